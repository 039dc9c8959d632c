"""The one check for every number a person gives mlcloud (a flag, a spec key, an environment
variable): finite, within its range, and said the same way wherever it came from.

`float()` takes nan and inf, and a 400-digit number becomes inf; each then breaks what it
feeds (a sleep of nan spins, one of inf overflows). The callers add where the value came from.
"""

from __future__ import annotations

import math
import re

YEAR_S = 365 * 86400  # the longest wait or interval worth asking for, in seconds
MAX_BYTES = 1 << 60  # 1 EiB: past it a size is a typo
MAX_INT = (1 << 31) - 1  # what every store and system call takes

# what YAML 1.1 (PyYAML) keeps as text though it reads as a number: an exponent needs a dot
_EXPONENT_TEXT = re.compile(r"[-+]?\d+[eE][-+]?\d+")


class Invalid(ValueError):
    """Why a value is not a number in range; the caller names the flag, key or variable."""


def check(
    value: object,
    low: float,
    high: float,
    *,
    above: bool = False,
    whole: bool = False,
) -> float | int:
    """value itself if it is a finite number (a whole one if `whole`) from low (excluded when
    `above`) to high; else Invalid saying what it is and what is wanted."""
    want = _wanted(low, high, above, whole)
    if isinstance(value, str) and _EXPONENT_TEXT.fullmatch(value.strip()):
        raise Invalid(
            f"must be {want}, got the text {value.strip()!r} (YAML 1.1 reads a number with an "
            f"exponent but no dot as text: write {_dotted(value.strip())})"
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"must be {want}, got {short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise Invalid(f"{value:g} is not a finite number: must be {want}")
    if whole and isinstance(value, float):
        raise Invalid(f"{value:g} is not a whole number: must be {want}")
    if value > high or value < low or (above and value == low):
        raise Invalid(f"{_shown(value)} is out of range: must be {want}")
    return value


def _wanted(low: float, high: float, above: bool, whole: bool) -> str:
    kind = "a whole number" if whole else "a number"
    if above:
        start = f"above {_g(low)}"
    elif low > 0 and not whole:
        start = f"above 0, at least {_g(low)},"
    else:
        start = f"of {_g(low)} or more"
    return f"{kind} {start} and {_g(high)} or less"


def _g(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) >= 10_000 else f"{x:g}"


def _shown(value: float) -> str:
    if isinstance(value, int) and len(str(value)) > 20:
        return f"a {len(str(value))}-digit number"
    return f"{value:.15g}" if isinstance(value, float) else str(value)


def _dotted(text: str) -> str:
    mantissa, _, exponent = text.lower().partition("e")
    return f"{mantissa}.0e{exponent}"


def short(value: object) -> str:
    """value's repr, cut to a readable length (a 400-digit number, a pasted paragraph)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"
