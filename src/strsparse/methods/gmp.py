"""GMP: gradual magnitude pruning (Zhu & Gupta, 2017).

The target sparsity follows the cubic schedule
s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3 for t0 <= t <= t1; every
``frequency`` steps in that window (and always exactly at t1) each layer's mask is recomputed
from the raw weights' magnitudes, per layer or by one ranking over all layers. Between
updates the mask is fixed; the forward pass is ``weight * mask``.

Unlike the authors' code, the final target is reached exactly at t1 (``round(s_f * n)``
zeros per layer) and the current target is a buffer, so it survives a resume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from strsparse.errors import OptionError
from strsparse.functional import (
    cubic_sparsity,
    global_magnitude_masks,
    magnitude_mask,
    pruned_cutoff,
    update_point,
)
from strsparse.methods.base import (
    LayerWeight,
    SparsityMethod,
    check_fraction,
    check_schedule_options,
    check_target_options,
    raw_weight,
    register_method,
    resolve_targets,
    schedule_window,
)

__all__ = ["GradualMagnitude", "GradualMagnitudeOptions"]


@dataclass(frozen=True)
class GradualMagnitudeOptions:
    """Options of ``sparsify(model, "gmp", ...)``.

    sparsity: the final sparsity s_f, reached exactly at ``end``.
    budget: per-layer final sparsities (layer name -> fraction) instead of ``sparsity``;
        each layer follows the cubic schedule towards its own target.
    initial_sparsity: s_i, the sparsity at ``start`` (dense before ``start``).
    start, end: t0 and t1 as an optimizer step (int) or a fraction of ``total_steps``
        (float in [0, 1]); by default pruning spans the first 75% of training and the rest
        fine-tunes the final mask.
    frequency: steps between mask updates (Zhu & Gupta's Δt); masks are also updated at
        ``end``.
    scope: 'layer' ranks each layer on its own; 'global' ranks all layers' magnitudes
        together against one target (so layers end up with different sparsities). A budget
        needs 'layer'.
    """

    sparsity: float | None = None
    budget: Mapping[str, float] | None = None
    initial_sparsity: float = 0.0
    start: int | float = 0.0
    end: int | float = 0.75
    frequency: int = 100
    scope: str = "layer"

    def __post_init__(self) -> None:
        check_target_options("gmp", self.sparsity, self.budget, self.scope)
        check_fraction(self.initial_sparsity, "initial_sparsity")
        check_schedule_options(self.start, self.end)
        if (
            isinstance(self.frequency, bool)
            or not isinstance(self.frequency, int)
            or self.frequency < 1
        ):
            raise OptionError(f"frequency={self.frequency!r} must be a positive number of steps")


@register_method
class GradualMagnitude(SparsityMethod):
    """Cubic-schedule magnitude masks: effective weight = weight * mask.

    Buffers (in ``state_dict``): ``mask`` (bool, the weight's shape), ``target`` (the current
    target sparsity), ``cutoff`` (the largest pruned magnitude at the last update, NaN when
    none) and ``update_step`` (the step of the last mask update, -1 for none).
    ``threshold()`` is that cut-off: weights with |w| <= it were dropped at the last update.
    """

    name = "gmp"
    Options = GradualMagnitudeOptions
    mask: Tensor
    target: Tensor
    cutoff: Tensor
    update_step: Tensor

    def __init__(self, weight: Tensor, final: float, options: GradualMagnitudeOptions) -> None:
        super().__init__()
        self.final = float(final)
        self.options = options
        device = weight.device
        self.register_buffer("mask", torch.ones(weight.shape, dtype=torch.bool, device=device))
        self.register_buffer("target", torch.zeros((), device=device))
        self.register_buffer("cutoff", torch.full((), math.nan, device=device))
        self.register_buffer("update_step", torch.full((), -1, dtype=torch.long, device=device))

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask

    def threshold(self) -> float | None:
        value = float(self.cutoff)
        return None if math.isnan(value) else value

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"final={self.final}, start={o.start!r}, end={o.end!r}, "
            f"frequency={o.frequency}, scope={o.scope!r}"
        )

    @classmethod
    def create(
        cls, layers: Mapping[str, LayerWeight], options: GradualMagnitudeOptions
    ) -> dict[str, SparsityMethod]:
        targets = resolve_targets(list(layers), options.sparsity, options.budget)
        for name, final in targets.items():
            if options.initial_sparsity > final:
                raise OptionError(
                    f"initial_sparsity={options.initial_sparsity} exceeds layer {name!r}'s "
                    f"final sparsity {final}; lower initial_sparsity"
                )
        return {name: cls(layers[name].weight, targets[name], options) for name in layers}

    @classmethod
    @torch.no_grad()
    def update(cls, layers: Mapping[str, LayerWeight], step: int, total_steps: int) -> None:
        """Recompute the masks when ``step`` reaches a new update point of the schedule."""
        params = cls.attached(layers)
        if not params:
            return
        options = params[0].options
        start, end = schedule_window(options.start, options.end, total_steps)
        point = update_point(step, start, end, options.frequency)
        previous = int(params[0].update_step)  # all layers are updated together
        if point is None:
            if previous != -1:  # the run went back before start: dense again
                for p in params:
                    p._set(torch.ones_like(p.mask), 0.0, None, -1)
            return
        if point == previous:
            return

        weights = [raw_weight(m) for m in layers.values()]
        if options.scope == "global":
            sparsity = cubic_sparsity(point, start, end, params[0].final, options.initial_sparsity)
            masks = global_magnitude_masks(weights, sparsity)
            sparsities = [sparsity] * len(params)
        else:
            sparsities = [
                cubic_sparsity(point, start, end, p.final, options.initial_sparsity) for p in params
            ]
            masks = [magnitude_mask(w, s) for w, s in zip(weights, sparsities, strict=True)]
        for p, w, mask, sparsity in zip(params, weights, masks, sparsities, strict=True):
            p._set(mask, sparsity, pruned_cutoff(w, mask), point)

    def _set(self, mask: Tensor, target: float, cutoff: float | None, step: int) -> None:
        self.mask.copy_(mask)
        self.target.fill_(target)
        self.cutoff.fill_(math.nan if cutoff is None else cutoff)
        self.update_step.fill_(step)
