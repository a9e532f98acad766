"""Time CRCDLoss (heads, sources of negatives, kernels, writes) forward + backward in training mode.

Uses only the keywords 0.2.0 also takes, so the same file times an old checkout against this one
(run it with each tree first on PYTHONPATH); prints the median step time per source of negatives.

    python benchmarks/loss_module.py --threads 1 --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from crcd_plugin import CRCDLoss

SOURCES = {
    "bank": dict(negatives="bank", num_samples=5000, num_negatives=500),
    "bank-shared": dict(negatives="bank", num_samples=5000, num_negatives=500, share_negatives=True),
    "queue": dict(negatives="queue", queue_size=4096, num_negatives=500),
    "batch": dict(negatives="batch"),
}


def time_source(name: str, batch: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    with warnings.catch_warnings():  # this checkout may deprecate the 0.2.0 keywords
        warnings.simplefilter("ignore", DeprecationWarning)
        crcd = CRCDLoss(256, 512, embed_dim=128, objective="nce", **SOURCES[name])
    student, teacher = torch.randn(batch, 256, requires_grad=True), torch.randn(batch, 512)
    times = []
    for _ in range(warmup + steps):
        index = torch.randint(0, 5000, (batch,)) if name.startswith("bank") else None
        start = time.perf_counter()
        crcd(student, teacher, index).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.sources:
        print(f"{name}: {time_source(name, args.batch, args.steps, args.warmup):.2f} ms/step")


if __name__ == "__main__":
    main()
