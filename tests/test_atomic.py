"""strsparse.atomic: atomic writes and the cleanup of temporary files a killed write left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from strsparse.atomic import remove_stale_temporaries, write_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = write_atomic(tmp_path / "a.txt", "old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_only_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    dead = tmp_path / "checkpoints" / ".last.pt.999999999.0123abcd.tmp"
    alive = tmp_path / f".metrics.csv.{os.getpid()}.89abcdef.tmp"  # being written right now
    mine = tmp_path / ".notes.tmp"  # not ours: a name atomic_path never makes
    for path in (dead, alive, mine):
        path.write_text("x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and mine.exists()
