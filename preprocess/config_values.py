"""One config value converted and checked, so that a value of the wrong type is one line naming the key.

The ``as_*`` functions take the key as the user types it (``data.flip``) and the value Hydra passed, and return
it converted or raise ``ConfigValueError`` naming both, e.g. ``data.flip='no' must be true or false``. Hydra
turns ``16``, ``1e3``, ``true`` into numbers and booleans and leaves anything else as text, so:

- integers: an int, a float holding a whole number (``1e3``), or the text of one (a quoted override, an
  environment variable); never a bool;
- numbers: an int or float, or its text; never a bool, nan or infinity;
- booleans: ``true`` or ``false`` only, as booleans or as text in any case; ``yes``/``no``/``on``/``off``/``0``/``1``
  are errors, not switches (``bool("no")`` is True);
- choices: one of a fixed set of strings.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from preprocess.shard_format import DatasetError


class ConfigValueError(DatasetError, ValueError):
    """A config value of the wrong type or out of range; one line naming the key as typed and the value.

    A ``ValueError`` to callers, and a ``DatasetError``, which every command already prints as one line
    ``error: ...`` with exit status 2.
    """


def _bounds(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """`` within 1..100``, `` >= 0``, `` > 0 and <= 1``, `` >= 0 and < 1``, `` <= 5`` or nothing."""
    if low is not None and high is not None and not (low_open or high_open):
        return f" within {low}..{high}"
    above = None if low is None else f"{'>' if low_open else '>='} {low}"
    below = None if high is None else f"{'<' if high_open else '<='} {high}"
    parts = [part for part in (above, below) if part]
    return " " + " and ".join(parts) if parts else ""


def _within(
    number: float, low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> bool:
    above = low is None or (number > low if low_open else number >= low)
    below = high is None or (number < high if high_open else number <= high)
    return above and below


def _number(value: Any) -> int | float | None:
    """An int or a finite float from a number or its text; None for anything else, bools included."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if math.isfinite(value) else None


def _whole(value: Any, low: int | None, high: int | None) -> int | None:
    """``value`` as an int within the bounds, or None when it is not one."""
    number = _number(value)
    if number is None or number != int(number) or not _within(int(number), low, high):
        return None
    return int(number)


def as_int(key: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within ``low..high`` (either bound may be None)."""
    number = _whole(value, low, high)
    if number is None:
        raise ConfigValueError(f"{key}={value!r} must be an integer{_bounds(low, high)}")
    return number


def as_optional_int(key: str, value: Any, low: int | None = None, high: int | None = None) -> int | None:
    """None (``null``: the command chooses), or ``value`` as an int within ``low..high``."""
    number = None if value is None else _whole(value, low, high)
    if value is not None and number is None:
        raise ConfigValueError(f"{key}={value!r} must be an integer{_bounds(low, high)} or null")
    return number


def as_float(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within ``low..high`` (``low_open``/``high_open``: excluding that bound)."""
    number = _number(value)
    if number is None or not _within(float(number), low, high, low_open, high_open):
        raise ConfigValueError(f"{key}={value!r} must be a number{_bounds(low, high, low_open, high_open)}")
    return float(number)


def as_bool(key: str, value: Any) -> bool:
    """``value`` as a bool: True, False, or the text ``true``/``false`` in any case; nothing else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigValueError(f"{key}={value!r} must be true or false")


def as_choice(key: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigValueError(f"{key}={value!r} is not one of {'|'.join(choices)}")
    return value


def as_group(group: str, values: Mapping[str, Any], checks: Mapping[str, Callable[[str, Any], Any]]) -> dict[str, Any]:
    """A config group's values, each converted by its check (called with the key as typed, ``group.key``); a key
    without a check is an error naming the known ones."""
    unknown = sorted(set(values) - set(checks))
    if unknown:
        raise ConfigValueError(f"{group} has unknown keys {unknown}: the known ones are {sorted(checks)}")
    return {key: checks[key](f"{group}.{key}", value) for key, value in values.items()}
