"""Export a sparsified model as a plain dense model: safetensors weights plus a rebuild spec.

The exported ``state_dict`` is what ``strsparse.finalize`` would leave: each sparse layer's
effective weight (zeros included) stored as a plain ``weight``, with no parametrization, STR
threshold ``s`` or mask. It loads with ``strict=True`` into the unmodified architecture
(``strsparse.models.create_model``), like the STR authors' ``--dense-conv-model`` export, so
the result runs anywhere PyTorch does, without strsparse's methods.

An export directory holds two files:

- ``model.safetensors``: the dense ``state_dict`` (safetensors: nothing is unpickled on load);
- ``config.yaml``: what rebuilds the architecture (model name, ``num_classes``,
  ``in_channels``, model keyword arguments) and, for information, where it came from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from torch.nn.utils import parametrize

from strsparse.data import dataset_info
from strsparse.errors import MissingFileError, OutputExistsError, StrsparseError
from strsparse.models import create_model
from strsparse.models.cifar_resnet import ChannelPlacement
from strsparse.report import sparsity_report
from strsparse.slimming import SlimError, describe_layers, rebuild_layers, slim

__all__ = [
    "CONFIG_FILE",
    "EXPORT_FORMAT",
    "SLIM_FORMAT",
    "WEIGHTS_FILE",
    "DenseModelSpec",
    "ExportError",
    "dense_state_dict",
    "export_dense",
    "export_slim",
    "load_dense",
    "load_slim",
    "read_spec",
]

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "strsparse-dense-model"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


class ExportError(StrsparseError, ValueError):
    """An export cannot be written or read: unexportable options, a damaged directory."""


@dataclass(frozen=True)
class DenseModelSpec:
    """What rebuilds an exported architecture: ``create_model(name, num_classes=...,
    in_channels=..., **kwargs)``."""

    name: str
    num_classes: int
    in_channels: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    def create(self) -> nn.Module:
        """A freshly initialised (dense, unmodified) model of this architecture."""
        return create_model(
            self.name,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            **self.kwargs,
        )

    @classmethod
    def from_config(cls, cfg: Any) -> DenseModelSpec:
        """The spec of the model a training configuration builds (its dataset sets
        ``num_classes`` and ``in_channels``)."""
        model_cfg = cfg.model
        num_classes = getattr(model_cfg, "num_classes", None)
        in_channels = getattr(model_cfg, "in_channels", None)
        if num_classes is None or in_channels is None:  # as build_model: the data decides
            info = dataset_info(cfg.data)
            num_classes = num_classes or info.num_classes
            in_channels = in_channels or info.in_channels
        return cls(
            name=str(model_cfg.name),
            num_classes=int(num_classes),
            in_channels=int(in_channels),
            kwargs=_plain(dict(getattr(model_cfg, "kwargs", None) or {})),
        )


def _plain(value: Any) -> Any:
    """``value`` as YAML-safe plain data (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ExportError(
        f"model option value {value!r} ({type(value).__name__}) cannot be exported; "
        "model options must be numbers, strings, booleans or lists of them"
    )


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The ``state_dict`` ``strsparse.finalize(model)`` would leave, without changing ``model``.

    Every parametrized tensor is replaced by its effective value (``module.weight``: the
    sparse weight) under its plain name; the parametrizations' own state (STR's ``s``,
    masks, schedule buffers) is dropped. Tensors are detached, contiguous CPU copies.
    """
    # The keys a parametrization owns (its raw tensor and its own state) are found by walking
    # the modules, not by parsing key names: each parametrized tensor's first owned key is
    # replaced, in place, by its plain name holding the effective value; the rest are dropped.
    module_names = {id(m): name for name, m in model.named_modules()}
    replaced: dict[str, tuple[str, Tensor] | None] = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in module.parametrizations.items():
            owned = [f"{module_names[id(chain)]}.{key}" for key in chain.state_dict()]
            plain = f"{name}.{tensor_name}" if name else tensor_name
            replaced.update(dict.fromkeys(owned))
            replaced[owned[0]] = (plain, getattr(module, tensor_name))
    state: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key in replaced:
            entry = replaced[key]
            if entry is None:
                continue  # the parametrization's own state
            key, value = entry
        state[key] = value.detach().cpu().contiguous().clone()
    return state


def _check_loads(spec: DenseModelSpec, state: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` unless ``state`` loads strictly into ``spec.create()``."""
    target = spec.create()
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(
            f"the model's weights do not fit {spec.name!r} with num_classes={spec.num_classes}, "
            f"in_channels={spec.in_channels}, kwargs={spec.kwargs}: {exc}"
        ) from exc


def _is_previous_export(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() or (path / CONFIG_FILE).is_file()


def _check_destination(out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputExistsError(
            f"{str(out_dir)!r} exists and is not a directory; choose another output path"
        )
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise OutputExistsError(
            f"{str(out_dir)!r} exists and is not empty; choose another output directory, or "
            "replace a previous export with force=True (strsparse convert --force)"
        )
    if not _is_previous_export(out_dir):
        raise OutputExistsError(
            f"{str(out_dir)!r} is not empty and holds no previous export ({WEIGHTS_FILE} or "
            f"{CONFIG_FILE}); refusing to replace it even with force: choose another directory"
        )


def _apply_umask(directory: Path) -> None:
    """Give ``directory`` and its files the modes the user's umask gives new ones
    (``mkdtemp`` makes the directory 0700 and a file written into it may be 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _write_export(out_dir: Path, state: Mapping[str, Tensor], document: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``config.yaml`` into ``out_dir`` atomically (a
    temporary directory renamed into place; a previous export moved aside, then deleted)."""
    from safetensors.torch import save_file

    fmt = str(document["format"])
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    old_dir: Path | None = None
    try:
        save_file(
            dict(state),
            str(tmp_dir / WEIGHTS_FILE),
            metadata={"format": fmt, "model": json.dumps(document["model"])},
        )
        (tmp_dir / CONFIG_FILE).write_text(yaml.safe_dump(document, sort_keys=False))
        _apply_umask(tmp_dir)
        if out_dir.exists() and any(out_dir.iterdir()):
            # force: move the previous export aside, put the new one in place, then delete it
            old_dir = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, old_dir)
        elif out_dir.exists():
            out_dir.rmdir()  # empty: rename cannot replace a directory on every platform
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if old_dir is not None and not out_dir.exists():
            os.replace(old_dir, out_dir)  # put the previous export back
        raise
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def export_dense(
    model: nn.Module,
    cfg: Any,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
) -> Path:
    """Write ``model`` as a plain dense model to ``out_dir``; returns ``out_dir``.

    ``cfg`` describes the architecture: a ``DenseModelSpec`` or a training configuration
    (``strsparse.config.Config``, e.g. from ``restore_model``). ``model`` may be sparsified
    or plain; it is not changed. The weights are checked to load strictly into the
    unmodified architecture before anything is written. The directory is written atomically
    (a temporary directory renamed into place). An existing non-empty ``out_dir`` is an error
    unless ``force`` is set and it holds a previous export, which is then replaced.
    """
    out_dir = Path(out_dir)
    spec = cfg if isinstance(cfg, DenseModelSpec) else DenseModelSpec.from_config(cfg)
    _check_destination(out_dir, force)
    state = dense_state_dict(model)
    _check_loads(spec, state)

    report = sparsity_report(model)
    source: dict[str, Any] = {
        "sparse_layers": len(report.layers),
        "params": report.params,
        "nonzero": report.nonzero,
        "sparsity": round(report.sparsity, 6) if report.layers else 0.0,
    }
    if not report.layers:  # a plain model: measure the zeros of its >= 2-dim weights
        total = sum(v.numel() for k, v in state.items() if k.endswith("weight") and v.dim() >= 2)
        zeros = sum(
            int((v == 0).sum()) for k, v in state.items() if k.endswith("weight") and v.dim() >= 2
        )
        source.update(params=total, nonzero=total - zeros, sparsity=zeros / total if total else 0.0)
    document = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model": {
            "name": spec.name,
            "num_classes": spec.num_classes,
            "in_channels": spec.in_channels,
            "kwargs": _plain(spec.kwargs),
        },
        "source": source,
    }

    _write_export(out_dir, state, document)
    logger.info(
        "exported %s (%d tensors, sparsity %.2f%%) to %s",
        spec.name,
        len(state),
        100 * source["sparsity"],
        out_dir,
    )
    return out_dir


def _read_config(
    path: Path, *, fmt: str, max_version: int, writer: str, wrong_format: str
) -> dict[str, Any]:
    """The YAML mapping of an export's ``config.yaml``, checked for its ``format`` and a
    ``version`` this strsparse reads; ``writer`` names what writes such a directory."""
    if not path.is_file():
        raise MissingFileError(
            f"{str(path)!r} does not exist; pass a directory written by {writer}"
        )
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ExportError(f"{str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise ExportError(f"{str(path)!r} {wrong_format}")
    version = document.get("version")
    if not isinstance(version, int) or version > max_version:
        raise ExportError(
            f"{str(path)!r} has version {version!r}; this strsparse reads versions up to "
            f"{max_version}: upgrade strsparse"
        )
    return document


def read_spec(out_dir: str | os.PathLike) -> DenseModelSpec:
    """The architecture spec of an export directory (its ``config.yaml``)."""
    path = Path(out_dir) / CONFIG_FILE
    document = _read_config(
        path,
        fmt=EXPORT_FORMAT,
        max_version=EXPORT_VERSION,
        writer="export_dense (`strsparse convert`)",
        wrong_format="is not a strsparse dense-model config (format)",
    )
    model = document.get("model")
    if not isinstance(model, dict):
        raise ExportError(f"{str(path)!r} lacks the 'model' section")
    missing = [k for k in ("name", "num_classes", "in_channels") if k not in model]
    if missing:
        raise ExportError(f"{str(path)!r}: model section lacks {', '.join(missing)}")
    kwargs = model.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ExportError(f"{str(path)!r}: model.kwargs must be a mapping, got {kwargs!r}")
    return DenseModelSpec(
        name=str(model["name"]),
        num_classes=int(model["num_classes"]),
        in_channels=int(model["in_channels"]),
        kwargs=kwargs,
    )


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of an export's safetensors file; an unreadable file is an ``ExportError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"cannot read {str(weights)!r}: {exc}") from exc


def load_dense(out_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported model (``create_model`` from ``config.yaml``) and load its
    safetensors weights with ``strict=True``; returned in eval mode on ``device``."""
    spec = read_spec(out_dir)
    weights = Path(out_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingFileError(f"{str(weights)!r} does not exist; the export is incomplete")
    return _load_weights(spec.create(), weights, "architecture", device)


def _load_weights(
    model: nn.Module, weights: Path, what: str, device: str | torch.device
) -> nn.Module:
    """``model`` with the exported ``weights`` loaded strictly, in eval mode on ``device``."""
    state = _read_weights(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(
            f"{str(weights)!r} does not match the {what} in {CONFIG_FILE}: {exc}"
        ) from exc
    return model.to(device).eval()


# -- slim models ------------------------------------------------------------------------------

SLIM_FORMAT = "strsparse-slim-model"
SLIM_VERSION = 1


def _weight_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_slim(
    model: nn.Module,
    cfg: Any,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
) -> Path:
    """Slim ``model`` (``strsparse.slim``) and write it to ``out_dir`` with its architecture.

    Like ``export_dense``: ``model.safetensors`` (the slim ``state_dict``) and ``config.yaml``
    (format ``strsparse-slim-model``): the model's name and options plus ``layers``, the
    constructor arguments of every conv, Linear, BatchNorm and low-rank layer of the slim model.
    ``load_slim`` rebuilds the architecture from that data alone (``create_model``, then each
    listed layer replaced) and loads the weights with ``strict=True``: nothing is unpickled,
    and no training configuration is needed. Checked to reload before anything is written.
    """
    out_dir = Path(out_dir)
    spec = cfg if isinstance(cfg, DenseModelSpec) else DenseModelSpec.from_config(cfg)
    _check_destination(out_dir, force)
    slim_model = slim(model, example_inputs)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in slim_model.state_dict().items()}
    document: dict[str, Any] = {
        "format": SLIM_FORMAT,
        "version": SLIM_VERSION,
        "model": {
            "name": spec.name,
            "num_classes": spec.num_classes,
            "in_channels": spec.in_channels,
            "kwargs": _plain(spec.kwargs),
        },
        "layers": _plain(describe_layers(slim_model)),
        "source": {
            "params": _weight_count(model),
            "slim_params": _weight_count(slim_model),
        },
    }
    _build_slim(document, out_dir).load_state_dict(state, strict=True)  # it reloads
    _write_export(out_dir, state, document)
    logger.info(
        "exported a slim %s (%d -> %d parameters) to %s",
        spec.name,
        document["source"]["params"],
        document["source"]["slim_params"],
        out_dir,
    )
    return out_dir


def _build_slim(document: Mapping[str, Any], where: Path) -> nn.Module:
    model_doc = document.get("model")
    layers = document.get("layers")
    if not isinstance(model_doc, dict) or not isinstance(layers, dict):
        raise ExportError(f"{str(where)!r}: a slim export needs 'model' and 'layers' mappings")
    spec = DenseModelSpec(
        name=str(model_doc["name"]),
        num_classes=int(model_doc["num_classes"]),
        in_channels=int(model_doc["in_channels"]),
        kwargs=model_doc.get("kwargs") or {},
    )
    try:
        return rebuild_layers(spec.create(), layers, {"ChannelPlacement": ChannelPlacement})
    except (SlimError, TypeError, KeyError) as exc:
        raise ExportError(f"{str(where)!r}: cannot rebuild the slim architecture: {exc}") from exc


def load_slim(out_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by ``export_slim`` (``strsparse convert --slim``) from its
    ``config.yaml`` and load its safetensors weights with ``strict=True``; in eval mode."""
    out_dir = Path(out_dir)
    document = _read_config(
        out_dir / CONFIG_FILE,
        fmt=SLIM_FORMAT,
        max_version=SLIM_VERSION,
        writer="export_slim (`strsparse convert --slim`)",
        wrong_format=(
            f"is not a slim-model config (format {SLIM_FORMAT!r}); a dense "
            "export loads with load_dense"
        ),
    )
    model = _build_slim(document, out_dir)
    return _load_weights(model, out_dir / WEIGHTS_FILE, "slim architecture", device)
