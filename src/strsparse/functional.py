"""Pure tensor math behind the sparsity methods: no modules, no state.

Everything here is a function of its arguments, testable without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from strsparse.errors import did_you_mean

__all__ = [
    "THRESHOLD_FUNCTIONS",
    "cubic_sparsity",
    "global_magnitude_masks",
    "magnitude_mask",
    "pruned_cutoff",
    "resolve_threshold_function",
    "soft_threshold",
    "straight_through",
    "update_point",
]


class _SoftThreshold(torch.autograd.Function):
    """sign(w) * relu(|w| - t) with the sub-gradients of Kusupati et al. (2020), Appendix A.2.

    Only the output is saved: the mask 1{|w| > t} is ``out != 0`` and sign(w) on that mask
    is ``sign(out)``, so neither has to be stored between forward and backward.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, threshold: Tensor) -> Tensor:
        out = torch.copysign(torch.relu(weight.abs() - threshold), weight)
        ctx.save_for_backward(out)
        ctx.threshold_shape = threshold.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
        (out,) = ctx.saved_tensors
        grad_weight = grad_threshold = None
        if ctx.needs_input_grad[0]:
            # dL/dw = dL/dw_hat * 1{|w| > t}
            grad_weight = grad_out * (out != 0)
        if ctx.needs_input_grad[1]:
            # dL/dt = -<dL/dw_hat, sign(w) * 1{|w| > t}>, summed over what t is shared by
            grad_threshold = (-(grad_out * out.sign())).sum_to_size(ctx.threshold_shape)
        return grad_weight, grad_threshold


def soft_threshold(weight: Tensor, threshold: Tensor | float) -> Tensor:
    """STR's reparameterization ``sign(w) * relu(|w| - threshold)`` (Kusupati et al., 2020, eq. 3).

    ``threshold`` broadcasts against ``weight`` (a scalar per layer, one value per output
    channel, or one per weight). Gradients are the paper's sub-gradients:
    d/dw = 1{|w| > threshold}; d/dthreshold = -sign(w) * 1{|w| > threshold}, summed over the
    weights a threshold is shared by.
    """
    if not isinstance(threshold, Tensor):
        threshold = torch.tensor(threshold, dtype=weight.dtype, device=weight.device)
    return _SoftThreshold.apply(weight, threshold)


def _sigmoid(s: Tensor) -> Tensor:
    return torch.sigmoid(s)


def _exp(s: Tensor) -> Tensor:
    return torch.exp(s)


THRESHOLD_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": _sigmoid,  # the paper's choice for CNNs
    "exp": _exp,  # the paper's choice for low-rank RNNs
}


def resolve_threshold_function(name: str) -> Callable[[Tensor], Tensor]:
    """The threshold function g by name ('sigmoid' or 'exp')."""
    try:
        return THRESHOLD_FUNCTIONS[name]
    except KeyError:
        valid = sorted(THRESHOLD_FUNCTIONS)
        raise ValueError(
            f"unknown threshold function g={name!r}{did_you_mean(name, valid)}; "
            f"valid: {', '.join(valid)}"
        ) from None


def cubic_sparsity(step: int, start: int, end: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3.

    ``initial`` before ``start``, exactly ``final`` from ``end`` on (the authors' GMP code
    never reached s_f). With ``end <= start`` the schedule jumps to ``final`` at ``start``.
    """
    if step < start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def update_point(step: int, start: int, end: int, frequency: int) -> int | None:
    """The last mask update at or before ``step``: start + k * frequency, capped at ``end``
    (always an update there); None before ``start``. A pure function of the step, so a
    resumed run or a loop that skips steps computes the same masks."""
    if step < start:
        return None
    if step >= end:
        return end
    return start + (step - start) // frequency * frequency


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Boolean mask keeping the largest-magnitude ``1 - sparsity`` fraction of ``weight``.

    Exactly ``round(sparsity * numel)`` entries are dropped; ties are broken by position so
    the count is exact even when many weights share a magnitude.
    """
    numel = weight.numel()
    n_pruned = round(sparsity * numel)
    mask = torch.ones(numel, dtype=torch.bool, device=weight.device)
    if n_pruned > 0:
        # topk of the smallest magnitudes: exact count regardless of ties
        _, idx = torch.topk(weight.detach().abs().flatten(), n_pruned, largest=False, sorted=False)
        mask[idx] = False
    return mask.view_as(weight)


def pruned_cutoff(weight: Tensor, mask: Tensor) -> float | None:
    """The largest magnitude among the pruned (``mask == False``) entries, None if none."""
    pruned = weight.detach().abs()[~mask]
    return float(pruned.max()) if pruned.numel() else None


def global_magnitude_masks(weights: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """Masks for one global magnitude budget: the smallest ``sparsity`` fraction of all entries
    of all ``weights`` together are dropped, exactly that many (ties broken by position)."""
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    keep = magnitude_mask(flat, sparsity)
    return [
        m.view_as(w) for m, w in zip(keep.split([w.numel() for w in weights]), weights, strict=True)
    ]


class _StraightThrough(torch.autograd.Function):
    """Forward ``transform(w)``; backward passes the gradient to ``w`` unchanged."""

    @staticmethod
    def forward(ctx, weight: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
        return transform(weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        return grad_out, None


def straight_through(weight: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
    """``transform(weight)`` in the forward pass, identity in the backward pass.

    The straight-through estimator of DNW (Wortsman et al., 2019) and ST-3 (Vanderschueren &
    De Vleeschouwer, 2023): every raw weight, pruned or not, receives dL/d(transform(w)), so
    pruned weights can grow back. Same gradients as ``w + (transform(w) - w).detach()`` with
    one elementwise pass fewer in forward and backward. ``transform`` runs without autograd.
    """
    return _StraightThrough.apply(weight, transform)
