"""Atomic file writes: readers see the old file or the new one, never a half-written one.

Everything a user may lose (checkpoints, configs, budgets, summaries, plots) goes through
here: the data is written to a temporary file beside the target, then renamed over it.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "remove_stale_temporaries", "write_atomic"]

logger = logging.getLogger(__name__)

# the temporary files atomic_path makes: .NAME.PID.HEX8.tmp
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


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


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes under ``directory`` whose writing process
    is gone (a write killed half-way, e.g. by SIGKILL); returns what was removed."""
    removed = []
    for path in Path(directory).rglob(".*.tmp"):
        match = _TEMPORARY.fullmatch(path.name)
        if match and path.is_file() and not _alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("removed %d unfinished temporary file(s) in %s", len(removed), directory)
    return removed
