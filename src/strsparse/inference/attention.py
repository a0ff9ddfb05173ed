"""Transformer layers that ``to_sparse`` can run sparse.

PyTorch's ``nn.MultiheadAttention`` keeps its query, key and value projections in one packed
parameter and reads its output projection's weight directly, and
``nn.TransformerEncoderLayer`` hands all its weights to one fused kernel in inference. Neither
calls its projections as layers, so none of them could be swapped for a sparse one. The
modules here compute the same outputs from separate ``SparseLinear`` projections (sparse, or
kept dense by the per-layer rule). Self-attention's input is transposed once for its three
projections, and between the two feed-forward layers the activations stay channel-major
(features, tokens), the layout the kernel works in, so that those layers spend no transposes
of their own. They are for inference: dropout is left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from strsparse.inference._native import backend
from strsparse.inference.layers import ELEMENTWISE_FUNCTIONS, ELEMENTWISE_MODULES, SparseLinear
from strsparse.methods.base import is_conv1d

__all__ = [
    "SparseMultiheadAttention",
    "SparseTransformerEncoderLayer",
    "attention_projections",
    "conv1d_as_linear",
    "is_hf_projection",
    "supported_attention",
]


def is_hf_projection(module: nn.Module) -> bool:
    """Whether ``module`` is shaped as Hugging Face's ``Conv1D`` is: a class of that name with
    a 2-D ``weight`` (in x out) whose ``nf`` is its number of outputs. A layer merely named
    so (a 1-D convolution of one's own) is left alone."""
    weight = getattr(module, "weight", None)
    return (
        is_conv1d(module)
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (out x in) and ``bias``."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().clone().contiguous())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone())
    return linear


def conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what a Hugging Face ``Conv1D`` does (``x @ W + b``)."""
    weight: Tensor = module.get_parameter("weight")  # (in, out)
    return _linear(weight.t(), getattr(module, "bias", None))


def supported_attention(mha: nn.MultiheadAttention) -> bool:
    """Whether ``SparseMultiheadAttention`` computes what ``mha`` does: all but the learned
    extra key and value (``add_bias_kv``) and the zero attention slot (``add_zero_attn``)."""
    return mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn


def attention_projections(mha: nn.MultiheadAttention) -> dict[str, nn.Linear]:
    """``mha``'s four projections as separate ``nn.Linear`` layers: ``q_proj``, ``k_proj``,
    ``v_proj`` (slices of the packed ``in_proj_weight``, or the separate weights where the
    key and value have their own sizes) and ``out_proj``."""
    e = mha.embed_dim
    if mha.in_proj_weight is not None:  # packed (3E, E)
        weights = mha.in_proj_weight.split(e)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None,) * 3
    projections = {
        name: _linear(weight, bias)
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases, strict=True)
    }
    projections["out_proj"] = _linear(mha.out_proj.weight, mha.out_proj.bias)
    return projections


def _channel_major(x: Tensor) -> Tensor:
    """(..., E) -> (E, tokens), the tokens in the order given."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    return backend().swap01(x2.contiguous())


def _elementwise(fn: Callable[[Tensor], Tensor]) -> bool:
    """Whether ``fn`` acts on each value alone, so on either layout."""
    return fn in ELEMENTWISE_FUNCTIONS or isinstance(fn, ELEMENTWISE_MODULES)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A mask to add to attention scores: a boolean one's True (not allowed) becomes -inf."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


class SparseMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (same call, same outputs) with its projections as layers.

    The scores are PyTorch's (``scaled_dot_product_attention``, or softmax and matmul where
    the weights are asked for). The projections read their input transposed, once for all
    three in self-attention.
    """

    def __init__(
        self,
        num_heads: int,
        batch_first: bool,
        q_proj: SparseLinear,
        k_proj: SparseLinear,
        v_proj: SparseLinear,
        out_proj: SparseLinear,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.out_proj = out_proj

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, batch_first={self.batch_first}"

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            # as nn.MultiheadAttention: the hint says what attn_mask holds, it is no mask
            raise RuntimeError(
                "is_causal=True needs the causal attn_mask too (it is a hint that attn_mask "
                "is causal); pass attn_mask=nn.Transformer.generate_square_subsequent_mask(L)"
            )
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): one sample, batch first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        # tokens stay in the order given: (N, L) batch first, else (L, N)
        batch_first = self.batch_first or unbatched
        n = query.shape[0] if batch_first else query.shape[1]
        length, source = (query.shape[1], key.shape[1]) if batch_first else (len(query), len(key))
        xq = _channel_major(query)  # (E, T)
        xk = xq if key is query else _channel_major(key)
        xv = xk if value is key else (xq if value is query else _channel_major(value))
        h = self.num_heads
        swap = backend().swap01

        def heads(layer: SparseLinear, x: Tensor, tokens: int) -> Tensor:  # (N, H, tokens, D)
            y = swap(layer.forward_channel_major(x))  # (T, E): what attention's kernel reads
            if batch_first:
                return y.view(n, tokens, h, -1).transpose(1, 2)
            return y.view(tokens, n, h, -1).permute(1, 2, 0, 3)

        q = heads(self.q_proj, xq, length)
        k = heads(self.k_proj, xk, source)
        v = heads(self.v_proj, xv, source)
        d = q.shape[-1]
        mask = _additive(attn_mask, q.dtype)  # (L, S) or (N*H, L, S)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(n, h, length, source)
        pad = _additive(key_padding_mask, q.dtype)  # (N, S)
        if pad is not None:
            pad = pad.view(n, 1, 1, source)
            mask = pad if mask is None else mask + pad
        weights = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)  # (N, H, L, S)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, H, L, D)
        # (T, E), the tokens in the order given
        out = out.transpose(1, 2) if batch_first else out.permute(2, 0, 1, 3)
        y = self.out_proj(out.reshape(*query.shape[:2], h * d))
        if unbatched:
            y = y.squeeze(0)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        return y, weights


class SparseTransformerEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer``'s computation (its layer-by-layer path, which PyTorch
    takes in training) with ``SparseLinear`` feed-forward layers, between which the
    activations stay channel-major."""

    def __init__(
        self,
        layer: nn.TransformerEncoderLayer,
        linear1: SparseLinear,
        linear2: SparseLinear,
        relu_fused: bool = False,
    ) -> None:
        """``relu_fused``: ``linear1`` clamps its outputs at zero itself, so the ReLU after it
        is left out."""
        super().__init__()
        self.self_attn = layer.self_attn
        self.linear1 = linear1
        self.linear2 = linear2
        self.norm1 = layer.norm1
        self.norm2 = layer.norm2
        self.norm_first = bool(layer.norm_first)
        self.activation: Callable[[Tensor], Tensor] = (
            nn.Identity() if relu_fused else layer.activation
        )

    def _sa_block(
        self, x: Tensor, mask: Tensor | None, padding: Tensor | None, causal: bool
    ) -> Tensor:
        return self.self_attn(
            x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False,
            is_causal=causal,
        )[0]  # fmt: skip

    def _ff_block(self, x: Tensor) -> Tensor:
        hidden = self.linear1.forward_channel_major(_channel_major(x))  # (F, T)
        if _elementwise(self.activation):
            hidden = self.activation(hidden)
        else:  # on the layout it was written for
            swap = backend().swap01
            hidden = swap(self.activation(swap(hidden)).contiguous())
        return backend().swap01(self.linear2.forward_channel_major(hidden)).view(x.shape)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))
