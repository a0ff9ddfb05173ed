"""What a run writes while it trains: ``metrics.csv`` and TensorBoard events.

``metrics.csv`` is rewritten from the run's history (which the checkpoint holds) after every
epoch, atomically, so a resumed run never duplicates or loses rows. TensorBoard events go to
``RUN_DIR/tensorboard``; a resumed run purges events logged after its checkpoint's step.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from strsparse.atomic import write_atomic

__all__ = ["CSV_COLUMNS", "RunLogger", "write_metrics_csv"]

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
)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_metrics_csv(history: Mapping[str, Sequence[Any]], path: str | os.PathLike) -> Path:
    """Write one row per epoch of ``history`` (columns ``CSV_COLUMNS``) atomically."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i in range(len(history.get("epoch", ()))):
        writer.writerow(
            [_format(history[c][i]) if i < len(history.get(c, ())) else "" for c in CSV_COLUMNS]
        )
    return write_atomic(path, buf.getvalue())


class RunLogger:
    """TensorBoard scalars and the per-epoch CSV of one run; a no-op when ``enabled`` is
    False (every rank but 0 of a distributed job)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        purge_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step or None
            )

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        """Scalars of one training step (``train/loss``, ``train/lr``)."""
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, step)

    def log_epoch(
        self,
        step: int,
        record: Mapping[str, Any],
        layer_sparsity: Mapping[str, float],
        layer_threshold: Mapping[str, float],
    ) -> None:
        """An epoch's metrics, overall and per-layer sparsity and per-layer thresholds."""
        if self._writer is None:
            return
        w = self._writer
        for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5"):
            if key in record:
                w.add_scalar(key.replace("_", "/", 1), record[key], step)
        w.add_scalar("sparsity/overall", record["sparsity"], step)
        if not math.isnan(record.get("sparse_flops", math.nan)):
            w.add_scalar("flops/sparse", record["sparse_flops"], step)
        for name, value in layer_sparsity.items():
            w.add_scalar(f"sparsity/{name}", value, step)
        for name, value in layer_threshold.items():
            w.add_scalar(f"threshold/{name}", value, step)
        w.flush()

    def write_csv(self, history: Mapping[str, Sequence[Any]]) -> None:
        if self.enabled:
            write_metrics_csv(history, self.run_dir / "metrics.csv")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
