"""The example scripts run as printed in the README and docs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_loop_example_runs_and_reports_accuracies():
    result = subprocess.run(
        [sys.executable, "examples/plain_loop.py"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "test accuracy" in line]
    assert len(lines) == 3, result.stdout
    accuracies = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert all(0.1 < acc <= 1.0 for acc in accuracies), lines  # better than chance (10 classes)
