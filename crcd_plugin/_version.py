"""The installed version of crcd-plugin, from its metadata (one source: pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("crcd-plugin")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
