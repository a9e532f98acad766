"""The Hugging Face examples run as printed in docs/huggingface.md (here with fewer samples and epochs).

OMP_NUM_THREADS=1 only keeps import-time thread pools small; the examples set one torch thread themselves.
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # several processes or a subprocess run: left out by -m "not slow"

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(printed: str, tmp_path, *flags: str) -> str:
    """The command as docs/huggingface.md prints it, plus flags for fewer samples and epochs."""
    program, script = printed.split()
    assert program == "python"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    command = [sys.executable, os.path.join(ROOT, script), "--output-dir", str(tmp_path), *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize(
    "name, flags",
    [
        ("python examples/hf_text_classification.py",
         ["--train-size", "64", "--eval-size", "32", "--teacher-epochs", "1", "--epochs", "1", "--batch-size", "16"]),
        ("python examples/hf_image_classification.py", ["--train-size", "64", "--teacher-epochs", "1", "--epochs", "1",
                                        "--batch-size", "16"]),
    ],
    ids=["text", "image"],
)
def test_example_trains_teacher_and_students_and_saves_a_loadable_student(tmp_path, name, flags):
    output = run_example(name, tmp_path, *flags)
    assert "teacher accuracy" in output and "student CRCD" in output
    saved = os.listdir(tmp_path / "student")
    assert "config.json" in saved and "model.safetensors" in saved
    assert not any("crcd" in file for file in saved)
