"""Durations as operators write them on the command line (`apply --confirm-within 60s`,
`learn --for 15m`): one grammar and one error for every option that takes one."""

from __future__ import annotations

import re

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,9})?)([smhd]?)", re.ASCII | re.IGNORECASE)


class DurationError(ValueError):
    """A value that is not a duration, or one out of the option's range."""


def parse_duration(text: str, most: float) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``2h`` or ``1d`` (a decimal number of ASCII
    digits, then an optional unit; blanks around it are ignored); more than 0 and at most
    ``most`` seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise DurationError(
            f"{text!r} is not a duration: give seconds (90), or a number with s, m, h or d "
            "(60s, 15m, 2h, 1d)"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not 0 < seconds <= most:
        raise DurationError(f"{text!r}: give more than 0 s and at most {_spoken(most)}")
    return seconds


def _spoken(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"
