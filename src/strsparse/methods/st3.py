"""ST-3: straight-through soft thresholding (Vanderschueren & De Vleeschouwer, WACV 2023).

Each step the threshold is the magnitude quantile, at the current target sparsity p_t, of
all sparsified layers' weights together (one global cut-off; ST-3σ first scales each layer's
magnitudes by sqrt(sum(weight.shape)), i.e. divides them by 1/sqrt(sum(shape))). The
forward weight is soft-thresholded and rescaled per output channel,

    w_q = (w - sign(w) * th) * 1{|w| > th} * 1.01 / (r + 0.01),
    r = (mean(|w| * 1{|w| > th}) + 1e-6) / (mean(|w|) + 1e-6)   (over the output channel),

and the backward pass is straight-through: every raw weight gets dL/dw_q, so pruned weights
can come back. The target follows p_t = p_max * (1 - (1 - (t - t_start) / (t_end - t_start))^3)
(dense before t_start). At t_end the thresholded, rescaled weights are written over the raw
ones and the mask is frozen; from then on the forward pass is ``weight * mask`` (fine-tuning
with the pruned weights held at zero).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from strsparse.errors import OptionError
from strsparse.functional import cubic_sparsity, straight_through
from strsparse.methods.base import (
    LayerWeight,
    SparsityMethod,
    check_schedule_options,
    check_target_options,
    get_parametrization,
    raw_weight,
    register_method,
    resolve_targets,
    schedule_window,
)

__all__ = ["StraightThroughSoftThreshold", "StraightThroughSoftThresholdOptions", "st3_weight"]

# ST-3's rescaling constants (authors' code): 1.01 / (r + 0.01) with 1e-6 in both means
_RESCALE_OFFSET = 0.01
_RESCALE_EPS = 1e-6


def st3_weight(
    weight: Tensor, threshold: Tensor | float, rescale: bool = True, axis: int = 0
) -> Tensor:
    """ST-3's forward weight: soft threshold, then per-output-channel rescaling.

    w_q = (w - sign(w) * th) * 1{|w| > th}, times 1.01 / (r + 0.01) per output channel
    (dim ``axis``: 0 for Linear and Conv, 1 for ConvTranspose and in x out layers) with
    r = (mean(|w| * 1{|w| > th}) + 1e-6) / (mean(|w|) + 1e-6) over the channel: the fraction
    of the channel's magnitude that survives. A channel that keeps everything gets factor 1;
    one that loses most of its mass is scaled up (at most 101x).
    """
    magnitude = weight.abs()
    keep = magnitude > threshold
    out = torch.copysign(torch.relu(magnitude - threshold), weight)  # 0 where |w| <= th
    if rescale and weight.dim() > 1:
        dims = tuple(d for d in range(weight.dim()) if d != axis)  # all but the output axis
        kept_mass = (magnitude * keep).mean(dims, keepdim=True)  # (C_out, 1, ...) for axis 0
        ratio = (kept_mass + _RESCALE_EPS) / (magnitude.mean(dims, keepdim=True) + _RESCALE_EPS)
        out = out * ((1.0 + _RESCALE_OFFSET) / (ratio + _RESCALE_OFFSET))
    return out


def _kth_smallest(values: Tensor, k: int) -> Tensor:
    """The k-th smallest entry (1-based) of ``values`` as a 0-dim tensor; 0 for k == 0."""
    if k == 0:
        return values.new_zeros(())
    return torch.kthvalue(values.flatten(), k).values


def _layer_scale(shape: torch.Size) -> float:
    """ST-3σ's per-layer magnitude scale 1 / sqrt(sum(weight.shape))."""
    return 1.0 / math.sqrt(sum(shape))


@dataclass(frozen=True)
class StraightThroughSoftThresholdOptions:
    """Options of ``sparsify(model, "st3", ...)``.

    sparsity: p_max, the final sparsity over all sparsified layers together (one global
        magnitude quantile, so layers end up with different sparsities).
    budget: per-layer final sparsities (layer name -> fraction) instead of ``sparsity``:
        each layer then gets its own quantile at its own scheduled target.
    start, end: t_start and t_end as an optimizer step (int) or a fraction of
        ``total_steps`` (float in [0, 1]); dense before ``start``; at ``end`` the weights
        are fixed and the mask frozen. By default the target ramps up over the first 80% of
        training and the last 20% fine-tunes.
    normalize: ST-3σ: divide each layer's magnitudes by 1/sqrt(sum(weight.shape)) before
        the global quantile (layers with small initial weights are not emptied first).
        Only meaningful with ``sparsity`` (a budget uses per-layer quantiles).
    rescale: apply the per-output-channel rescaling 1.01 / (r + 0.01).
    """

    sparsity: float | None = None
    budget: Mapping[str, float] | None = None
    start: int | float = 0.0
    end: int | float = 0.8
    normalize: bool = False
    rescale: bool = True

    def __post_init__(self) -> None:
        check_target_options("st3", self.sparsity, self.budget)
        check_schedule_options(self.start, self.end)
        for option in ("normalize", "rescale"):
            value = getattr(self, option)
            if not isinstance(value, bool):
                raise OptionError(f"{option}={value!r} must be True or False")
        if self.normalize and self.budget is not None:
            raise OptionError(
                "normalize=True scales the global quantile and has no effect with a budget "
                "(per-layer quantiles); drop normalize or give sparsity=<fraction>"
            )


@register_method
class StraightThroughSoftThreshold(SparsityMethod):
    """ST-3's parametrization.

    Buffers (in ``state_dict``): ``current_threshold`` (the layer's threshold th), ``target``
    (the current target sparsity p_t), ``mask`` (bool, the frozen mask; all True before the
    freeze) and ``frozen``. ``threshold()`` is th (0 while dense).
    """

    name = "st3"
    Options = StraightThroughSoftThresholdOptions
    current_threshold: Tensor
    target: Tensor
    mask: Tensor
    frozen: Tensor

    def __init__(
        self,
        weight: Tensor,
        final: float,
        options: StraightThroughSoftThresholdOptions,
        axis: int = 0,
    ) -> None:
        """``axis``: the weight's output-channel axis, along which ``rescale`` runs."""
        super().__init__()
        self.final = float(final)
        self.options = options
        self.axis = axis
        self.scale = _layer_scale(weight.shape)
        device = weight.device
        self.register_buffer("current_threshold", torch.zeros((), device=device))
        self.register_buffer("target", torch.zeros((), device=device))
        self.register_buffer("mask", torch.ones(weight.shape, dtype=torch.bool, device=device))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool, device=device))
        # Python mirrors of the buffers, so that forward never syncs with the device
        self._frozen = False
        self._dense = True  # threshold 0: w_q == w exactly, skip the work

    # -- forward ---------------------------------------------------------------------------
    def _quantize(self, weight: Tensor) -> Tensor:
        threshold = self.current_threshold.to(weight.dtype)
        return st3_weight(weight, threshold, self.options.rescale, self.axis)

    def forward(self, weight: Tensor) -> Tensor:
        if self._frozen:
            return weight * self.mask
        if self._dense:
            return weight
        return straight_through(weight, self._quantize)

    def threshold(self) -> float:
        return float(self.current_threshold)

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"final={self.final}, start={o.start!r}, end={o.end!r}, "
            f"normalize={o.normalize}, rescale={o.rescale}"
        )

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._frozen = bool(self.frozen)
        self._dense = not self._frozen and float(self.current_threshold) == 0.0

    # -- schedule --------------------------------------------------------------------------
    @classmethod
    def create(
        cls, layers: Mapping[str, LayerWeight], options: StraightThroughSoftThresholdOptions
    ) -> dict[str, SparsityMethod]:
        targets = resolve_targets(list(layers), options.sparsity, options.budget)
        return {
            name: cls(layer.weight, targets[name], options, layer.output_axis)
            for name, layer in layers.items()
        }

    @classmethod
    @torch.no_grad()
    def update(cls, layers: Mapping[str, LayerWeight], step: int, total_steps: int) -> None:
        """Set every layer's threshold for ``step``; at ``end``, fix the weights (``freeze``).

        Frozen layers are left alone: the fix happens once.
        """
        params = cls.attached(layers)
        if not params or params[0]._frozen:
            return
        options = params[0].options
        start, end = schedule_window(options.start, options.end, total_steps)
        targets = [
            cubic_sparsity(step, start, end, p.final) if step >= start else 0.0 for p in params
        ]
        weights = [raw_weight(m) for m in layers.values()]

        if not any(targets):  # dense (before start): no quantile to compute
            thresholds = [torch.zeros(()) for _ in params]
        elif options.budget is None:
            # one quantile over all layers' (optionally normalised) magnitudes
            magnitudes = [
                w.abs().flatten() / (p.scale if options.normalize else 1.0)
                for p, w in zip(params, weights, strict=True)
            ]
            flat = torch.cat(magnitudes)
            quantile = _kth_smallest(flat, round(targets[0] * flat.numel()))
            thresholds = [quantile * p.scale if options.normalize else quantile for p in params]
        else:
            thresholds = [
                _kth_smallest(w.abs(), round(t * w.numel()))
                for w, t in zip(weights, targets, strict=True)
            ]
        for p, threshold, target in zip(params, thresholds, targets, strict=True):
            p.current_threshold.copy_(threshold)
            p.target.fill_(target)
            p._dense = target == 0.0
        if step >= end:
            cls.freeze(layers)

    @classmethod
    @torch.no_grad()
    def freeze(cls, layers: Mapping[str, LayerWeight]) -> None:
        """ST-3's final fix, now: write the thresholded, rescaled weights into the raw ones
        and freeze the mask; afterwards the forward pass is ``weight * mask``.

        ``update`` calls it at ``end``; call it yourself to stop pruning early, e.g.
        ``StraightThroughSoftThreshold.freeze(handle.layers)``. Frozen layers are skipped.
        """
        for module in layers.values():
            p = get_parametrization(module)
            if not isinstance(p, cls):
                raise OptionError(
                    f"freeze expects layers sparsified with 'st3', got {type(p).__name__}"
                )
            if p._frozen:
                continue
            weight = raw_weight(module)
            threshold = p.current_threshold.to(weight.dtype)
            p.mask.copy_(weight.abs() > threshold)
            weight.copy_(st3_weight(weight, threshold, p.options.rescale, p.axis))
            p.frozen.fill_(True)
            p._frozen = True
            p._dense = False
