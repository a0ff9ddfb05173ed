"""Saving and loading ``to_sparse`` models in safetensors.

The file holds the sparse model's tensors (CSR values and indices, folded biases, the
layers kept dense and every other parameter) and, in its metadata, the per-layer plan and,
when known, the architecture (``create_model`` name and options). Loading rebuilds the
architecture, converts it with the saved plan and puts the saved tensors in place, so
nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from strsparse.atomic import atomic_path
from strsparse.errors import MissingFileError, OptionError
from strsparse.inference.convert import to_sparse
from strsparse.models import create_model

__all__ = ["SPARSE_FILE", "SPARSE_FORMAT", "load_sparse", "save_sparse"]

SPARSE_FILE = "model.safetensors"
SPARSE_FORMAT = "strsparse-sparse-model"
SPARSE_VERSION = 1


def save_sparse(
    model: nn.Module, path: str | os.PathLike, *, architecture: dict[str, Any] | None = None
) -> Path:
    """Write a ``to_sparse`` model to ``path`` (safetensors), atomically.

    ``architecture`` (``{"name", "num_classes", "in_channels", "kwargs"}``, what
    ``strsparse.create_model`` takes) lets ``load_sparse`` rebuild the model on its own;
    without it, ``load_sparse`` needs the dense architecture passed in.
    """
    plan = getattr(model, "sparse_plan", None)
    if plan is None:
        raise OptionError(
            "save_sparse takes a model made by strsparse.to_sparse (it has no sparse_plan); "
            "convert it first: save_sparse(to_sparse(model), path)"
        )
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": SPARSE_FORMAT,
        "version": str(SPARSE_VERSION),
        "plan": json.dumps(plan),
    }
    if architecture is not None:
        metadata["architecture"] = json.dumps(architecture)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def load_sparse(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a model written by ``save_sparse`` (a file, or a directory holding
    ``model.safetensors``).

    ``model`` is the dense architecture (any weights: they are replaced), needed unless the
    file names a ``strsparse.create_model`` architecture.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():  # what `strsparse convert --format sparse` writes
        path = path / SPARSE_FILE
    if not path.is_file():
        raise MissingFileError(f"{str(path)!r} does not exist; pass a file written by save_sparse")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise OptionError(f"cannot read {str(path)!r}: {exc}") from exc
    if metadata.get("format") != SPARSE_FORMAT:
        raise OptionError(f"{str(path)!r} is not a strsparse sparse model (save_sparse writes one)")
    if int(metadata.get("version", "0")) > SPARSE_VERSION:
        raise OptionError(
            f"{str(path)!r} has version {metadata.get('version')}; this strsparse reads up to "
            f"{SPARSE_VERSION}: upgrade strsparse"
        )
    plan = json.loads(metadata["plan"])
    if model is None:
        if "architecture" not in metadata:
            raise OptionError(
                f"{str(path)!r} does not name its architecture; pass the dense model: "
                "load_sparse(path, model)"
            )
        arch = json.loads(metadata["architecture"])
        model = create_model(
            arch["name"],
            num_classes=arch["num_classes"],
            in_channels=arch["in_channels"],
            **(arch.get("kwargs") or {}),
        )
    sparse = to_sparse(model, _plan=plan)
    try:
        sparse.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise OptionError(f"{str(path)!r} does not match the architecture: {exc}") from exc
    return sparse.eval()
