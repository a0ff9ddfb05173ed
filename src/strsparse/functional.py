"""Pure tensor math behind the sparsity methods: no modules, no state.

Everything here is a function of its arguments, testable without a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from strsparse.errors import OptionError, did_you_mean

__all__ = [
    "initial_threshold",
    "threshold_to_s",
    "THRESHOLD_FUNCTIONS",
    "cubic_sparsity",
    "global_magnitude_masks",
    "magnitude_mask",
    "pruned_cutoff",
    "resolve_threshold_function",
    "soft_threshold",
    "str_weights",
    "straight_through",
    "update_point",
]


class _SoftThreshold(torch.autograd.Function):
    """sign(w) * relu(|w| - t) with the sub-gradients of Kusupati et al. (2020), Appendix A.2.

    Only the output is saved: the mask 1{|w| > t} is ``out != 0`` and sign(w) on that mask
    is ``sign(out)``, so neither has to be stored between forward and backward.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, threshold: Tensor) -> Tensor:
        out = _shrink(weight, threshold)
        ctx.save_for_backward(out)
        ctx.threshold_shape = threshold.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
        (out,) = ctx.saved_tensors
        return _shrink_grads(grad_out, out, ctx.threshold_shape, *ctx.needs_input_grad)


def _shrink(weight: Tensor, threshold: Tensor) -> Tensor:
    """sign(w) * relu(|w| - t) (``t >= 0``, broadcastable), without autograd, in as few
    passes over the weight as the available kernels allow."""
    if threshold.dim() == 0 and weight.device.type == "cpu":
        # one fused kernel; reading the scalar costs nothing on the CPU (a sync elsewhere)
        return torch.nn.functional.softshrink(weight, float(threshold))
    # w - clamp(w, -t, t); clamp with tensor bounds is several times slower than these two
    out = torch.clamp_min(weight, -threshold)
    out.clamp_max_(threshold)
    return torch.sub(weight, out, out=out)


def _shrink_formula(weight: Tensor, threshold: Tensor) -> Tensor:
    # the same as a differentiable formula (for compilers): w - clamp(w, -t, t) equals
    # sign(w) * relu(|w| - t), and its autograd gradients are the paper's sub-gradients
    return weight - torch.clamp_max(torch.clamp_min(weight, -threshold), threshold)


def _shrink_grads(
    grad_out: Tensor, out: Tensor, threshold_shape: torch.Size, need_weight: bool, need_t: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dw, dL/dt) of ``out = _shrink(w, t)`` from dL/dout and ``out`` alone.

    dL/dw = dL/dout * 1{|w| > t} = dL/dout * 1{out != 0};
    dL/dt = -<dL/dout, sign(w) * 1{|w| > t}> = -<dL/dout, sign(out)>, summed over the weights
    that t is shared by. One weight-sized allocation, which becomes dL/dw: every fresh
    allocation of a large tensor costs page faults on the CPU.
    """
    softshrink_backward = torch.ops.aten.softshrink_backward
    if not need_t:
        return (softshrink_backward(grad_out, out, 0.0) if need_weight else None), None
    sign = out.sign()
    grad_t = _signed_sum(grad_out, sign, threshold_shape)
    grad_weight = None
    if need_weight:
        # the mask is 1{out != 0}, in the buffer that held the sign (done with)
        grad_weight = softshrink_backward.grad_input(grad_out, out, 0.0, grad_input=sign)
    return grad_weight, grad_t


def _signed_sum(grad_out: Tensor, sign: Tensor, shape: torch.Size) -> Tensor:
    """-(grad_out * sign) summed down to ``shape`` (a scalar, one per output channel, or
    the weight's own shape), without a weight-sized temporary where the layout allows."""
    dense = grad_out.is_contiguous() and sign.is_contiguous()
    if len(shape) == 0 and dense:
        return -torch.dot(grad_out.view(-1), sign.view(-1))
    channels = grad_out.shape[0] if grad_out.dim() > 0 else 0
    if dense and grad_out.dim() > 1 and tuple(shape) == (channels,) + (1,) * (grad_out.dim() - 1):
        # (C, 1, K) @ (C, K, 1) -> (C, 1, 1): one dot product per output channel
        per_channel = torch.bmm(grad_out.view(channels, 1, -1), sign.view(channels, -1, 1))
        return -per_channel.view(shape)
    return torch.mul(grad_out, sign).neg_().sum_to_size(shape)


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
        raise OptionError(
            f"unknown threshold function g={name!r}{did_you_mean(name, valid)}; "
            f"valid: {', '.join(valid)}"
        ) from None


def _foreach_sigmoid(values: list[Tensor]) -> list[Tensor]:
    return list(torch._foreach_sigmoid(values))


def _foreach_exp(values: list[Tensor]) -> list[Tensor]:
    return list(torch._foreach_exp(values))


def _sigmoid_derivative(values: list[Tensor]) -> list[Tensor]:
    # sigmoid'(s) = g * (1 - g)
    out = list(torch._foreach_neg(values))
    torch._foreach_add_(out, 1.0)
    torch._foreach_mul_(out, values)
    return out


# g over a list of tensors in one call, and g'(s) from the values g(s)
_THRESHOLD_FOREACH: dict[
    str, tuple[Callable[[list[Tensor]], list[Tensor]], Callable[[list[Tensor]], list[Tensor]]]
] = {
    "sigmoid": (_foreach_sigmoid, _sigmoid_derivative),
    "exp": (_foreach_exp, lambda values: values),
}


class _STRWeights(torch.autograd.Function):
    """STR's effective weights of many layers as one autograd node.

    Per layer the math is ``_SoftThreshold``'s with t = k * g(s); batching removes the fixed
    cost of one node, one Python call and one ``k * g(s)`` per layer, and g runs once per
    distinct ``s``. Nothing weight-sized is kept for the backward: it finds the mask again
    from the inputs (the raw weights and ``s``, parameters that live anyway), so each
    effective weight is freed as soon as its layer's backward is done with it, although this
    node's backward runs only once every layer's gradient has arrived.

    The inputs are kept with their versions rather than through ``save_for_backward``: a
    layer that was handed another weight (one changed in place after the batch was computed)
    gets no gradient from this node and must not fail it; a layer that gets a gradient fails
    if its weight or ``s`` changed in place before the backward, as autograd's own check does.
    """

    @staticmethod
    def forward(
        ctx: Any, k: float, g: str, s_index: tuple[int, ...], *tensors: Tensor
    ) -> tuple[Tensor, ...]:
        n = len(s_index)
        weights, s = tensors[:n], tensors[n:]
        thresholds = _THRESHOLD_FOREACH[g][0](list(s))
        if k != 1.0:
            torch._foreach_mul_(thresholds, k)
        outs = tuple(
            _shrink(w, thresholds[j].to(w.dtype)) for w, j in zip(weights, s_index, strict=True)
        )
        ctx.k, ctx.g, ctx.s_index = k, g, s_index
        ctx.inputs = tensors
        ctx.versions = tuple(t._version for t in tensors)
        ctx.set_materialize_grads(False)  # a layer not used in this forward gets no gradient
        return outs

    @staticmethod
    def backward(ctx: Any, *grad_outs: Tensor | None) -> tuple[Tensor | None, ...]:
        s_index = ctx.s_index
        n = len(s_index)
        weights, s = ctx.inputs[:n], ctx.inputs[n:]
        for i, (grad, j) in enumerate(zip(grad_outs, s_index, strict=True)):
            if grad is not None and (
                weights[i]._version != ctx.versions[i] or s[j]._version != ctx.versions[n + j]
            ):
                raise RuntimeError(
                    "a weight or threshold of an STR layer was modified by an in-place "
                    "operation between the forward and the backward; its gradient would be "
                    "wrong (change parameters after backward(), e.g. in the optimizer step)"
                )
        needs_weight, needs_s = ctx.needs_input_grad[3 : 3 + n], ctx.needs_input_grad[3 + n :]
        g_fn, derivative = _THRESHOLD_FOREACH[ctx.g]
        values = g_fn(list(s))  # g(s), for t = k * g(s) and for g'(s)
        thresholds = torch._foreach_mul(values, ctx.k) if ctx.k != 1.0 else values
        grad_weights: list[Tensor | None] = [None] * n
        grad_t: list[Tensor | None] = [None] * len(s)  # dL/dt, summed over the layers sharing s
        for i, (grad, w, j) in enumerate(zip(grad_outs, weights, s_index, strict=True)):
            if grad is None:
                continue
            grad_weights[i], part = _shrink_grads_from_weight(
                grad, w, thresholds[j].to(w.dtype), s[j].shape, needs_weight[i], needs_s[j]
            )
            if part is not None:
                part = part.to(s[j].dtype)
                grad_t[j] = part if grad_t[j] is None else grad_t[j] + part
        grad_s: list[Tensor | None] = [None] * len(s)
        live = [j for j, gt in enumerate(grad_t) if gt is not None]
        if live:
            # dL/ds = dL/dt * k * g'(s), for every s at once
            chain = derivative([values[j] for j in live])
            torch._foreach_mul_(chain, [gt for gt in grad_t if gt is not None])
            if ctx.k != 1.0:
                torch._foreach_mul_(chain, ctx.k)
            for j, grad in zip(live, chain, strict=True):
                grad_s[j] = grad
        return (None, None, None, *grad_weights, *grad_s)


def _shrink_grads_from_weight(
    grad_out: Tensor,
    weight: Tensor,
    threshold: Tensor,
    threshold_shape: torch.Size,
    need_weight: bool,
    need_t: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """``_shrink_grads`` from the raw weight instead of the output (the same values)."""
    if threshold.dim() == 0 and weight.device.type == "cpu":
        # dL/dout * 1{|w| > t} in one pass, with no output to recompute
        masked = torch.ops.aten.softshrink_backward(grad_out, weight, float(threshold))
        grad_t = None
        if need_t:  # -<dL/dout * 1{|w| > t}, sign(w)>
            grad_t = _signed_sum(masked, weight.sign(), threshold_shape)
        return (masked if need_weight else None), grad_t
    return _shrink_grads(grad_out, _shrink(weight, threshold), threshold_shape, need_weight, need_t)


def str_weights(
    weights: Sequence[Tensor],
    s: Sequence[Tensor],
    *,
    k: float = 1.0,
    g: str = "sigmoid",
    s_index: Sequence[int] | None = None,
) -> list[Tensor]:
    """STR's effective weights ``sign(w) * relu(|w| - k * g(s))`` (Kusupati et al., 2020,
    eq. 3) of several layers in one autograd node.

    ``s_index[i]`` is the position in ``s`` of the threshold parameter of ``weights[i]``
    (default: ``s[i]``), so a shared ``s`` (STR's 'global' granularity) is passed once. Each
    ``s`` broadcasts against its weights. Gradients are ``soft_threshold``'s, chained through
    k * g(s); a weight whose output is unused gets no gradient. Under ``torch.compile``,
    ``torch.export`` and ``torch.jit.trace`` it is the plain formula, which they record.
    """
    if s_index is None:
        s_index = range(len(weights))
    s_index = tuple(s_index)
    if len(s_index) != len(weights) or any(not 0 <= j < len(s) for j in s_index):
        raise OptionError(
            f"s_index={list(s_index)} must give one position in s (0..{len(s) - 1}) per weight "
            f"({len(weights)} weights)"
        )
    g_fn = resolve_threshold_function(g)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        thresholds = [k * g_fn(x) for x in s]
        return [
            _shrink_formula(w, thresholds[j].to(w.dtype))
            for w, j in zip(weights, s_index, strict=True)
        ]
    return list(_STRWeights.apply(float(k), g, s_index, *weights, *s))


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
    def forward(ctx: Any, weight: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
        return transform(weight)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        return grad_out, None


def straight_through(weight: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
    """``transform(weight)`` in the forward pass, identity in the backward pass.

    The straight-through estimator of DNW (Wortsman et al., 2019) and ST-3 (Vanderschueren &
    De Vleeschouwer, 2023): every raw weight, pruned or not, receives dL/d(transform(w)), so
    pruned weights can grow back. Same gradients as ``w + (transform(w) - w).detach()`` with
    one elementwise pass fewer in forward and backward. ``transform`` runs without autograd.
    """
    return _StraightThrough.apply(weight, transform)


def threshold_to_s(threshold: float, g: str) -> float:
    """The s with g(s) = ``threshold`` (k already divided out): logit for sigmoid, log for exp."""
    if g == "sigmoid":
        t = min(max(threshold, 1e-12), 1.0 - 1e-6)
        return math.log(t) - math.log1p(-t)
    if g == "exp":
        return math.log(max(threshold, 1e-30))
    raise ValueError(f"no inverse for threshold function g={g!r}")


@torch.no_grad()
def initial_threshold(weight: Tensor, fraction: float = 0.01) -> float:
    """A safe starting threshold for ``weight``: its ``fraction`` magnitude quantile, so
    about 1% of a freshly initialised layer starts at zero and ``s`` starts where
    g'(s) is not vanishingly small."""
    flat = weight.detach().abs().flatten().float().cpu()
    k = max(1, math.ceil(fraction * flat.numel()))
    value = float(torch.kthvalue(flat, k).values)
    return value if value > 0 else float(flat[flat > 0].min()) if (flat > 0).any() else 1e-8
