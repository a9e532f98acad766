"""Live teacher against a teacher cache: step time and peak memory, side by side in one run.

KD + CRCD + gradient element (the memory bank, the library's defaults otherwise), CIFAR-100-sized
inputs, resnet32x4 teacher -> resnet8x4 student (``examples/cifar100/models.py``), batch 64, CPU.
The models are freshly initialised and the images random: the work per step is what a real run
does, and the script needs no download. Each measurement is its own process, so that its peak
memory (``ru_maxrss``) is its own; the cache side never builds the teacher. Live and cache
processes alternate over the rounds, so that load from other jobs hits both alike.

    python benchmarks/teacher_cache.py --out benchmarks/results/teacher_cache_cpu.json

Prints: the cache's build time and size on disk, the median step time and peak RSS of each side,
their ratios, and whether the first step's losses of both sides are equal (the cache is exact for a
deterministic teacher: eval mode, no augmentation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _models():
    sys.path.insert(0, str(ROOT / "examples" / "cifar100"))
    import models  # examples/cifar100/models.py

    return models


def _data(num_samples: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (num_samples,), generator=g)
    return x, y


def _batches(x, y, batch_size: int, order_seed: int):
    import torch

    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(order_seed))
    for start in range(0, len(y) - batch_size + 1, batch_size):
        index = perm[start:start + batch_size]
        yield x[index], y[index], index


def _teacher():
    import torch

    torch.manual_seed(0)
    return _models().create_model("resnet32x4").eval()


def build(args) -> dict:
    import torch

    from crcd_plugin import TeacherCache

    torch.set_num_threads(args.threads)
    x, y = _data(args.samples)
    teacher = _teacher()
    loader = [(x[i:i + args.batch], y[i:i + args.batch], torch.arange(i, min(i + args.batch, len(y))))
              for i in range(0, len(y), args.batch)]
    start = time.perf_counter()
    TeacherCache.build(args.cache, teacher, loader, "fc", num_samples=args.samples, dtype=getattr(torch, args.dtype))
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in Path(args.cache).rglob("*") if f.is_file())
    return {"build_s": seconds, "size_bytes": size, "samples": args.samples, "dtype": args.dtype}


def step(args) -> dict:
    import torch

    from crcd_plugin import CRCDConfig, CRCDDistiller, TeacherCache

    torch.set_num_threads(args.threads)
    x, y = _data(args.samples)
    torch.manual_seed(1)
    student = _models().create_model("resnet8x4")
    teacher = _teacher() if args.side == "live" else TeacherCache.open(args.cache, num_samples=args.samples)
    torch.manual_seed(2)
    distiller = CRCDDistiller(student, teacher, "fc", "fc", CRCDConfig(gradient_element=True),
                              num_samples=args.samples)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    distiller.train()
    times, first = [], None
    batches = _batches(x, y, args.batch, order_seed=3)
    for i in range(args.warmup + args.steps):
        xb, yb, index = next(batches)
        start = time.perf_counter()
        out = distiller(xb, yb, index)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if first is None:
            first = {k: float(v) for k, v in out.items() if k != "logits"}
        if i >= args.warmup:
            times.append(elapsed)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"side": args.side, "step_s": times, "peak_rss_mib": peak_kib / 1024, "first_losses": first}


def _worker(mode: str, args, **extra) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--cache", str(args.cache),
           "--samples", str(args.samples), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--dtype", args.dtype]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1280, help="dataset size N (rows of the cache)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="live/cache process pairs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=("build", "step"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--side", choices=("live", "cache"), default="live", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "build":
        print(json.dumps(build(args)))
        return
    if args.worker == "step":
        print(json.dumps(step(args)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="crcd-teacher-cache-"))
    args.cache = workdir / "cache"
    try:
        built = _worker("build", args)
        runs: dict = {"live": [], "cache": []}
        for r in range(args.rounds):
            for side in (("live", "cache") if r % 2 == 0 else ("cache", "live")):
                runs[side].append(_worker("step", args, side=side))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {}
    for side, results in runs.items():
        steps = [t for result in results for t in result["step_s"]]
        summary[side] = {"median_step_s": statistics.median(steps), "min_step_s": min(steps),
                         "peak_rss_mib": max(result["peak_rss_mib"] for result in results)}
    ratio = summary["cache"]["median_step_s"] / summary["live"]["median_step_s"]
    memory = summary["cache"]["peak_rss_mib"] / summary["live"]["peak_rss_mib"]
    same = runs["live"][0]["first_losses"] == runs["cache"][0]["first_losses"]
    print(f"build: {built['build_s']:.1f} s for {args.samples} samples, {built['size_bytes'] / 2**20:.2f} MiB "
          f"({args.dtype}, {built['size_bytes'] / args.samples / 1024:.2f} KiB per sample)")
    for side in ("live", "cache"):
        s = summary[side]
        print(f"{side:5s}  step {s['median_step_s'] * 1e3:7.1f} ms (min {s['min_step_s'] * 1e3:.1f})  "
              f"peak RSS {s['peak_rss_mib']:.0f} MiB")
    print(f"cache/live: step time {ratio:.2f}x, peak memory {memory:.2f}x; first-step losses equal: {same}")
    if args.out:
        import torch

        args.out.write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                       f"{args.threads} thread(s) per process",
            "setting": "KD + CRCD + gradient element, memory bank, resnet32x4 -> resnet8x4, CIFAR-sized random "
                       f"inputs, batch {args.batch}",
            "build": built, "summary": summary, "cache_over_live_step": ratio, "cache_over_live_peak_rss": memory,
            "first_step_losses_equal": same, "runs": runs,
        }, indent=1))


if __name__ == "__main__":
    main()
