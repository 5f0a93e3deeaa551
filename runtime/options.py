"""Range checks for every numeric setting, shared by the API, the CLI and the app.

NaN compares false with everything, so a check written `if x <= 0: raise` lets NaN through; every
check here is written as "inside the allowed range, or raise", and names the range.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os

from runtime.errors import OptionError

log = logging.getLogger(__name__)
THREADS_PER_CORE_LIMIT = 4  # past this many threads per core, a setting is refused


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def number(
    name: str,
    value,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """`value` as a float inside [lo, hi] (ends open where asked); NaN and ±inf are refused."""
    allowed = _range_text(lo, hi, lo_open, hi_open)
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number in {allowed}, got {value!r}") from None
    inside = math.isfinite(x)
    inside = inside and (lo is None or (x > lo if lo_open else x >= lo))
    inside = inside and (hi is None or (x < hi if hi_open else x <= hi))
    if not inside:
        raise OptionError(f"{name} must be a finite number in {allowed}, got {value!r}")
    return x


def integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int inside [lo, hi]; bools, fractions, NaN and ±inf are refused."""
    x = None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        x = int(value)
    elif isinstance(value, float) and value.is_integer():
        x = int(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            x = int(value.strip())
    if x is None or (lo is not None and x < lo) or (hi is not None and x > hi):
        allowed = _range_text(lo, hi, False, False)
        raise OptionError(f"{name} must be an integer in {allowed}, got {value!r}")
    return x


def threads(value) -> int | None:
    """onnxruntime intra-op threads: None (onnxruntime's choice) or 1 to 4× the core count; a
    warning past the core count, where threads only compete for the same cores."""
    if value is None:
        return None
    cores = os.cpu_count() or 1
    n = integer("threads", value, 1, THREADS_PER_CORE_LIMIT * cores)
    if n > cores:
        log.warning(
            "%d threads on a machine with %d cores: the extra threads compete for the same cores "
            "and usually make every step slower; use at most %d",
            n,
            cores,
            cores,
        )
    return n


def argparse_type(check, *args, **kwargs):
    """An argparse `type=` that runs one of the checks above (its message becomes the usage
    error)."""
    import argparse

    def parse(text: str):
        try:
            return check("value", text, *args, **kwargs)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None

    parse.__name__ = check.__name__  # argparse names the type in its messages
    return parse
