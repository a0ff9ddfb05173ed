"""Numbers for people: ``human(4089284608) == '4.09G'``."""

from __future__ import annotations

import math

__all__ = ["human"]


def human(value: float | None) -> str:
    """A count with a K/M/G suffix and three significant digits ('4.09G', '42M', '980');
    'n/a' for None, NaN or infinity."""
    if value is None or not math.isfinite(value):
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"
