"""to_sparse on transformers: PyTorch's attention and encoder layers, which read their weights
directly, rebuilt from separate projection layers; Hugging Face's Conv1D."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strsparse
from strsparse.inference import (
    SparseLinear,
    SparseMultiheadAttention,
    SparseTransformerEncoderLayer,
    backend,
    load_sparse,
    save_sparse,
    to_sparse,
)
from tests.lookalikes import Conv1D

needs_native = pytest.mark.skipif(
    not backend().native, reason="the native kernels could not be built on this machine"
)
TOL = 1e-4


def _prune(model: nn.Module, sparsity: float = 0.9) -> nn.Module:
    torch.manual_seed(0)
    strsparse.sparsify(model, "magnitude", sparsity=sparsity)
    return strsparse.finalize(model).eval()


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= TOL * scale


class _Encoder(nn.Module):
    def __init__(self, batch_first: bool, norm_first: bool, activation: str | nn.Module) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            32, 4, 64, dropout=0.0, activation=activation, batch_first=batch_first,
            norm_first=norm_first,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=padding))


@needs_native
@pytest.mark.parametrize(
    "batch_first,norm_first,activation",
    [(True, False, "relu"), (False, True, "gelu"), (True, True, "relu")],
)
def test_an_encoders_projections_and_feed_forward_layers_run_sparse(
    batch_first: bool, norm_first: bool, activation: str
) -> None:
    torch.manual_seed(1)
    model = _prune(_Encoder(batch_first, norm_first, activation))
    sparse = to_sparse(model)
    for i in range(2):
        layer = sparse.net.get_submodule(f"encoder.layers.{i}")
        assert isinstance(layer, SparseTransformerEncoderLayer)
        assert isinstance(layer.self_attn, SparseMultiheadAttention)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.out_proj", "linear1", "linear2"):  # fmt: skip
            assert sparse.sparse_plan[f"encoder.layers.{i}.{name}"] == "sparse"
            assert isinstance(layer.get_submodule(name), SparseLinear)
        # the ReLU runs in linear1's epilogue
        assert isinstance(layer.activation, nn.Identity) == (activation == "relu")
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    padding[2, 3:] = True
    with torch.inference_mode():
        _close(sparse(x), model(x))
        _close(sparse(x, padding), model(x, padding))
        _close(
            sparse(x[:1] if batch_first else x[:, :1]), model(x[:1] if batch_first else x[:, :1])
        )


@needs_native
def test_an_encoder_with_some_layers_kept_dense_and_any_activation() -> None:
    """A dense projection or feed-forward layer inside a rebuilt layer runs on PyTorch's
    kernel, and an activation that is not elementwise sees the layout it was written for."""

    class Softmax(nn.Module):  # mixes the features of a token
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.softmax(dim=-1)

    torch.manual_seed(4)
    model = _prune(_Encoder(True, False, Softmax()))
    with torch.no_grad():
        first = model.encoder.layers[0]
        first.linear2.weight.normal_()
        first.self_attn.in_proj_weight[:32].normal_()  # the query's projection
    sparse = to_sparse(model)
    plan = sparse.sparse_plan
    assert plan["encoder.layers.0.linear2"] == plan["encoder.layers.0.self_attn.q_proj"] == "dense"
    assert plan["encoder.layers.0.linear1"] == plan["encoder.layers.0.self_attn.k_proj"] == "sparse"
    x = torch.randn(2, 6, 32)
    with torch.inference_mode():
        _close(sparse(x), model(x))


class _Attention(nn.Module):
    """An attention call with its options fixed: query, key and value (and masks) as inputs."""

    def __init__(self, mha: nn.MultiheadAttention, **options: object) -> None:
        super().__init__()
        self.attn = mha
        self.options = options

    def forward(self, q, k, v, padding=None, mask=None):  # type: ignore[no-untyped-def]
        return self.attn(q, k, v, key_padding_mask=padding, attn_mask=mask, **self.options)


def _attention_case(case: str) -> tuple[nn.MultiheadAttention, dict, tuple]:
    e, h, n, length, source = 16, 4, 2, 5, 6
    g = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if case == "self, batch first, padding":
        mha = nn.MultiheadAttention(e, h, batch_first=True)
        x = rand(n, length, e)
        padding = torch.tensor([[False] * 4 + [True], [False] * 5])
        return mha, {"need_weights": False}, (x, x, x, padding)
    if case == "cross, weights averaged, float mask":
        mha = nn.MultiheadAttention(e, h)
        mask = rand(length, source)
        return mha, {}, (rand(length, n, e), rand(source, n, e), rand(source, n, e), None, mask)
    if case == "own key and value sizes, no bias, weights per head, mask per head":
        mha = nn.MultiheadAttention(e, h, bias=False, kdim=12, vdim=20, batch_first=True)
        mask = rand(n * h, length, source) > 1.0  # True: not allowed
        q, k, v = rand(n, length, e), rand(n, source, 12), rand(n, source, 20)
        return mha, {"average_attn_weights": False}, (q, k, v, None, mask)
    if case == "unbatched":
        mha = nn.MultiheadAttention(e, h)
        padding = torch.tensor([False, False, True, False, False, True])
        return mha, {}, (rand(length, e), rand(source, e), rand(source, e), padding)
    assert case == "causal"
    mha = nn.MultiheadAttention(e, h, batch_first=True)
    x = rand(n, length, e)
    mask = nn.Transformer.generate_square_subsequent_mask(length)
    return mha, {"need_weights": False, "is_causal": True}, (x, x, x, None, mask)


@needs_native
@pytest.mark.parametrize(
    "case",
    [
        "self, batch first, padding",
        "cross, weights averaged, float mask",
        "own key and value sizes, no bias, weights per head, mask per head",
        "unbatched",
        "causal",
    ],
)
def test_sparse_attention_gives_what_multihead_attention_gives(case: str) -> None:
    mha, options, inputs = _attention_case(case)
    if mha.in_proj_bias is not None:
        nn.init.normal_(mha.in_proj_bias)
    model = _prune(_Attention(mha, **options), 0.8)
    sparse = to_sparse(model, max_density=1.0)
    assert isinstance(sparse.net.get_submodule("attn"), SparseMultiheadAttention)
    with torch.inference_mode():
        (out, weights), (want, want_weights) = sparse(*inputs), model(*inputs)
    _close(out, want)
    if want_weights is None:
        assert weights is None
    else:
        _close(weights, want_weights)


@needs_native
def test_an_input_of_the_wrong_width_is_an_error() -> None:
    model = _prune(_Attention(nn.MultiheadAttention(8, 2), need_weights=False))
    sparse = to_sparse(model, max_density=1.0)
    x = torch.randn(3, 1, 6)
    with pytest.raises(ValueError, match=r"\(8, tokens\)"), torch.inference_mode():
        sparse(x, x, x)


def test_causal_attention_without_its_mask_is_an_error_as_in_pytorch() -> None:
    model = _prune(_Attention(nn.MultiheadAttention(8, 2), need_weights=False, is_causal=True))
    sparse = to_sparse(model, max_density=1.0)
    x = torch.randn(3, 1, 8)
    with pytest.raises(RuntimeError, match="attn_mask"), torch.inference_mode():
        sparse(x, x, x)


def test_attention_with_extra_key_and_value_stays_as_it_is() -> None:
    model = _prune(_Attention(nn.MultiheadAttention(8, 2, add_bias_kv=True), need_weights=False))
    sparse = to_sparse(model, max_density=1.0)
    assert type(sparse.net.get_submodule("attn")) is nn.MultiheadAttention
    x = torch.randn(3, 2, 8)
    with torch.inference_mode():
        _close(sparse(x, x, x)[0], model(x, x, x)[0])


def test_layers_that_all_stay_dense_keep_pytorchs_modules() -> None:
    model = _prune(_Encoder(True, False, "relu"), 0.5)  # denser than the Linear limit
    sparse = to_sparse(model)
    layer = sparse.net.get_submodule("encoder.layers.0")
    assert type(layer) is nn.TransformerEncoderLayer
    assert type(layer.self_attn) is nn.MultiheadAttention
    assert sparse.sparse_plan["encoder.layers.0.linear1"] == "dense"
    x = torch.randn(2, 4, 32)
    with torch.inference_mode():
        _close(sparse(x), model(x))


@needs_native
def test_a_full_transformer_runs_its_decoder_sparse_too() -> None:
    torch.manual_seed(2)
    model = _prune(
        nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True), 0.9
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: a transformer is swapped layer by layer
        sparse = to_sparse(model)
    decoder = sparse.get_submodule("net.decoder.layers.0")
    assert isinstance(decoder.self_attn, SparseMultiheadAttention)
    assert isinstance(decoder.multihead_attn, SparseMultiheadAttention)
    assert isinstance(decoder.linear1, SparseLinear)
    assert isinstance(sparse.get_submodule("net.encoder.layers.0"), SparseTransformerEncoderLayer)
    src, tgt = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.inference_mode():
        _close(sparse(src, tgt, tgt_mask=mask), model(src, tgt, tgt_mask=mask))


def test_an_untraceable_model_with_an_encoder_layer_runs() -> None:
    """Swapped layer by layer, an encoder layer's Linear layers used to break PyTorch's fused
    path, which reads their weights."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace this
                x = x * 2
            return self.head(self.layer(x))

    model = _prune(Branchy(), 0.9)
    with pytest.warns(RuntimeWarning, match="could not trace"):
        sparse = to_sparse(model, max_density=1.0)
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        _close(sparse(x), model(x))


class _GPT2Block(nn.Module):
    """A GPT-2 style block on Hugging Face's Conv1D projections (weights stored in x out)."""

    def __init__(self, e: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(3 * e, e)
        self.c_proj = Conv1D(e, e)
        self.c_fc = Conv1D(4 * e, e)
        self.c_out = Conv1D(e, 4 * e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, E)
        n, length, e = x.shape
        q, k, v = self.c_attn(x).split(e, dim=-1)
        q, k, v = (t.view(n, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(a.transpose(1, 2).reshape(n, length, e))
        return x + self.c_out(F.gelu(self.c_fc(x)))


@needs_native
def test_hugging_face_conv1d_layers_run_sparse_and_save(tmp_path) -> None:
    model = _prune(_GPT2Block(), 0.9)
    sparse = to_sparse(model)
    for name in ("c_attn", "c_proj", "c_fc", "c_out"):
        assert isinstance(sparse.net.get_submodule(name), SparseLinear)
        assert sparse.sparse_plan[name] == "sparse"
    x = torch.randn(2, 6, 16)
    with torch.inference_mode():
        _close(sparse(x), model(x))
    loaded = load_sparse(save_sparse(sparse, tmp_path / "gpt2.safetensors"), _GPT2Block())
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), sparse(x), rtol=0, atol=0)


@needs_native
def test_an_encoder_saves_and_loads(tmp_path) -> None:
    model = _prune(_Encoder(True, False, "relu"))
    sparse = to_sparse(model)
    path = save_sparse(sparse, tmp_path / "encoder.safetensors")
    loaded = load_sparse(path, _Encoder(True, False, "relu"))
    assert loaded.sparse_plan == sparse.sparse_plan
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), sparse(x), rtol=0, atol=0)
    # a plan saved before attention layers could run sparse names none of their layers: they
    # stay PyTorch's, as they were saved
    old = {k: v for k, v in sparse.sparse_plan.items() if k.startswith("head")}
    again = to_sparse(_Encoder(True, False, "relu"), _plan=old)
    assert type(again.net.get_submodule("encoder.layers.0")) is nn.TransformerEncoderLayer


def test_a_layer_merely_named_conv1d_is_left_alone() -> None:
    class Conv1D(nn.Conv1d):  # a 1-D convolution of one's own, not Hugging Face's
        pass

    model = _prune(nn.Sequential(Conv1D(4, 6, 3), nn.Flatten(), nn.Linear(6 * 8, 2)), 0.8)
    sparse = to_sparse(model, max_density=1.0)
    assert "0" not in sparse.sparse_plan
    x = torch.randn(2, 4, 10)
    with torch.inference_mode():
        _close(sparse(x), model(x))
