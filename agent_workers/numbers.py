"""The numbers a message carries: one JSON parse rule on every path, and one checked conversion per kind of field.

JSON has one number type and Python two, and the parsers a message can go through disagreed on big ones: orjson
reads an integer literal beyond 64 bits as a float (and refuses one beyond the float range, ``1e400`` too), while
the standard library keeps an exact integer of any size. So the same ``deadline_ms`` was an int or a float depending
on whether something else in the message made orjson give up. :func:`loads` applies orjson's rule on both paths:

* an integer literal in ``[-2**63, 2**64 - 1]`` is an ``int``; any other is a ``float``, ``±inf`` past the float
  range (orjson refuses those; the fallback parser then reads them as infinities);
* a float literal past the float range (``1e400``) is ``±inf``.

Every field then goes through one checked conversion that names it in an :class:`~agent_workers.errors.InputError`
(:func:`integer`, :func:`finite`), so a bad number fails its own request, never the consumer, a timer or the
transport.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import orjson

from agent_workers.errors import InputError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
#: Digits beyond which an integer literal cannot be within 64 bits (skips int() on huge literals: Python refuses
#: to convert more than 4300 digits, and the conversion is quadratic).
_MAX_INT64_DIGITS = 20


def _parse_int(text: str) -> int | float:
    """orjson's reading of an integer literal: an int within 64 bits, else a float (inf past the float range)."""
    if len(text.lstrip("-")) <= _MAX_INT64_DIGITS:
        value = int(text)
        if INT64_MIN <= value <= UINT64_MAX:
            return value
    return float(text)


_stdlib_loads = functools.partial(json.loads, parse_int=_parse_int)


def loads(data: bytes | str) -> Any:
    """Parse JSON from a message: orjson, else the standard library with orjson's number rule (see the module
    docstring) for what orjson refuses (NaN/Infinity literals, lone surrogate escapes, numbers past the float
    range). Objects stay plain dicts on both paths (no kombu ``__type__`` hook: the same text, the same value).

    Raises:
        ValueError: not JSON (invalid UTF-8 included).
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data).decode("utf-8")
    return _stdlib_loads(data)


def integer(name: str, value: Any, *, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    """``value`` as an int in ``[low, high]``.

    Raises:
        InputError: naming ``name``, for a bool, a float (even integral: JSON producers that mean an integer send
            one), anything else, or an int out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer from {low} to {high}, got {_show(value)}")
    if not low <= value <= high:
        raise InputError(f"{name} must be an integer from {low} to {high}, got {_show(value)}")
    return value


def finite(name: str, value: Any) -> float:
    """``value`` (an int or a float) as a finite float.

    Raises:
        InputError: naming ``name``, for a bool, a non-number, an infinity or NaN, or an int past the float range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a finite number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise InputError(f"{name} must be a finite number, got {_show(value)}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {_show(value)}")
    return number


def _show(value: Any) -> str:
    """A short rendering of a bad value (a 400-digit integer is named by its size, not printed)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > UINT64_MAX:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return f"{value!r:.40}"
