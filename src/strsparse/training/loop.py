"""The training loop: ``train(cfg)`` runs one experiment end to end; ``evaluate`` scores a model.

One optimizer step, in order: set every group's learning rate from the pure schedule, advance
the sparsity schedules (``handle.step(step, total_steps)``, before the forward of that step),
forward, loss, backward, optimizer step. After each epoch: evaluate (top-1/top-5/loss),
measure sparsity and FLOPs, append to the history, write ``checkpoints/last.pt`` atomically,
``metrics.csv`` and TensorBoard scalars. At the end: ``summary.json`` and the plots.

Resuming restores model, optimizer, step, epoch, history and random states, and the loader
order is a function of (seed, epoch), so a resumed run ends with the same weights as an
uninterrupted one (on CPU). Ctrl-C finishes the current step, saves ``last.pt`` with the
position inside the epoch, and re-raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from strsparse import plots
from strsparse.atomic import write_atomic
from strsparse.budgets import Budget
from strsparse.config import Config, config_to_dict, save_config
from strsparse.data import build_datasets, build_loaders
from strsparse.errors import StrsparseError
from strsparse.flops import FlopsProfile
from strsparse.flops import profile as profile_flops
from strsparse.methods.base import get_parametrization
from strsparse.methods.structured import structure_report
from strsparse.report import sparsity_report
from strsparse.sparsify import SparsityHandle, sparse_layers
from strsparse.training.build import build_model
from strsparse.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    copy_atomic,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from strsparse.training.distributed import (
    DistributedEnv,
    all_reduce_sum,
    broadcast_buffers,
    cleanup_distributed,
    setup_distributed,
)
from strsparse.training.logs import CSV_COLUMNS, RunLogger
from strsparse.training.optim import build_optimizer, parameter_groups
from strsparse.training.schedules import learning_rate

__all__ = ["TrainResult", "TrainingDiverged", "evaluate", "run_dir_of", "train"]

logger = logging.getLogger(__name__)

# train.amp -> the autocast dtype (None: plain fp32)
_AUTOCAST_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(StrsparseError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class TrainResult:
    """What ``train`` produced: the run directory, final and best metrics, the summary."""

    run_dir: Path
    final: dict[str, float]
    best: dict[str, float]
    summary_path: Path


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
    correct1 = correct5 = count = 0
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
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
        raise ValueError("the evaluation loader yielded no samples")
    return {
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "loss": loss_total / count,
    }


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- helpers ------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_loader_epoch(loader: Any, epoch: int, seed: int) -> None:
    """Make the loader's order a function of (seed, epoch): DistributedSampler.set_epoch, or
    reseed the sampler's / loader's generator."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
        return
    generator = getattr(sampler, "generator", None) or getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed + epoch)


def _epoch_images(loader: Any) -> int | None:
    sampler = getattr(loader, "sampler", None)
    try:
        return len(sampler)  # type: ignore[arg-type]
    except TypeError:
        return None


@torch.no_grad()
def _layer_stats(model: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
    sparsity: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    for name, module in sparse_layers(model).items():
        weight = module.weight
        sparsity[name] = float((weight == 0).sum()) / max(weight.numel(), 1)
        t = get_parametrization(module).threshold()
        if t is not None:
            thresholds[name] = float(t)
    return sparsity, thresholds


def _flops(model: nn.Module, input_shape: tuple[int, ...]) -> FlopsProfile | None:
    """``strsparse.flops.profile(model, input_shape)``; None when the FLOPs counter cannot
    profile this model."""
    try:
        return profile_flops(model, tuple(input_shape))
    except Exception as exc:  # a custom model the counter does not know: keep training
        logger.warning("FLOPs profile failed (%s: %s); FLOPs are left out", type(exc).__name__, exc)
        return None


def _overall(flops_profile: FlopsProfile | None) -> dict[str, float]:
    if flops_profile is None:
        return {"flops": math.nan, "sparse_flops": math.nan, "params": math.nan}
    o = flops_profile.overall
    return {
        "flops": float(o.flops),
        "sparse_flops": float(o.sparse_flops),
        "params": float(o.params),
        "nonzero_params": float(o.nonzero_params),
    }


class _InterruptFlag:
    """Turns the first Ctrl-C into a flag the loop checks between steps, so the checkpoint
    it saves is consistent; a second Ctrl-C interrupts at once. Only in the main thread of
    a single-process run (in a distributed job, ranks cannot stop at the same step)."""

    def __init__(self, active: bool) -> None:
        self.active = active and threading.current_thread() is threading.main_thread()
        self.raised = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True
        logger.warning("interrupted: finishing this step, saving a checkpoint (Ctrl-C again: quit)")

    def __enter__(self) -> _InterruptFlag:
        if self.active:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self._previous)


class _Forward(logging.Handler):
    """Passes records at or above ``threshold`` on to the parent logger's handlers."""

    def __init__(self, parent: logging.Logger, threshold: int) -> None:
        super().__init__()
        self.parent_logger = parent
        self.threshold = threshold

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self.threshold:
            self.parent_logger.handle(record)


@contextlib.contextmanager
def _log_file(path: Path, enabled: bool) -> Iterator[None]:
    """Copy the library's INFO (and higher) records to ``RUN_DIR/train.log``.

    When the application shows only warnings (the ``strsparse`` logger's effective level is
    above INFO), the logger is lowered to INFO for the file while the records that reach the
    application's handlers stay exactly those it would have shown.
    """
    if not enabled:
        yield
        return
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lib = logging.getLogger("strsparse")
    saved = lib.level, lib.propagate
    shown = lib.getEffectiveLevel()
    forward = None
    if shown > logging.INFO:
        forward = _Forward(lib.parent or logging.getLogger(), shown)
        lib.setLevel(logging.INFO)
        lib.propagate = False
        lib.addHandler(forward)
    lib.addHandler(handler)
    try:
        yield
    finally:
        lib.removeHandler(handler)
        if forward is not None:
            lib.removeHandler(forward)
        lib.setLevel(saved[0])
        lib.propagate = saved[1]
        handler.close()


def _diff_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            keys += _diff_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(f"{prefix}{key}")
    return keys


# -- training -----------------------------------------------------------------------------


@dataclass
class _State:
    """Progress that a checkpoint saves."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    batch: int = 0  # batches of epoch `epoch` already trained (mid-epoch checkpoints)
    epoch_state: dict[str, float] = dataclasses.field(default_factory=dict)
    history: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    best: dict[str, float] = dataclasses.field(default_factory=dict)


def _new_history() -> dict[str, Any]:
    history: dict[str, Any] = {k: [] for k in CSV_COLUMNS}
    history["layer_sparsity"] = {}
    history["layer_threshold"] = {}
    return history


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
        return _Trainer(cfg, env, device).run(resume)
    finally:
        # leave the process as it was: train() may be one call among others
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        cleanup_distributed(env)


class _Trainer:
    def __init__(self, cfg: Config, env: DistributedEnv, device: torch.device) -> None:
        self.cfg = cfg
        self.env = env
        self.device = device
        self.run_dir = run_dir_of(cfg)
        self.ckpt_dir = self.run_dir / "checkpoints"
        tc = cfg.train
        self.epochs = tc.epochs
        self.quiet = tc.quiet
        self.log_every = tc.log_every
        amp, self.channels_last = tc.amp, tc.channels_last
        if device.type != "cuda":
            if amp != "off" or self.channels_last:
                logger.info(
                    "device %s: mixed precision (train.amp=%s) and channels_last are CUDA-only; "
                    "training in fp32, contiguous",
                    device,
                    amp,
                )
            amp, self.channels_last = "off", False
        self.amp = amp  # the train.amp in effect: 'off' on CPU whatever the config says
        self.autocast_dtype = _AUTOCAST_DTYPES[amp]

    # -- setup ----------------------------------------------------------------------------
    def _configure_torch(self) -> None:
        deterministic = self.cfg.train.deterministic
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not deterministic
            torch.backends.cudnn.deterministic = deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)

    def _configure_threads(self) -> None:
        """CPU intra-op threads: ``train.num_threads``, else torch's default shared out
        between the processes torchrun starts on this machine.

        On an idle 2-core machine a LeNet-5 step (batch 128) takes 31 ms on 1 thread and
        17 ms on 2; on a machine busy with other work, fewer threads can be faster: set
        ``train.num_threads`` then.
        """
        if self.device.type != "cpu":
            return
        threads = self.cfg.train.num_threads
        if threads is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            cores = cores or os.cpu_count() or 1
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.env.world_size))
            threads = max(1, min(torch.get_num_threads(), cores // max(local, 1)))
        if threads != torch.get_num_threads():
            logger.info("CPU threads: %d", threads)
            torch.set_num_threads(threads)

    def _build(self, *, loading_weights: bool) -> None:
        cfg = self.cfg
        train_ds, val_ds, info = build_datasets(cfg.data)
        self.info = info
        self.train_loader, self.val_loader = build_loaders(
            train_ds, val_ds, cfg.data, seed=cfg.seed, distributed=self.env.enabled
        )
        model, handle, _ = build_model(cfg, info, loading_weights=loading_weights)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model: nn.Module = model
        self.handle: SparsityHandle | None = handle
        oc = cfg.optim
        groups = parameter_groups(
            model,
            handle.threshold_parameters() if handle is not None else (),
            weight_decay=oc.weight_decay,
            threshold_weight_decay=oc.threshold_weight_decay,
            norm_bias_decay=oc.norm_bias_decay,
        )
        self.base_lr = oc.lr
        self.optimizer = build_optimizer(
            groups,
            oc.name,
            lr=self.base_lr,
            momentum=oc.momentum,
            nesterov=oc.nesterov,
            betas=oc.betas,
            eps=oc.eps,
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.steps_per_epoch = len(self.train_loader)
        max_steps = cfg.train.max_steps_per_epoch
        if max_steps is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps)
        self.grad_clip = cfg.train.grad_clip
        if self.steps_per_epoch == 0:
            raise ValueError("the training loader is empty: check data.train_limit / batch_size")
        # the LR and sparsity schedules span the steps actually taken (max_steps_per_epoch)
        self.total_steps = self.epochs * self.steps_per_epoch
        if self.env.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model: nn.Module = DistributedDataParallel(model, device_ids=ids)
        else:
            self.train_model = model

    def _lr(self, step: int) -> float:
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

    # -- checkpoints ----------------------------------------------------------------------
    def _checkpoint_state(self, state: _State, rng_epoch_start: Any = None) -> dict[str, Any]:
        payload = {
            "config": self.config_dict,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": state.epoch,
            "step": state.step,
            "batch": state.batch,
            "epoch_state": dict(state.epoch_state),
            "metrics": dict(state.metrics),
            "best": dict(state.best),
            "history": state.history,
            "rng": capture_rng_state(),
        }
        if rng_epoch_start is not None:
            payload["rng_epoch_start"] = rng_epoch_start
        return payload

    def _save(self, state: _State, *, is_best: bool = False, rng_epoch_start: Any = None) -> None:
        if not self.env.is_main:
            return
        last = save_checkpoint(
            self._checkpoint_state(state, rng_epoch_start), self.ckpt_dir / "last.pt"
        )
        if is_best:
            copy_atomic(last, self.ckpt_dir / "best.pt")
        every = self.cfg.train.save_every
        if every and state.batch == 0 and state.epoch % every == 0:
            copy_atomic(last, self.ckpt_dir / f"epoch_{state.epoch:03d}.pt")

    def _restore(self, ckpt: dict[str, Any]) -> _State:
        differing = _diff_keys(ckpt["config"], self.config_dict)
        if differing:
            logger.warning(
                "resuming with a configuration that differs from the checkpoint's in: %s",
                ", ".join(differing),
            )
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"the checkpoint does not fit this configuration's model/optimizer: {exc}"
            ) from exc
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        return _State(
            epoch=int(ckpt["epoch"]),
            step=int(ckpt["step"]),
            batch=int(ckpt.get("batch", 0)),
            epoch_state=dict(ckpt.get("epoch_state") or {}),
            history=ckpt.get("history") or _new_history(),
            metrics=dict(ckpt.get("metrics") or {}),
            best=dict(ckpt.get("best") or {}),
        )

    # -- the run --------------------------------------------------------------------------
    def run(self, resume: str | os.PathLike | None) -> TrainResult:
        cfg = self.cfg
        self.config_dict = config_to_dict(cfg)
        ckpt_path: Path | None = None
        if resume is not None:
            ckpt_path = find_checkpoint(resume)
        elif (self.ckpt_dir / "last.pt").is_file():
            ckpt_path = self.ckpt_dir / "last.pt"
        ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None

        if self.env.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        with _log_file(self.run_dir / "train.log", self.env.is_main):
            self._configure_torch()
            _seed_everything(cfg.seed)
            self._build(loading_weights=ckpt is not None)
            self._configure_threads()
            if ckpt is not None:
                state = self._restore(ckpt)
                logger.info(
                    "resuming from %s at epoch %d, step %d", ckpt_path, state.epoch, state.step
                )
            else:
                state = _State(history=_new_history())
                # each rank draws its own dropout/augmentation randomness from here on
                _seed_everything(cfg.seed + self.env.rank)
            purge = state.step if ckpt is not None else None
            self.run_logger = RunLogger(
                self.run_dir,
                enabled=self.env.is_main,
                tensorboard=cfg.train.tensorboard,
                purge_step=purge,
            )
            try:
                self._fit(state, ckpt)
                return self._finish(state)
            finally:
                self.run_logger.close()

    def _fit(self, state: _State, ckpt: dict[str, Any] | None) -> None:
        if ckpt is not None and state.batch == 0:
            restore_rng_state(ckpt["rng"])
        if state.epoch >= self.epochs:
            logger.info("the run has completed its %d epochs already", self.epochs)
            return
        logger.info(
            "training %s (%s) on %s for %d epochs x %d steps, device %s%s",
            self.cfg.model.name,
            self.handle.method if self.handle is not None else "dense",
            self.cfg.data.name,
            self.epochs,
            self.steps_per_epoch,
            self.device,
            f", {self.env.world_size} processes" if self.env.enabled else "",
        )
        with _InterruptFlag(active=not self.env.enabled) as interrupt:
            while state.epoch < self.epochs:
                resume_ckpt = ckpt if (ckpt is not None and state.batch > 0) else None
                self._train_epoch(state, interrupt, resume_ckpt)
                ckpt = None
                self._end_epoch(state)
                if interrupt.raised:
                    raise KeyboardInterrupt

    def _train_epoch(self, state: _State, interrupt: _InterruptFlag, resume: Any) -> None:
        from tqdm.auto import tqdm

        epoch = state.epoch
        _set_loader_epoch(self.train_loader, epoch, self.cfg.seed)
        if resume is not None and "rng_epoch_start" in resume:
            restore_rng_state(resume["rng_epoch_start"])
        rng_epoch_start = capture_rng_state() if interrupt.active else None
        batches = iter(self.train_loader)
        if resume is not None:
            # replay the loader up to where the interrupted run stopped, then take its RNG
            for _ in range(state.batch):
                next(batches)
            restore_rng_state(resume["rng"])
        else:
            state.batch, state.epoch_state = 0, {}
        sums = state.epoch_state
        loss_sum = torch.tensor(sums.get("loss_sum", 0.0), dtype=torch.float64, device=self.device)
        correct = torch.tensor(int(sums.get("correct", 0)), device=self.device)
        count = int(sums.get("count", 0))
        t0 = time.perf_counter() - float(sums.get("time", 0.0))

        self.model.train()
        total = _epoch_images(self.train_loader)
        batch_size = getattr(self.train_loader, "batch_size", None)
        if total is not None and batch_size and self.steps_per_epoch < len(self.train_loader):
            total = min(total, self.steps_per_epoch * batch_size)
        bar = tqdm(
            total=total,
            initial=count,
            unit="img",
            unit_scale=True,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=self.quiet or not self.env.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        check_every = 1 if self.device.type == "cpu" else self.log_every
        try:
            for batch_index in range(state.batch, self.steps_per_epoch):
                inputs, targets = next(batches)
                lr = self._lr(state.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if self.handle is not None:
                    self.handle.step(state.step, self.total_steps)
                loss, logits = self._step(inputs, targets)
                n = targets.shape[0]
                with torch.no_grad():
                    loss_sum += loss.detach().double() * n
                    correct += (logits.argmax(dim=1) == targets.to(logits.device)).sum()
                count += n
                state.step += 1
                state.batch = batch_index + 1
                bar.update(n)
                if state.step % check_every == 0 or state.batch == self.steps_per_epoch:
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value) and not self.env.enabled:
                        raise TrainingDiverged(self._diverged_message(state, loss_value))
                    if state.step % self.log_every == 0:
                        self.run_logger.log_step(
                            state.step, {"train/loss": loss_value, "train/lr": lr}
                        )
                        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", refresh=False)
                if interrupt.raised and state.batch < self.steps_per_epoch:
                    state.epoch_state = {
                        "loss_sum": float(loss_sum),
                        "correct": int(correct),
                        "count": count,
                        "time": time.perf_counter() - t0,
                    }
                    if math.isfinite(float(loss_sum)):
                        self._save(state, rng_epoch_start=rng_epoch_start)
                        logger.warning(
                            "saved %s at epoch %d, step %d; resume with the same command",
                            self.ckpt_dir / "last.pt",
                            epoch + 1,
                            state.step,
                        )
                    raise KeyboardInterrupt
        finally:
            bar.close()
        if self.env.enabled:
            broadcast_buffers(self.model)
        loss_total, correct_total, count_total = all_reduce_sum(
            [float(loss_sum), float(correct), float(count)], self.device
        )
        state.epoch_state = {
            "loss_sum": loss_total,
            "correct": correct_total,
            "count": count_total,
            "time": time.perf_counter() - t0,
        }

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with _autocast(self.device, self.autocast_dtype):
            logits = self.train_model(inputs)
            loss = self.criterion(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        return loss, logits

    def _diverged_message(self, state: _State, value: float) -> str:
        last = self.ckpt_dir / "last.pt"
        kept = f"; {last} (epoch {state.epoch}) is kept as it was" if last.is_file() else ""
        return (
            f"training diverged: the loss is {value} at epoch {state.epoch + 1}, step "
            f"{state.step}{kept}. Lower optim.lr (now {self.base_lr}) or add warmup "
            "(schedule.warmup_epochs)"
        )

    def _end_epoch(self, state: _State) -> None:
        sums = state.epoch_state
        train_loss = sums["loss_sum"] / max(sums["count"], 1)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(self._diverged_message(state, train_loss))
        val = self._evaluate()
        if not math.isfinite(val["loss"]):
            raise TrainingDiverged(self._diverged_message(state, val["loss"]))
        layer_sparsity, layer_threshold = _layer_stats(self.model)
        report = sparsity_report(self.model)
        structure = structure_report(self.model)
        profile = _flops(self.model, self.info.input_shape) if self.env.is_main else None
        flops = _overall(profile)
        state.epoch += 1
        state.batch = 0
        record = {
            "epoch": state.epoch,
            "step": state.step,
            "lr": self._lr(max(state.step - 1, 0)),
            "train_loss": train_loss,
            "train_top1": 100.0 * sums["correct"] / max(sums["count"], 1),
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "sparsity": report.sparsity,
            "sparse_flops": flops["sparse_flops"],
            "time": sums["time"],
            # structured STR: alive filters / rank-one components per layer ("w=12/32 u=40/100")
            "structure": " ".join(f"{n}={a}/{t}" for n, (a, t) in structure.items()),
        }
        history = state.history
        for key, value in record.items():
            history.setdefault(key, []).append(value)
        for name, value in layer_sparsity.items():
            history["layer_sparsity"].setdefault(name, []).append(value)
        for name, value in layer_threshold.items():
            history["layer_threshold"].setdefault(name, []).append(value)
        state.metrics = {**val, "sparsity": report.sparsity, **flops}
        is_best = not state.best or val["top1"] > state.best["top1"]
        if is_best:
            state.best = {**state.metrics, "epoch": float(state.epoch)}
        state.epoch_state = {}
        self._save(state, is_best=is_best)
        self.run_logger.write_csv(history)
        self.run_logger.log_epoch(state.step, record, layer_sparsity, layer_threshold)
        self.run_logger.log_step(
            state.step, {f"structure/{n}": a for n, (a, _) in structure.items()}
        )
        logger.info(
            "epoch %d/%d: train loss %.4f top1 %.2f | val loss %.4f top1 %.2f top5 %.2f | "
            "sparsity %.2f%% | %.1fs",
            state.epoch,
            self.epochs,
            record["train_loss"],
            record["train_top1"],
            val["loss"],
            val["top1"],
            val["top5"],
            100 * report.sparsity,
            record["time"],
        )
        if structure:
            logger.info("epoch %d: alive filters / ranks %s", state.epoch, record["structure"])

    def _evaluate(self) -> dict[str, float]:
        # a validation set sharded across ranks (each sees a part) is summed over ranks
        sharded = False
        if self.env.enabled:
            sampler = getattr(self.val_loader, "sampler", None)
            dataset = getattr(self.val_loader, "dataset", None)
            with contextlib.suppress(TypeError):
                sharded = len(sampler) < len(dataset)  # type: ignore[arg-type]
        return evaluate(
            self.model,
            self.val_loader,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
            channels_last=self.channels_last,
            reduce_across_ranks=sharded,
        )

    # -- the end --------------------------------------------------------------------------
    def _finish(self, state: _State) -> TrainResult:
        summary_path = self.run_dir / "summary.json"
        final = dict(state.metrics)
        if not final:  # nothing trained (e.g. zero epochs): measure what there is
            val = self._evaluate()
            final = {**val, "sparsity": sparsity_report(self.model).sparsity}
        if self.env.is_main:
            profile = _flops(self.model, self.info.input_shape)
            final.update(_overall(profile))
            self._write_summary(summary_path, state, final, profile)
            self._plot(state, profile)
        logger.info(
            "done: top1 %.2f%% (best %.2f%%), sparsity %.2f%%; results in %s",
            final["top1"],
            state.best.get("top1", final["top1"]),
            100 * final["sparsity"],
            self.run_dir,
        )
        return TrainResult(
            run_dir=self.run_dir,
            final={k: float(v) for k, v in final.items()},
            best={k: float(v) for k, v in (state.best or final).items()},
            summary_path=summary_path,
        )

    def _write_summary(
        self, path: Path, state: _State, final: dict[str, float], profile: FlopsProfile | None
    ) -> None:
        report = sparsity_report(self.model)
        layers = [
            {
                "name": row.name,
                "shape": list(row.shape),
                "params": row.params,
                "nonzero": row.nonzero,
                "sparsity": row.sparsity,
                "threshold": row.threshold,
            }
            for row in report.layers
        ]
        if profile is not None:
            per_layer = {record.name: record for record in profile.layers}
            for row in layers:
                record = per_layer.get(row["name"])
                if record is not None:
                    row["flops"] = record.flops
                    row["sparse_flops"] = record.sparse_flops

        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        summary = {
            "name": self.cfg.name,
            "model": self.cfg.model.name,
            "method": self.handle.method if self.handle is not None else "dense",
            "dataset": self.cfg.data.name,
            "epochs": state.epoch,
            "steps": state.step,
            "final": final,
            "best": state.best,
            "sparsity": final.get("sparsity"),
            "flops": {"dense": final.get("flops"), "sparse": final.get("sparse_flops")},
            "params": {"dense": final.get("params"), "nonzero": final.get("nonzero_params")},
            "train_time_s": sum(state.history.get("time", [])),
            "layers": layers,
        }
        text = json.dumps(clean(summary), indent=2)
        write_atomic(path, text + "\n")

    def _plot(self, state: _State, profile: FlopsProfile | None) -> None:
        out = self.run_dir / "plots"
        out.mkdir(exist_ok=True)
        history = state.history
        try:
            if self.handle is not None:
                plots.plot_budgets(
                    {self.cfg.name: Budget.from_model(self.model)},
                    out / "layer_sparsity.png",
                    flops_profile=profile,
                    title=f"{self.cfg.name}: per-layer sparsity",
                )
            thresholds = history["layer_threshold"]
            if thresholds:
                n = min(len(v) for v in thresholds.values())
                plots.plot_thresholds(
                    {name: values[-n:] for name, values in thresholds.items()},
                    out / "thresholds.png",
                    epochs=history["epoch"][-n:],
                    title=f"{self.cfg.name}: per-layer threshold",
                )
            if history["epoch"]:
                plots.plot_metrics(
                    history["epoch"],
                    {
                        "val top-1 %": history["val_top1"],
                        "train top-1 %": history["train_top1"],
                        "sparsity %": [100 * s for s in history["sparsity"]],
                        "val loss": history["val_loss"],
                    },
                    out / "metrics.png",
                    title=f"{self.cfg.name}: accuracy and sparsity",
                )
        except Exception as exc:  # a plot must never lose a finished run
            logger.warning("plotting failed (%s: %s)", type(exc).__name__, exc)
