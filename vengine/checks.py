"""Type and range guards for config fields, so every dataclass rejects bad values the same way.

Bools are not numbers here, floats must be finite, and ints must fit in int64: larger ones pass
Python's comparisons but crash torch much later, far from the field that caused it.
"""

from __future__ import annotations

import math

from vengine.errors import ConfigError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def invalid(field: str, want: str, value: object) -> ConfigError:
    """The one message shape of a rejected field: '<field> must be <want>, got <value!r>'."""
    return ConfigError(f"{field} must be {want}, got {value!r}", field=field)


def check_int(
    value: object,
    field: str,
    lo: int | None = None,
    hi: int | None = None,
    *,
    want: str | None = None,
) -> int:
    """`value` if it is an int (not a bool) in [lo, hi]; else a ConfigError.

    A bound left as None is int64's. `want` replaces the generated description ("an int >= 1").
    """
    want = want or _describe("an int", lo, hi, False, False)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, want, value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise invalid(field, want, value)
    if (lo is None and value < INT64_MIN) or (hi is None and value > INT64_MAX):
        raise invalid(field, f"{want} that fits in int64", value)
    return value


def check_seed(value: object, field: str) -> int | None:
    """None, or an int that torch.Generator.manual_seed takes: [-2**63, 2**64)."""
    if value is None:
        return None
    return check_int(value, field, INT64_MIN, 2**64 - 1, want="None or an int in [-2**63, 2**64)")


def check_float(
    value: object,
    field: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    want: str | None = None,
) -> float:
    """`value` (an int or float, not a bool, finite) if it lies in the interval; else a ConfigError.

    lo_open / hi_open exclude the bound itself: lo=0, lo_open=True is "> 0". The value is returned
    unchanged (an int stays an int). `want` replaces the generated description in the message.
    """
    want = want or _describe("a number", lo, hi, lo_open, hi_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(field, want, value)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond float range
        finite = False
    if not finite:
        raise invalid(field, want, value)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise invalid(field, want, value)
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise invalid(field, want, value)
    return value


def _describe(kind: str, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    """'an int >= 1', 'a number in (0, 1]', 'a finite number > 0'."""
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if kind == "a number":
        kind = "a finite number"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    return kind
