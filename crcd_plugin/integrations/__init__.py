"""Integrations with training frameworks, each imported only when used.

``import crcd_plugin`` never imports transformers, timm or accelerate: import
``crcd_plugin.integrations.hf`` or ``crcd_plugin.integrations.timm`` explicitly. A missing extra
raises an ``ImportError`` that names the ``pip install`` to run.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` naming the extra that installs it.

    Args:
        module: Top-level module to import (``"transformers"``, ``"timm"``).
        extra: The crcd-plugin extra that brings it (``"hf"``, ``"timm"``).

    Returns:
        The imported module.

    Example:
        >>> require("math", "none").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"crcd_plugin.integrations needs {module!r}, which is not installed: "
            f'pip install "crcd-plugin[{extra}]"'
        ) from error
