"""Where a run goes, saving its position, and resuming it exactly (also mid-epoch).

A run directory only ever describes what ran in it. ``place_run`` continues the run of
``output_dir/name`` only when its saved configuration matches (keys that do not change what
is computed, such as ``train.quiet`` or ``data.num_workers``, may differ); a different
configuration under the same name goes to the first free ``name-1``, ``name-2``, ... (or the
one holding that same configuration). ``resume=`` continues exactly the run it names, in its
own directory, and refuses a configuration that would change it.

A checkpoint holds the model, optimizer and scaler, the position (``Progress``), the record
(``Recorder.state``) and the random states. Resuming mid-epoch replays the loader to where
the run stopped: the loader's order is a function of (seed, epoch), the random state at the
start of the epoch is restored before the loader is iterated (its workers and shuffling draw
from it), then the state at the interruption, so every later step draws what it would have.

Under torchrun each rank draws its own dropout and augmentation randomness and keeps its own
running sums, so a checkpoint keeps every rank's (``ranks``, gathered to rank 0, which
writes the file) and ``for_rank`` gives each rank its own back: a resumed multi-process run
is exact too, when it runs on as many processes as the one that saved.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from strsparse.config import config_from_dict, config_to_dict
from strsparse.errors import StrsparseError
from strsparse.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    copy_atomic,
    describe_mismatch,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)

__all__ = [
    "Progress",
    "RunMismatchError",
    "RunPlace",
    "config_differences",
    "epoch_batches",
    "for_rank",
    "load_progress",
    "place_run",
    "reseed_rank",
    "save_progress",
    "set_loader_epoch",
]

# Keys that say where and how verbosely a run happens, not what it computes: a rerun that
# differs only in these continues the run.
NEUTRAL_KEYS = frozenset(
    {
        "name",
        "output_dir",
        "device",
        "data.root",
        "data.num_workers",
        "train.quiet",
        "train.log_every",
        "train.num_threads",
        "train.tensorboard",
        "train.save_every",
        "train.checkpoint_every_steps",
    }
)

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a run is; a checkpoint saves it."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    batch: int = 0  # batches of epoch `epoch` already trained (> 0: a mid-epoch checkpoint)
    epoch_state: dict[str, float] = field(default_factory=dict)  # that epoch's running sums


class RunMismatchError(StrsparseError, ValueError):
    """``resume=`` names a run trained with another configuration."""


@dataclass(frozen=True)
class RunPlace:
    """The run directory a run writes to, and the checkpoint it resumes (None: a new run)."""

    run_dir: Path
    checkpoint: Path | None


def _diff_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping | None) and isinstance(vb, Mapping | None) and va != vb:
            keys += _diff_keys(va or {}, vb or {}, f"{prefix}{key}.")
        elif va != vb:
            keys.append(f"{prefix}{key}")
    return keys


def config_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configurations (as plain dicts), leaving
    out ``NEUTRAL_KEYS``."""
    return [key for key in _diff_keys(saved, wanted) if key not in NEUTRAL_KEYS]


def _describe(keys: list[str], saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    def value(data: Mapping[str, Any], key: str) -> Any:
        for part in key.split("."):
            data = data.get(part) if isinstance(data, Mapping) else None  # type: ignore[assignment]
        return data

    shown = [f"{k} {value(saved, k)!r} -> {value(wanted, k)!r}" for k in keys[:4]]
    return ", ".join(shown) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _with_defaults(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved configuration with the keys it predates filled in with their defaults, so
    that a run started before a key existed still matches; as saved if it does not load."""
    try:
        return config_to_dict(config_from_dict(saved))
    except StrsparseError:
        return dict(saved)


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The configuration a run directory was started with (its ``config.yaml``, else its
    checkpoint's), or None when it holds no run."""
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        data = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        return _with_defaults(data) if isinstance(data, dict) else {}
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        return _with_defaults(load_checkpoint(last)["config"])
    return None


def _run_dir_of(checkpoint: Path) -> Path | None:
    """``RUN/checkpoints/x.pt`` -> ``RUN``; None for a checkpoint outside a run directory."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def place_run(
    output_dir: str | os.PathLike, name: str, config: Mapping[str, Any], resume: Any = None
) -> RunPlace:
    """Where a run of ``config`` (a plain dict) named ``name`` goes, and what it resumes.

    With ``resume`` (a run directory or checkpoint): that run, in its own directory; a
    ``config`` that differs from the run's in more than ``NEUTRAL_KEYS`` is refused with
    ``RunMismatchError``. Without: ``output_dir/name`` if it is free or holds a run of the same
    configuration (resumed from its ``checkpoints/last.pt``), else the first ``name-N`` that
    is free or holds that configuration.
    """
    if resume is not None:
        checkpoint = find_checkpoint(resume)
        in_checkpoint = _with_defaults(load_checkpoint(checkpoint)["config"])
        differing = config_differences(in_checkpoint, config)
        if differing:
            raise RunMismatchError(
                f"cannot resume {str(resume)!r} with this configuration: it changes "
                f"{_describe(differing, in_checkpoint, config)}. Resume with the run's own "
                "configuration (strsparse train --resume RUN_DIR alone reads it), or start a "
                "new run without --resume"
            )
        run_dir = _run_dir_of(checkpoint)
        if run_dir is not None:
            return RunPlace(run_dir, checkpoint)
        place = place_run(output_dir, name, config)  # a loose checkpoint file: a new run
        return RunPlace(place.run_dir, checkpoint)
    base = Path(output_dir) / name
    for version in itertools.count():
        run_dir = base if version == 0 else base.with_name(f"{base.name}-{version}")
        saved = _saved_config(run_dir)
        if saved is None:
            if run_dir.exists() and any(run_dir.iterdir()):
                continue  # something else lives here: leave it alone
            if version:
                logger.warning(
                    "%s holds a run with another configuration; this run goes to %s",
                    base,
                    run_dir,
                )
            return RunPlace(run_dir, None)
        if not config_differences(saved, config):
            if version:
                logger.info("continuing the run of this configuration in %s", run_dir)
            last = run_dir / "checkpoints" / "last.pt"
            return RunPlace(run_dir, last if last.is_file() else None)
    raise AssertionError("unreachable")


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
    except RuntimeError as exc:
        mismatch = describe_mismatch(ckpt["config"], config, model.state_dict(), ckpt["model"])
        raise CheckpointError(f"cannot resume: {mismatch}") from exc
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            "cannot resume: the checkpoint's optimizer state does not fit this "
            f"configuration's optimizer ({ckpt['config'].get('optim', {}).get('name')!r} "
            f"saved, {config.get('optim', {}).get('name')!r} asked): {exc}"
        ) from exc
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return Progress(
        epoch=int(ckpt["epoch"]),
        step=int(ckpt["step"]),
        batch=int(ckpt.get("batch", 0)),
        epoch_state=dict(ckpt.get("epoch_state") or {}),
    )


# what each rank of a distributed run holds of its own: its random states and running sums
RANK_KEYS = ("rng", "rng_epoch_start", "epoch_state")


def for_rank(ckpt: Mapping[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """``ckpt`` as rank ``rank`` of ``world_size`` processes resumes it: with that rank's own
    random states and running sums (``RANK_KEYS``) in place of rank 0's.

    A checkpoint from before per-rank states were kept gives every rank rank 0's (resuming a
    multi-process run from it is not exact). A checkpoint saved by another number of
    processes resumes at an epoch boundary, not exactly: ``rng`` is None there and each rank
    reseeds (``reseed_rank``); mid-epoch it is refused with ``CheckpointError``, since the
    position inside the epoch is one of each process's shard.
    """
    saved_world = ckpt.get("world_size")
    if saved_world is None or saved_world == world_size:
        ranks = ckpt.get("ranks")
        if ranks is None or world_size == 1:
            if saved_world is None and world_size > 1 and rank == 0:  # one warning per job
                logger.warning(
                    "this checkpoint predates per-rank random states: every rank resumes with "
                    "rank 0's, so the resumed run is not exactly the uninterrupted one"
                )
            return dict(ckpt)
        shared = {key: value for key, value in ckpt.items() if key not in RANK_KEYS}
        return {**shared, **{key: ranks[rank][key] for key in RANK_KEYS if key in ranks[rank]}}
    if int(ckpt.get("batch", 0)) > 0:
        raise CheckpointError(
            f"this checkpoint was saved inside epoch {int(ckpt['epoch']) + 1} by {saved_world} "
            f"process(es); resuming it on {world_size} cannot continue that epoch (each "
            f"process's position is one of its own shard). Resume on {saved_world} "
            f"(torchrun --nproc_per_node={saved_world}), or from a checkpoint saved at the end "
            "of an epoch (train.save_every keeps checkpoints/epoch_NNN.pt)"
        )
    if rank == 0:
        logger.warning(
            "resuming a checkpoint of %d process(es) on %d: the data is sharded otherwise and "
            "every rank restarts its random streams, so the run continues, but not exactly as "
            "it would have on %d",
            saved_world,
            world_size,
            saved_world,
        )
    shared = {key: value for key, value in ckpt.items() if key not in RANK_KEYS}
    return {**shared, "rng": None}


def reseed_rank(seed: int, step: int, rank: int) -> None:
    """Seed torch, Python and NumPy for rank ``rank`` continuing a run at ``step`` without a
    saved state of its own (``for_rank`` on another number of processes)."""
    seed_everything((seed * 1_000_003 + step) * 1_000_003 + rank)


def set_loader_epoch(loader: Any, epoch: int, seed: int, rank: int = 0) -> None:
    """Make the loader's order and its workers' random streams a function of (seed, epoch,
    rank): DistributedSampler.set_epoch, and reseed the loader's generator (which seeds its
    workers, and is the sampler's own in one process) with ``seed + epoch`` on rank 0, a
    distinct seed on every other rank."""
    sampler = getattr(loader, "sampler", None)
    set_epoch = getattr(sampler, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)
    generator = getattr(sampler, "generator", None) or getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed + epoch + 1_000_003 * rank)


def epoch_batches(
    loader: Any,
    progress: Progress,
    *,
    seed: int,
    resume: Mapping[str, Any] | None,
    keep_epoch_start: bool,
    rank: int = 0,
) -> tuple[Iterator[Any], Any]:
    """The batches of epoch ``progress.epoch`` still to train, and the random state at the
    start of the epoch (when ``keep_epoch_start``, for a mid-epoch checkpoint; else None).

    ``resume`` is the checkpoint of an interrupted epoch: its first ``progress.batch``
    batches are drawn and dropped and its random states restored. Without it the epoch
    starts afresh (``progress.batch`` and the running sums are reset).
    """
    set_loader_epoch(loader, progress.epoch, seed, rank)
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
    ranks: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``ckpt_dir/last.pt`` atomically: ``state`` (config, model, optimizer, scaler,
    the record) with ``progress`` and the random states. Copy it to ``best.pt`` when
    ``is_best`` and to ``epoch_NNN.pt`` every ``save_every`` epochs.

    ``ranks``: in a distributed run, every rank's ``RANK_KEYS`` (rank 0's first), kept under
    ``ranks`` beside rank 0's own at the top level, which older readers use."""
    payload = {
        **state,
        "epoch": progress.epoch,
        "step": progress.step,
        "batch": progress.batch,
        "epoch_state": dict(progress.epoch_state),
        "rng": ranks[0]["rng"] if ranks else capture_rng_state(),
        "world_size": len(ranks) if ranks else 1,
    }
    if rng_epoch_start is not None:
        payload["rng_epoch_start"] = rng_epoch_start
    if ranks is not None and len(ranks) > 1:
        payload["ranks"] = [{k: r[k] for k in RANK_KEYS if r.get(k) is not None} for r in ranks]
    last = save_checkpoint(payload, ckpt_dir / "last.pt")
    if is_best:
        copy_atomic(last, ckpt_dir / "best.pt")
    if save_every and progress.batch == 0 and progress.epoch % save_every == 0:
        copy_atomic(last, ckpt_dir / f"epoch_{progress.epoch:03d}.pt")
    return last
