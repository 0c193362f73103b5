"""The installed distribution's version: one source, pyproject's ``version``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("bridge-kit")
except PackageNotFoundError:
    # Imported from a checkout that was never installed (PYTHONPATH=.): there is no
    # metadata to read, and a made-up number would be worse than saying so.
    __version__ = "0+unknown"
