"""The one cattrs converter for every wire format bridge_kit speaks.

Per-class hooks decide which fields are omitted: the register types follow
ruma's ``skip_serializing_if`` rules field for field (see ``register.py``),
so omission is configured per class, never globally.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

T = TypeVar("T")

converter = cattrs.Converter()

converter.register_unstructure_hook(timedelta, lambda d: round(d.total_seconds() * 1000))
converter.register_structure_hook(timedelta, lambda v, _: timedelta(milliseconds=v))


def keep_unknown_keys(
    cls: type[T],
    *,
    omit_if_default: bool = False,
    **overrides: Any,
) -> type[T]:
    """Register hooks so ``cls.extra`` collects (and re-emits) keys it has no field for.

    The class must have an ``extra: dict[str, Any]`` field. Matrix formats grow
    new keys all the time; a bridge must pass them through, not drop them.
    ``overrides`` are cattrs ``override(...)`` values per field name.
    """
    fields = attrs.fields(cls)  # type: ignore[arg-type]
    known = {_wire_name(f.name, overrides) for f in fields if f.name != "extra"}
    struct = make_dict_structure_fn(cls, converter, extra=override(omit=True), **overrides)
    unstruct = make_dict_unstructure_fn(
        cls,
        converter,
        _cattrs_omit_if_default=omit_if_default,
        extra=override(omit=True),
        **overrides,
    )

    def structure(value: Mapping[str, Any], _: Any) -> T:
        if not isinstance(value, Mapping):
            raise TypeError(
                f"expected a JSON object for {cls.__name__}, got {type(value).__name__}"
            )
        obj = struct(value, cls)
        extra = {k: v for k, v in value.items() if k not in known}
        if extra:
            obj = attrs.evolve(obj, extra=extra)  # type: ignore[misc]
        return obj

    def unstructure(obj: T) -> dict[str, Any]:
        out: dict[str, Any] = dict(getattr(obj, "extra"))  # noqa: B009
        out.update(unstruct(obj))
        return out

    converter.register_structure_hook(cls, structure)
    converter.register_unstructure_hook(cls, unstructure)
    return cls


def _wire_name(name: str, overrides: Mapping[str, Any]) -> str:
    rename = getattr(overrides.get(name), "rename", None)
    return rename or name


def structure(data: Any, cls: type[T]) -> T:
    """Turn decoded JSON into ``cls``; raises cattrs errors on a shape mismatch."""
    return converter.structure(data, cls)


def unstructure(obj: Any) -> Any:
    """Turn an attrs model into JSON-ready data."""
    return converter.unstructure(obj)


def describe_error(exc: BaseException) -> str:
    """One line naming every field that failed to structure, for error replies."""
    if isinstance(exc, cattrs.BaseValidationError):
        parts = cattrs.transform_error(exc)
        return "; ".join(parts)
    return str(exc)
