"""Durations on the command line: ``90s``, ``30m``, ``6h``, ``7d``."""

from __future__ import annotations

import argparse
import re

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def duration(text: str) -> float:
    """Seconds in ``text`` (argparse type); a bad value is refused with the accepted forms."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use a positive number with s, m, h or d (6h)")
    return float(match.group(1)) * _UNITS[match.group(2)]
