"""Whole-model API: attach a method to every eligible weight, advance it, bake it in."""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from strsparse.errors import did_you_mean
from strsparse.methods.base import SparsityMethod, get_method, get_parametrization

__all__ = ["SparsityHandle", "eligible_layers", "finalize", "sparse_layers", "sparsify"]

logger = logging.getLogger(__name__)

# Embedding tables have 2-D weights but are lookups, not matrix products: sparsifying them is
# opt-in, through an include pattern that names them.
_OPT_IN_TYPES = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class SparsityHandle:
    """What ``sparsify`` attached: the layers, the method, its options; advances schedules."""

    method: str
    options: dict[str, Any]
    layers: dict[str, nn.Module] = field(repr=False)

    @property
    def parametrizations(self) -> dict[str, SparsityMethod]:
        """Layer name -> the method's parametrization on that layer."""
        return {name: get_parametrization(m) for name, m in self.layers.items()}

    def step(self, step: int, total_steps: int) -> None:
        """Advance training-dependent state (GMP masks, ST-3 thresholds) to optimizer step
        ``step`` of ``total_steps``; call it once per optimizer step (a no-op for STR)."""
        if total_steps <= 0:
            raise ValueError(f"total_steps={total_steps} must be positive")
        get_method(self.method).update(self.layers, step, total_steps)

    def threshold_parameters(self) -> list[nn.Parameter]:
        """The learnable thresholds (STR's ``s``), each once even when shared."""
        seen: dict[int, nn.Parameter] = {}
        for p in self.parametrizations.values():
            s = getattr(p, "s", None)
            if isinstance(s, nn.Parameter):
                seen.setdefault(id(s), s)
        return list(seen.values())


def eligible_layers(model: nn.Module, include: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Modules whose ``weight`` has >= 2 dims, by full dotted name (embeddings only when an
    ``include`` pattern names them)."""
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            weight = module.parametrizations.weight.original
        else:
            weight = getattr(module, "_parameters", {}).get("weight")
        if weight is None or weight.dim() < 2:
            continue
        if isinstance(module, _OPT_IN_TYPES) and not _matches(name, include or ()):
            continue
        layers[name] = module
    return layers


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(patterns: Sequence[str], names: list[str], option: str) -> None:
    if isinstance(patterns, str):
        raise ValueError(
            f"{option}={patterns!r} must be a list of glob patterns, e.g. [{patterns!r}]"
        )
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise ValueError(
                f"{option} pattern {pattern!r} matches no sparsifiable layer"
                f"{did_you_mean(pattern, names)}; layers are: {shown}"
            )


def sparsify(
    model: nn.Module,
    method: str,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    **options: Any,
) -> SparsityHandle:
    """Attach sparsity ``method`` to the weight of every eligible module of ``model``.

    Eligible: any module whose ``weight`` has >= 2 dims (Linear, Conv1d/2d/3d, third-party
    projections); biases and norm layers stay dense. ``include``/``exclude`` are glob
    patterns over full dotted module names (``"layer1.*"``, ``"fc"``); a pattern matching no
    layer is an error. ``options`` go to the method (see ``list_methods()``), e.g.
    ``sparsify(model, "str", init_threshold=-3200)`` or ``sparsify(model, "gmp", sparsity=0.9)``.
    The model is changed in place; the returned handle advances schedules with ``step``.
    """
    method_cls = get_method(method)
    parsed = method_cls.parse_options(options)
    candidates = eligible_layers(model, include)
    names = list(candidates)
    if not names:
        raise ValueError(f"{type(model).__name__} has no module with a >= 2-dim weight to sparsify")
    if include is not None:
        _check_patterns(include, names, "include")
        names = [n for n in names if _matches(n, include)]
    if exclude is not None:
        _check_patterns(exclude, names, "exclude")
        names = [n for n in names if not _matches(n, exclude)]
    if not names:
        raise ValueError("include/exclude leave no layer to sparsify")

    layers: dict[str, nn.Module] = {}
    seen_weights: dict[int, str] = {}
    for name in names:
        module = candidates[name]
        if get_parametrization(module) is not None:
            raise ValueError(
                f"layer {name!r} is already sparsified; call strsparse.finalize(model) first"
            )
        if id(module.weight) in seen_weights:
            warnings.warn(
                f"layer {name!r} shares its weight with {seen_weights[id(module.weight)]!r}; "
                "it is sparsified once, through the first",
                UserWarning,
                stacklevel=2,
            )
            continue
        seen_weights[id(module.weight)] = name
        layers[name] = module

    parametrizations = method_cls.create(layers, parsed)
    for name, module in layers.items():
        parametrize.register_parametrization(module, "weight", parametrizations[name])
    logger.info("sparsified %d layers with %r", len(layers), method)
    return SparsityHandle(method=method, options=dict(options), layers=layers)


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The sparsified modules of ``model`` by full dotted name."""
    return {
        name: module
        for name, module in model.named_modules()
        if get_parametrization(module) is not None
    }


def finalize(model: nn.Module) -> nn.Module:
    """Bake the effective sparse weights into plain ``weight`` parameters, in place.

    The parametrizations are removed, so the model's ``state_dict`` loads with
    ``strict=True`` into the unmodified architecture and gives the same outputs.
    """
    for module in sparse_layers(model).values():
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model
