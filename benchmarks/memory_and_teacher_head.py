"""Side by side on MNIST-1D: memory start (cold vs first write) and, with ``symmetric=False``,
whether the student-side loss should train the teacher embedding head (``teacher_head_grad``).

One teacher (a strided 1-D CNN whose feature is the flattened conv map, the kind of teacher that
gives a relational gain here) is trained once; its features and logits are precomputed. Each
student (an MLP) trains with CE + KD + the library's ``CRCDLoss`` on the bank, with paired seeds:
the same initialisation and data order for every setting of a seed. Reports the test accuracy
of each setting and its gain over KD in points (mean +- std over seeds of the paired difference).

    python benchmarks/memory_and_teacher_head.py --json benchmarks/results/memory_cpu.json

About 80 s of CPU time on one thread (3.5 to 7 minutes of wall time on the shared 2-core VM);
``--epochs``, ``--seeds`` and ``--settings`` shorten it. The 40-epoch CRD figures in the docs:
``--epochs 40 --settings kd "crd cold" "crd first_write" "crd first_write teacher_head_grad"``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin import CRCDLoss
from crcd_plugin.config import RelationConfig
from crcd_plugin.demo.data import DataConfig, load_dataset
from crcd_plugin.functional import kd_loss

# name -> RelationConfig fields on top of the shared ones (None: KD alone)
SETTINGS: Dict[str, dict] = {
    "kd": None,
    "crd cold": dict(anchored=False, memory_init="cold"),
    "crd first_write": dict(anchored=False),
    "crd first_write teacher_head_grad": dict(anchored=False, train_teacher_embedding=True),
    "crcd cold": dict(memory_init="cold"),
    "crcd first_write": dict(),
    "crcd first_write teacher_head_grad": dict(train_teacher_embedding=True),
}
# Relation-loss settings of the demo's tuning run (docs/demo.md); symmetric=False throughout.
SHARED = dict(embed_dim=64, temperature=0.1, objective="infonce", symmetric=False)
CRD = dict(num_negatives=256, beta=1.0)
CRCD = dict(num_negatives=16, num_anchors=8, beta=0.3)


class StridedTeacher(nn.Module):
    """Two strided convolutions; the feature is the flattened conv map ``[B, 64 * 10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(1, 32, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 10, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x[:, None, :])


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU())
        self.fc = nn.Linear(100, 10)


def batches(n: int, size: int, generator: torch.Generator) -> List[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    return [perm[i : i + size] for i in range(0, n - size // 2, size)]


def train_teacher(x: torch.Tensor, y: torch.Tensor, epochs: int) -> StridedTeacher:
    torch.manual_seed(0)
    teacher = StridedTeacher()
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    steps = epochs * len(batches(len(y), 100, torch.Generator()))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    for _ in range(epochs):
        for idx in batches(len(y), 100, gen):
            loss = F.cross_entropy(teacher.fc(teacher.features(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return teacher.eval().requires_grad_(False)


def train_student(setting: str, data, teacher_feat, teacher_logits, seed: int, epochs: int) -> float:
    torch.manual_seed(seed)
    student = Student()
    options = SETTINGS[setting]
    crcd, beta = None, 0.0
    if options is not None:
        extra = dict(CRD if options.get("anchored") is False else CRCD)
        beta = extra.pop("beta")
        torch.manual_seed(seed + 7919)
        config = RelationConfig(**SHARED, **extra, **options)
        crcd = CRCDLoss(100, teacher_feat.shape[1], config, num_samples=len(data.y_train))
    params = list(student.parameters()) + ([] if crcd is None else list(crcd.parameters()))
    opt = torch.optim.AdamW(params, lr=0.02, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed)
    steps = epochs * len(batches(len(data.y_train), 256, torch.Generator()))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(epochs):
        for idx in batches(len(data.y_train), 256, order):
            feat = student.body(data.x_train[idx])
            logits = student.fc(feat)
            loss = F.cross_entropy(logits, data.y_train[idx]) + 2.0 * kd_loss(logits, teacher_logits[idx], 8.0)
            if crcd is not None:
                loss = loss + beta * crcd(feat, teacher_feat[idx], index=idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (student.fc(student.body(data.x_test)).argmax(1) == data.y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="cache the generated MNIST-1D arrays here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = ["kd"] + [s for s in args.settings if s != "kd"]

    start = time.perf_counter()
    data = load_dataset(DataConfig(name="mnist1d", num_train=4000, num_test=1000, seed=42), cache_dir=args.cache_dir)
    teacher = train_teacher(data.x_train, data.y_train, args.teacher_epochs)
    with torch.no_grad():
        teacher_feat = teacher.features(data.x_train)
        teacher_logits = teacher.fc(teacher_feat)
        teacher_acc = (teacher.fc(teacher.features(data.x_test)).argmax(1) == data.y_test).float().mean().item()
    print(f"teacher test accuracy {teacher_acc:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)

    acc: Dict[str, List[float]] = {s: [] for s in settings}
    for seed in range(args.seeds):
        for setting in settings:  # interleaved, so that load on the shared machine hits all alike
            acc[setting].append(train_student(setting, data, teacher_feat, teacher_logits, seed, args.epochs))
    rows = {}
    print(f"\n{'setting':40s} {'accuracy':>16s} {'gain over KD (points)':>24s}")
    for setting in settings:
        gains = [100 * (a - k) for a, k in zip(acc[setting], acc["kd"])]
        rows[setting] = {
            "acc": acc[setting],
            "acc_mean": statistics.mean(acc[setting]),
            "gain_mean": statistics.mean(gains),
            "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
        }
        r = rows[setting]
        gain = "" if setting == "kd" else f"{r['gain_mean']:+.1f} +- {r['gain_std']:.1f}"
        print(f"{setting:40s} {100 * r['acc_mean']:15.1f}% {gain:>24s}")
    paired = {}
    print(f"\n{'paired difference (points)':60s}")
    for loss in ("crd", "crcd"):
        cold, first, grad = f"{loss} cold", f"{loss} first_write", f"{loss} first_write teacher_head_grad"
        for a, b in ((first, cold), (grad, first)):
            if a in acc and b in acc:
                diff = [100 * (x - y) for x, y in zip(acc[a], acc[b])]
                std = statistics.stdev(diff) if len(diff) > 1 else 0.0
                paired[f"{a} - {b}"] = {"mean": statistics.mean(diff), "std": std}
                print(f"{a + ' - ' + b:72s} {statistics.mean(diff):+.1f} +- {std:.1f}")
    elapsed = time.perf_counter() - start
    print(f"\n{elapsed:.0f} s, torch {torch.__version__}, {platform.machine()}, {args.threads} threads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "teacher_acc": teacher_acc, "rows": rows, "paired": paired, "seconds": elapsed,
                 "torch": torch.__version__, "machine": "2-vCPU x86-64 cloud VM, shared"},
                f, indent=1,
            )


if __name__ == "__main__":
    main()
