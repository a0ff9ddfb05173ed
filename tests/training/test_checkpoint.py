"""Checkpoints: atomic writes, safe loads, clear errors for truncated or foreign files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from strsparse.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    capture_rng_state,
    copy_atomic,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {
        "config": {"name": "x", "train": {"epochs": 1}},
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 1,
        "step": 10,
        "history": {"epoch": [1], "val_top1": [12.5], "layer_threshold": {"fc": [0.1]}},
        "rng": capture_rng_state(),
    }


def test_save_load_round_trip_with_weights_only(tmp_path: Path) -> None:
    state = _state()
    path = save_checkpoint(state, tmp_path / "checkpoints" / "last.pt")
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["format"] == CHECKPOINT_FORMAT
    loaded = load_checkpoint(path)
    assert loaded["step"] == 10 and loaded["history"]["val_top1"] == [12.5]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    # no temporary files left beside the checkpoint
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    # a run directory resolves to its last checkpoint
    assert find_checkpoint(tmp_path) == path
    assert load_checkpoint(tmp_path)["epoch"] == 1


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(_state(), tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value)


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointError, match="not a strsparse checkpoint"):
        load_checkpoint(path)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(text)


class _Payload:
    pass


def test_arbitrary_objects_are_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "obj": _Payload()}, path)
    with pytest.raises(CheckpointError, match="never unpickles") as info:
        load_checkpoint(path)
    assert "weights_only=False" not in str(info.value)  # not torch's advice for such a file


def test_missing_newer_and_incomplete_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="without checkpoints/last.pt"):
        load_checkpoint(tmp_path)
    newer = save_checkpoint({**_state(), "version": 99}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(newer)
    partial = tmp_path / "partial.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "model": {}}, partial)
    with pytest.raises(CheckpointError, match="lacks the keys"):
        load_checkpoint(partial)


def test_failed_write_keeps_previous_file(tmp_path: Path) -> None:
    path = save_checkpoint(_state(), tmp_path / "last.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - any pickling failure
        save_checkpoint({**_state(), "bad": lambda: None}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    best = copy_atomic(path, tmp_path / "best.pt")
    assert best.read_bytes() == before


def test_rng_state_round_trip(tmp_path: Path) -> None:
    state = capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    path = save_checkpoint({**_state(), "rng": state}, tmp_path / "rng.pt")
    torch.rand(5), random.random(), np.random.rand()  # move every generator on
    restore_rng_state(load_checkpoint(path)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0])
    assert expected[1:] == again[1:]
