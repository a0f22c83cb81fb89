"""Values read from JSON, checked against a dataclass's annotations: a wrong type is named where it is read
instead of failing deep inside the code that uses it. Torch-free."""

from __future__ import annotations

import math
import types
import typing


def _fits(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, dict):
        (item, *_) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, origin) and (origin is dict or all(_fits(v, item) for v in value))
    if hint is typing.Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


_NAMES = {int: ("a whole number", "whole numbers"), float: ("a finite number", "numbers"),
          bool: ("true or false", "booleans"), str: ("a string", "strings"), dict: ("an object", "objects")}


def _describe(hint, plural: bool = False) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        (item, *_) = typing.get_args(hint) or (typing.Any,)
        return "a list" if item is typing.Any else f"a list of {_describe(item, plural=True)}"
    return _NAMES.get(hint, (getattr(hint, "__name__", str(hint)),) * 2)[plural]


def type_problems(cls, values: dict) -> list[str]:
    """'field should be ..., got ...' for each of `values` whose type does not fit `cls`'s annotation of it."""
    hints = typing.get_type_hints(cls)
    return [f"{name} should be {_describe(hints[name])}, got {value!r}" for name, value in values.items()
            if name in hints and not _fits(value, hints[name])]
