"""Saving a run's position and resuming it exactly, at an epoch boundary or mid-epoch.

A checkpoint holds the model, optimizer and scaler, the position (``Progress``), the record
(``Recorder.state``) and the random states. Resuming mid-epoch replays the loader to where
the run stopped: the loader's order is a function of (seed, epoch), the random state at the
start of the epoch is restored before the loader is iterated (its workers and shuffling draw
from it), then the state at the interruption, so every later step draws what it would have.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from strsparse.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    copy_atomic,
    find_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

__all__ = ["Progress", "epoch_batches", "load_progress", "resume_path", "save_progress"]

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a run is; a checkpoint saves it."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    batch: int = 0  # batches of epoch `epoch` already trained (> 0: a mid-epoch checkpoint)
    epoch_state: dict[str, float] = field(default_factory=dict)  # that epoch's running sums


def resume_path(run_dir: Path, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume: ``resume`` (a run directory or file) if given, else the run
    directory's own ``checkpoints/last.pt`` if there is one, else None (a fresh run)."""
    if resume is not None:
        return find_checkpoint(resume)
    last = run_dir / "checkpoints" / "last.pt"
    return last if last.is_file() else None


def _diff_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            keys += _diff_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(f"{prefix}{key}")
    return keys


def load_progress(
    ckpt: Mapping[str, Any],
    *,
    config: Mapping[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any = None,
) -> Progress:
    """Load model, optimizer and scaler states of ``ckpt`` strictly; return its position.
    A configuration that differs from the checkpoint's is named in a warning."""
    differing = _diff_keys(ckpt["config"], config)
    if differing:
        logger.warning(
            "resuming with a configuration that differs from the checkpoint's in: %s",
            ", ".join(differing),
        )
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"the checkpoint does not fit this configuration's model/optimizer: {exc}"
        ) from exc
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return Progress(
        epoch=int(ckpt["epoch"]),
        step=int(ckpt["step"]),
        batch=int(ckpt.get("batch", 0)),
        epoch_state=dict(ckpt.get("epoch_state") or {}),
    )


def set_loader_epoch(loader: Any, epoch: int, seed: int) -> None:
    """Make the loader's order a function of (seed, epoch): DistributedSampler.set_epoch, or
    reseed the sampler's / loader's generator."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
        return
    generator = getattr(sampler, "generator", None) or getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed + epoch)


def epoch_batches(
    loader: Any,
    progress: Progress,
    *,
    seed: int,
    resume: Mapping[str, Any] | None,
    keep_epoch_start: bool,
) -> tuple[Iterator[Any], Any]:
    """The batches of epoch ``progress.epoch`` still to train, and the random state at the
    start of the epoch (when ``keep_epoch_start``, for a mid-epoch checkpoint; else None).

    ``resume`` is the checkpoint of an interrupted epoch: its first ``progress.batch``
    batches are drawn and dropped and its random states restored. Without it the epoch
    starts afresh (``progress.batch`` and the running sums are reset).
    """
    set_loader_epoch(loader, progress.epoch, seed)
    if resume is not None and "rng_epoch_start" in resume:
        restore_rng_state(resume["rng_epoch_start"])
    epoch_start = capture_rng_state() if keep_epoch_start else None
    batches = iter(loader)
    if resume is not None:
        for _ in range(progress.batch):
            next(batches)
        restore_rng_state(resume["rng"])
    else:
        progress.batch, progress.epoch_state = 0, {}
    return batches, epoch_start


def save_progress(
    ckpt_dir: Path,
    progress: Progress,
    state: Mapping[str, Any],
    *,
    is_best: bool = False,
    save_every: int | None = None,
    rng_epoch_start: Any = None,
) -> Path:
    """Write ``ckpt_dir/last.pt`` atomically: ``state`` (config, model, optimizer, scaler,
    the record) with ``progress`` and the random states. Copy it to ``best.pt`` when
    ``is_best`` and to ``epoch_NNN.pt`` every ``save_every`` epochs."""
    payload = {
        **state,
        "epoch": progress.epoch,
        "step": progress.step,
        "batch": progress.batch,
        "epoch_state": dict(progress.epoch_state),
        "rng": capture_rng_state(),
    }
    if rng_epoch_start is not None:
        payload["rng_epoch_start"] = rng_epoch_start
    last = save_checkpoint(payload, ckpt_dir / "last.pt")
    if is_best:
        copy_atomic(last, ckpt_dir / "best.pt")
    if save_every and progress.batch == 0 and progress.epoch % save_every == 0:
        copy_atomic(last, ckpt_dir / f"epoch_{progress.epoch:03d}.pt")
    return last
