"""Release readiness: the sdist and wheel build, and the wheel works in an environment that has only
torch and the declared dependencies; the docs site builds, ruff and mypy are clean.

The fresh-environment test installs the CPU torch wheel this project's machines keep on disk
(``pip install torch==2.13.0``, about 20 s, no download), then the wheel and, over it, the sdist,
and checks the installed version against pyproject.toml; where pip cannot get torch, it is skipped.
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


@pytest.mark.slow
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


def _project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


FRESH_CHECK = """
import importlib.metadata, importlib.util, sys, torch
import crcd_plugin
from crcd_plugin import CRCDLoss
assert importlib.metadata.version("crcd-plugin") == crcd_plugin.__version__ == sys.argv[1], crcd_plugin.__version__
assert crcd_plugin.__file__.startswith(sys.prefix), crcd_plugin.__file__  # the installed copy, not a checkout
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


@pytest.mark.slow
def test_the_wheel_and_the_sdist_install_and_run_in_a_fresh_environment_with_torch_alone(dist_dir, tmp_path):
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], timeout=300).returncode == 0
    python = venv / "bin" / "python"
    env = _isolated_env()
    torch_install = _run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], timeout=900, env=env)
    if torch_install.returncode != 0:
        pytest.skip(f"the CPU torch wheel is not available to pip here: {torch_install.stderr[-500:]}")
    version = _project_version()
    wheel, sdist = next(dist_dir.glob("*.whl")), next(dist_dir.glob("*.tar.gz"))
    assert f"-{version}-" in wheel.name and sdist.name.endswith(f"-{version}.tar.gz"), (wheel.name, sdist.name)
    # The wheel brings the declared dependencies; the sdist is then built and installed over it.
    for artifact, options in ((wheel, []), (sdist, ["--force-reinstall", "--no-deps"])):
        install = _run([str(python), "-m", "pip", "install", "-q", *options, str(artifact)], timeout=900, env=env)
        assert install.returncode == 0, install.stderr[-3000:]
        result = _run([str(python), "-c", FRESH_CHECK, version], cwd=tmp_path, env=env, timeout=300)
        assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
            artifact.name, result.stdout + result.stderr[-3000:])
    # crcd-demo is installed with the library; without its extra it names the install to run.
    demo = _run([str(venv / "bin" / "crcd-demo"), "--quick"], cwd=tmp_path, env=env, timeout=300)
    assert demo.returncode == 2, demo.stdout + demo.stderr[-3000:]
    assert 'pip install "crcd-plugin[demo]"' in demo.stderr and "Traceback" not in demo.stderr, demo.stderr[-3000:]


def test_the_version_has_a_dated_changelog_entry():
    import datetime
    import re

    version = _project_version()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    match = re.search(r"^## \[" + re.escape(version) + r"\] - (\d{4}-\d{2}-\d{2})$", changelog, re.M)
    assert match, f"CHANGELOG.md has no '## [{version}] - YYYY-MM-DD' entry"
    datetime.date.fromisoformat(match.group(1))
    released = re.findall(r"^## \[(\d[^\]]*)\]", changelog, re.M)
    assert released[0] == version, f"the newest released entry is {released[0]}, the package says {version}"


@pytest.mark.slow
def test_docs_site_builds_with_warnings_as_errors(tmp_path):
    result = _run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "index.html").exists()


@pytest.mark.slow
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or pytest.fail("ruff is not installed (dev extra)")
    result = _run([ruff, "check", "crcd_plugin", "tests", "examples", "benchmarks"], cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.slow
def test_mypy_is_clean_on_the_package():
    result = _run([sys.executable, "-m", "mypy", "crcd_plugin"], cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]


def test_the_install_instructions_name_this_versions_wheel():
    import re

    version = _project_version()
    for page in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        named = set(re.findall(r"crcd_plugin-([0-9][^-]*)-py3-none-any\.whl", page.read_text()))
        assert named == {version}, f"{page.name} names the wheels of {sorted(named)}; the package is {version}"
