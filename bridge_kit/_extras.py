"""How to install one of bridge_kit's extras, for the messages that need one.

bridge_kit is not on PyPI, so ``pip install 'bridge-kit[e2ee]'`` cannot work: an
extra comes from a checkout (``.[e2ee]`` in it, or the checkout's path elsewhere).
"""

from __future__ import annotations

__all__ = ["install_extra"]


def install_extra(extra: str) -> str:
    """The pip command (and where to run it) that installs bridge_kit's ``extra``."""
    return (
        f"pip install '.[{extra}]' in a checkout of bridge_kit "
        f"(from elsewhere: pip install '/path/to/bridge_kit[{extra}]')"
    )
