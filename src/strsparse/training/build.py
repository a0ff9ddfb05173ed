"""From a configuration to a sparsified model: ``build_model`` and ``resolve_budget``."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from strsparse.budgets import Budget
from strsparse.config import DENSE, Config
from strsparse.functional import closest
from strsparse.methods.soft_threshold import InitThresholdWarning
from strsparse.sparsify import SparsityHandle, eligible_layers, sparsify

if TYPE_CHECKING:
    from strsparse.data import DatasetInfo

__all__ = ["DENSE", "build_model", "dataset_info", "resolve_budget"]

logger = logging.getLogger(__name__)


def dataset_info(cfg: Config) -> DatasetInfo:
    """num_classes / in_channels / input_shape of ``cfg.data``, without loading the data
    (``strsparse.data.dataset_info``)."""
    from strsparse import data

    return data.dataset_info(cfg.data)


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
    from strsparse.models import create_model

    if info is None:
        info = dataset_info(cfg)
    model_cfg = cfg.model
    model = create_model(
        model_cfg.name,
        num_classes=info.num_classes if model_cfg.num_classes is None else model_cfg.num_classes,
        in_channels=info.in_channels if model_cfg.in_channels is None else model_cfg.in_channels,
        **model_cfg.kwargs,
    )
    sp = cfg.sparsity
    if sp.method == DENSE:
        return model, None, info
    options = dict(sp.options)
    budget_spec = sp.budget
    if budget_spec:
        if "budget" in options or "sparsity" in options:
            raise ValueError(
                "sparsity.budget is set together with sparsity.options.budget/sparsity; "
                "give the target once"
            )
        options["budget"] = resolve_budget(budget_spec, model)
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
        from strsparse.training.checkpoint import restore_model

        source, _, _ = restore_model(path)
        budget = Budget.from_model(source)
    else:
        from strsparse.budgets import list_paper_budgets

        names = list_paper_budgets()
        if str(spec) not in names:
            raise ValueError(
                f"budget {str(spec)!r} is neither a CSV file, a checkpoint nor a paper budget"
                f"{closest(str(spec), names)}; paper budgets: {', '.join(names)}"
            )
        budget = Budget.from_paper(str(spec))
    layers = list(eligible_layers(model))
    if not set(budget) & set(layers):
        raise ValueError(
            f"budget {str(spec)!r} names none of this model's layers (it has e.g. "
            f"{', '.join(list(budget)[:3])}; the model has {', '.join(layers[:3])} ...): "
            "is it for another architecture?"
        )
    return budget
