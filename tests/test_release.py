"""Release readiness: the sdist and wheel build, and the wheel works in an environment that has only
torch and the declared dependencies; the docs site builds, ruff and mypy are clean.

The fresh-environment test installs the CPU torch wheel this project's machines keep on disk
(``pip install torch==2.13.0``, about 20 s, no download); where pip cannot get it, it is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def _isolated_env() -> dict:
    """The environment without PYTHONPATH: a checkout on it would make pip see the package as
    installed already (its egg-info) and the fresh environment import the checkout."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = _run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_build_makes_an_sdist_and_a_wheel_with_the_package_and_its_metadata(dist_dir):
    wheels, sdists = list(dist_dir.glob("*.whl")), list(dist_dir.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for module in ("loss.py", "integrations/hf.py", "integrations/timm.py"):
        assert f"crcd_plugin/{module}" in names, module
    assert not any(name.startswith(("tests/", "benchmarks/", "examples/")) for name in names)
    for field in ("License-Expression: Apache-2.0", "Classifier: ", "Project-URL: ", 'Provides-Extra: hf'):
        assert field in metadata, field
    with tarfile.open(sdists[0]) as sdist:
        assert any(name.endswith("/CHANGELOG.md") for name in sdist.getnames())


def test_the_wheel_runs_in_a_fresh_environment_and_extras_name_their_install(dist_dir, tmp_path):
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], timeout=300).returncode == 0
    python = venv / "bin" / "python"
    env = _isolated_env()
    torch_install = _run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], timeout=900, env=env)
    if torch_install.returncode != 0:
        pytest.skip(f"the CPU torch wheel is not available to pip here: {torch_install.stderr[-500:]}")
    wheel = next(dist_dir.glob("*.whl"))
    install = _run([str(python), "-m", "pip", "install", "-q", str(wheel)], timeout=900, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    check = """
import importlib.util, torch
from crcd_plugin import CRCDLoss
crcd = CRCDLoss(8, 16, negatives="queue", queue_size=64)
student = torch.randn(4, 8, requires_grad=True)
loss = crcd(student, torch.randn(4, 16))
loss.backward()
assert torch.isfinite(loss) and student.grad is not None
for module, extra in (("hf", "hf"), ("timm", "timm")):
    assert importlib.util.find_spec(module if module != "hf" else "transformers") is None
    try:
        __import__(f"crcd_plugin.integrations.{module}")
    except ImportError as error:
        assert f'pip install "crcd-plugin[{extra}]"' in str(error), str(error)
    else:
        raise AssertionError(f"crcd_plugin.integrations.{module} imported without its extra")
print("ok")
"""
    result = _run([str(python), "-c", check], cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr[-3000:]


def test_docs_site_builds_with_warnings_as_errors(tmp_path):
    result = _run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "index.html").exists()


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or pytest.fail("ruff is not installed (dev extra)")
    result = _run([ruff, "check", "crcd_plugin", "tests", "examples", "benchmarks"], cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


def test_mypy_is_clean_on_the_package():
    result = _run([sys.executable, "-m", "mypy", "crcd_plugin"], cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]
