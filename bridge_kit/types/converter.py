"""The one cattrs converter for every wire format bridge_kit speaks.

Per-class hooks decide which fields are omitted: the register types follow
ruma's ``skip_serializing_if`` rules field for field (see ``register.py``),
so omission is configured per class, never globally.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar, Union, get_args, get_origin

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.v import format_exception

from bridge_kit.errors import WrongType

T = TypeVar("T")
StructureHook = Callable[[Any, Any], Any]

converter = cattrs.Converter()
"""The shared converter. Configured once, by :func:`bridge_kit._preconf.configure_converter`
when the package is imported; each module's hooks are in its ``configure_converter()``."""


def configure_converter(converter: cattrs.Converter) -> None:
    """The hooks every wire format shares: durations travel as milliseconds."""
    converter.register_unstructure_hook(timedelta, lambda d: round(d.total_seconds() * 1000))
    converter.register_structure_hook(timedelta, lambda v, _: timedelta(milliseconds=v))


def keep_unknown_keys(
    converter: cattrs.Converter,
    cls: type[T],
    *,
    omit_if_default: bool = False,
    strict: bool = False,
    **overrides: Any,
) -> type[T]:
    """Register hooks so ``cls.extra`` collects (and re-emits) keys it has no field for.

    The class must have an ``extra: dict[str, Any]`` field. Matrix formats grow
    new keys all the time; a bridge must pass them through, not drop them.
    ``overrides`` are cattrs ``override(...)`` values per field name.

    With ``strict``, fields typed ``str``, ``int``, ``list[...]`` or ``dict[...]``
    (or one of those ``| None``) refuse a value of another JSON type instead of
    converting it (cattrs would turn ``1`` into ``"1"`` and ``"ab"`` into ``["a", "b"]``).
    """
    fields = attrs.fields(cls)  # type: ignore[arg-type]
    # A field omitted from the wire (override(omit=True)) has no key there: a key of
    # its name in the JSON is an unknown one, kept in extra like any other.
    known = frozenset(
        _wire_name(f.name, overrides)
        for f in fields
        if f.name != "extra" and not getattr(overrides.get(f.name), "omit", False)
    )
    struct_overrides = dict(overrides)
    if strict:
        struct_overrides.update(_strict_overrides(converter, cls, overrides))
    struct = make_dict_structure_fn(cls, converter, extra=override(omit=True), **struct_overrides)
    unstruct = make_dict_unstructure_fn(
        cls,
        converter,
        _cattrs_omit_if_default=omit_if_default,
        extra=override(omit=True),
        **overrides,
    )

    def structure(value: Mapping[str, Any], _: Any) -> T:
        if not isinstance(value, Mapping):
            raise WrongType(f"a JSON object for {cls.__name__}", value)
        obj = struct(value, cls)
        extra = {k: v for k, v in value.items() if k not in known}
        if extra:
            # obj was built just now and nobody else holds it: fill in extra rather
            # than build the whole object a second time with attrs.evolve.
            object.__setattr__(obj, "extra", extra)
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


def _strict_overrides(
    converter: cattrs.Converter, cls: type, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    attrs.resolve_types(cls)
    strict: dict[str, Any] = {}
    for field in attrs.fields(cls):
        hook = strict_hook(converter, field.type)
        existing = overrides.get(field.name)
        if hook is None or field.name == "extra" or getattr(existing, "struct_hook", None):
            continue
        strict[field.name] = (
            override(struct_hook=hook)
            if existing is None
            else attrs.evolve(existing, struct_hook=hook)
        )
    return strict


def strict_hook(converter: cattrs.Converter, tp: Any) -> StructureHook | None:
    """A structure hook for ``tp`` that refuses other JSON types, or None if ``tp`` has none.

    Handles ``str``, ``int`` (not ``bool``), ``list[X]``, ``dict[str, X]`` and ``X | None``.
    """
    if tp is str:
        return _strict_str
    if tp is int:
        return _strict_int
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = strict_hook(converter, next(arg for arg in args if arg is not type(None)))
        return None if inner is None else _optional(inner)
    if origin is list:
        element = strict_hook(converter, args[0]) if args else None
        if element is not None:
            return _strict_list(tp, element)
        return _strict_container(converter, tp, list, "an array")
    if origin is dict and args and args[0] is str:
        if args[1] is Any:
            return _json_object
        return _strict_container(converter, tp, dict, "an object")
    return None


def _strict_str(value: Any, _: Any) -> str:
    if isinstance(value, str):
        return value
    raise WrongType("a string", value)


def _strict_int(value: Any, _: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise WrongType("an integer", value)


def _json_object(value: Any, _: Any) -> dict[str, Any]:
    # Values typed Any are decoded JSON already: keep the object as it is, do not copy it.
    if isinstance(value, dict):
        return value
    raise WrongType("an object", value)


def _optional(hook: StructureHook) -> StructureHook:
    def structure_optional(value: Any, tp: Any) -> Any:
        return None if value is None else hook(value, tp)

    return structure_optional


def _strict_container(
    converter: cattrs.Converter, tp: Any, container: type, expected: str
) -> StructureHook:
    elements: list[StructureHook] = []

    def structure_container(value: Any, _: Any) -> Any:
        if not isinstance(value, container):
            raise WrongType(expected, value)
        if not elements:
            # Looked up on first use: the element type's hook may be registered later.
            elements.append(converter.get_structure_hook(tp))
        return elements[0](value, tp)

    return structure_container


def _strict_list(tp: Any, element: StructureHook) -> StructureHook:
    (element_type,) = get_args(tp)

    def structure_list(value: Any, _: Any) -> list[Any]:
        if not isinstance(value, list):
            raise WrongType("an array", value)
        result: list[Any] = []
        errors: list[Exception] = []
        for index, item in enumerate(value):
            try:
                result.append(element(item, element_type))
            except Exception as error:  # collected, then raised together
                note = cattrs.IterableValidationNote(
                    f"Structuring @ index {index}", index, element_type
                )
                error.__notes__ = [*getattr(error, "__notes__", []), note]
                errors.append(error)
        if errors:
            raise cattrs.IterableValidationError(f"While structuring {tp!r}", errors, tp)
        return result

    return structure_list


def refuse(cls: type, key: str, error: Exception) -> cattrs.ClassValidationError:
    """A validation error for ``key`` of ``cls``, shaped like the converter's own."""
    error.__notes__ = [cattrs.AttributeValidationNote(f"Structuring {key}", key, Any)]
    return cattrs.ClassValidationError(f"While structuring {cls.__name__}", [error], cls)


def structure(data: Any, cls: type[T]) -> T:
    """Turn decoded JSON into ``cls``; raises cattrs errors on a shape mismatch."""
    return converter.structure(data, cls)


def unstructure(obj: Any) -> Any:
    """Turn an attrs model into JSON-ready data."""
    return converter.unstructure(obj)


def describe_error(exc: BaseException) -> str:
    """One line naming every field that failed to structure, for error replies."""
    if isinstance(exc, cattrs.BaseValidationError):
        parts = cattrs.transform_error(exc, format_exception=_format_exception)
        return "; ".join(parts)
    return str(exc)


def _format_exception(exc: BaseException, tp: type | None) -> str:
    if isinstance(exc, WrongType):
        return str(exc)
    return format_exception(exc, tp)
