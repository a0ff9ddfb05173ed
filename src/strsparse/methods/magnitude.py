"""One-shot magnitude pruning: the baseline every other method is compared with.

At ``sparsify`` time the smallest-magnitude weights are masked out, per layer or by one
ranking over all layers (Han et al., 2015) - what ``torch.nn.utils.prune.l1_unstructured``
and ``global_unstructured`` offer. The mask is a buffer and never changes afterwards; the
forward pass is ``weight * mask``, so pruned weights stay zero during fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from strsparse.errors import OptionError
from strsparse.functional import global_magnitude_masks, magnitude_mask, pruned_cutoff
from strsparse.methods.base import (
    LayerWeight,
    SparsityMethod,
    check_target_options,
    register_method,
    resolve_targets,
)

__all__ = ["Magnitude", "MagnitudeOptions"]


@dataclass(frozen=True)
class MagnitudeOptions:
    """Options of ``sparsify(model, "magnitude", ...)``.

    sparsity: the fraction of weights to drop, in every layer (scope 'layer') or over all
        sparsified layers together (scope 'global').
    budget: per-layer sparsities (layer name -> fraction) instead of ``sparsity``.
    scope: 'layer' ranks each layer's magnitudes on its own (``l1_unstructured``); 'global'
        ranks all layers' together (``global_unstructured``), so layers end up with
        different sparsities. A budget needs 'layer'.
    """

    sparsity: float | None = None
    budget: Mapping[str, float] | None = None
    scope: str = "layer"

    def __post_init__(self) -> None:
        check_target_options("magnitude", self.sparsity, self.budget, self.scope)


@register_method
class Magnitude(SparsityMethod):
    """Fixed magnitude mask computed once: effective weight = weight * mask.

    ``threshold()`` is the largest magnitude that was pruned when the mask was computed
    (weights with |w| <= it were dropped), or None when nothing was pruned.
    """

    name = "magnitude"
    Options = MagnitudeOptions
    mask: Tensor
    cutoff: Tensor

    def __init__(self, mask: Tensor, cutoff: float | None) -> None:
        super().__init__()
        self.register_buffer("mask", mask.clone())  # same shape as the weight, bool
        self.register_buffer(
            "cutoff", torch.tensor(float("nan") if cutoff is None else cutoff)
        )  # scalar; NaN when nothing is pruned

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask

    def threshold(self) -> float | None:
        value = float(self.cutoff)
        return None if value != value else value  # NaN -> None

    @classmethod
    @torch.no_grad()
    def create(
        cls, layers: Mapping[str, LayerWeight], options: MagnitudeOptions
    ) -> dict[str, SparsityMethod]:
        names = list(layers)
        weights = [layers[n].weight.detach() for n in names]
        if any(w.is_meta for w in weights):
            raise OptionError(
                "one-shot magnitude pruning ranks the weights' values, and this model's are on "
                "the meta device: load its weights first (model.to_empty(device=...) and "
                "load_state_dict), or use 'gmp', which computes its masks during training"
            )
        if options.scope == "global":
            assert options.sparsity is not None  # checked: a budget needs scope='layer'
            masks = global_magnitude_masks(weights, options.sparsity)
        else:
            targets = resolve_targets(names, options.sparsity, options.budget)
            masks = [magnitude_mask(w, targets[n]) for n, w in zip(names, weights, strict=True)]
        return {
            n: cls(mask, pruned_cutoff(w, mask))
            for n, w, mask in zip(names, weights, masks, strict=True)
        }
