"""Exit codes of the distributed examples, run many times as printed (2 CPU processes).

Each example is launched ``--runs`` times in a row, exactly as README.md and docs/distributed.md
print it, and every exit code is counted; a run also fails if it did not print its results. A
teardown abort (``terminate called without an active exception``, exit code 1 from the launcher
with SIGABRT in a rank) shows up as a non-zero count.

    python benchmarks/distributed_exits.py                 # 50 runs of each, about 30-60 minutes on 2 CPU cores
    python benchmarks/distributed_exits.py --runs 5 --only torchrun --json exits.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
COMMANDS: Dict[str, str] = {
    "torchrun": "torchrun --standalone --nproc_per_node 2 examples/ddp_train.py",
    "accelerate": (
        "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
        "--dynamo_backend no examples/accelerate_train.py"
    ),
    "fabric": "python examples/fabric_train.py --devices 2",
    "fsdp2": "torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py",
}
ABORT = "terminate called without an active exception"


def _abort_lines(stderr: str) -> str:
    keep = ("terminate", "Fatal Python error", "Thread 0x", "Current thread", "File \"", "SIGABRT", "TERMINATE")
    return "\n".join(line for line in stderr.splitlines() if any(k in line for k in keep))[-4000:]


def run_once(command: str, timeout: float) -> Dict[str, object]:
    """One launch; returns its exit code, wall time and whether it printed results or aborted."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    try:
        result = subprocess.run(
            shlex.split(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired:
        code, stdout, stderr = "timeout", "", ""
    return {
        "exit_code": code,
        "seconds": round(time.perf_counter() - start, 1),
        "printed_results": "identical on all 2 " in stdout,
        "teardown_abort": ABORT in stderr,
        # Where the abort happened: the faulthandler / terminate-handler lines, wherever they are.
        "stderr_abort": _abort_lines(stderr) if code != 0 else "",
        "stderr_tail": stderr[-1500:] if code != 0 else "",
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="launches of each example (default 50)")
    parser.add_argument("--only", choices=sorted(COMMANDS), action="append", help="run only this example")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a launch counts as hung")
    parser.add_argument("--json", type=Path, help="also write the counts and failures here")
    args = parser.parse_args(argv)

    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report: Dict[str, object] = {
        "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}",
        "torch": torch.__version__,
        "code": commit.stdout.strip() + (" (uncommitted changes)" if dirty else ""),
    }
    failed = False
    for name in args.only or list(COMMANDS):
        codes: collections.Counter = collections.Counter()
        failures: List[Dict[str, object]] = []
        for run in range(1, args.runs + 1):
            outcome = run_once(COMMANDS[name], args.timeout)
            ok = outcome["exit_code"] == 0 and outcome["printed_results"]
            codes[str(outcome["exit_code"])] += 1
            if not ok:
                failures.append({"run": run, **outcome})
            print(f"{name} run {run}/{args.runs}: exit {outcome['exit_code']} ({outcome['seconds']} s)"
                  + ("" if ok else "  FAILED"), flush=True)
        report[name] = {"command": COMMANDS[name], "runs": args.runs, "exit_codes": dict(codes), "failures": failures}
        failed |= bool(failures)
        print(f"{name}: exit codes {dict(codes)} over {args.runs} runs", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
