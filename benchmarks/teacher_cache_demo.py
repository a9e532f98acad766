"""What a teacher cache costs in accuracy under augmentation: `crcd-demo --augment`, live teacher
against `--teacher-cache`, paired seed by seed.

With augmentation the live teacher sees every random view the student sees; a cache holds one
fixed, un-augmented view per sample. Both runs use the same seeds, so each student starts from the
same weights and sees the same batches and the same random views; the difference per seed is the
price of the fixed view.

    python benchmarks/teacher_cache_demo.py --out /tmp/cache-demo          # runs both (a few minutes)
    python benchmarks/teacher_cache_demo.py --live A/results.json --cached B/results.json   # reads runs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path


def _run(out: Path, extra: list[str], methods: str, cache_dir: Path | None) -> Path:
    cmd = [sys.executable, "-m", "crcd_plugin.demo", "--augment", "--methods", methods, "--out", str(out),
           "--no-progress", *extra]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    subprocess.run(cmd, check=True)
    return out / "results.json"


def paired(live: dict, cached: dict) -> dict:
    """Per method: cached - live accuracy over the seeds both runs share (mean, SE, n)."""
    table = {}
    for method, row in cached["students"].items():
        if method not in live["students"]:
            continue
        by_seed = dict(zip(live["students"][method]["seeds"], live["students"][method]["accs"]))
        diffs = [acc - by_seed[seed] for seed, acc in zip(row["seeds"], row["accs"]) if seed in by_seed]
        if diffs:
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
            table[method] = {"live": live["students"][method]["mean"], "cached": row["mean"],
                             "diff": statistics.fmean(diffs), "se": se, "n": len(diffs)}
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("crcd-cache-demo"))
    p.add_argument("--methods", default="kd,crcd,crcd_grad")
    p.add_argument("--cache-dir", type=Path, default=None, help="the demo's data/teacher cache")
    p.add_argument("--live", type=Path, default=None, help="results.json of a `crcd-demo --augment` run")
    p.add_argument("--cached", type=Path, default=None, help="results.json of a `--augment --teacher-cache` run")
    args = p.parse_args()
    live_path = args.live or _run(args.out / "live", [], args.methods, args.cache_dir)
    cached_path = args.cached or _run(args.out / "cached", ["--teacher-cache"], args.methods, args.cache_dir)
    table = paired(json.loads(Path(live_path).read_text()), json.loads(Path(cached_path).read_text()))
    print("| method | live teacher | teacher cache | cache - live (points, mean +- SE) | seeds |")
    print("|---|---|---|---|---|")
    for method, row in table.items():
        print(f"| {method} | {row['live']:.4f} | {row['cached']:.4f} | "
              f"{100 * row['diff']:+.1f} +- {100 * row['se']:.1f} | {row['n']} |")


if __name__ == "__main__":
    main()
