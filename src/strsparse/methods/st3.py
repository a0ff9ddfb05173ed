"""ST-3: straight-through soft thresholding (Vanderschueren & De Vleeschouwer, WACV 2023).

Each step the threshold is the magnitude quantile, at the current target sparsity p_t, of
all sparsified layers' weights together (one global cut-off; ST-3σ first scales each layer's
magnitudes by sqrt(sum(weight.shape)), i.e. divides them by 1/sqrt(sum(shape))). The
forward weight is soft-thresholded and rescaled per output channel,

    w_q = (w - sign(w) * th) * 1{|w| > th} * 1.01 / (r + 0.01),
    r = (mean(|w| * 1{|w| > th}) + 1e-6) / (mean(|w|) + 1e-6)   (over the output channel),

and the backward pass is straight-through: every raw weight gets dL/dw_q, so pruned weights
can come back. The target follows p_t = p_max * (1 - (1 - (t - t_start) / (t_end - t_start))^3)
(dense before t_start) and holds p_max after t_end, the mask still free to move, as the
authors run it. At ``freeze`` (their ``fix_from``, by default the end of training) the
thresholded, rescaled weights are written over the raw ones and the mask is frozen; from then
on the forward pass is ``weight * mask`` (fine-tuning with the pruned weights held at zero).
The threshold is the linearly interpolated quantile of the magnitudes, as ``torch.quantile``
computes it (computed from the two neighbouring order statistics, so any size works).
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
    resolve_step,
    resolve_targets,
    schedule_window,
)

__all__ = [
    "StraightThroughSoftThreshold",
    "StraightThroughSoftThresholdOptions",
    "interpolated_quantile",
    "st3_weight",
]

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


def interpolated_quantile(values: Tensor, q: float) -> Tensor:
    """The ``q`` quantile of ``values`` with linear interpolation, as ``torch.quantile``
    (its default ``interpolation='linear'``) computes it, as a 0-dim tensor; 0 for q == 0.

    With the n values sorted, v_(0) <= ... <= v_(n-1), and pos = q * (n - 1):
    v_(floor(pos)) + (pos - floor(pos)) * (v_(ceil(pos)) - v_(floor(pos))). The two order
    statistics come from ``kthvalue``, which has no input-size limit (``torch.quantile``
    refuses inputs of more than 2**24 entries).
    """
    if q == 0:
        return values.new_zeros(())
    flat = values.flatten()
    position = q * (flat.numel() - 1)
    lower = math.floor(position)
    upper = min(lower + 1, flat.numel() - 1)
    low = torch.kthvalue(flat, lower + 1).values
    if upper == lower or position == lower:
        return low
    high = torch.kthvalue(flat, upper + 1).values
    return low + (position - lower) * (high - low)


def _freeze_step(freeze: int | float, end: int, total_steps: int) -> int:
    """The step of the fix: ``freeze`` resolved like ``end`` (a fraction means at most the
    last step), never before the ramp's last step ``end``."""
    step = resolve_step(freeze, total_steps, "freeze")
    if isinstance(freeze, float):
        step = min(step, total_steps - 1)
    if step < end:
        raise OptionError(
            f"freeze={freeze!r} (step {step}) comes before the end of the ramp (step {end}) "
            f"with total_steps={total_steps}; pass a later freeze"
        )
    return step


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
        ``total_steps`` (float in [0, 1]); dense before ``start``, p_max from ``end`` on.
        By default the target ramps up over the first 80% of training.
    freeze: the authors' ``fix_from``: the step (int) or fraction of training (float) at
        which the weights are fixed and the mask frozen, at or after ``end``. The default,
        1.0, is the last step (the authors' default: the mask moves until the end); pass
        ``freeze=end`` to fine-tune a frozen mask after the ramp.
    normalize: ST-3σ: divide each layer's magnitudes by 1/sqrt(sum(weight.shape)) before
        the global quantile (layers with small initial weights are not emptied first).
        Only meaningful with ``sparsity`` (a budget uses per-layer quantiles).
    rescale: apply the per-output-channel rescaling 1.01 / (r + 0.01).
    """

    sparsity: float | None = None
    budget: Mapping[str, float] | None = None
    start: int | float = 0.0
    end: int | float = 0.8
    freeze: int | float = 1.0
    normalize: bool = False
    rescale: bool = True

    def __post_init__(self) -> None:
        check_target_options("st3", self.sparsity, self.budget)
        check_schedule_options(self.start, self.end)
        resolve_step(self.freeze, 1, "freeze")
        if type(self.freeze) is type(self.end) and self.freeze < self.end:
            raise OptionError(
                f"freeze={self.freeze!r} comes before end={self.end!r}: the mask is frozen at "
                "or after the end of the ramp; pass freeze=end to freeze right after it"
            )
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
            f"final={self.final}, start={o.start!r}, end={o.end!r}, freeze={o.freeze!r}, "
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
        """Set every layer's threshold for ``step``; at ``freeze``, fix the weights.

        Frozen layers are left alone: the fix happens once.
        """
        params = cls.attached(layers)
        if not params or params[0]._frozen:
            return
        options = params[0].options
        start, end = schedule_window(options.start, options.end, total_steps)
        freeze_step = _freeze_step(options.freeze, end, total_steps)
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
            quantile = interpolated_quantile(flat, targets[0])
            thresholds = [quantile * p.scale if options.normalize else quantile for p in params]
        else:
            thresholds = [
                interpolated_quantile(w.abs(), t) for w, t in zip(weights, targets, strict=True)
            ]
        for p, threshold, target in zip(params, thresholds, targets, strict=True):
            p.current_threshold.copy_(threshold)
            p.target.fill_(target)
            p._dense = target == 0.0
        if step >= freeze_step:
            cls.freeze(layers)

    @classmethod
    @torch.no_grad()
    def freeze(cls, layers: Mapping[str, LayerWeight]) -> None:
        """ST-3's final fix, now: write the thresholded, rescaled weights into the raw ones
        and freeze the mask; afterwards the forward pass is ``weight * mask``.

        ``update`` calls it at the ``freeze`` step; call it yourself to stop pruning early, e.g.
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
