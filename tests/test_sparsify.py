"""strsparse.sparsify: targets chosen by include/exclude patterns; models users bring (tied
weights, RNNs, attention) and what is left dense."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import strsparse
from strsparse.methods import get_parametrization, list_methods, raw_weight


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_include_or_exclude_matching_nothing() -> None:
    with pytest.raises(ValueError, match="include pattern 'fc' matches no"):
        strsparse.sparsify(_model(), "gmp", include=["fc"], sparsity=0.5)
    with pytest.raises(ValueError, match="exclude pattern 'layer1.*' matches no"):
        strsparse.sparsify(_model(), "magnitude", exclude=["layer1.*"], sparsity=0.5)


# options that make every method sparse after ``handle.step(5, 10)`` without training
METHOD_OPTIONS = {
    "str": {"init_threshold": -2.0},
    "gmp": {"sparsity": 0.7, "frequency": 1, "end": 0.5},
    "dnw": {"sparsity": 0.7},
    "magnitude": {"sparsity": 0.7},
    "st3": {"sparsity": 0.7, "end": 0.8},  # step 5 of 10: sparse, rescaled, not yet frozen
}


def _sparsify(model: nn.Module, method: str, **kwargs: object) -> strsparse.SparsityHandle:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # STR's init warning: wanted here
        handle = strsparse.sparsify(model, method, **(METHOD_OPTIONS[method] | kwargs))
    handle.step(5, 10)
    return handle


def test_every_method_has_options_here() -> None:
    assert sorted(METHOD_OPTIONS) == list_methods()


class TinyGPT(nn.Module):
    """Token embedding, one block, and an output head tied to the embedding."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.block = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # (vocab, dim), tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.block(self.wte(ids))))


@pytest.mark.parametrize("opt_in", [False, True], ids=["head", "embedding-opted-in"])
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_tied_weights_are_one_sparse_tensor_through_finalize(method: str, opt_in: bool) -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    ids = torch.randint(0, 50, (3, 7))
    handle = _sparsify(model, method, include=["*"] if opt_in else None)

    assert sorted(handle.layers) == ["block", "lm_head"]  # one layer for the shared tensor
    assert [n for n, _, _ in handle.layers["lm_head"].tied] == ["wte"]
    # both users compute with the same sparse tensor during training
    assert get_parametrization(model.wte) is get_parametrization(model.lm_head)
    torch.testing.assert_close(model.wte.weight, model.lm_head.weight)
    assert strsparse.sparsity_report(model).sparsity > 0.15
    out = model(ids)
    torch.testing.assert_close(model.wte(ids), nn.functional.embedding(ids, model.lm_head.weight))
    # gradients from both uses reach the one raw tensor
    model(ids).sum().backward()
    assert raw_weight(model.wte) is raw_weight(model.lm_head)
    assert raw_weight(model.wte).grad is not None

    state = copy.deepcopy(model.state_dict())
    strsparse.finalize(model)
    assert model.wte.weight is model.lm_head.weight  # still tied, one plain Parameter
    torch.testing.assert_close(model(ids), out)
    # the finalized weights load strictly into the bare architecture and compute the same
    bare = TinyGPT()
    bare.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(bare(ids), out)
    # a checkpoint of the sparsified model restores into a freshly sparsified one
    again = TinyGPT()
    _sparsify(again, method, include=["*"] if opt_in else None)
    again.load_state_dict(state)
    torch.testing.assert_close(again(ids), out)


def test_excluding_one_user_of_a_tied_weight_keeps_it_dense() -> None:
    model = TinyGPT()
    handle = strsparse.sparsify(model, "magnitude", sparsity=0.5, exclude=["lm_head"])
    assert list(handle.layers) == ["block"]
    report = strsparse.sparsity_report(model)
    dense = {d.name: d for d in report.dense}
    assert dense["lm_head"].tied == ("wte",)
    assert "include/exclude" in dense["lm_head"].reason
    assert (model.wte.weight != 0).all()


def test_report_says_what_is_left_dense_and_why() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.norm = nn.LayerNorm((4, 8))
            self.fc = nn.Linear(8, 3)
            self.skip = nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.embed(ids) + self.pos_embed)
            return self.fc(h) + self.skip(h)

    model = Model()
    plain = strsparse.sparsity_report(model)
    assert not plain.layers and "no sparsified layer" in plain.to_table()
    assert {d.name: d.reason for d in plain.dense}["fc"] == "not sparsified"

    strsparse.sparsify(model, "magnitude", sparsity=0.5, exclude=["skip"])
    report = strsparse.sparsity_report(model)
    assert [r.name for r in report.layers] == ["fc"]
    reasons = {d.name: d.reason for d in report.dense}
    assert set(reasons) == {"embed", "pos_embed", "norm", "norm.bias", "skip"}
    assert "opt in" in reasons["embed"]
    assert "not a weight matrix" in reasons["pos_embed"]
    assert reasons["norm"] == reasons["norm.bias"] == "normalization parameter"
    assert "include/exclude" in reasons["skip"]
    assert report.vector_params == 3 + 3  # the two Linear biases
    table = report.to_table()
    assert "left dense:" in table and "pos_embed" in table


# -- every weight matrix a module owns ------------------------------------------------------
class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.rnn = cell(6, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.attn = nn.MultiheadAttention(10, 2, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(ids))  # (B, T, 10)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h[:, -1])


def _rnn_names() -> list[str]:
    return [
        f"rnn.weight_{kind}_l{layer}{suffix}"
        for layer in (0, 1)
        for suffix in ("", "_reverse")
        for kind in ("ih", "hh")
    ]


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("method", ["magnitude", "dnw", "gmp", "st3"])
def test_rnn_and_attention_weights_reach_the_requested_sparsity(
    cell: type[nn.RNNBase], method: str
) -> None:
    torch.manual_seed(0)
    model = Recurrent(cell)
    ids = torch.randint(0, 20, (2, 4))
    handle = _sparsify(model, method)
    expected = [*_rnn_names(), "attn.in_proj_weight", "attn.out_proj", "head"]
    assert sorted(handle.layers) == sorted(expected)
    report = strsparse.sparsity_report(model)
    for row in report.layers:
        if method == "st3":  # one global quantile: about 70% over all layers together
            continue
        # DNW prunes int(p * n), as its authors do (0.7 * 90 = 62.99... -> 62)
        pruned = int(0.7 * row.params) if method == "dnw" else round(0.7 * row.params)
        assert row.nonzero == row.params - pruned, row.name
    if method == "st3":  # the scheduled target of step 5
        target = float(handle.parametrizations["head"].target)
        assert 0.6 < target < 0.7 and report.sparsity == pytest.approx(target, abs=0.01)

    # the forward really computes with the sparse tensors (RNNs cache _flat_weights)
    out = model(ids)
    sparse = strsparse.finalize(copy.deepcopy(model))
    bare = Recurrent(cell)
    bare.load_state_dict(sparse.state_dict(), strict=True)
    assert (bare.rnn.weight_hh_l1_reverse == 0).float().mean() > 0.3
    torch.testing.assert_close(bare(ids), out)
    dense = copy.deepcopy(bare)
    with torch.no_grad():  # raw weights instead of the sparse ones: a different output
        for name in _rnn_names():
            getattr(dense.rnn, name.split(".")[1]).copy_(raw_weight(handle.layers[name]))
    assert not torch.allclose(dense(ids), out)


def test_str_on_an_lstm_trains_each_weight_matrix_with_its_own_threshold() -> None:
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM)
    handle = _sparsify(model, "str", g="exp", init_threshold=-2.5)
    model(torch.randint(0, 20, (2, 4))).sum().backward()
    params = handle.parametrizations
    assert params["rnn.weight_ih_l0"].s is not params["rnn.weight_hh_l0"].s
    assert params["rnn.weight_hh_l0"].s.grad is not None
    assert params["attn.in_proj_weight"].s.grad is not None


def test_patterns_and_budgets_name_each_weight_matrix() -> None:
    model = Recurrent(nn.LSTM)
    handle = strsparse.sparsify(
        model, "magnitude", sparsity=0.5, include=["rnn.weight_hh_*", "attn.*"]
    )
    assert sorted(handle.layers) == sorted(
        [n for n in _rnn_names() if "_hh_" in n] + ["attn.in_proj_weight", "attn.out_proj"]
    )
    budget = strsparse.Budget.erk(Recurrent(nn.LSTM), 0.8)
    assert "rnn.weight_ih_l1_reverse" in budget and "attn.in_proj_weight" in budget
    model = Recurrent(nn.LSTM)
    strsparse.sparsify(model, "magnitude", budget=budget)
    report = {r.name: r.sparsity for r in strsparse.sparsity_report(model).layers}
    assert report["rnn.weight_ih_l1_reverse"] == pytest.approx(
        budget["rnn.weight_ih_l1_reverse"], abs=0.01
    )


def test_separate_qkv_projections_are_sparsified() -> None:
    attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=4)
    handle = strsparse.sparsify(attn, "magnitude", sparsity=0.5)
    assert sorted(handle.layers) == ["k_proj_weight", "out_proj", "q_proj_weight", "v_proj_weight"]
    q, k, v = torch.randn(3, 1, 8), torch.randn(5, 1, 6), torch.randn(5, 1, 4)
    out = attn(q, k, v)[0]
    strsparse.finalize(attn)
    assert (attn.k_proj_weight == 0).float().mean() == pytest.approx(0.5)
    torch.testing.assert_close(attn(q, k, v)[0], out)


def _resnet_like() -> nn.Module:
    block = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1))
    return nn.Sequential(
        nn.Sequential(block, nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1))),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def test_exclude_leaves_the_matching_layers_dense() -> None:
    model = _resnet_like()
    handle = strsparse.sparsify(model, "magnitude", sparsity=0.5, exclude=["0.1.*", "2"])
    assert list(handle.layers) == ["0.0.0", "0.0.1"]
    assert list(strsparse.sparse_layers(model)) == ["0.0.0", "0.0.1"]
    for name in ("0.1.0", "0.1.1", "2"):  # excluded: plain, dense weights
        module = model.get_submodule(name)
        assert get_parametrization(module) is None
        assert bool((module.weight != 0).all())


def test_include_then_exclude() -> None:
    model = _resnet_like()
    handle = strsparse.sparsify(model, "magnitude", sparsity=0.5, include=["0.*"], exclude=["*.1"])
    assert list(handle.layers) == ["0.0.0", "0.1.0"]


# -- pretrained weights ---------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_load_pretrained_after_sparsify_equals_loading_before(method: str) -> None:
    torch.manual_seed(0)
    pretrained = Recurrent(nn.LSTM).state_dict()  # plain keys, as a dense checkpoint has
    before = Recurrent(nn.LSTM)
    before.load_state_dict(pretrained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strsparse.sparsify(before, method, **METHOD_OPTIONS[method])
        after = Recurrent(nn.LSTM)
        handle = strsparse.sparsify(after, method, **METHOD_OPTIONS[method])
        with pytest.raises(RuntimeError, match="parametrizations.weight.original"):
            after.load_state_dict(pretrained)  # what torch alone does
        strsparse.load_pretrained(after, pretrained, handle=handle)
    expected = before.state_dict()
    got = after.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], equal_nan=True, msg=key)


def test_load_pretrained_fills_a_tied_weight_saved_once() -> None:
    torch.manual_seed(0)
    source = TinyGPT()
    checkpoint = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    model = TinyGPT()
    handle = strsparse.sparsify(model, "magnitude", sparsity=0.5)
    strsparse.load_pretrained(model, checkpoint, handle=handle)
    assert torch.equal(raw_weight(model.lm_head), source.wte.weight)
    assert float((model.wte.weight == 0).float().mean()) == pytest.approx(0.5)
    ids = torch.randint(0, 50, (2, 5))
    reference = copy.deepcopy(source)
    strsparse.sparsify(reference, "magnitude", sparsity=0.5)
    torch.testing.assert_close(model(ids), reference(ids))


def test_load_pretrained_errors_name_the_keys() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    strsparse.sparsify(model, "magnitude", sparsity=0.5)
    wrong = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)).state_dict()
    with pytest.raises(strsparse.PretrainedWeightsError, match="size mismatch"):
        strsparse.load_pretrained(model, wrong)
    extra = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).state_dict() | {"head.weight": 0}
    with pytest.raises(strsparse.PretrainedWeightsError, match="head.weight"):
        strsparse.load_pretrained(model, extra)
    del extra["head.weight"], extra["1.bias"]
    strsparse.load_pretrained(model, extra, strict=False)
    assert torch.equal(raw_weight(model[1]), extra["1.weight"])


# -- rough edges ----------------------------------------------------------------------------
def test_whole_model_torch_save_says_what_to_save_instead(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    strsparse.sparsify(model, "str")
    with pytest.raises(strsparse.SparsifiedPickleError, match="state_dict.*finalize"):
        torch.save(model, tmp_path / "model.pt")
    copy.deepcopy(model)  # copies still work
    torch.save(model.state_dict(), tmp_path / "state.pt")
    strsparse.finalize(model)
    torch.save(model, tmp_path / "model.pt")  # a plain model again


@pytest.mark.parametrize("method", ["str", "gmp", "dnw", "st3"])
def test_sparsify_a_meta_device_model(method: str) -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    handle = strsparse.sparsify(model, method, **METHOD_OPTIONS[method])
    model.to_empty(device="cpu")
    assert model(torch.randn(2, 4)).shape == (2, 2) and len(handle.layers) == 2


def test_magnitude_on_a_meta_model_asks_for_the_weights() -> None:
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    with pytest.raises(strsparse.errors.OptionError, match="meta device.*'gmp'"):
        strsparse.sparsify(model, "magnitude", sparsity=0.5)


def test_step_after_finalize_and_a_model_name_are_clear_errors() -> None:
    model = nn.Linear(4, 3)
    handle = strsparse.sparsify(model, "gmp", sparsity=0.5)
    strsparse.finalize(model)
    with pytest.raises(strsparse.errors.OptionError, match="no longer sparsified"):
        handle.step(1, 10)
    with pytest.raises(strsparse.errors.OptionError, match=r"create_model\('resnet50'\)"):
        strsparse.sparsify("resnet50", "str")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_method_state_follows_a_model_already_on_the_gpu(method: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).cuda()
    _sparsify(model, method)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    model(torch.randn(2, 4, device="cuda")).sum().backward()
