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
