"""Error bodies: the standard Matrix error."""

from __future__ import annotations

from typing import Any

import attrs
import cattrs

from bridge_kit.types.converter import keep_unknown_keys


@attrs.frozen
class MatrixErrorBody:
    """``{"errcode": ..., "error": ...}`` plus ``retry_after_ms`` and any extra keys."""

    errcode: str
    error: str | None = None
    retry_after_ms: int | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


def configure_converter(converter: cattrs.Converter) -> None:
    """Register the hooks of this module's models on ``converter``."""
    keep_unknown_keys(converter, MatrixErrorBody, omit_if_default=True)
