"""What a run records: the history, ``metrics.csv``, TensorBoard, ``train.log``,
``summary.json`` and the plots.

The history (per-epoch metrics and per-layer sparsity and thresholds), the latest metrics
and the best ones are saved in every checkpoint, so a resumed run continues them.
``metrics.csv`` is rewritten from the history after every epoch, atomically, so a resumed
run never duplicates or loses rows; a resumed run's TensorBoard writer purges the events
logged after its checkpoint's step. Only rank 0 of a distributed job writes files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from strsparse import plots
from strsparse.atomic import write_atomic
from strsparse.budgets import Budget
from strsparse.config import Config
from strsparse.report import SparsityReport

__all__ = ["CSV_COLUMNS", "Recorder", "log_to_file", "write_metrics_csv"]

logger = logging.getLogger(__name__)

CSV_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "sparsity",
    "sparse_flops",
    "time",
    "structure",
    # STR with a target: the final target and the schedule's value at the epoch's end (a
    # sparsity, a fraction of dense FLOPs for a FLOPs target, the fraction of filters or rank-one
    # components removed for structured STR); empty otherwise
    "target",
    "scheduled",
)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_metrics_csv(history: Mapping[str, Sequence[Any]], path: str | os.PathLike) -> Path:
    """Write one row per epoch of ``history`` (columns ``CSV_COLUMNS``) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i in range(len(history.get("epoch", ()))):
        # a column added later (structure) is empty in the rows of older epochs
        writer.writerow(
            [_format(history[c][i]) if i < len(history.get(c, ())) else "" for c in CSV_COLUMNS]
        )
    return write_atomic(Path(path), buf.getvalue())


def _new_history() -> dict[str, Any]:
    history: dict[str, Any] = {k: [] for k in CSV_COLUMNS}
    history["layer_sparsity"] = {}
    history["layer_threshold"] = {}
    history["initial_threshold"] = {}  # layer -> threshold before the first step (epoch 0)
    return history


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: unknown values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


class Recorder:
    """The record of one run in ``run_dir``; writes nothing unless ``enabled`` (rank 0).

    ``saved`` is what ``state()`` returned into a checkpoint (history, metrics, best), to
    continue a resumed run's record; ``purge_step`` drops TensorBoard events after it.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        enabled: bool,
        saved: Mapping[str, Any] | None = None,
        purge_step: int | None = None,
    ) -> None:
        saved = saved or {}
        self.cfg = cfg
        self.run_dir = run_dir
        self.enabled = enabled
        self.history: dict[str, Any] = saved.get("history") or _new_history()
        self.metrics: dict[str, float] = dict(saved.get("metrics") or {})
        self.best: dict[str, float] = dict(saved.get("best") or {})
        self._tensorboard = enabled and cfg.train.tensorboard
        self._purge_step = purge_step or None
        self._writer: Any = None

    def _events(self) -> Any:
        """The TensorBoard writer, opened at the first value logged (None when off): a run
        that logs nothing, such as a finished run run again, adds no empty events file."""
        if self._writer is None and self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow to import: only when used

            self._writer = SummaryWriter(
                log_dir=str(self.run_dir / "tensorboard"), purge_step=self._purge_step
            )
        return self._writer

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the record."""
        return {"history": self.history, "metrics": dict(self.metrics), "best": dict(self.best)}

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """One training step's loss and learning rate (TensorBoard)."""
        writer = self._events()
        if writer is not None:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/lr", lr, step)

    def add_start(self, layers: SparsityReport) -> None:
        """The thresholds before the first training step: the threshold plot's epoch 0."""
        self.history["initial_threshold"] = {
            layer.name: float(layer.threshold)
            for layer in layers.layers
            if layer.threshold is not None
        }

    def add_epoch(
        self, row: Mapping[str, Any], layers: SparsityReport, val: Mapping[str, float]
    ) -> bool:
        """Append an epoch (``row``: the ``CSV_COLUMNS``) to the history; returns whether its
        validation top-1 is the best so far (the first epoch is)."""
        for key, value in row.items():
            self.history.setdefault(key, []).append(value)
        for layer in layers.layers:
            self.history["layer_sparsity"].setdefault(layer.name, []).append(layer.sparsity)
            if layer.threshold is not None:
                threshold = float(layer.threshold)
                self.history["layer_threshold"].setdefault(layer.name, []).append(threshold)
        self.metrics = {**val, "sparsity": layers.sparsity, **layers.model_totals()}
        is_best = not self.best or val["top1"] > self.best["top1"]
        if is_best:
            self.best = {**self.metrics, "epoch": float(row["epoch"])}
        return is_best

    def write_epoch(
        self,
        row: Mapping[str, Any],
        layers: SparsityReport,
        structure: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        """``metrics.csv``, the epoch's TensorBoard scalars and its log line; ``structure``:
        structured STR's alive filters or ranks per layer, (alive, total)."""
        structure = structure or {}
        if self.enabled:
            write_metrics_csv(self.history, self.run_dir / "metrics.csv")
        w = self._events()
        if w is not None:
            step = row["step"]
            for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5"):
                w.add_scalar(key.replace("_", "/", 1), row[key], step)
            w.add_scalar("sparsity/overall", row["sparsity"], step)
            for key in ("target", "scheduled"):
                value = row.get(key, math.nan)
                if isinstance(value, float) and not math.isnan(value):
                    w.add_scalar(f"target/{key}", value, step)
            if not math.isnan(row["sparse_flops"]):
                w.add_scalar("flops/sparse", row["sparse_flops"], step)
            for layer in layers.layers:
                w.add_scalar(f"sparsity/{layer.name}", layer.sparsity, step)
            for layer in layers.layers:
                if layer.threshold is not None:
                    w.add_scalar(f"threshold/{layer.name}", float(layer.threshold), step)
            for name, (alive, _) in structure.items():
                w.add_scalar(f"structure/{name}", alive, step)
            w.flush()
        logger.info(
            "epoch %d/%d: train loss %.4f top1 %.2f | val loss %.4f top1 %.2f top5 %.2f | "
            "sparsity %.2f%% | %.1fs",
            row["epoch"],
            self.cfg.train.epochs,
            row["train_loss"],
            row["train_top1"],
            row["val_loss"],
            row["val_top1"],
            row["val_top5"],
            100 * row["sparsity"],
            row["time"],
        )
        if structure:
            logger.info("epoch %d: alive filters / ranks %s", row["epoch"], row["structure"])

    def finish(
        self,
        final: Mapping[str, float],
        layers: SparsityReport,
        *,
        epochs: int,
        steps: int,
        target: Mapping[str, Any] | None = None,
        structure: Mapping[str, tuple[int, int]] | None = None,
    ) -> Path:
        """Write ``summary.json`` and the plots; returns the summary's path. ``target``: a
        target's kind, value and what the final model reached (STR with a target);
        ``structure``: structured STR's (alive, total) filters or components per layer."""
        path = self.run_dir / "summary.json"
        if not self.enabled:
            return path
        cfg = self.cfg
        summary = {
            "name": cfg.name,
            "model": cfg.model.name,
            "method": cfg.sparsity.method,
            "dataset": cfg.data.name,
            "epochs": epochs,
            "steps": steps,
            "final": dict(final),
            "best": self.best,
            "sparsity": final.get("sparsity"),
            "flops": {"dense": final.get("flops"), "sparse": final.get("sparse_flops")},
            "params": {"dense": final.get("params"), "nonzero": final.get("nonzero_params")},
            # structured STR: the model ``strsparse convert --slim`` writes
            "slim": (
                {"params": final.get("slim_params"), "flops": final.get("slim_flops")}
                if "slim_params" in final
                else None
            ),
            "train_time_s": sum(self.history.get("time", [])),
            "target": dict(target) if target is not None else None,
            "structure": {name: list(counts) for name, counts in (structure or {}).items()} or None,
            "layers": [layer.as_dict() for layer in layers.layers],
        }
        write_atomic(path, json.dumps(_finite_or_none(summary), indent=2) + "\n")
        self._plot(layers)
        return path

    def _plot(self, layers: SparsityReport) -> None:
        out = self.run_dir / "plots"
        out.mkdir(exist_ok=True)
        name, history = self.cfg.name, self.history
        try:
            if layers.layers:
                plots.plot_budgets(
                    {name: Budget({layer.name: layer.sparsity for layer in layers.layers})},
                    out / "layer_sparsity.png",
                    flops_profile=layers.profile,
                    title=f"{name}: per-layer sparsity",
                )
            thresholds = history["layer_threshold"]
            if thresholds:
                n = min(len(v) for v in thresholds.values())
                series = {layer: values[-n:] for layer, values in thresholds.items()}
                epochs = history["epoch"][-n:]
                initial = history.get("initial_threshold") or {}
                if epochs and epochs[0] == 1 and all(layer in initial for layer in series):
                    epochs = [0, *epochs]  # start the curves at the initial thresholds
                    series = {layer: [initial[layer], *v] for layer, v in series.items()}
                plots.plot_thresholds(
                    series,
                    out / "thresholds.png",
                    epochs=epochs,
                    title=f"{name}: per-layer threshold",
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
                    title=f"{name}: accuracy and sparsity",
                )
        except Exception as exc:  # a plot must never lose a finished run
            logger.warning("plotting failed (%s: %s)", type(exc).__name__, exc)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
def log_to_file(path: Path, enabled: bool) -> Iterator[None]:
    """Copy the library's INFO (and higher) records to ``path`` (``RUN_DIR/train.log``).

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
