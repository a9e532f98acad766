"""examples/timm_train.py runs as printed in docs/timm.md (offline, CPU, tiny timm models)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # several processes or a subprocess run: left out by -m "not slow"

pytest.importorskip("timm")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]


def test_timm_example_trains_a_teacher_then_distils_a_student_that_beats_chance():
    command = [sys.executable, "examples/timm_train.py"]
    assert "python examples/timm_train.py\n" in (ROOT / "docs" / "timm.md").read_text()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    student_epochs = [line for line in result.stdout.splitlines() if line.startswith("student epoch")]
    assert len(student_epochs) == 3, result.stdout
    for key in ("task_loss", "kd_loss", "crcd_feature_loss", "crcd_gradient_loss"):
        assert re.search(rf"{key}=\d+\.\d+", student_epochs[-1]), key
    final = re.search(r"student \S+ final val_acc=(\d\.\d+)", result.stdout)
    assert final is not None and float(final.group(1)) > 0.5, result.stdout  # 10 classes: chance is 0.1
