"""Errors a user can fix, and the one helper that suggests the name they meant.

Every error caused by what the user gave (a configuration, an option, a budget, a checkpoint,
a dataset, a model or method name) derives from :class:`StrsparseError`; its message names
the bad value and the fix. The command line prints such an error as one line; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["StrsparseError", "closest_match", "did_you_mean"]

# difflib similarity a suggestion needs: 'sgdd' -> 'sgd', 'fashoin_mnist' -> 'fashion_mnist',
# but an unrelated word gets no suggestion rather than a misleading one
_CUTOFF = 0.5


class StrsparseError(Exception):
    """Base of the errors caused by user input; the message says what to change."""


def closest_match(name: object, valid: Iterable[str]) -> str | None:
    """The valid name most similar to ``name``, or None when none is close."""
    match = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=_CUTOFF)
    return match[0] if match else None


def did_you_mean(name: object, valid: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest valid name, or ``""`` when none is close."""
    match = closest_match(name, valid)
    return f" (did you mean {match!r}?)" if match else ""
