"""Old public names kept for a while, each with a :class:`DeprecationWarning`.

A package lists its renamed exports with :func:`renamed` as its module-level
``__getattr__``, so ``from bridge_kit import AppState`` keeps working, says what
to use instead, and the old name stays out of ``__all__`` and of ``dir()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

__all__ = ["renamed"]


def renamed(module: str, new_names: Mapping[str, tuple[str, object]]) -> Callable[[str], object]:
    """A module ``__getattr__`` resolving each old name to ``(new name, value)``, with a warning.

    The new name is relative to ``module``: ``"AppLifecycle"``, or ``"inbox.signals.Park"``
    for a name that moved into a subpackage.
    """

    def __getattr__(name: str) -> object:
        if name not in new_names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new_name, value = new_names[name]
        warnings.warn(
            f"{module}.{name} is deprecated; use {module}.{new_name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__
