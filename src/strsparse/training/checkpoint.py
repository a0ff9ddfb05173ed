"""Training checkpoints: plain dicts of tensors and numbers, written atomically, loaded safely.

A checkpoint is what ``torch.save`` writes for a dict holding only tensors, numbers, strings
and containers of them, so it loads with ``torch.load(path, weights_only=True)``: nothing is
unpickled but data. Keys:

- ``format``: ``"strsparse-checkpoint"``; ``version``: ``CHECKPOINT_VERSION``;
- ``config``: the run's configuration as a plain dict (``strsparse.config.config_to_dict``);
- ``model``: ``state_dict`` of the *sparsified* model (raw weights, STR ``s``, masks and
  schedule buffers of the parametrizations);
- ``optimizer``: the optimizer's ``state_dict``; ``scaler``: the fp16 GradScaler's or None;
- ``epoch``: completed epochs; ``step``: completed optimizer steps; ``batch``: batches of
  epoch ``epoch`` already trained (0 at an epoch boundary; > 0 after an interruption);
- ``epoch_state``: running train-loss sums of that partial epoch;
- ``metrics``: the latest validation metrics; ``best``: the best ones;
- ``history``: per-epoch lists (what ``metrics.csv`` and the plots are drawn from);
- ``rng``: torch (CPU and CUDA), Python and NumPy random states (rank 0's under torchrun);
- ``world_size``: the number of processes that trained; with more than one, ``ranks`` holds
  each rank's ``rng``, ``rng_epoch_start`` and ``epoch_state`` (``resume.for_rank``).

There is no LR-scheduler state: the learning rate is a pure function of ``step``.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strsparse.atomic import write_atomic
from strsparse.errors import StrsparseError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "capture_rng_state",
    "copy_atomic",
    "describe_mismatch",
    "find_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "seed_everything",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "strsparse-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED_KEYS = ("config", "model", "epoch", "step")


class CheckpointError(StrsparseError, ValueError):
    """A checkpoint is missing, truncated, corrupt, foreign or from a newer version."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` (with ``format``/``version`` added) to ``path`` atomically."""
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    write_atomic(path, lambda tmp: torch.save(payload, tmp))
    return path


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file atomically (e.g. ``last.pt`` to ``best.pt``)."""
    dst = Path(dst)
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))
    return dst


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file from a file path or a run directory (``RUN/checkpoints/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"{str(path)!r} is a directory without checkpoints/last.pt; pass a run directory "
            "of `strsparse train` or a checkpoint file"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and validate a strsparse checkpoint (file or run directory) with
    ``torch.load(weights_only=True)``.

    Raises ``CheckpointError`` for a missing, truncated or corrupt file, a file that holds
    anything but plain data, a file that is not a strsparse checkpoint, or a newer version.
    """
    path = find_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # objects that weights_only refuses to rebuild
        # (torch's own message suggests weights_only=False: wrong for a file one may not trust)
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds Python objects, not only plain tensors and "
            "numbers; strsparse never unpickles those, since loading them can run code from "
            "the file. Checkpoints of `strsparse train` hold data only: this file comes from "
            "elsewhere or was altered"
        ) from exc
    except Exception as exc:  # a truncated zip, a bad magic number, ...
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: the file is truncated or corrupt (an "
            "interrupted copy?); copy it again, or resume from another checkpoint of the run"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        keys = sorted(map(str, state))[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a strsparse checkpoint (no format={CHECKPOINT_FORMAT!r}; "
            f"found {keys}); checkpoints come from `strsparse train`"
        )
    version = state.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has version {version!r}; this strsparse reads versions "
            f"up to {CHECKPOINT_VERSION}: upgrade strsparse"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the keys {missing}")
    return state


def describe_mismatch(
    saved_config: Mapping[str, Any],
    config: Mapping[str, Any],
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, Any],
) -> str:
    """Why a checkpoint's model state does not fit a model, in a line: the model and method
    each side names, then a count of the missing, unexpected and reshaped tensors with a few
    names (``expected``: the model's ``state_dict``; ``found``: the checkpoint's)."""

    def what(cfg: Mapping[str, Any]) -> str:
        model = (cfg.get("model") or {}).get("name", "?")
        method = (cfg.get("sparsity") or {}).get("method", "?")
        return f"{model} with {method}"

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [
        k
        for k in expected
        if k in found
        and isinstance(found[k], torch.Tensor)
        and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = [
        f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with another shape", reshaped),
        )
        if keys
    ]
    return (
        f"the checkpoint holds a {what(saved_config)} model, the config asks for "
        f"{what(config)}: tensors {'; '.join(parts) or 'differ'}"
    )


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's default generators (any integer)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**64)  # torch maps a negative seed the same way


def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU, CUDA), Python and NumPy random states as plain data."""
    py_version, py_state, py_gauss = random.getstate()
    np_state: Any = np.random.get_state()  # the legacy tuple: (name, keys, pos, ...)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the random states captured by ``capture_rng_state``."""
    torch.set_rng_state(state["torch"])
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("checkpoint has CUDA RNG states for a different number of GPUs")
