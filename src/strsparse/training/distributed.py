"""Multi-process data-parallel training launched by ``torchrun``.

``torchrun --nproc_per_node=N -m strsparse train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in each process; ``setup_distributed`` reads them, joins the process group
(gloo on CPU, NCCL on CUDA) and picks the process's device. Sparsity state stays identical
on every rank without extra communication: DistributedDataParallel broadcasts rank 0's
parameters and buffers (raw weights, STR ``s``, masks) at construction and buffers before
each forward, and ``SparsityHandle.step`` is a deterministic function of the step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from strsparse.errors import OptionError

__all__ = [
    "DistributedEnv",
    "all_reduce_sum",
    "any_rank",
    "any_rank_each",
    "barrier",
    "broadcast_buffers",
    "cleanup_distributed",
    "gather_to_main",
    "on_main",
    "setup_distributed",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in a data-parallel job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, logs and progress bars."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise OptionError(f"environment variable {name}={value!r} must be an integer") from None


def setup_distributed(device: str) -> tuple[DistributedEnv, torch.device]:
    """Join the process group described by torchrun's environment, if any.

    ``device`` is the configured device ('auto', 'cpu', 'cuda', 'cuda:1', ...); in a
    distributed CUDA job each process takes ``cuda:LOCAL_RANK``. Returns the environment and
    the device this process trains on.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device)
    if world_size <= 1:
        return DistributedEnv(), resolved
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        initialized_here = True
        logger.info("joined process group: rank %d of %d (%s)", rank, world_size, backend)
    env = DistributedEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        initialized_here=initialized_here,
    )
    return env, resolved


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else as torch understands it."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise OptionError(
            f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device={device!r} asked for CUDA, but no CUDA device is available")
    return resolved


def cleanup_distributed(env: DistributedEnv) -> None:
    """Leave the process group if ``setup_distributed`` joined it."""
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    use_count = t._use_count  # type: ignore[attr-defined]  # not in torch's stubs
    held = use_count()
    dist.all_reduce(t)
    # The collective's work object still holds ``t`` when the call returns and lets go of it
    # a moment later on the backend's own thread, taking the GIL to do so: if that moment
    # fell in the interpreter's shutdown, the process would abort ("terminate called without
    # an active exception"). Wait (the GIL released) until it has let go.
    deadline = time.monotonic() + 5.0
    while use_count() > held and time.monotonic() < deadline:
        time.sleep(1e-5)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (``flag`` itself when not distributed)."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def any_rank_each(flags: Sequence[bool], device: torch.device) -> list[bool]:
    """For each of ``flags``, whether it is true on any rank, in one all_reduce: every rank
    gets the same answer, whenever each set its own flags."""
    return [total > 0 for total in all_reduce_sum([float(f) for f in flags], device)]


def barrier(env: DistributedEnv) -> None:
    """Wait until every rank gets here (nothing when not distributed)."""
    if env.enabled and dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers to every rank.

    DistributedDataParallel broadcasts buffers *before* each forward, so after the last
    training step each rank holds BatchNorm running statistics updated by its own batch;
    this makes them (and every mask) identical before evaluation and checkpointing.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


def gather_to_main(env: DistributedEnv, value: T) -> list[T] | None:
    """Every rank's ``value``, in rank order, on rank 0 (None on the other ranks): for what
    only rank 0 writes but each rank holds its own of, such as random states. A collective:
    every rank must call it."""
    if not (env.enabled and dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def on_main(env: DistributedEnv, fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only, its result (or its exception) shared with every rank:
    for decisions all ranks must agree on, such as the run directory."""
    if not (env.enabled and dist.is_available() and dist.is_initialized()):
        return fn()
    box: list[Any] = [None]
    if env.is_main:
        try:
            box[0] = (True, fn())
        except Exception as exc:  # every rank raises it, none waits forever
            box[0] = (False, exc)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value
