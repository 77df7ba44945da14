"""A config value checked against its field's type annotation, with the YAML-ish conversions a
user expects (1e-4 read as a string by YAML 1.1 is a number; a whole float is an int) and one
error naming the key when it does not fit."""

from __future__ import annotations

import difflib
import math
import types
from typing import Any, Literal, Union, get_args, get_origin

from snug.errors import ConfigError


def one_of(value: Any, choices: tuple, where: str) -> Any:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(
            f"{where} is {value!r}, but must be one of {', '.join(map(str, choices))}{suggestion}"
        )
    return value


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` checked against `annotation`, converting YAML-ish strings and ints."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where} must not be null.")
    if origin is Literal:
        return one_of(value, get_args(annotation), where)
    if origin is list:
        (item,) = get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, not {value!r}.")
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, not {value!r}.")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be a whole number, not {value!r}.")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where} must be a number, not {value!r}.")
        if not math.isfinite(number):  # .inf, .nan, 'inf': a run that diverges at step 2
            raise ConfigError(f"{where} is {value!r}, but must be a finite number.")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a revision that is all digits
        raise ConfigError(f"{where} must be a string, not {value!r}.")
    raise TypeError(f"unsupported config annotation {annotation!r}")  # a bug in this file
