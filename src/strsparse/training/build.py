"""From a configuration to a sparsified model: ``build_model``, ``restore_model`` (the model of
a checkpoint) and ``resolve_budget``."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from strsparse.budgets import Budget, list_paper_budgets
from strsparse.config import DENSE, Config, config_from_dict
from strsparse.data import DatasetInfo, dataset_info
from strsparse.errors import BudgetError, did_you_mean
from strsparse.methods import get_method
from strsparse.methods.soft_threshold import InitThresholdWarning
from strsparse.models import create_model
from strsparse.sparsify import SparsityHandle, eligible_layers, select_layers, sparsify
from strsparse.training.checkpoint import CheckpointError, describe_mismatch, load_checkpoint

__all__ = ["DENSE", "build_model", "check_config", "resolve_budget", "restore_model"]

logger = logging.getLogger(__name__)


def build_model(
    cfg: Config, info: DatasetInfo | None = None, *, loading_weights: bool = False
) -> tuple[nn.Module, SparsityHandle | None, DatasetInfo]:
    """Create ``cfg.model`` for the dataset of ``cfg.data`` and sparsify it per ``cfg.sparsity``.

    ``info`` (num_classes, in_channels, input_shape) is taken from ``cfg.data`` when not
    given; ``cfg.model.num_classes`` / ``cfg.model.in_channels``, when set, override the
    dataset's. A ``cfg.sparsity.budget`` (CSV path, checkpoint or paper budget name) is
    resolved with ``resolve_budget`` and passed to the method as ``budget=``. Method
    ``"dense"`` leaves the model dense (handle None). Returns (model, handle, info).
    ``loading_weights``: trained weights are loaded next (a restore or a resume), so warnings
    about the freshly initialised weights are left out.
    """
    if info is None:
        info = dataset_info(cfg.data)
    model = _create_model(cfg, info)
    if cfg.sparsity.method == DENSE:
        return model, None, info
    options = _method_options(cfg, model)
    sp = cfg.sparsity
    with warnings.catch_warnings():
        if loading_weights:
            warnings.simplefilter("ignore", InitThresholdWarning)
        handle = sparsify(
            model,
            sp.method,
            include=sp.include or None,  # [] as unset: all eligible layers
            exclude=sp.exclude or None,
            **options,
        )
    return model, handle, info


def _create_model(cfg: Config, info: DatasetInfo) -> nn.Module:
    model_cfg = cfg.model
    return create_model(
        model_cfg.name,
        num_classes=info.num_classes if model_cfg.num_classes is None else model_cfg.num_classes,
        in_channels=info.in_channels if model_cfg.in_channels is None else model_cfg.in_channels,
        **model_cfg.kwargs,
    )


def _method_options(cfg: Config, model: nn.Module) -> dict[str, Any]:
    """``sparsity.options``, with ``sparsity.budget`` resolved for ``model`` as ``budget=``."""
    options = dict(cfg.sparsity.options)
    if cfg.sparsity.budget:
        if "budget" in options or "sparsity" in options:
            raise BudgetError(
                "sparsity.budget is set together with sparsity.options.budget/sparsity; "
                "give the target once"
            )
        options["budget"] = resolve_budget(cfg.sparsity.budget, model)
    return options


def check_config(cfg: Config) -> None:
    """Report a mistake in the model or sparsity sections before any data is loaded or any
    file is written: the model is built on the meta device (no memory, no time) and the
    method's options, with a budget resolved against that model, are parsed and checked."""
    with torch.device("meta"):
        model = _create_model(cfg, dataset_info(cfg.data))
    if cfg.sparsity.method != DENSE:
        parsed = get_method(cfg.sparsity.method).parse_options(_method_options(cfg, model))
        select_layers(
            model,
            structure=getattr(parsed, "structure", "weight"),
            include=cfg.sparsity.include or None,
            exclude=cfg.sparsity.exclude or None,
        )


def restore_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Config, SparsityHandle | None]:
    """Rebuild the sparsified model of a checkpoint (file or run directory).

    The model is created from the checkpoint's own configuration, sparsified the same way,
    loaded strictly and put in eval mode on ``device``. Returns (model, config, handle);
    the handle is None for a dense run.
    """
    state = load_checkpoint(path)
    try:
        cfg = config_from_dict(state["config"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} holds an invalid config: {exc}") from exc
    model, handle, _ = build_model(cfg, loading_weights=True)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        mismatch = describe_mismatch(
            state["config"], state["config"], model.state_dict(), state["model"]
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model its own config describes "
            f"(written by another strsparse version?): {mismatch}"
        ) from exc
    model.to(device).eval()
    return model, cfg, handle


def resolve_budget(spec: str | os.PathLike, model: nn.Module) -> Budget:
    """A per-layer budget from ``spec``: a CSV file (``layer,sparsity``), a strsparse
    checkpoint or run directory (the budget its model reached: the paper's budget transfer,
    Section 4.1), or a paper budget name (``strsparse.budgets.list_paper_budgets()``).

    The budget must name layers of ``model``; anything else is a ``ValueError``.
    """
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".csv":
        budget = Budget.from_csv(path)
    elif path.exists():
        source, _, _ = restore_model(path)
        budget = Budget.from_model(source)
    else:
        names = list_paper_budgets()
        if str(spec) not in names:
            raise BudgetError(
                f"budget {str(spec)!r} is neither a CSV file, a checkpoint nor a paper budget"
                f"{did_you_mean(str(spec), names)}; paper budgets: {', '.join(names)}"
            )
        budget = Budget.from_paper(str(spec))
    layers = list(eligible_layers(model))
    if not set(budget) & set(layers):
        raise BudgetError(
            f"budget {str(spec)!r} names none of this model's layers (it has e.g. "
            f"{', '.join(list(budget)[:3])}; the model has {', '.join(layers[:3])} ...): "
            "is it for another architecture?"
        )
    return budget
