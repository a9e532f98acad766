"""A distiller step with a live teacher and with a teacher cache: an older tree against this one.

The teacher side became a type (``crcd_plugin.teacher``) without changing what a step computes;
this checks that it costs nothing. Each worker is its own process on one thread, importing
``crcd_plugin`` from the tree it is given; old and new workers alternate over the rounds, so that
load from other jobs hits both alike. The figure is the median step (over rounds x steps) and the
ratio of medians; the first step's losses of both trees are compared too (same seed, same batches).

Setup: KD + CRCD + gradient element, memory bank (the library's defaults otherwise), an MLP
teacher (3072 -> 1024 -> 100) and student (3072 -> 256 -> 100), batch 128, 4,096 samples, CPU.

    git worktree add /tmp/crcd-old 4682b82     # the tree to compare against
    python benchmarks/teacher_side_old_new.py --old /tmp/crcd-old --rounds 3 \\
        --out benchmarks/results/teacher_side_old_new_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N, BATCH, IN_DIM, CLASSES = 4096, 128, 3072, 100


def _worker(side: str, cache_dir: str, steps: int) -> dict:
    import torch
    from torch import nn

    from crcd_plugin import CRCDConfig, CRCDDistiller, TeacherCache

    torch.set_num_threads(1)

    def mlp(width: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(IN_DIM, width), nn.ReLU(), nn.Linear(width, CLASSES)).eval()

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, IN_DIM, generator=g), torch.randint(0, CLASSES, (N,), generator=g)
    teacher = mlp(1024, 1)
    source = teacher
    if side == "cache":
        loader = [(x[i:i + 512], y[i:i + 512], torch.arange(i, min(i + 512, N))) for i in range(0, N, 512)]
        source = TeacherCache.build(Path(cache_dir) / "cache", teacher, loader, "2", num_samples=N)
    torch.manual_seed(2)
    distiller = CRCDDistiller(mlp(256, 3).train(), source, "2", "2", CRCDConfig(gradient_element=True),
                              num_samples=N)
    optimizer = torch.optim.SGD(distiller.trainable_module.parameters(), lr=0.01)
    order = torch.Generator().manual_seed(4)
    times, first = [], None
    for step in range(steps + 2):  # two warm-up steps
        index = torch.randperm(N, generator=order)[:BATCH]
        torch.manual_seed(100 + step)
        start = time.perf_counter()
        out = distiller(x[index], y[index], index)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if first is None:
            first = {k: float(v).hex() for k, v in out.items() if k != "logits"}
        if step >= 2:
            times.append(elapsed)
    return {"times": times, "first_losses": first}


def _run(tree: str, side: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
        result = subprocess.run(
            [sys.executable, __file__, "--worker", side, "--cache-dir", scratch, "--steps", str(steps)],
            env=env, check=True, capture_output=True, text=True, cwd=scratch,
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", help="root of the tree to compare against (holds crcd_plugin/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=["live", "cache"], help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.cache_dir, args.steps)))
        return
    if not args.old:
        parser.error("--old is required")
    trees = {"old": str(Path(args.old).resolve()), "new": str(ROOT)}
    samples = {(tree, side): [] for tree in trees for side in ("live", "cache")}
    first = {}
    for _ in range(args.rounds):
        for side in ("live", "cache"):
            for tree, path in trees.items():
                result = _run(path, side, args.steps)
                samples[(tree, side)].extend(result["times"])
                first[(tree, side)] = result["first_losses"]
    report = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
              "setup": {"N": N, "batch": BATCH, "rounds": args.rounds, "steps": args.steps}, "sides": {}}
    for side in ("live", "cache"):
        old, new = (statistics.median(samples[(tree, side)]) * 1e3 for tree in trees)
        report["sides"][side] = {
            "old_ms": round(old, 2), "new_ms": round(new, 2), "new_over_old": round(new / old, 3),
            "first_step_losses_equal": first[("old", side)] == first[("new", side)],
        }
        print(f"{side:5s}  old {old:8.2f} ms  new {new:8.2f} ms  new/old {new / old:.3f}  "
              f"first-step losses equal: {report['sides'][side]['first_step_losses_equal']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
