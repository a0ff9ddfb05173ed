"""FLOPs and parameter accounting (strsparse.flops) against the STR paper's tables and by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import strsparse
from strsparse.budgets import load_paper_budget
from strsparse.flops import FlopsProfile, apply_budget, profile
from strsparse.models import create_model
from tests.lookalikes import Conv1D

# Appendix Table 6 (= Table 7): layer, dense params, dense FLOPs, in the table's order.
RESNET50_TABLE6 = [
    ("conv1", 9_408, 118_013_952),
    ("layer1.0.conv1", 4_096, 12_845_056),
    ("layer1.0.conv2", 36_864, 115_605_504),
    ("layer1.0.conv3", 16_384, 51_380_224),
    ("layer1.0.downsample.0", 16_384, 51_380_224),
    ("layer1.1.conv1", 16_384, 51_380_224),
    ("layer1.1.conv2", 36_864, 115_605_504),
    ("layer1.1.conv3", 16_384, 51_380_224),
    ("layer1.2.conv1", 16_384, 51_380_224),
    ("layer1.2.conv2", 36_864, 115_605_504),
    ("layer1.2.conv3", 16_384, 51_380_224),
    ("layer2.0.conv1", 32_768, 102_760_448),
    ("layer2.0.conv2", 147_456, 115_605_504),
    ("layer2.0.conv3", 65_536, 51_380_224),
    ("layer2.0.downsample.0", 131_072, 102_760_448),
    ("layer2.1.conv1", 65_536, 51_380_224),
    ("layer2.1.conv2", 147_456, 115_605_504),
    ("layer2.1.conv3", 65_536, 51_380_224),
    ("layer2.2.conv1", 65_536, 51_380_224),
    ("layer2.2.conv2", 147_456, 115_605_504),
    ("layer2.2.conv3", 65_536, 51_380_224),
    ("layer2.3.conv1", 65_536, 51_380_224),
    ("layer2.3.conv2", 147_456, 115_605_504),
    ("layer2.3.conv3", 65_536, 51_380_224),
    ("layer3.0.conv1", 131_072, 102_760_448),
    ("layer3.0.conv2", 589_824, 115_605_504),
    ("layer3.0.conv3", 262_144, 51_380_224),
    ("layer3.0.downsample.0", 524_288, 102_760_448),
    ("layer3.1.conv1", 262_144, 51_380_224),
    ("layer3.1.conv2", 589_824, 115_605_504),
    ("layer3.1.conv3", 262_144, 51_380_224),
    ("layer3.2.conv1", 262_144, 51_380_224),
    ("layer3.2.conv2", 589_824, 115_605_504),
    ("layer3.2.conv3", 262_144, 51_380_224),
    ("layer3.3.conv1", 262_144, 51_380_224),
    ("layer3.3.conv2", 589_824, 115_605_504),
    ("layer3.3.conv3", 262_144, 51_380_224),
    ("layer3.4.conv1", 262_144, 51_380_224),
    ("layer3.4.conv2", 589_824, 115_605_504),
    ("layer3.4.conv3", 262_144, 51_380_224),
    ("layer3.5.conv1", 262_144, 51_380_224),
    ("layer3.5.conv2", 589_824, 115_605_504),
    ("layer3.5.conv3", 262_144, 51_380_224),
    ("layer4.0.conv1", 524_288, 102_760_448),
    ("layer4.0.conv2", 2_359_296, 115_605_504),
    ("layer4.0.conv3", 1_048_576, 51_380_224),
    ("layer4.0.downsample.0", 2_097_152, 102_760_448),
    ("layer4.1.conv1", 1_048_576, 51_380_224),
    ("layer4.1.conv2", 2_359_296, 115_605_504),
    ("layer4.1.conv3", 1_048_576, 51_380_224),
    ("layer4.2.conv1", 1_048_576, 51_380_224),
    ("layer4.2.conv2", 2_359_296, 115_605_504),
    ("layer4.2.conv3", 1_048_576, 51_380_224),
    ("fc", 2_048_000, 2_048_000),
]
# Appendix Table 8, layers 1..28 (conv1, then blocks.i.dw / blocks.i.pw, then fc).
MOBILENET_V1_TABLE8 = [
    ("conv1", 864, 10_838_016),
    ("blocks.0.dw", 288, 3_612_672),
    ("blocks.0.pw", 2_048, 25_690_112),
    ("blocks.1.dw", 576, 1_806_336),
    ("blocks.1.pw", 8_192, 25_690_112),
    ("blocks.2.dw", 1_152, 3_612_672),
    ("blocks.2.pw", 16_384, 51_380_224),
    ("blocks.3.dw", 1_152, 903_168),
    ("blocks.3.pw", 32_768, 25_690_112),
    ("blocks.4.dw", 2_304, 1_806_336),
    ("blocks.4.pw", 65_536, 51_380_224),
    ("blocks.5.dw", 2_304, 451_584),
    ("blocks.5.pw", 131_072, 25_690_112),
    ("blocks.6.dw", 4_608, 903_168),
    ("blocks.6.pw", 262_144, 51_380_224),
    ("blocks.7.dw", 4_608, 903_168),
    ("blocks.7.pw", 262_144, 51_380_224),
    ("blocks.8.dw", 4_608, 903_168),
    ("blocks.8.pw", 262_144, 51_380_224),
    ("blocks.9.dw", 4_608, 903_168),
    ("blocks.9.pw", 262_144, 51_380_224),
    ("blocks.10.dw", 4_608, 903_168),
    ("blocks.10.pw", 262_144, 51_380_224),
    ("blocks.11.dw", 4_608, 225_792),
    ("blocks.11.pw", 524_288, 25_690_112),
    ("blocks.12.dw", 9_216, 451_584),
    ("blocks.12.pw", 1_048_576, 51_380_224),
    ("fc", 1_024_000, 1_024_000),
]


@pytest.fixture(scope="module")
def resnet50_profile() -> FlopsProfile:
    torch.manual_seed(0)
    return profile(create_model("resnet50"), (3, 224, 224))


@pytest.fixture(scope="module")
def mobilenet_profile() -> FlopsProfile:
    torch.manual_seed(0)
    return profile(create_model("mobilenet_v1"), (3, 224, 224))


# -- the paper's tables ----------------------------------------------------------------------
def test_resnet50_layers_match_table6(resnet50_profile):
    weights = [(r.name, r.params, r.flops) for r in resnet50_profile.weight_layers]
    assert weights == RESNET50_TABLE6
    assert [r.kind for r in resnet50_profile.weight_layers] == ["conv"] * 53 + ["linear"]


def test_resnet50_totals(resnet50_profile):
    prof = resnet50_profile
    assert prof.overall.params == 25_502_912
    assert prof.overall.flops == 4_089_284_608
    assert prof.total_flops(include_pool=True) == 4_089_284_608
    assert prof.total_flops(include_pool=False) == 4_089_284_608 - 100_352
    assert prof["conv1"].flops == 118_013_952
    pool = prof["avgpool"]
    assert (pool.kind, pool.params, pool.flops) == ("pool", 0, 100_352)
    assert prof.classifier == "fc"
    assert prof.backbone.params == 23_454_912
    assert prof.backbone.flops == 4_087_136_256
    # The maxpool is not counted, as in the paper; the pool is the only non-weight record.
    assert [r.name for r in prof if r.kind == "pool"] == ["avgpool"]


def test_mobilenet_v1_matches_table8(mobilenet_profile):
    prof = mobilenet_profile
    assert [(r.name, r.params, r.flops) for r in prof.weight_layers] == MOBILENET_V1_TABLE8
    assert prof.overall.params == 4_209_088
    assert prof.total_flops(include_pool=False) == 568_740_352
    assert prof["avgpool"].kind == "pool" and prof["avgpool"].flops == 50_176
    assert prof.total_flops() == 568_740_352 + 50_176
    assert (prof.backbone.params, prof.backbone.flops) == (3_185_088, 567_716_352)


# Authors' README / METHODS.md: ResNet-50 STR budget -> inference FLOPs.
@pytest.mark.parametrize(
    ("name", "flops"),
    [
        ("resnet50-str-81.27", 705e6),
        ("resnet50-str-90.23", 343e6),
        ("resnet50-str-95.15", 162e6),
        ("resnet50-str-96.11", 127e6),
        ("resnet50-str-98.05", 73e6),
        ("resnet50-str-98.98", 47e6),
    ],
)
def test_str_budgets_give_published_flops(resnet50_profile, name, flops):
    budget = load_paper_budget(name)
    sparse = profile_with(resnet50_profile, budget)
    assert sparse.total_sparse_flops() == pytest.approx(flops, rel=0.01)
    # Budget-derived counts: (1 - s) x dense, per layer.
    conv1 = sparse["conv1"]
    assert conv1.sparse_flops == pytest.approx((1 - budget["conv1"]) * 118_013_952)
    assert conv1.nonzero_params == pytest.approx((1 - budget["conv1"]) * 9_408)
    assert sparse.overall.sparsity == pytest.approx(float(name.rsplit("-", 1)[1]) / 100, abs=5e-4)


def test_mobilenet_str_budget_flops(mobilenet_profile):
    # README: MobileNetV1 at 89.01% sparsity costs 42M FLOPs.
    sparse = mobilenet_profile.with_budget(load_paper_budget("mobilenet_v1-str-89.01"))
    assert sparse.total_sparse_flops(include_pool=False) == pytest.approx(42e6, rel=0.01)
    assert sparse.backbone.sparsity == pytest.approx(0.9293, abs=5e-5)


def profile_with(prof: FlopsProfile, budget) -> FlopsProfile:
    result = apply_budget(prof, budget)
    assert result == prof.with_budget(budget)
    return result


# -- hand-computed counts --------------------------------------------------------------------
class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # (8, 3, 3, 3): 216 weights, 10x10 out
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)  # (8, 1, 3, 3): 72, 5x5
        self.grouped = nn.Conv2d(8, 16, 1, groups=4, bias=False)  # (16, 2, 1, 1): 32, 5x5
        self.pool = nn.AdaptiveAvgPool2d(1)  # input 16 x 5 x 5
        self.head = nn.Linear(16, 5)  # 80 weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(torch.relu(self.dw(torch.relu(self.conv(x)))))
        return self.head(torch.flatten(self.pool(x), 1))


class SequenceNet(nn.Module):
    """Conv1d over time, then a Linear applied at every time step of (B, T, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3)  # (6, 4, 3): 72 weights, length 20 -> 18
        self.proj = nn.Linear(6, 3)  # 18 weights, applied at 18 positions
        self.pool = nn.AvgPool1d(2)  # input 3 x 18
        self.fc = nn.Linear(27, 2)  # 54 weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.conv(x).transpose(1, 2))  # (B, 18, 3)
        h = self.pool(h.transpose(1, 2))  # (B, 3, 9)
        return self.fc(h.flatten(1))


def test_hand_computed_conv_model():
    prof = profile(SmallConvNet(), (3, 10, 10))
    got = {r.name: (r.kind, r.params, r.flops) for r in prof}
    assert got == {
        "conv": ("conv", 216, 216 * 10 * 10),
        "dw": ("conv", 72, 72 * 5 * 5),
        "grouped": ("conv", 32, 32 * 5 * 5),
        "pool": ("pool", 0, 16 * 5 * 5),
        "head": ("linear", 80, 80),
    }
    assert prof.classifier == "head"  # the last linear executed
    assert prof.overall.params == 216 + 72 + 32 + 80
    assert prof.backbone.params == 216 + 72 + 32
    assert prof.backbone.flops == 21_600 + 1_800 + 800
    assert prof.total_flops() == 21_600 + 1_800 + 800 + 400 + 80
    assert prof.total_flops(include_pool=False) == 21_600 + 1_800 + 800 + 80


def test_hand_computed_sequence_model():
    prof = profile(SequenceNet(), (4, 20))
    got = {r.name: (r.kind, r.params, r.flops) for r in prof}
    assert got == {
        "conv": ("conv", 72, 72 * 18),
        "proj": ("linear", 18, 18 * 18),
        "pool": ("pool", 0, 3 * 18),
        "fc": ("linear", 54, 54),
    }


def test_conv3d_and_transposed_conv():
    model = nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1),  # (4, 2, 3, 3, 3): 216 weights, 4x4x4 out
        nn.ConvTranspose2d(16, 3, 2, stride=2),  # (16, 3, 2, 2): 192 weights, 4x4 input
    )

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body[0](x)  # (B, 4, 4, 4, 4)
            return self.body[1](y.flatten(1, 2))  # (B, 16, 4, 4) -> (B, 3, 8, 8)

    prof = profile(Net(), (2, 4, 4, 4))
    assert prof["body.0"].flops == 216 * 64
    assert (prof["body.1"].kind, prof["body.1"].flops) == ("conv_transpose", 192 * 16)


def test_shared_module_counts_every_call():
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.Linear(5, 5, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(7):
                x = torch.tanh(self.cell(x))
            return x

    record = profile(Recurrent(), (5,))["cell"]
    assert (record.params, record.flops, record.calls) == (25, 7 * 25, 7)


@pytest.mark.parametrize(
    ("shape", "batched"), [((3, 10, 10), None), ((1, 3, 10, 10), None), ((4, 3, 10, 10), True)]
)
def test_counts_are_per_sample_with_or_without_batch_dim(shape, batched):
    prof = profile(SmallConvNet(), shape, batched=batched)
    assert prof.total_flops() == 21_600 + 1_800 + 800 + 400 + 80
    assert prof.input_shape == shape


def test_bad_input_shape_is_a_value_error():
    with pytest.raises(ValueError, match="forward failed"):
        profile(SmallConvNet(), (5, 10, 10))
    with pytest.raises(ValueError, match="positive"):
        profile(SmallConvNet(), (3, 0, 10))


# -- sparsity: measured vs budget ------------------------------------------------------------
def _zero_fraction_(weight: torch.Tensor, fraction: float) -> None:
    flat = weight.detach().view(-1)
    flat[: round(fraction * flat.numel())] = 0.0


def test_measured_sparse_flops_equal_budget_derived():
    torch.manual_seed(0)
    model = SmallConvNet()
    # Fractions that give whole numbers of weights: 216 * 0.75, 72 * 0.5, 32 * 0.25, 80 * 0.9.
    budget = {"conv": 0.75, "dw": 0.5, "grouped": 0.25, "head": 0.9}
    for name, fraction in budget.items():
        _zero_fraction_(getattr(model, name).weight, fraction)
    measured = profile(model, (3, 10, 10))
    derived = profile(SmallConvNet(), (3, 10, 10), budget=budget)
    for m, d in zip(measured, derived, strict=True):
        assert m.name == d.name
        assert m.sparsity == pytest.approx(d.sparsity)
        assert m.sparse_flops == pytest.approx(d.sparse_flops)
        assert m.nonzero_params == pytest.approx(d.nonzero_params)
    assert measured["conv"].nonzero_params == 54
    assert measured.total_sparse_flops() == pytest.approx(
        0.25 * 21_600 + 0.5 * 1_800 + 0.75 * 800 + 400 + 0.1 * 80
    )
    assert measured.overall.sparsity == pytest.approx((162 + 36 + 8 + 72) / 400)


def test_parametrized_model_is_measured_through_its_effective_weight():
    torch.manual_seed(0)
    model = SmallConvNet()
    budget = {"conv": 0.75, "dw": 0.5, "grouped": 0.25, "head": 0.9}
    strsparse.sparsify(model, "magnitude", budget=budget)
    measured = profile(model, (3, 10, 10))
    for name, fraction in budget.items():
        assert measured[name].sparsity == pytest.approx(fraction, abs=0.02)
        assert measured[name].sparse_flops == pytest.approx(
            measured[name].flops * (1 - measured[name].sparsity)
        )


def test_budget_layers_missing_are_dense_and_unknown_layers_are_errors():
    prof = profile(SmallConvNet(), (3, 10, 10), budget={"conv": 0.5})
    assert prof["dw"].sparsity == 0.0 and prof["dw"].sparse_flops == 1_800
    assert prof["conv"].sparse_flops == 10_800
    with pytest.raises(ValueError, match="'conv9'.*did you mean 'conv'"):
        profile(SmallConvNet(), (3, 10, 10), budget={"conv9": 0.5})
    with pytest.raises(ValueError, match="fraction"):
        profile(SmallConvNet(), (3, 10, 10), budget={"conv": 90.0})


# -- classifier, modes, hooks ----------------------------------------------------------------
def test_classifier_choice():
    model = SmallConvNet()
    assert profile(model, (3, 10, 10), classifier="grouped").backbone.params == 216 + 72 + 80
    model.classifier_name = "dw"
    assert profile(model, (3, 10, 10)).classifier == "dw"
    with pytest.raises(ValueError, match="did you mean 'head'"):
        profile(SmallConvNet(), (3, 10, 10), classifier="haed")


def test_training_modes_restored_and_hooks_removed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model keeps its own mode
    prof = profile(model, (3, 6, 6))
    assert model.training and model[0].training and not model[1].training
    assert all(not m._forward_hooks for m in model.modules())
    assert prof.classifier == "3"


def test_hooks_removed_on_error():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.fc(x)
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(ValueError, match="boom"):
        profile(model, (4,))
    assert model.training and not model.fc._forward_hooks


# -- rendering -------------------------------------------------------------------------------
def test_table_and_csv(tmp_path):
    prof = profile(SmallConvNet(), (3, 10, 10), budget={"conv": 0.5})
    table = prof.to_table()
    assert "21,600" in table and "10,800" in table and "backbone" in table
    path = tmp_path / "flops.csv"
    text = prof.to_csv(path)
    assert path.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["flops.csv"]
    lines = text.splitlines()
    assert lines[0] == "layer,kind,params,flops,sparsity_%,nonzero_params,sparse_flops"
    assert lines[1] == "conv,conv,216,21600,50.00,108,10800"
    assert lines[-3].startswith("overall,,400,24680,")
    assert lines[-2].startswith("overall_no_pool,,400,24280,")
    assert lines[-1].startswith("backbone,,320,24200,")
    assert math.isclose(prof.overall.flops_fraction, (24_680 - 10_800) / 24_680)


# -- token inputs, RNNs, attention, Conv1D -------------------------------------------------
class TokenModel(nn.Module):
    """Token ids -> embedding -> 2-layer bidirectional LSTM -> attention -> Conv1D -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.rnn = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.attn = nn.MultiheadAttention(10, 2, batch_first=True)
        self.proj = Conv1D(4, 10)  # weight (10, 4): in x out
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h, _ = self.rnn(self.embed(ids))  # (B, T, 10)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.proj(h)[:, -1] * scale)


def _token_model_flops(steps: int) -> dict[str, int]:
    """Hand count per sample for ``steps`` tokens."""
    flops = {}
    for suffix in ("", "_reverse"):
        flops[f"rnn.weight_ih_l0{suffix}"] = 4 * 5 * 6 * steps  # (4H, D) per step
        flops[f"rnn.weight_hh_l0{suffix}"] = 4 * 5 * 5 * steps  # (4H, H) per step
        flops[f"rnn.weight_ih_l1{suffix}"] = 4 * 5 * 10 * steps  # (4H, 2H) per step
        flops[f"rnn.weight_hh_l1{suffix}"] = 4 * 5 * 5 * steps
    flops["attn.in_proj_weight"] = 10 * 10 * (steps + 2 * steps)  # q per query, k v per key
    flops["attn.out_proj"] = 10 * 10 * steps
    flops["proj"] = 10 * 4 * steps
    flops["head"] = 4 * 3
    return flops


@pytest.mark.parametrize("batch", [1, 3])
def test_profile_with_token_ids_counts_lstm_attention_and_conv1d(batch: int) -> None:
    model = TokenModel()
    ids = torch.randint(0, 20, (batch, 7))
    prof = profile(model, example_inputs=ids)
    assert {r.name: r.flops for r in prof.layers} == _token_model_flops(7)
    assert prof["rnn.weight_ih_l1"].params == 4 * 5 * 10 and prof["rnn.weight_ih_l1"].kind == "rnn"
    assert prof["attn.in_proj_weight"].params == 300 and prof["attn.out_proj"].params == 100
    assert prof.classifier == "head"
    assert model.training  # mode restored
    # a tuple and a dict of keyword inputs call the model the same way
    assert profile(model, example_inputs=(ids, 2.0)).overall == prof.overall
    assert profile(model, example_inputs={"ids": ids}).overall == prof.overall


def test_profile_reads_the_sparsity_of_rnn_and_attention_weights() -> None:
    model = TokenModel()
    strsparse.sparsify(model, "magnitude", sparsity=0.5)
    prof = profile(model, example_inputs=torch.randint(0, 20, (1, 4)))
    for name in ("rnn.weight_hh_l1_reverse", "attn.in_proj_weight", "attn.out_proj", "proj"):
        assert prof[name].sparsity == pytest.approx(0.5), name
        assert prof[name].sparse_flops == pytest.approx(0.5 * prof[name].flops)
    budgeted = profile(TokenModel(), example_inputs=torch.randint(0, 20, (1, 4)))
    budgeted = budgeted.with_budget({"rnn.weight_ih_l0": 0.75})
    assert budgeted["rnn.weight_ih_l0"].sparse_flops == pytest.approx(0.25 * 120 * 4)


def test_profile_input_errors() -> None:
    with pytest.raises(ValueError, match="exactly one of input_shape"):
        profile(TokenModel())
    with pytest.raises(ValueError, match="exactly one of input_shape"):
        profile(TokenModel(), (4,), example_inputs=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="a tuple of positional inputs"):
        profile(TokenModel(), example_inputs=[torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="forward failed on example_inputs"):
        profile(TokenModel(), example_inputs=torch.zeros(1, 4))  # float ids


def test_low_rank_layers_count_both_factors_and_every_step() -> None:
    from strsparse.methods.structured import StructuredSoftThreshold

    model = strsparse.create_model("fastgrnn", hidden_size=16, rank_w=4, rank_u=8)
    strsparse.sparsify(model, "str", structure="rank")
    with torch.no_grad():
        for gate in model.modules():
            if isinstance(gate, StructuredSoftThreshold):
                gate.m[::2] = 0.0  # half of the rank-one components
    p = profile(model, (28, 28))  # 28 steps of 28 features
    w, u = p["w.weight2"], p["u.weight2"]  # named like the sparsified layers
    assert w.params == 4 * (28 + 16) and u.params == 8 * (16 + 16)
    assert w.flops == 28 * w.params  # W x_t at every step
    assert u.flops == 28 * u.params and u.calls == 28  # U h_{t-1}
    assert w.nonzero_params == 2 * (28 + 16) and u.sparsity == 0.5
    assert set(p.names) >= set(strsparse.sparse_layers(model))
