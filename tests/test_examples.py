"""The example scripts run as printed in the README and docs."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # several processes or a subprocess run: left out by -m "not slow"

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


def test_teacher_cache_example_builds_a_cache_and_distils_without_the_teacher():
    command = "python examples/teacher_cache.py"  # as docs/teacher-cache.md prints it
    result = subprocess.run(
        [sys.executable, *command.split()[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "teacher cache: 1200 rows, feature dim 64, torch.float32" in result.stdout, result.stdout
    line = next(line for line in result.stdout.splitlines() if "distilled from the cache" in line)
    assert 0.5 < float(line.split("accuracy ")[1].split()[0]) <= 1.0, line  # well above chance (10 classes)
