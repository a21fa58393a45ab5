"""Bounded numbers: the one check of a numeric argument (budgets, recipes, the Python API).

``bounded_number`` takes what a user may give (an int, a float, the text of a number) and
returns an ``int`` or ``float`` inside the range asked for, or raises a ``SurgeryError`` that
names the argument. Nothing passes that Python or torch cannot use as it is: no bool, no inf or
NaN, no text longer than ``MAX_TEXT`` characters (``int()`` of 5000 digits is itself an error),
no number beyond ``MAX_INT`` or the float range. ``flag`` is the same for booleans.

Errors name the Python argument (``target_macs``) and carry it as ``SurgeryError.argument``: the
command line shows the option (``--target-macs``) in its place.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

from .errors import SurgeryError

__all__ = ["MAX_INT", "MAX_TEXT", "bounded_number", "flag", "shown"]

#: The largest integer any count, size or seed may be (int64: what torch and C take).
MAX_INT = 2**63 - 1
#: The longest text read as a number (``1.5e-3``, ``300000000000``): longer is refused unread.
MAX_TEXT = 40

Number = Union[int, float]


def shown(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 5000-digit number is not echoed whole)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]}...({len(text)} characters)"


def _num(value: Number) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _range_text(low: Optional[Number], high: Optional[Number], low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_num(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_num(high)}"
    return "finite"


def _parse_text(text: str) -> Number:
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise ValueError("too long")
    try:
        return int(text)
    except ValueError:
        return float(text)


def bounded_number(value: Any, name: str, *, integer: bool = False, low: Optional[Number] = None,
                   high: Optional[Number] = None, low_open: bool = False, high_open: bool = False,
                   hint: str = "") -> Number:
    """``value`` as an ``int`` (``integer``) or a finite ``float`` within ``[low, high]`` (``low_open``
    / ``high_open``: the bound itself excluded); anything else is a ``SurgeryError`` naming ``name``
    (``hint``: an example of a good value, appended to the message)."""
    kind = "a whole number" if integer else "a number"
    wanted = f"{kind} {_range_text(low, high, low_open, high_open)}".replace(" finite", "")
    if integer and high is None:
        high = MAX_INT
    number: Optional[Number] = None
    if isinstance(value, str):
        try:
            number = _parse_text(value)
        except ValueError:
            number = None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    problem = None
    if number is None:
        problem = "not a number" if not isinstance(value, str) or len(value.strip()) <= MAX_TEXT else "too long"
    elif isinstance(number, float) and not math.isfinite(number):
        problem = "not finite"
    elif integer and isinstance(number, float) and not number.is_integer():
        problem = "not a whole number"
    if problem is None:
        try:
            number = int(number) if integer else float(number)
        except OverflowError:  # float(10**400)
            problem = "too large"
    if problem is None:
        if integer and abs(number) > MAX_INT:
            problem = "too large"
        elif ((low is not None and (number <= low if low_open else number < low))
              or (high is not None and (number >= high if high_open else number > high))):
            problem = "out of range"
    if problem is not None:
        message = f"{name} must be {wanted}, not {shown(value)} ({problem})"
        raise SurgeryError(message + (f"; e.g. {hint}." if hint else "."), argument=name)
    return number


def flag(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False``; anything else (``"no"``, ``0``, ``None``) is a
    ``SurgeryError`` naming ``name``: a string such as ``"no"`` would otherwise read as true."""
    if not isinstance(value, bool):
        raise SurgeryError(f"{name} must be True or False, not {shown(value)}.", argument=name)
    return value
