"""Does adding the CRCD terms destabilise a loop where CE alone trains? A grid of loss settings.

The setting of issue 12: scikit-learn's digits (1797 8x8 images, shipped with the package, no
download), a tiny CNN student (8 channels, BatchNorm, ``fc`` head) distilled from a trained
24-channel teacher, batch 32, SGD lr 0.05 momentum 0.9 (and AdamW), ``CRCDDistiller`` with
queue negatives. For each row it reports the student's CE on the whole training set (eval mode)
at fixed steps, the largest student gradient norm, and the mean time of a training step.

    python benchmarks/stability.py                      # the grid, printed as a Markdown table
    python benchmarks/stability.py --rows reference default --steps 60 --json out.json
    python benchmarks/stability.py --optimizers sgd adamw --lrs 0.01 0.05 0.1 --rows default

A row is "stable" when the CE never rises above its value before training and ends below it.
CE is measured with BatchNorm on the whole set's batch statistics (see ``train_ce``).
Timings are for the machine at hand (shared CPUs are noisy): compare rows of one run only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin.distiller import CRCDDistiller

# Rows: distiller keyword arguments. "default" is whatever the library's defaults are now
# (in-batch negatives, InfoNCE); "reference" the authors' settings through preset="reference"
# (index-free: a queue of 4096 with K = 500 and NCE); "old_default" the distiller's first default
# (a queue of 4096, all 4096 rows as negatives, NCE). ``bank_*`` rows pass dataset indices.
Q = {"queue_size": 4096}
ROWS: Dict[str, Dict[str, Any]] = {
    "ce_only": {"alpha": 0.0, "beta": 0.0},
    "kd_only": {"beta": 0.0},
    "default": {},
    "reference": {"preset": "reference"},
    "old_default": {**Q, "crcd_options": {"objective": "nce", "num_negatives": 4096, "num_anchors": None}},
    "queue_infonce_k4096": {**Q, "crcd_options": {"objective": "infonce", "num_negatives": 4096}},
    "queue_nce_k500": {**Q, "crcd_options": {"objective": "nce"}},
    "queue_nce_k500_warmup": {**Q, "crcd_options": {"objective": "nce"}, "warmup_steps": 100},
    "queue_nce_k500_mask": {**Q, "crcd_options": {"objective": "nce", "self_anchor": "mask"}},
    "queue_infonce_k500": {**Q, "crcd_options": {"objective": "infonce"}},
    "queue_nce_q1024_k500": {"queue_size": 1024, "crcd_options": {"objective": "nce"}},
    "batch_nce": {"crcd_options": {"objective": "nce"}},
    "default_warmup": {"warmup_steps": 100},
    "default_mask": {"crcd_options": {"self_anchor": "mask"}},
    "bank_reference": {"preset": "reference", "num_samples": 1797},
    "bank_default": {"num_samples": 1797},
    "bank_infonce": {"num_samples": 1797, "crcd_options": {"objective": "infonce"}},
}
DEFAULT_ROWS = ("ce_only", "kd_only", "default", "reference", "old_default")
CHECKPOINTS = (0, 20, 40, 60, 90, 120)


class TinyCNN(nn.Module):
    """Two 3x3 convolutions with BatchNorm, global average pooling, an ``fc`` head."""

    def __init__(self, channels: int, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, stride=2), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
    return (x - 0.3) / 0.4, torch.tensor(data.target)


def train_teacher(x: torch.Tensor, y: torch.Tensor, steps: int = 300, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    teacher = TinyCNN(24)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.01)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,))
        loss = F.cross_entropy(teacher(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return teacher.eval()


@torch.no_grad()
def train_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """CE on the whole training set as the optimiser sees it: BatchNorm on batch statistics (train
    mode), on a copy so that the running statistics do not move. Eval-mode CE would mostly measure
    how far BatchNorm's running averages lag behind a fast-changing network."""
    probe = copy.deepcopy(model).train()
    return F.cross_entropy(probe(x), y).item()


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr)


def run_row(
    options: Dict[str, Any], teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
    optimizer_name: str = "sgd", lr: float = 0.05, steps: int = 60, batch_size: int = 32, seed: int = 0,
    checkpoints: Sequence[int] = CHECKPOINTS,
) -> Dict[str, Any]:
    """Train a fresh student (same initialisation and batch order for every row) and record CE."""
    torch.manual_seed(seed)
    student = TinyCNN(8)
    distiller = CRCDDistiller(student, teacher, **options)
    optimizer = make_optimizer(optimizer_name, distiller.parameters(), lr)
    batches = torch.Generator().manual_seed(seed + 1)
    ce = {0: train_ce(student, x, y)}
    grad_norms: List[float] = []
    times: List[float] = []
    crcd_losses: List[float] = []
    distiller.train()
    for step in range(1, steps + 1):
        idx = torch.randperm(x.shape[0], generator=batches)[:batch_size]
        start = time.perf_counter()
        out = distiller(x[idx], y[idx], idx if "num_samples" in options else None)
        optimizer.zero_grad()
        out["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(student.parameters(), float("inf"))
        optimizer.step()
        times.append(time.perf_counter() - start)
        grad_norms.append(float(norm))
        crcd_losses.append(float(out["crcd_feature_loss"].detach()))
        if step in checkpoints:
            ce[step] = train_ce(student, x, y)
    values = [ce[s] for s in sorted(ce)]
    finite = all(v == v and v < float("inf") for v in values)
    return {
        "ce": ce,
        # Largest rise of the CE above its lowest earlier value: how far training was thrown back.
        "rebound": max(v - min(values[: i + 1]) for i, v in enumerate(values)),
        "max_grad_norm": max(grad_norms),
        "max_crcd_loss": max(crcd_losses),
        "step_ms": 1000 * statistics.median(times),
        "stable": finite and max(values[1:]) <= values[0] and values[-1] < values[0],
    }


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=sorted(ROWS))
    parser.add_argument("--optimizers", nargs="+", default=["sgd"], choices=("sgd", "adamw"))
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help="learning rates (default: 0.05 for SGD, 0.003 for AdamW)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = digits()
    teacher = train_teacher(x, y)
    print(f"teacher CE {train_ce(teacher, x, y):.3f} on the training set", file=sys.stderr)
    checkpoints = sorted({s for s in (*CHECKPOINTS, args.steps) if s <= args.steps})
    results = []
    header = " | ".join(f"CE@{s}" for s in checkpoints)
    print(f"| row | optimizer | lr | seed | {header} | rebound | max grad norm | max CRCD loss | step ms | stable |")
    print("|---|---|---|---|" + "---|" * len(checkpoints) + "---|---|---|---|---|")
    for optimizer_name in args.optimizers:
        lrs = args.lrs or ([0.05] if optimizer_name == "sgd" else [0.003])
        for lr in lrs:
            for seed in args.seeds:
                for row in args.rows:
                    result = run_row(ROWS[row], teacher, x, y, optimizer_name=optimizer_name, lr=lr,
                                     steps=args.steps, seed=seed, checkpoints=checkpoints)
                    result.update(row=row, optimizer=optimizer_name, lr=lr, seed=seed)
                    results.append(result)
                    ces = " | ".join(f"{result['ce'][s]:.2f}" for s in checkpoints)
                    print(f"| {row} | {optimizer_name} | {lr:g} | {seed} | {ces} | {result['rebound']:.2f} "
                          f"| {result['max_grad_norm']:.1f} "
                          f"| {result['max_crcd_loss']:.1f} | {result['step_ms']:.0f} | "
                          f"{'yes' if result['stable'] else 'NO'} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": args.threads,
                       "results": results}, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
