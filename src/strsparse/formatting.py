"""Numbers and tables for people: ``human(4089284608) == '4.09G'``, ``count(4089284608) ==
'4,089,284,608'``, and the one fixed-width table every report prints."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["count", "human", "render_table"]


def human(value: float | None) -> str:
    """A count with a K/M/G suffix and three significant digits ('4.09G', '42M', '980');
    'n/a' for None, NaN or infinity."""
    if value is None or not math.isfinite(value):
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def count(value: Any) -> str:
    """An exact count with thousands separators ('4,089,284,608'); 'n/a' when unknown."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{round(value):,}"


def render_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    totals: Sequence[Sequence[str]] = (),
    left: int = 1,
) -> str:
    """Header, a rule, ``rows``, then (after another rule) ``totals``; the first ``left``
    columns are left-aligned, the others right-aligned."""
    widths = [len(str(h)) for h in header]
    for row in (*rows, *totals):
        widths = [max(w, len(str(c))) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    body = [line(r) for r in rows]
    bottom = [line(r) for r in totals]
    rule = "-" * max(len(text) for text in (line(header), *body, *bottom))
    lines = [line(header), rule, *body]
    if bottom:
        lines += [rule, *bottom]
    return "\n".join(lines)
