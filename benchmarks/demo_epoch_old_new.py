"""The demo epoch, 0.2.0 against this tree, side by side in one run (same settings on both sides).

0.2.0's demo drove ``CRCDLoss`` and the gradient helpers itself; this release's demo trains through
``CRCDDistiller``. This script times one demo epoch (MNIST-1D, 4000 samples, batch 256, the demo's
MLP student, precomputed teacher) of each method with **0.2.0's demo settings** on both sides, so
that the only difference is the code path. Workers alternate (old, new, old, new, ...) as separate
processes on one thread, so that load from other jobs hits both alike; the figure is the median
epoch and the ratio of medians.

    git worktree add /tmp/crcd-020 61c9035          # the 0.2.0 tree
    python benchmarks/demo_epoch_old_new.py --old /tmp/crcd-020 --rounds 4 \\
        --out benchmarks/results/demo_epoch_old_new_cpu.json

The new side maps 0.2.0's demo settings onto ``CRCDConfig``: weights, temperatures, in-batch
negatives, 2 anchors, d 32, one side, no gradient rescaling (0.2.0 had none) and the value checks
off (0.2.0's demo turned them off). 0.2.0's ``distill_until`` only acts after 80% of the 40 epochs,
so a 3-epoch window distils throughout on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# 0.2.0's demo settings (crcd_plugin/demo/config.py at 61c9035), per method.
OLD_SETTINGS = {
    "kd": dict(gamma=0.1, alpha=0.9, kd_temperature=8.0),
    "crd": dict(gamma=0.1, alpha=0.9, kd_temperature=8.0, beta=3.0, temperature=0.2, negatives="batch",
                symmetric=False),
    "crcd": dict(gamma=0.1, alpha=0.9, kd_temperature=8.0, beta=1.0, embed_dim=32, num_anchors=2,
                 negatives="batch", symmetric=False),
    "crcd_grad": dict(gamma=0.1, alpha=0.9, kd_temperature=8.0, beta=1.0, beta_grad=0.3, embed_dim=32,
                      num_anchors=2, negatives="batch", symmetric=False),
}


def _new_config(method: str):
    from crcd_plugin import CRCDConfig, RelationConfig

    s = {"beta": 0.5, "beta_grad": 0.5, "temperature": 0.1, "embed_dim": 64, "num_anchors": 8,
         "symmetric": True, **OLD_SETTINGS[method]}
    relation = RelationConfig(
        embed_dim=s["embed_dim"], num_anchors=s["num_anchors"], temperature=s["temperature"],
        objective="infonce", negatives="batch", symmetric=s["symmetric"],
        on_nonfinite="skip", check_index=False,
    )
    return CRCDConfig(
        task_weight=s["gamma"], kd_weight=s["alpha"], kd_temperature=s["kd_temperature"],
        feature_weight=s["beta"], gradient_weight=s["beta_grad"], gradient_normalization="none",
        relation=relation,
    )


def worker(methods: list[str], epochs: int, cache_dir: Path) -> None:
    """Time ``epochs`` epochs of each method in this process's tree; print JSON epoch times."""
    import dataclasses

    import torch

    from crcd_plugin.demo import config
    from crcd_plugin.demo import train as demo_train
    from crcd_plugin.demo.experiment import prepare

    torch.set_num_threads(1)
    data, teacher = prepare(config.DEFAULT_DATA["mnist1d"], config.DEFAULT_TEACHER, cache_dir, progress=False)
    train = dataclasses.replace(config.DEFAULT_TRAIN, epochs=epochs)
    new = hasattr(demo_train, "method_config")
    times = {}
    for method in methods:
        if new:
            base = _new_config(method)
            settings = base
        else:
            settings = config.MethodSettings(**OLD_SETTINGS[method])
        result = demo_train.train_student(method, data, teacher, train, settings, seed=0)
        times[method] = result.epoch_times
    print(json.dumps({"tree": "new" if new else "old", "times": times}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, help="a checkout of 0.2.0 (commit 61c9035)")
    p.add_argument("--methods", default="kd,crd,crcd,crcd_grad")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3, help="epochs per method per worker")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",")]
    if args.worker:
        worker(methods, args.epochs, args.cache_dir)
        return
    if args.old is None:
        p.error("--old PATH (a checkout of 0.2.0) is required")
    new_root = Path(__file__).resolve().parents[1]
    trees = {"old": args.old.resolve(), "new": new_root}
    times: dict[str, dict[str, list[float]]] = {side: {m: [] for m in methods} for side in trees}
    for r in range(args.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            env = dict(os.environ, PYTHONPATH=str(trees[side]), OMP_NUM_THREADS="1")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--methods", args.methods,
                   "--epochs", str(args.epochs), "--cache-dir", f"/tmp/crcd_demo_epoch_{side}"]
            out = subprocess.run(cmd, env=env, cwd=trees[side], capture_output=True, text=True, check=True)
            record = json.loads(out.stdout.strip().splitlines()[-1])
            if record["tree"] != side:
                raise RuntimeError(f"the {side} worker imported the {record['tree']} tree; check PYTHONPATH")
            for m in methods:
                times[side][m] += record["times"][m]
    summary = {}
    for m in methods:
        old, new = statistics.median(times["old"][m]), statistics.median(times["new"][m])
        summary[m] = {"old_s": old, "new_s": new, "new_over_old": new / old}
        print(f"{m:10s} old {old * 1e3:7.1f} ms  new {new * 1e3:7.1f} ms  new/old {new / old:.2f}")
    if args.out:
        import torch

        args.out.write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, one thread per worker",
            "torch": torch.__version__,
            "old": "0.2.0 (61c9035)", "rounds": args.rounds, "epochs_per_worker": args.epochs,
            "summary": summary, "epoch_times": times,
        }, indent=1))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
