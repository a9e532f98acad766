"""``CRCDLoss`` with a memory bank: per-sample negative draws (the reference) against one shared draw
per step (``share_negatives=True``), forward + backward of the whole module, side by side.

Configurations run interleaved in one process on one thread (round-robin, several rounds), on the
same features and indices; the figure is the median step. CRD (``anchored=False``, the demo's queue)
is the yardstick the demo's time budget is stated in.

    PYTHONPATH=$PWD python benchmarks/shared_bank.py
    PYTHONPATH=$PWD python benchmarks/shared_bank.py --batch 256 --anchors 8 --negatives 16 64 256 --out r.json
    PYTHONPATH=$PWD python benchmarks/shared_bank.py --device cuda --negatives 500 4096   # benchmarks/gpu.sh
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from crcd_plugin import CRCDLoss
from crcd_plugin.config import RelationConfig


def _configs(args: argparse.Namespace) -> dict[str, dict]:
    """name -> RelationConfig fields, plus ``negatives`` (and the bank's ``num_samples``)."""
    base = dict(embed_dim=args.dim, temperature=0.1, objective="infonce", on_nonfinite="skip", check_index=False)
    bank = dict(negatives="bank", num_samples=args.num_samples, num_anchors=args.anchors)
    configs = {
        "crd (queue 1024, K 64, one-sided)": dict(
            base, negatives="queue", queue_size=1024, num_negatives=64, anchored=False, symmetric=False
        )
    }
    for k in args.negatives:
        for symmetric in (True, False):
            side = "symmetric" if symmetric else "one-sided"
            for share in (False, True):
                name = f"crcd bank K {k} {side} {'shared' if share else 'per-sample'}"
                configs[name] = dict(base, **bank, num_negatives=k, symmetric=symmetric, share_negatives=share)
    return configs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--anchors", type=int, default=8)
    p.add_argument("--dim", type=int, default=64, help="embedding size d")
    p.add_argument("--negatives", type=int, nargs="+", default=[16, 64])
    p.add_argument("--num-samples", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration per round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    student_dim, teacher_dim = 100, 160  # the demo's student and teacher features
    features = (
        torch.randn(args.num_samples, student_dim, device=device),
        torch.randn(args.num_samples, teacher_dim, device=device),
    )
    losses = {}
    for name, config in _configs(args).items():
        torch.manual_seed(0)
        config = dict(config)
        source = dict(negatives=config.pop("negatives"), num_samples=config.pop("num_samples", None))
        losses[name] = CRCDLoss(student_dim, teacher_dim, RelationConfig(**config), **source).to(device)
    times: dict[str, list[float]] = {name: [] for name in losses}
    gen = torch.Generator().manual_seed(0)

    def step(loss: CRCDLoss) -> float:
        index = torch.randperm(args.num_samples, generator=gen)[: args.batch].to(device)
        student = features[0][index].clone().requires_grad_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss(student, features[1][index], index=index).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for loss in losses.values():  # every bank row written once before timing: the steady state
        for _ in range(args.num_samples // args.batch + 1):
            step(loss)
    for _ in range(args.rounds):
        for name, loss in losses.items():
            times[name] += [step(loss) for _ in range(args.steps)]
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    crd = next(iter(medians.values()))
    where = "one CPU thread" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"B {args.batch}, A {args.anchors}, d {args.dim}, {where}; median ms per forward + backward")
    for name, ms in medians.items():
        print(f"{name:48s} {ms:7.2f} ms  {ms / crd:5.2f}x crd")
    if args.out:
        result = {
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "median_ms": medians,
            "machine": platform.platform(),
            "device": where,
            "processor": platform.processor(),
            "torch": torch.__version__,
            "date": date.today().isoformat(),
            "command": "python benchmarks/shared_bank.py "
            + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items()
                if k != "out"
            ),
        }
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
