"""Values a kernel reported (its JSON events, run_state.json, manifest, history), checked before anything uses them.

A kernel's outputs are untrusted: the kernel may be another version of ours, a user's script, or hostile. Each
reader takes a value and returns it in the one shape the launcher uses, or None, which every caller treats as
"missing": a malformed value is never an exception, and never reaches the store or the terminal as it came.
"""

from __future__ import annotations

import math
import re

MAX_WHOLE = 2**53  # steps, sizes and versions beyond this are not real (and lose precision as floats)
TEXT_LIMIT = 500
# C0 and C1 control characters and DEL, except tab and newline: what turns printed text into terminal commands.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Escape sequences whole (CSI ... final byte, OSC ... BEL or ST, other ESC pairs), so no parameter bytes remain.
_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[PX^_][^\x1b]*(?:\x1b\\)?|.)?"
                      r"|\x9b[0-?]*[ -/]*[@-~]|\x9d[^\x07\x9c]*[\x07\x9c]?")


def whole(value: object, low: int = 0, high: int = MAX_WHOLE) -> int | None:
    """A whole number in [low, high]; None for anything else (bools, floats, strings, huge numbers)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def finite(value: object) -> float | None:
    """A finite number as a float; None for NaN, infinities, bools, strings and the rest."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too big for a float
        return None
    return number if math.isfinite(number) else None


def text(value: object, limit: int = TEXT_LIMIT) -> str | None:
    """Printable text of at most `limit` characters; None for what is not a string."""
    if not isinstance(value, str):
        return None
    cleaned = printable(value)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def printable(value: str) -> str:
    """`value` without terminal escape sequences or control characters (tabs and newlines stay)."""
    return _CONTROL.sub("", _ESCAPES.sub("", value))


def sha256_hex(value: object) -> str | None:
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else None
