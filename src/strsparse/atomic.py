"""Atomic file writes: readers see the old file or the new one, never a half-written one.

Everything a user may lose (checkpoints, configs, budgets, summaries, plots) goes through
here: the data is written to a temporary file beside the target, then renamed over it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_atomic"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On any error (Ctrl-C included) the temporary file is removed and ``path`` is untouched.
    The temporary file is created by whatever writes it, so it gets the usual umask
    permissions (``tempfile.mkstemp`` would make it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[Path], object]) -> Path:
    """Write text, bytes, or whatever ``data(tmp_path)`` writes, to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
    return Path(path)
