"""Parameter groups chosen by what a tensor is, and the optimizer factory.

STR's sparsity comes from weight decay on the threshold parameter ``s`` (Kusupati et al.,
2020, eq. 6: ``s <- s + eta * g'(s) * P - eta * lambda * s``), so thresholds get decay by
default, optionally with their own coefficient. Norm-layer parameters and biases are
exempt from decay unless asked for. Groups come from identity and module types, never from
parameter-name substrings: the STR authors' ``"bn" in name`` test missed the BatchNorm of
ResNet downsample branches (``layer1.0.downsample.1``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from strsparse.config import OPTIMIZERS
from strsparse.errors import OptionError, did_you_mean

__all__ = ["GROUPS", "NORM_TYPES", "build_optimizer", "parameter_groups"]

logger = logging.getLogger(__name__)

NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, _InstanceNorm)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES = (*NORM_TYPES, nn.RMSNorm)

GROUPS = ("weights", "thresholds", "norm", "bias")


def _classify(model: nn.Module, thresholds: Iterable[nn.Parameter]) -> dict[int, str]:
    """id(parameter) -> 'thresholds' | 'norm' | 'bias' for the parameters that are not weights."""
    kinds: dict[int, str] = {id(p): "thresholds" for p in thresholds}
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            for p in module.parameters(recurse=False):
                kinds.setdefault(id(p), "norm")
        bias = module._parameters.get("bias")
        if isinstance(bias, nn.Parameter):
            kinds.setdefault(id(bias), "bias")
    return kinds


def parameter_groups(
    model: nn.Module,
    thresholds: Iterable[nn.Parameter] = (),
    *,
    weight_decay: float,
    threshold_weight_decay: float | None = None,
    norm_bias_decay: bool = False,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into named optimizer groups.

    - ``weights``: every other parameter (conv/linear weights, the raw weights behind a
      sparsity parametrization, 1-d parameters of custom modules), decayed by ``weight_decay``;
    - ``thresholds``: ``thresholds`` (a ``SparsityHandle.threshold_parameters()``), decayed by
      ``threshold_weight_decay`` (None: the same as ``weight_decay``, the paper's choice);
    - ``norm``: parameters of BatchNorm/LayerNorm/GroupNorm/InstanceNorm modules and
    - ``bias``: a module's ``bias`` parameter, both decayed only when ``norm_bias_decay``.

    Empty groups are left out; each group carries its ``name``.
    """
    kinds = _classify(model, thresholds)
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name in GROUPS}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        buckets[kinds.get(id(p), "weights")].append(p)
    decays = {
        "weights": weight_decay,
        "thresholds": weight_decay if threshold_weight_decay is None else threshold_weight_decay,
        "norm": weight_decay if norm_bias_decay else 0.0,
        "bias": weight_decay if norm_bias_decay else 0.0,
    }
    groups: list[dict[str, Any]] = [
        {"name": name, "params": params, "weight_decay": decays[name]}
        for name, params in buckets.items()
        if params
    ]
    logger.debug(
        "parameter groups: %s",
        ", ".join(f"{g['name']}={len(g['params'])} (wd {g['weight_decay']})" for g in groups),
    )
    return groups


def build_optimizer(
    groups: list[dict[str, Any]],
    name: str,
    *,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """An optimizer over ``groups`` (from ``parameter_groups``): ``sgd``, ``adam`` or ``adamw``.

    Weight decay is per group. For ``adam`` it is L2 added to the gradient (as SGD does,
    the form of the paper's eq. 6); ``adamw`` decouples it (Loshchilov & Hutter, 2019).
    """
    key = str(name).lower()
    if key == "sgd":
        if nesterov and momentum <= 0:
            raise OptionError(f"nesterov=True needs momentum > 0, got momentum={momentum}")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if key == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(betas[0], betas[1]), eps=eps)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(betas[0], betas[1]), eps=eps)
    raise OptionError(
        f"unknown optimizer {name!r}{did_you_mean(key, OPTIMIZERS)}; valid optimizers: "
        f"{', '.join(OPTIMIZERS)}"
    )
