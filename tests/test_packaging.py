"""Package boundaries: the core needs only torch; extras fail with the install command to run."""

import subprocess
import sys

import pytest

from crcd_plugin.integrations import require


def test_importing_the_package_imports_no_integration_framework():
    code = (
        "import sys, crcd_plugin; "
        "print(sorted(m for m in ('transformers', 'timm', 'accelerate', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_missing_extra_names_the_pip_install_to_run():
    with pytest.raises(ImportError, match=r'pip install "crcd-plugin\[hf\]"'):
        require("a_module_that_is_not_installed", "hf")


def test_version_is_the_installed_metadata_and_pyproject_is_its_single_source():
    import importlib.metadata
    from pathlib import Path

    import tomllib

    import crcd_plugin

    assert crcd_plugin.__version__ == importlib.metadata.version("crcd-plugin")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == crcd_plugin.__version__, (
        f"pyproject.toml says {pyproject['project']['version']}, the installed metadata {crcd_plugin.__version__}: "
        "reinstall the checkout (pip install -e .) after changing the version")


def test_the_public_names_of_0_2_0_stay_importable_and_the_config_is_exported():
    import crcd_plugin

    names_0_2_0 = ["CRCDDistiller", "CRCDLoss", "DistillSchedule", "EmbedHead", "FeatureCapture", "FeatureQueue",
                   "MemoryBank", "ShardedMemoryBank", "functional", "linear_cross_entropy_feature_grad",
                   "student_gradient_element", "teacher_gradient_element", "__version__"]
    assert set(names_0_2_0) | {"CRCDConfig", "RelationConfig"} <= set(crcd_plugin.__all__)
    assert all(hasattr(crcd_plugin, name) for name in crcd_plugin.__all__)
