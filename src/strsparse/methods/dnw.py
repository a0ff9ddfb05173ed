"""DNW: Discovering Neural Wirings (Wortsman et al., NeurIPS 2019).

Every forward pass zeroes the ``int(s * n)`` smallest-magnitude weights of each layer (the
count rounded down, as the authors' code does) and keeps the other ``n - int(s * n)``; the
backward pass is straight-through, so every weight - kept or not - gets the dense gradient
and the kept set can change from one step to the next. There is no schedule: the target
sparsity holds from the first step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from strsparse.functional import magnitude_mask, pruned_cutoff, straight_through
from strsparse.methods.base import (
    LayerWeight,
    SparsityMethod,
    check_target_options,
    register_method,
    resolve_targets,
)

__all__ = ["DiscoveringNeuralWirings", "DiscoveringNeuralWiringsOptions", "dnw_mask"]


def dnw_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Boolean mask dropping the ``int(sparsity * numel)`` smallest magnitudes of ``weight``
    (rounded down, as Wortsman et al.'s code prunes), ties broken by position."""
    numel = weight.numel()
    return magnitude_mask(weight, int(sparsity * numel) / numel if numel else 0.0)


@dataclass(frozen=True)
class DiscoveringNeuralWiringsOptions:
    """Options of ``sparsify(model, "dnw", ...)``.

    sparsity: the fraction of each layer's weights zeroed in every forward pass.
    budget: per-layer sparsities (layer name -> fraction) instead of ``sparsity``.
    """

    sparsity: float | None = None
    budget: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        check_target_options("dnw", self.sparsity, self.budget)


@register_method
class DiscoveringNeuralWirings(SparsityMethod):
    """Top-k magnitude forward, straight-through backward.

    ``threshold()`` is the largest magnitude the current mask drops (weights with |w| <= it
    are zero in the forward pass), or None when the layer's sparsity is 0.
    """

    name = "dnw"
    Options = DiscoveringNeuralWiringsOptions

    def __init__(self, sparsity: float) -> None:
        super().__init__()
        self.sparsity = float(sparsity)
        # the raw weight of the latest forward pass, for threshold() (a reference, no copy;
        # a tuple so that nn.Module does not register it)
        self._last_raw: tuple[Tensor, ...] = ()

    def _mask(self, weight: Tensor) -> Tensor:
        return dnw_mask(weight, self.sparsity)

    def _masked(self, weight: Tensor) -> Tensor:
        return weight * self._mask(weight)

    def forward(self, weight: Tensor) -> Tensor:
        self._last_raw = (weight if weight.is_leaf else weight.detach(),)
        # the mask is recomputed from the current weights every pass; gradients skip it
        return straight_through(weight, self._masked)

    @torch.no_grad()
    def threshold(self) -> float | None:
        if self.sparsity == 0.0 or not self._last_raw:
            return None
        (weight,) = self._last_raw
        return pruned_cutoff(weight, self._mask(weight))

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}"

    @classmethod
    def create(
        cls, layers: Mapping[str, LayerWeight], options: DiscoveringNeuralWiringsOptions
    ) -> dict[str, SparsityMethod]:
        targets = resolve_targets(list(layers), options.sparsity, options.budget)
        return {name: cls(targets[name]) for name in layers}
