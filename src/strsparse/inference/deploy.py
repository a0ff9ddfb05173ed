"""What ``strsparse convert --format sparse|onnx`` writes from a training run.

``sparse``: ``OUT/model.safetensors``, the ``to_sparse`` model with its architecture, so
``strsparse.load_sparse(OUT)`` rebuilds it alone. ``onnx``: ``OUT/model.onnx``, checked in
onnxruntime, with a dynamic batch dimension.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from strsparse.data import dataset_info
from strsparse.errors import OptionError, OutputExistsError
from strsparse.export import DenseModelSpec
from strsparse.inference.convert import to_sparse
from strsparse.inference.onnx_export import export_onnx
from strsparse.inference.serialize import SPARSE_FILE, save_sparse
from strsparse.slimming import slim as slim_model

__all__ = ["ONNX_FILE", "convert_run"]

ONNX_FILE = "model.onnx"
_OUTPUTS = (SPARSE_FILE, ONNX_FILE, "config.yaml")


def _check_destination(out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputExistsError(f"{str(out_dir)!r} exists and is not a directory; choose another")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise OutputExistsError(
            f"{str(out_dir)!r} exists and is not empty; choose another output directory or "
            "pass --force to replace a previous export"
        )
    if not any((out_dir / name).is_file() for name in _OUTPUTS):
        raise OutputExistsError(
            f"{str(out_dir)!r} holds no previous export; refusing to write into it even with "
            "--force: choose another directory"
        )


def convert_run(
    model: nn.Module,
    cfg: Any,
    out_dir: str | os.PathLike,
    fmt: str,
    *,
    force: bool = False,
    slim: bool = False,
) -> list[str]:
    """Write ``model`` (restored from a run with config ``cfg``) in format ``fmt`` to
    ``out_dir``; returns the lines to print. With ``slim``, the slimmed model (ONNX only)."""
    out_dir = Path(out_dir)
    if fmt not in ("sparse", "onnx"):
        raise OptionError(f"unknown format {fmt!r}; choose dense, sparse or onnx")
    if slim and fmt == "sparse":
        raise OptionError(
            "--slim goes with --format dense or onnx; a sparse model keeps the architecture "
            "(drop --slim)"
        )
    _check_destination(out_dir, force)
    spec = DenseModelSpec.from_config(cfg)
    if fmt == "sparse":
        sparse = to_sparse(model)
        architecture = {
            "name": spec.name,
            "num_classes": spec.num_classes,
            "in_channels": spec.in_channels,
            "kwargs": spec.kwargs,
        }
        path = save_sparse(sparse, out_dir / SPARSE_FILE, architecture=architecture)
        modes = list(sparse.sparse_plan.values())
        return [
            f"wrote a sparse {spec.name} ({modes.count('sparse')} layers sparse, "
            f"{modes.count('dense')} dense) to {path}",
            "load it with strsparse.load_sparse(path) and run it under torch.inference_mode()",
        ]
    if fmt == "onnx":
        shape = tuple(int(d) for d in dataset_info(cfg.data).input_shape)
        example = torch.zeros(1, *shape)
        if slim:
            model = slim_model(model, example)
        path = export_onnx(model, out_dir / ONNX_FILE, example)
        return [
            f"wrote {'a slim ' if slim else ''}{spec.name} as ONNX (input (batch, "
            f"{', '.join(map(str, shape))}), checked in onnxruntime) to {path}"
        ]
    raise AssertionError(fmt)
