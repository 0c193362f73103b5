"""Error bodies: the standard Matrix error and the user-interactive-auth 401."""

from __future__ import annotations

from typing import Any

import attrs
from cattrs.gen import override

from bridge_kit.types.converter import keep_unknown_keys


@attrs.frozen
class MatrixErrorBody:
    """``{"errcode": ..., "error": ...}`` plus ``retry_after_ms`` and any extra keys."""

    errcode: str
    error: str | None = None
    retry_after_ms: int | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class AuthFlow:
    """One list of stages that completes user-interactive auth."""

    stages: list[str] = attrs.field(factory=list)


@attrs.frozen
class UiaaResponse:
    """The 401 body of user-interactive auth (``flows``, ``params``, ``session``, ``completed``)."""

    flows: list[AuthFlow] = attrs.field(factory=list)
    params: dict[str, Any] = attrs.field(factory=dict)
    session: str | None = None
    completed: list[str] = attrs.field(factory=list)
    extra: dict[str, Any] = attrs.field(factory=dict)


keep_unknown_keys(MatrixErrorBody, omit_if_default=True)
keep_unknown_keys(UiaaResponse, session=override(omit_if_default=True))
