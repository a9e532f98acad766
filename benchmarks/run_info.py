"""What every benchmark output records about its run: device, versions, commit, date, settings.

The commit comes from ``CRCD_COMMIT`` (a copy of the tree without ``.git`` has no other way to know
it), else ``git rev-parse --short HEAD``, else ``"unknown"``.

    from run_info import run_info
    info = run_info(torch.device("cuda"), settings={"batch": 64})
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any, Dict, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
    """``CRCD_COMMIT``, else the checkout's short HEAD, else ``"unknown"``."""
    value = os.environ.get("CRCD_COMMIT", "").strip()
    if value:
        return value
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def run_info(device: torch.device, settings: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A dict for the top of a results file."""
    info: Dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "smoke": os.environ.get("GPU_SMOKE", "") == "1",
    }
    try:
        import triton  # noqa: F401

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    if settings is not None:
        info["settings"] = settings
    return info


def header(info: Dict[str, Any]) -> str:
    """One line for a text log."""
    return (f"device {info['device']} | torch {info['torch']} | triton {info.get('triton')} | "
            f"commit {info['commit']} | {info['date']}" + (" | SMOKE (tiny sizes)" if info.get("smoke") else ""))


if __name__ == "__main__":
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(header(run_info(dev)))
