"""Wall time of the test suite: the quick subset (``-m "not slow"``) and everything (what CI runs).

    python benchmarks/suite_duration.py                  # both, one after the other
    python benchmarks/suite_duration.py --which quick

Writes benchmarks/results/suite_duration_cpu.json with each run's wall time, exit status,
pytest's summary line and failed tests. (Its first figures, 2026-12-07, ran without the venv's bin
folder on PATH: the two launcher examples and the ruff test failed at once; run alone they took
0.9 min more.) Figures depend on the machine and on what else runs on it: say which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The README's commands, as a reader types them.
RUNS = {
    "quick": [sys.executable, "-m", "pytest", "-m", "not slow"],
    "full": [sys.executable, "-m", "pytest"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--which", choices=[*RUNS, "both"], default="both")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "suite_duration_cpu.json")
    args = parser.parse_args()
    names = list(RUNS) if args.which == "both" else [args.which]
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in names:
        start = time.time()
        # As in an activated venv: the tests launch torchrun, accelerate and ruff from its bin folder.
        env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        result = subprocess.run(RUNS[name], cwd=ROOT, capture_output=True, text=True, env=env)
        wall = time.time() - start
        summary = [line for line in result.stdout.splitlines() if line.strip()][-1:]
        results[name] = {
            "command": " ".join(["python", *RUNS[name][1:]]),
            "wall_s": round(wall, 1),
            "returncode": result.returncode,
            "summary": summary[0] if summary else "",
            "failed": [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))],
            "load_average_after": os.getloadavg(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        print(f"{name}: {wall / 60:.1f} min, exit {result.returncode}, {results[name]['summary']}", flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
