"""The distributed examples run as printed in README.md and docs/distributed.md (2 CPU processes)."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # several processes or a subprocess run: left out by -m "not slow"

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = "torchrun --standalone --nproc_per_node 2 examples/ddp_train.py"
ACCELERATE = "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no examples/accelerate_train.py"  # noqa: E501 - verbatim as printed


def run_printed(command):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")  # this worktree's package, CPU
    return subprocess.run(shlex.split(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [TORCHRUN, ACCELERATE], ids=["torchrun", "accelerate"])
def test_command_is_printed_in_readme_and_docs(command):
    for page in ("README.md", "docs/distributed.md"):
        assert command in (ROOT / page).read_text(), page


@pytest.mark.parametrize("command", [TORCHRUN, ACCELERATE], ids=["torchrun", "accelerate"])
def test_example_trains_on_two_processes_and_ends_with_identical_crcd_state(command):
    result = run_printed(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch ") == 3, result.stdout
    assert "identical on all 2 " in result.stdout and result.stdout.rstrip().endswith("True"), result.stdout
    accuracy = float(result.stdout.split("student train accuracy ")[1].split()[0])
    assert accuracy > 0.3, result.stdout  # 10 classes: well above chance
