"""The training loop: ``train(cfg)`` runs one experiment end to end; ``evaluate`` scores a model.

One optimizer step (``train_epoch``), in order: set every group's learning rate from the pure
schedule, advance the sparsity schedules (``handle.step(step, total_steps)``, before the
forward of that step), forward, loss, backward, optimizer step, then the divergence and
Ctrl-C checks. After each epoch: evaluate (top-1/top-5/loss), measure the per-layer record
(sparsity, thresholds, FLOPs) once, hand both to the recorder (history, ``metrics.csv``,
TensorBoard) and write ``checkpoints/last.pt`` atomically. At the end the recorder writes
``summary.json`` and the plots.

Resuming (``strsparse.training.resume``) restores model, optimizer, position, record and
random states (every rank's own under torchrun), and the loader order is a function of
(seed, epoch), so a resumed run ends with the same weights as an uninterrupted one (on CPU,
and on as many processes). Ctrl-C or SIGTERM (on any rank under torchrun) finishes the
current step, saves ``last.pt`` with the position inside the epoch, and raises
``KeyboardInterrupt`` (on every rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from strsparse.atomic import remove_stale_temporaries
from strsparse.config import Config, TrainConfig, config_to_dict, save_config
from strsparse.data import build_datasets, build_loaders
from strsparse.errors import OptionError, StrsparseError
from strsparse.flops import FlopsProfile
from strsparse.flops import profile as profile_flops
from strsparse.methods.structured import structure_report
from strsparse.report import SparsityReport, sparsity_report
from strsparse.slimming import slim
from strsparse.sparsify import SparsityHandle
from strsparse.training.build import build_model, check_config
from strsparse.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    seed_everything,
)
from strsparse.training.distributed import (
    DistributedEnv,
    all_reduce_sum,
    any_rank,
    any_rank_each,
    barrier,
    broadcast_buffers,
    cleanup_distributed,
    gather_to_main,
    on_main,
    setup_distributed,
)
from strsparse.training.optim import build_optimizer, parameter_groups
from strsparse.training.recorder import Recorder, log_to_file
from strsparse.training.resume import (
    Progress,
    epoch_batches,
    for_rank,
    load_progress,
    place_run,
    reseed_rank,
    save_progress,
)
from strsparse.training.schedules import learning_rate

__all__ = ["TrainResult", "TrainingDiverged", "evaluate", "run_dir_of", "train", "train_epoch"]

logger = logging.getLogger(__name__)

# train.amp -> the autocast dtype (None: plain fp32)
_AUTOCAST_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(StrsparseError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class TrainResult:
    """What ``train`` produced: the run directory, final and best metrics, the summary and
    the final per-layer record (sparsity, thresholds and FLOPs of every sparsified layer)."""

    run_dir: Path
    final: dict[str, float]
    best: dict[str, float]
    summary_path: Path
    layers: SparsityReport | None = None
    # structured STR: layer -> (filters or rank-one components alive, total)
    structure: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


def run_dir_of(cfg: Config) -> Path:
    """``output_dir / name``: where a run's files go."""
    return Path(cfg.output_dir) / cfg.name


# -- evaluation ---------------------------------------------------------------------------


def _topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    k_max = min(max(ks), logits.shape[1])
    pred = logits.topk(k_max, dim=1).indices  # (N, k_max)
    hits = pred.eq(target.unsqueeze(1))  # (N, k_max)
    return [int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    device: str | torch.device,
    criterion: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    reduce_across_ranks: bool = False,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent; top-5 is top-k with k = number of classes when
    there are fewer) and mean loss of ``model`` over ``loader``.

    ``criterion`` defaults to plain cross-entropy. With ``reduce_across_ranks`` the sums are
    added over a distributed job (each rank evaluating its shard). The model is left in
    eval mode.
    """
    device = torch.device(device)
    criterion = criterion or nn.CrossEntropyLoss()
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct1 = correct5 = count = 0.0  # summed as floats across ranks
    for inputs, targets in loader:
        inputs, targets = _to_device(inputs, targets, device, channels_last)
        with _autocast(device, autocast_dtype):
            logits = model(inputs)
            loss = criterion(logits.float(), targets)
        n = targets.shape[0]
        loss_sum += loss.double() * n
        c1, c5 = _topk_correct(logits, targets, (1, 5))
        correct1, correct5, count = correct1 + c1, correct5 + c5, count + n
    sums = [float(loss_sum), correct1, correct5, count]
    if reduce_across_ranks:
        sums = all_reduce_sum(sums, device)
    loss_total, correct1, correct5, count = sums
    if count == 0:
        raise OptionError("the evaluation loader yielded no samples")
    return {
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "loss": loss_total / count,
    }


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(
    inputs: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = inputs.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, targets


# -- what a run is made of ----------------------------------------------------------------


def _precision(
    train_cfg: TrainConfig, device: torch.device
) -> tuple[str, torch.dtype | None, bool]:
    """(the ``train.amp`` in effect, its autocast dtype, channels_last): mixed precision and
    channels_last are CUDA-only, so any other device trains in fp32, contiguous."""
    amp, channels_last = train_cfg.amp, train_cfg.channels_last
    if device.type != "cuda":
        if amp != "off" or channels_last:
            logger.info(
                "device %s: mixed precision (train.amp=%s) and channels_last are CUDA-only; "
                "training in fp32, contiguous",
                device,
                amp,
            )
        amp, channels_last = "off", False
    return amp, _AUTOCAST_DTYPES[amp], channels_last


def _base_lr(cfg: Config, world_size: int) -> float:
    """``optim.lr``, times the number of processes with ``optim.lr_scaling=linear``."""
    return cfg.optim.lr * (world_size if cfg.optim.lr_scaling == "linear" else 1)


@dataclass
class _Run:
    """Everything the epochs of one run use, built once by ``_build_run``."""

    cfg: Config
    env: DistributedEnv
    device: torch.device
    model: nn.Module  # the sparsified model: what checkpoints hold
    train_model: nn.Module  # ``model``, or its DistributedDataParallel wrapper
    handle: SparsityHandle | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for train.amp=fp16 only
    criterion: nn.Module
    train_loader: Any
    val_loader: Any
    input_shape: tuple[int, ...]
    steps_per_epoch: int  # the loader's length, capped by train.max_steps_per_epoch
    autocast_dtype: torch.dtype | None
    channels_last: bool

    @property
    def total_steps(self) -> int:
        # the LR and sparsity schedules span the steps actually taken
        return self.cfg.train.epochs * self.steps_per_epoch

    @property
    def ckpt_dir(self) -> Path:
        return run_dir_of(self.cfg) / "checkpoints"

    @property
    def base_lr(self) -> float:
        return _base_lr(self.cfg, self.env.world_size)

    def lr(self, step: int) -> float:
        sc = self.cfg.schedule
        return learning_rate(
            step,
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            name=sc.name,
            warmup_epochs=sc.warmup_epochs,
            min_lr=sc.min_lr,
            step_size=sc.step_size,
            gamma=sc.gamma,
            milestones=sc.milestones,
        )


def _build_run(
    cfg: Config, env: DistributedEnv, device: torch.device, *, loading_weights: bool
) -> _Run:
    """Data, model, sparsity, optimizer, loss: a run ready for its first (or next) step."""
    amp, autocast_dtype, channels_last = _precision(cfg.train, device)
    train_ds, val_ds, info = build_datasets(cfg.data)
    train_loader, val_loader = build_loaders(
        train_ds, val_ds, cfg.data, seed=cfg.seed, distributed=env.enabled
    )
    model, handle, _ = build_model(cfg, info, loading_weights=loading_weights)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in the stub
    oc = cfg.optim
    groups = parameter_groups(
        model,
        handle.threshold_parameters() if handle is not None else (),
        weight_decay=oc.weight_decay,
        threshold_weight_decay=oc.threshold_weight_decay,
        norm_bias_decay=oc.norm_bias_decay,
    )
    optimizer = build_optimizer(
        groups,
        oc.name,
        lr=oc.lr,
        momentum=oc.momentum,
        nesterov=oc.nesterov,
        betas=oc.betas,
        eps=oc.eps,
    )
    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise OptionError("the training loader is empty: check data.train_limit / batch_size")
    ids = [device.index] if device.type == "cuda" else None
    return _Run(
        cfg=cfg,
        env=env,
        device=device,
        model=model,
        train_model=DistributedDataParallel(model, device_ids=ids) if env.enabled else model,
        handle=handle,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=amp == "fp16"),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing),
        train_loader=train_loader,
        val_loader=val_loader,
        input_shape=tuple(info.input_shape),
        steps_per_epoch=steps_per_epoch,
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
    )


# -- one epoch of training steps ----------------------------------------------------------


def train_epoch(
    run: _Run,
    progress: Progress,
    batches: Iterator[Any],
    recorder: Recorder,
    interrupt: _InterruptFlag,
    rng_epoch_start: Any = None,
) -> None:
    """Train the rest of epoch ``progress.epoch``, one optimizer step per batch, and leave
    the epoch's loss and accuracy sums (over all ranks) in ``progress.epoch_state``."""
    model, optimizer, scaler = run.train_model, run.optimizer, run.scaler
    clip, log_every = run.cfg.train.grad_clip, run.cfg.train.log_every
    sums = _EpochSums(progress.epoch_state, run.device)
    check_every = 1 if run.device.type == "cpu" else log_every  # each check syncs the GPU
    every = run.cfg.train.checkpoint_every_steps or math.inf  # mid-epoch checkpoints
    run.model.train()
    bar = _progress_bar(run, progress, done=sums.count)
    try:
        while progress.batch < run.steps_per_epoch:
            inputs, targets = next(batches)
            lr = run.lr(progress.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if run.handle is not None:
                run.handle.step(progress.step, run.total_steps)
            inputs, targets = _to_device(inputs, targets, run.device, run.channels_last)
            with _autocast(run.device, run.autocast_dtype):
                logits = model(inputs)  # (N, num_classes)
                loss = run.criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(run.model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()

            sums.add(loss, logits, targets)
            progress.step += 1
            progress.batch += 1
            bar.update(targets.shape[0])
            # one process stops at once; ranks stop together, at a check they all make
            stop = interrupt.raised and not run.env.enabled
            if progress.step % check_every == 0 or progress.batch == run.steps_per_epoch:
                loss_value = float(loss.detach())
                # one all_reduce: has any rank's loss diverged, has any rank been signalled
                diverged, stop = any_rank_each(
                    [not math.isfinite(loss_value), interrupt.raised], run.device
                )
                if diverged:  # all ranks stop
                    raise TrainingDiverged(_diverged_message(run, progress, loss_value))
                if progress.step % log_every == 0:
                    recorder.log_step(progress.step, loss_value, lr)
                    postfix = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.3g}"}
                    bar.set_postfix(postfix | _target_postfix(run.handle), refresh=False)
            mid_epoch = progress.batch < run.steps_per_epoch  # an epoch end saves anyway
            if mid_epoch and (stop or progress.step % every == 0):
                _save_mid_epoch(run, progress, recorder, sums, rng_epoch_start, stop)
                if stop:
                    barrier(run.env)  # no rank leaves (and torchrun stops the rest) mid-write
                    raise KeyboardInterrupt
            if stop:
                interrupt.agreed = True  # at the epoch's end: stop after it is saved
    finally:
        bar.close()
    if run.env.enabled:
        broadcast_buffers(run.model)
    progress.epoch_state = sums.reduced(run.device)


def _save_mid_epoch(
    run: _Run,
    progress: Progress,
    recorder: Recorder,
    sums: _EpochSums,
    rng_epoch_start: Any,
    interrupted: bool,
) -> None:
    """``last.pt`` inside an epoch (Ctrl-C, SIGTERM, ``train.checkpoint_every_steps``), with
    what an exact resume needs: the running sums and the random state at the epoch's start."""
    progress.epoch_state = sums.state()
    if not _save(run, progress, recorder, rng_epoch_start=rng_epoch_start):
        return
    logger.log(
        logging.WARNING if interrupted else logging.INFO,
        "%ssaved %s at epoch %d, step %d; the same command resumes from it",
        "interrupted: " if interrupted else "",
        run.ckpt_dir / "last.pt",
        progress.epoch + 1,
        progress.step,
    )


class _EpochSums:
    """An epoch's running train-loss and accuracy sums, kept on the device (no sync per
    step), continued from a mid-epoch checkpoint's ``saved`` sums."""

    def __init__(self, saved: Mapping[str, float], device: torch.device) -> None:
        self.loss_sum = torch.tensor(saved.get("loss_sum", 0.0), dtype=torch.float64, device=device)
        self.correct = torch.tensor(int(saved.get("correct", 0)), device=device)
        self.count = int(saved.get("count", 0))
        self.start = time.perf_counter() - float(saved.get("time", 0.0))

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        n = targets.shape[0]
        self.loss_sum += loss.detach().double() * n
        self.correct += (logits.argmax(dim=1) == targets.to(logits.device)).sum()
        self.count += n

    def state(self) -> dict[str, float]:
        """This rank's sums, for a mid-epoch checkpoint."""
        return {
            "loss_sum": float(self.loss_sum),
            "correct": int(self.correct),
            "count": self.count,
            "time": time.perf_counter() - self.start,
        }

    def reduced(self, device: torch.device) -> dict[str, float]:
        """The sums over all ranks, at the end of the epoch."""
        loss_sum, correct, count = all_reduce_sum(
            [float(self.loss_sum), float(self.correct), float(self.count)], device
        )
        return {
            "loss_sum": loss_sum,
            "correct": correct,
            "count": count,
            "time": time.perf_counter() - self.start,
        }


def _progress_bar(run: _Run, progress: Progress, *, done: int) -> tqdm:
    total = _epoch_images(run.train_loader)
    batch_size = getattr(run.train_loader, "batch_size", None)
    if total is not None and batch_size and run.steps_per_epoch < len(run.train_loader):
        total = min(total, run.steps_per_epoch * batch_size)
    return tqdm(
        total=total,
        initial=done,
        unit="img",
        unit_scale=True,
        desc=f"epoch {progress.epoch + 1}/{run.cfg.train.epochs}",
        disable=run.cfg.train.quiet or not run.env.is_main,
        leave=False,
        dynamic_ncols=True,
    )


def _epoch_images(loader: Any) -> int | None:
    sampler = getattr(loader, "sampler", None)
    try:
        return len(sampler)  # type: ignore[arg-type]
    except TypeError:
        return None


def _diverged_message(run: _Run, progress: Progress, value: float) -> str:
    last = run.ckpt_dir / "last.pt"
    kept = f"; {last} (epoch {progress.epoch}) is kept as it was" if last.is_file() else ""
    # under torchrun, a rank whose own loss is finite stops because another's is not
    loss = f"the loss is {value}"
    if math.isfinite(value):
        loss = "the loss of another rank is not finite"
    return (
        f"training diverged: {loss} at epoch {progress.epoch + 1}, step "
        f"{progress.step}{kept}. Lower optim.lr (now {run.cfg.optim.lr}) or add warmup "
        "(schedule.warmup_epochs)"
    )


class _InterruptFlag:
    """Turns Ctrl-C (SIGINT) and SIGTERM (what Slurm, Kubernetes and cloud schedulers send
    before they stop a job, and what torchrun passes on to its workers) into a flag the loop
    reads between steps, so the checkpoint it saves is consistent.

    Under torchrun every rank keeps its own flag, and the ranks agree to stop in the loop's
    check after a step (the all_reduce that also looks for a diverged loss), however many of
    them were signalled; ``agreed`` records a stop agreed at an epoch's last step. A second
    Ctrl-C quits at once; a repeated SIGTERM does not (a scheduler and torchrun may each send
    one to the same worker). Only rank 0 (``announce``) logs the signal. Signal handlers can
    be set in the main thread only: elsewhere the flag stays down.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *, announce: bool = True) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        self.announce = announce
        self.raised = False  # a signal came to this process
        self.agreed = False  # all ranks agreed to stop at the end of the epoch
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.raised:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.raised = True
        if self.announce:
            logger.warning(
                "%s: finishing this step, saving a checkpoint (Ctrl-C again: quit at once)",
                signal.Signals(signum).name,
            )

    def __enter__(self) -> _InterruptFlag:
        if self.active:
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


# -- between epochs -----------------------------------------------------------------------


def _evaluate(run: _Run) -> dict[str, float]:
    # a validation set sharded across ranks (each sees a part) is summed over ranks
    sharded = False
    if run.env.enabled:
        sampler = getattr(run.val_loader, "sampler", None)
        dataset = getattr(run.val_loader, "dataset", None)
        with contextlib.suppress(TypeError):
            sharded = len(sampler) < len(dataset)  # type: ignore[arg-type]
    return evaluate(
        run.model,
        run.val_loader,
        device=run.device,
        autocast_dtype=run.autocast_dtype,
        channels_last=run.channels_last,
        reduce_across_ranks=sharded,
    )


def _flops(model: nn.Module, input_shape: tuple[int, ...]) -> FlopsProfile | None:
    """``strsparse.flops.profile(model, input_shape)``; None when the FLOPs counter cannot
    profile this model."""
    try:
        return profile_flops(model, tuple(input_shape))
    except Exception as exc:  # a custom model the counter does not know: keep training
        logger.warning("FLOPs profile failed (%s: %s); FLOPs are left out", type(exc).__name__, exc)
        return None


def slim_totals(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """For structured STR, the parameters and FLOPs of the slim model (``strsparse.slim``,
    what ``strsparse convert RUN --slim`` writes) as ``slim_params`` and ``slim_flops``:
    zeroed filters take the next layer's inputs with them, which the zeros in the weights do
    not show. Empty for other models, and where slim cannot follow the model (a warning says
    why)."""
    if not structure_report(model):
        return {}
    device = next(model.parameters()).device
    try:
        small = slim(model, torch.zeros(1, *input_shape, device=device))
    except Exception as exc:  # SlimError names the layer; anything else: keep the summary
        logger.warning("the slim model's size is left out (%s: %s)", type(exc).__name__, exc)
        return {}
    totals = {"slim_params": float(sum(p.numel() for p in small.parameters()))}
    profile = _flops(small, tuple(input_shape))
    if profile is not None:
        totals["slim_flops"] = float(profile.overall.flops)
    return totals


def _measure_layers(run: _Run) -> SparsityReport:
    """The per-layer record: sparsity and threshold of every sparsified layer, joined with
    FLOPs (profiled on rank 0 only: nothing else reads them)."""
    profile = _flops(run.model, run.input_shape) if run.env.is_main else None
    return sparsity_report(run.model, flops=profile)


def _save(
    run: _Run,
    progress: Progress,
    recorder: Recorder,
    *,
    is_best: bool = False,
    rng_epoch_start: Any = None,
) -> bool:
    """Write ``last.pt`` (rank 0) with every rank's random states and running sums, gathered
    to rank 0 (every rank calls this). Returns whether it was written (on rank 0): a rank
    whose running sums are not finite leaves the last good checkpoint as it was."""
    own = {"rng": capture_rng_state(), "epoch_state": dict(progress.epoch_state)}
    if rng_epoch_start is not None:
        own["rng_epoch_start"] = rng_epoch_start
    ranks = gather_to_main(run.env, own)
    if ranks is None:  # not rank 0
        return False
    if not all(math.isfinite(r["epoch_state"].get("loss_sum", 0.0)) for r in ranks):
        return False  # never replace a good checkpoint with a diverged state
    state = {
        "config": config_to_dict(run.cfg),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        **recorder.state(),
    }
    save_progress(
        run.ckpt_dir,
        progress,
        state,
        is_best=is_best,
        save_every=run.cfg.train.save_every,
        rng_epoch_start=rng_epoch_start,
        ranks=ranks,
    )
    return True


def _target_record(handle: SparsityHandle | None) -> dict[str, float]:
    """The ``target`` and ``scheduled`` columns: NaN (empty) without a target."""
    status = handle.target_status() if handle is not None else None
    if status is None:
        return {"target": math.nan, "scheduled": math.nan}
    return {"target": status["target"], "scheduled": status["scheduled"]}


# progress-bar name of each kind of target (structured STR: the fraction of filters or
# rank-one components removed)
_TARGET_FIELDS = {
    "sparsity": "sparsity",
    "flops": "flops",
    "filters": "filters pruned",
    "ranks": "ranks pruned",
}


def _target_postfix(handle: SparsityHandle | None) -> dict[str, str]:
    """Progress-bar fields of a target: what was reached and what the schedule asks now."""
    status = handle.target_status() if handle is not None else None
    if status is None:
        return {}
    name = _TARGET_FIELDS[status["kind"]]
    return {name: f"{100 * status['achieved']:.2f}%", "target": f"{100 * status['scheduled']:.2f}%"}


def _target_summary(
    handle: SparsityHandle | None,
    final: Mapping[str, float],
    structure: Mapping[str, tuple[int, int]],
) -> dict[str, Any] | None:
    """summary.json's ``target``: kind, target and what the final model reached
    (``structure``: ``structure_report`` of the final model)."""
    status = handle.target_status() if handle is not None else None
    if status is None:
        return None
    if status["kind"] == "sparsity":
        achieved = final.get("sparsity", math.nan)
    elif status["kind"] in ("filters", "ranks"):
        total = sum(n for _, n in structure.values())
        alive = sum(a for a, _ in structure.values())
        achieved = 1.0 - alive / total if total else math.nan
    elif structure:  # a FLOPs target with a structure counts the slim model
        achieved = final.get("slim_flops", math.nan) / final.get("flops", math.nan)
    else:
        achieved = final.get("sparse_flops", math.nan) / final.get("flops", math.nan)
    return {"kind": status["kind"], "target": status["target"], "achieved": achieved}


def _end_epoch(run: _Run, progress: Progress, recorder: Recorder) -> SparsityReport:
    """Evaluate, measure the per-layer record, record the epoch and save ``last.pt`` (and
    ``best.pt`` when the validation top-1 is the best so far)."""
    sums = progress.epoch_state
    train_loss = sums["loss_sum"] / max(sums["count"], 1)
    if not math.isfinite(train_loss):
        raise TrainingDiverged(_diverged_message(run, progress, train_loss))
    val = _evaluate(run)
    if not math.isfinite(val["loss"]):
        raise TrainingDiverged(_diverged_message(run, progress, val["loss"]))
    layers = _measure_layers(run)
    structure = structure_report(run.model)  # structured STR: alive filters / ranks per layer
    progress.epoch += 1
    progress.batch = 0
    row = {
        "epoch": progress.epoch,
        "step": progress.step,
        "lr": run.lr(max(progress.step - 1, 0)),
        "train_loss": train_loss,
        "train_top1": 100.0 * sums["correct"] / max(sums["count"], 1),
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "sparsity": layers.sparsity,
        "sparse_flops": layers.model_totals()["sparse_flops"],
        "time": sums["time"],
        "structure": " ".join(f"{n}={a}/{total}" for n, (a, total) in structure.items()),
        **_target_record(run.handle),
    }
    is_best = recorder.add_epoch(row, layers, val)
    progress.epoch_state = {}
    _save(run, progress, recorder, is_best=is_best)
    recorder.write_epoch(row, layers, structure)
    return layers


# -- the run ------------------------------------------------------------------------------


def train(cfg: Config, *, resume: str | os.PathLike | None = None) -> TrainResult:
    """Train ``cfg`` (a ``strsparse.config.Config``) and write the run directory.

    Run directory ``cfg.output_dir / cfg.name``: ``config.yaml``, ``checkpoints/last.pt``
    (every epoch) and ``best.pt``, ``metrics.csv``, ``tensorboard/``, ``train.log``,
    ``summary.json``, ``plots/*.png``. Resumes from ``resume`` (a run directory or a
    checkpoint file), or automatically when the run directory holds ``checkpoints/last.pt``.

    Under ``torchrun`` each process trains a shard (DistributedDataParallel); only rank 0
    writes files. Raises ``TrainingDiverged`` when the loss is not finite (the checkpoint of
    the last good epoch stays as it was) and re-raises ``KeyboardInterrupt`` after saving.
    """
    env, device = setup_distributed(cfg.device)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, env, device, resume)
    finally:
        # leave the process as it was: train() may be one call among others
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        cleanup_distributed(env)


def _train(
    cfg: Config, env: DistributedEnv, device: torch.device, resume: str | os.PathLike | None
) -> TrainResult:
    check_config(cfg)  # a bad model or method option: an error before any data or file
    place = on_main(env, lambda: place_run(cfg.output_dir, cfg.name, config_to_dict(cfg), resume))
    run_dir = place.run_dir
    # the run's own name and place: what its config.yaml and summary say
    cfg = dataclasses.replace(cfg, output_dir=str(run_dir.parent), name=run_dir.name)
    ckpt_path = place.checkpoint
    ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    if ckpt is not None:  # this rank's own random states and running sums
        ckpt = for_rank(ckpt, env.rank, env.world_size)
    if env.is_main:
        remove_stale_temporaries(run_dir)  # left by a write that was killed half-way
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").is_file():  # written once, when the run starts
            save_config(cfg, run_dir / "config.yaml")
    with log_to_file(run_dir / "train.log", env.is_main):
        _configure_torch(cfg, device)
        seed_everything(cfg.seed)
        run = _build_run(cfg, env, device, loading_weights=ckpt is not None)
        _configure_threads(cfg, env, device)
        if ckpt is not None:
            progress = load_progress(
                ckpt,
                config=config_to_dict(cfg),
                model=run.model,
                optimizer=run.optimizer,
                scaler=run.scaler if run.scaler.is_enabled() else None,
            )
            logger.info(
                "resuming from %s at epoch %d, step %d", ckpt_path, progress.epoch, progress.step
            )
        else:
            progress = Progress()
            # each rank draws its own dropout/augmentation randomness from here on
            seed_everything(cfg.seed + env.rank)
        purge_step = progress.step if ckpt is not None else None
        recorder = Recorder(cfg, run_dir, enabled=env.is_main, saved=ckpt, purge_step=purge_step)
        try:
            layers = _fit(run, progress, recorder, ckpt)
            return _finish(run, progress, recorder, layers)
        finally:
            recorder.close()


def _fit(
    run: _Run, progress: Progress, recorder: Recorder, ckpt: Mapping[str, Any] | None
) -> SparsityReport | None:
    """Train the epochs left; returns the last epoch's per-layer record (None if none ran)."""
    if ckpt is not None and progress.batch == 0:
        if ckpt["rng"] is None:  # saved by another number of processes
            reseed_rank(run.cfg.seed, progress.step, run.env.rank)
        else:
            restore_rng_state(ckpt["rng"])
    epochs = run.cfg.train.epochs
    if progress.epoch >= epochs:
        logger.info("the run has completed its %d epochs already", epochs)
        return None
    if run.env.enabled:
        logger.info(
            "%d processes x batch %d: global batch %d, lr %g (optim.lr_scaling=%s)",
            run.env.world_size,
            run.cfg.data.batch_size,
            run.env.world_size * run.cfg.data.batch_size,
            run.base_lr,
            run.cfg.optim.lr_scaling,
        )
    logger.info(
        "training %s (%s) on %s for %d epochs x %d steps, device %s%s",
        run.cfg.model.name,
        run.handle.method if run.handle is not None else "dense",
        run.cfg.data.name,
        epochs,
        run.steps_per_epoch,
        run.device,
        f", {run.env.world_size} processes" if run.env.enabled else "",
    )
    resume = ckpt if ckpt is not None and progress.batch > 0 else None  # a mid-epoch stop
    if progress.step == 0:
        recorder.add_start(sparsity_report(run.model))
    layers = None
    with _InterruptFlag(announce=run.env.is_main) as interrupt:
        while progress.epoch < epochs:
            batches, rng_epoch_start = epoch_batches(
                run.train_loader,
                progress,
                seed=run.cfg.seed,
                resume=resume,
                keep_epoch_start=interrupt.active or bool(run.cfg.train.checkpoint_every_steps),
                rank=run.env.rank,
            )
            resume = None
            train_epoch(run, progress, batches, recorder, interrupt, rng_epoch_start)
            layers = _end_epoch(run, progress, recorder)
            # saved at the epoch's end: stop there when signalled (one all_reduce an epoch
            # catches a signal that came during the evaluation), unless the run is done
            stop = interrupt.agreed or any_rank(interrupt.raised, run.device)
            if stop and progress.epoch < epochs:
                if run.env.is_main:
                    logger.warning(
                        "interrupted: saved %s at the end of epoch %d; the same command "
                        "resumes from it",
                        run.ckpt_dir / "last.pt",
                        progress.epoch,
                    )
                raise KeyboardInterrupt
    return layers


def _finish(
    run: _Run, progress: Progress, recorder: Recorder, layers: SparsityReport | None
) -> TrainResult:
    if layers is None:  # no epoch ran here (a finished run, resumed): measure the model
        layers = _measure_layers(run)
    final = dict(recorder.metrics)
    if not final:  # nothing trained (e.g. zero epochs): evaluate what there is
        final = {**_evaluate(run), "sparsity": layers.sparsity}
    if run.env.is_main:
        final.update(layers.model_totals())
        final.update(slim_totals(run.model, run.input_shape))
    structure = structure_report(run.model)
    summary_path = recorder.finish(
        final,
        layers,
        epochs=progress.epoch,
        steps=progress.step,
        target=_target_summary(run.handle, final, structure),
        structure=structure,
    )
    logger.info(
        "done: top1 %.2f%% (best %.2f%%), sparsity %.2f%%; results in %s",
        final["top1"],
        recorder.best.get("top1", final["top1"]),
        100 * final["sparsity"],
        run_dir_of(run.cfg),
    )
    return TrainResult(
        run_dir=run_dir_of(run.cfg),
        final={k: float(v) for k, v in final.items()},
        best={k: float(v) for k, v in (recorder.best or final).items()},
        summary_path=summary_path,
        layers=layers,
        structure=structure,
    )


# -- process set-up -----------------------------------------------------------------------


def _configure_torch(cfg: Config, device: torch.device) -> None:
    deterministic = cfg.train.deterministic
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def _configure_threads(cfg: Config, env: DistributedEnv, device: torch.device) -> None:
    """CPU intra-op threads: ``train.num_threads``, else torch's default shared out between
    the processes torchrun starts on this machine.

    On an idle 2-core machine a LeNet-5 step (batch 128) takes 31 ms on 1 thread and 17 ms
    on 2; on a machine busy with other work, fewer threads can be faster: set
    ``train.num_threads`` then.
    """
    if device.type != "cpu":
        return
    threads = cfg.train.num_threads
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        cores = cores or os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        threads = max(1, min(torch.get_num_threads(), cores // max(local, 1)))
    if threads != torch.get_num_threads():
        logger.info("CPU threads: %d", threads)
        torch.set_num_threads(threads)
