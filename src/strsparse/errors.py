"""Errors a user can fix, and the one helper that suggests the name they meant.

Every error caused by what the user gave (a configuration, an option, a budget, a checkpoint,
a dataset, a model or method name) derives from :class:`StrsparseError`; its message names
the bad value and the fix. The command line prints such an error as one line; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "BudgetError",
    "MissingDependencyError",
    "MissingFileError",
    "OptionError",
    "OutputExistsError",
    "StrsparseError",
    "closest_match",
    "did_you_mean",
]

# difflib similarity a suggestion needs: 'sgdd' -> 'sgd', 'fashoin_mnist' -> 'fashion_mnist',
# but an unrelated word gets no suggestion rather than a misleading one
_CUTOFF = 0.5


class StrsparseError(Exception):
    """Base of the errors caused by user input; the message says what to change.

    Module-specific ones live beside their module: ``ConfigError`` (``strsparse.config``),
    ``DatasetError`` (``strsparse.data``), ``CheckpointError`` (``strsparse.training``),
    ``ExportError`` (``strsparse.export``), ``TrainingDiverged`` (``strsparse.training``).
    Each also derives from the built-in exception it replaced, so ``except ValueError``
    keeps working.
    """


class OptionError(StrsparseError, ValueError):
    """A bad argument, option or name (method, model, schedule, layer pattern, ...)."""


class BudgetError(OptionError):
    """A sparsity budget that does not fit: unknown layers, bad values, an unreadable CSV."""


class MissingFileError(StrsparseError, FileNotFoundError):
    """A file or directory the user pointed to does not exist."""


class OutputExistsError(StrsparseError, FileExistsError):
    """An output path is taken; the message says how to replace it or where else to write."""


class MissingDependencyError(StrsparseError, ImportError):
    """An optional dependency is needed; the message names the extra to install."""


def closest_match(name: object, valid: Iterable[str]) -> str | None:
    """The valid name most similar to ``name``, or None when none is close."""
    match = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=_CUTOFF)
    return match[0] if match else None


def did_you_mean(name: object, valid: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest valid name, or ``""`` when none is close."""
    match = closest_match(name, valid)
    return f" (did you mean {match!r}?)" if match else ""
