"""Soak run: many steps of feature capture + CRCD on a tiny model; does memory grow?

Runs ``CRCDDistiller`` (hooks on both heads, KD, CRCD feature and gradient elements, every other
setting at its default) for ``--steps`` training steps on a tiny MLP and reports the process RSS
after the first step and at the end. Growth beyond a few MB would mean a leak (hooks left
registered, captured tensors or graphs kept alive, state that grows per step).

    python benchmarks/soak.py                        # 5,000 steps, about 3-5 minutes on 2 CPU cores
    python benchmarks/soak.py --steps 200 --negatives bank
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from crcd_plugin import CRCDDistiller

IN_DIM, CLASSES, BATCH, SAMPLES = 32, 10, 32, 2048


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN_DIM, width), nn.BatchNorm1d(width), nn.ReLU())
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def soak(steps: int, negatives: str, report_every: int = 1000) -> Dict[str, Any]:
    torch.manual_seed(0)
    extra: Dict[str, Any] = {"num_samples": SAMPLES} if negatives == "bank" else {}
    if negatives == "queue":
        extra = {"queue_size": 1024}
    distiller = CRCDDistiller(Net(16), Net(64), gradient_element=True, **extra)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    x_all = torch.randn(SAMPLES, IN_DIM, generator=data)
    y_all = torch.randint(0, CLASSES, (SAMPLES,), generator=data)
    trace = []
    start_rss = None
    start = time.perf_counter()
    loss = torch.zeros(())
    for step in range(1, steps + 1):
        index = torch.randint(0, SAMPLES, (BATCH,), generator=data)
        out = distiller(x_all[index], y_all[index], index if negatives == "bank" else None)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        loss = out["loss"].detach()
        if step == 1:
            start_rss = rss_mib()
        if step % report_every == 0 or step == steps:
            trace.append({"step": step, "rss_mib": rss_mib(), "seconds": time.perf_counter() - start})
    end_rss = rss_mib()
    return {
        "steps": steps,
        "negatives": negatives,
        "rss_after_first_step_mib": start_rss,
        "rss_end_mib": end_rss,
        "growth_mib": end_rss - start_rss,
        "seconds": time.perf_counter() - start,
        "final_loss": float(loss),
        "finite": bool(torch.isfinite(loss)),
        "trace": trace,
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--negatives", choices=("batch", "queue", "bank"), default="batch",
                        help="batch: the distiller's default (no index); bank passes dataset indices")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = soak(args.steps, args.negatives, report_every=max(1, args.steps // 5))
    for row in result["trace"]:
        print(f"step {row['step']:6d}  RSS {row['rss_mib']:8.1f} MiB  {row['seconds']:7.1f} s", flush=True)
    print(f"{result['steps']} steps ({result['negatives']} negatives): RSS {result['rss_after_first_step_mib']:.1f} "
          f"-> {result['rss_end_mib']:.1f} MiB (growth {result['growth_mib']:+.1f} MiB), "
          f"{result['seconds']:.0f} s, final loss {result['final_loss']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
