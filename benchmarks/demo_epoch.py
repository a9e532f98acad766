"""Per-epoch time of each demo method (the library's default config), measured side by side.

The methods run interleaved (round-robin, a few epochs each, several rounds) in one process on one
thread, so that load from other processes hits all of them alike; the figure is the median epoch.
``--profile METHOD`` prints the torch.profiler table of one epoch of that method instead.

    PYTHONPATH=$PWD python benchmarks/demo_epoch.py --rounds 3
    PYTHONPATH=$PWD python benchmarks/demo_epoch.py --profile crcd_grad
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from crcd_plugin.demo import config
from crcd_plugin.demo.experiment import prepare
from crcd_plugin.demo.train import train_student


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="ce,kd,crd,crcd,crcd_grad")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="epochs per method per round")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/crcdcache_demo"))
    p.add_argument("--profile", default=None, help="profile one epoch of this method instead")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    data, teacher = prepare(config.DEFAULT_DATA["mnist1d"], config.DEFAULT_TEACHER, args.cache_dir, progress=False)
    demo_config = config.DEMO_CONFIG
    if args.profile:
        train = dataclasses.replace(config.DEFAULT_TRAIN, epochs=1)
        train_student(args.profile, data, teacher, train, demo_config, seed=0)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            train_student(args.profile, data, teacher, train, demo_config, seed=0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        return
    train = dataclasses.replace(config.DEFAULT_TRAIN, epochs=args.epochs)
    methods = [m.strip() for m in args.methods.split(",")]
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods:
            times[m] += train_student(m, data, teacher, train, demo_config, seed=r).epoch_times
    med = {m: statistics.median(t) for m, t in times.items()}
    for m in methods:
        ratio = f"  {med[m] / med['crd']:.2f}x crd" if "crd" in med else ""
        print(f"{m:10s} {med[m]:.3f} s/epoch (min {min(times[m]):.3f}){ratio}")
    if args.out:
        args.out.write_text(json.dumps({"median_s": med, "epoch_times": times, "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
