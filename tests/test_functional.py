"""strsparse.functional: the soft threshold, straight-through, schedules and magnitude masks."""

from __future__ import annotations

import pytest
import torch

from strsparse.functional import (
    THRESHOLD_FUNCTIONS,
    cubic_sparsity,
    global_magnitude_masks,
    magnitude_mask,
    resolve_threshold_function,
    soft_threshold,
    str_weights,
    straight_through,
    update_point,
)


def _away_from_kinks(threshold: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Weights whose magnitudes are at least 0.05 from the threshold and from 0, so finite
    differences never cross a kink of relu(|w| - t)."""
    threshold = threshold.expand(shape)
    side = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).double()
    offset = 0.05 + 0.04 * torch.rand(shape, dtype=torch.float64)
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).double()
    return sign * (threshold + side * offset)


@pytest.mark.parametrize(
    "threshold_shape", [(), (4, 1, 1, 1), (4, 3, 2, 2)], ids=["layer", "channel", "weight"]
)
def test_soft_threshold_gradcheck(threshold_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    threshold = (0.1 + 0.3 * torch.rand(threshold_shape, dtype=torch.float64)).requires_grad_()
    weight = _away_from_kinks(threshold.detach(), (4, 3, 2, 2)).requires_grad_()
    assert torch.autograd.gradcheck(soft_threshold, (weight, threshold))


def test_soft_threshold_matches_the_naive_formula_and_its_gradients() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 5, requires_grad=True)
    threshold = torch.full((6, 1), 0.4, requires_grad=True)
    naive_weight = weight.detach().clone().requires_grad_()
    naive_threshold = threshold.detach().clone().requires_grad_()
    upstream = torch.randn(6, 5)

    out = soft_threshold(weight, threshold)
    naive = naive_weight.sign() * torch.relu(naive_weight.abs() - naive_threshold)
    torch.testing.assert_close(out, naive)
    (out * upstream).sum().backward()
    (naive * upstream).sum().backward()
    torch.testing.assert_close(weight.grad, naive_weight.grad)
    torch.testing.assert_close(threshold.grad, naive_threshold.grad)
    assert (out == 0).sum() > 0 and (weight.grad[out == 0] == 0).all()


def test_soft_threshold_accepts_a_float() -> None:
    w = torch.tensor([-1.0, -0.2, 0.0, 0.3, 2.0])
    torch.testing.assert_close(soft_threshold(w, 0.5), torch.tensor([-0.5, 0.0, 0.0, 0.0, 1.5]))


def _naive_str(weight: torch.Tensor, s: torch.Tensor, k: float, g: str) -> torch.Tensor:
    threshold = k * THRESHOLD_FUNCTIONS[g](s)
    return weight.sign() * torch.relu(weight.abs() - threshold)


# (weight shape, s shape) per layer; the last layer shares the first one's s in "shared"
_LAYERS = [((4, 3, 2, 2), ()), ((5, 6), (5, 1)), ((3, 2, 2), (3, 2, 2)), ((2, 4), ())]


@pytest.mark.parametrize("g", ["sigmoid", "exp"])
@pytest.mark.parametrize("shared", [False, True], ids=["own-s", "shared-s"])
def test_str_weights_gradcheck(g: str, shared: bool) -> None:
    torch.manual_seed(0)
    k = 0.7
    s = [torch.empty(shape, dtype=torch.float64).uniform_(-2.0, -1.0) for _, shape in _LAYERS]
    s_index = [0, 1, 2, 0 if shared else 3]
    if g == "exp":  # k * exp(s) in (0.1, 0.3) like k * sigmoid(s)
        s = [x - 1.0 for x in s]
    weights = []
    for (shape, _), j in zip(_LAYERS, s_index, strict=True):
        threshold = k * THRESHOLD_FUNCTIONS[g](s[j])
        weights.append(_away_from_kinks(threshold, shape).requires_grad_())
    s = [x.requires_grad_() for x in s[: 3 if shared else 4]]

    def fn(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(str_weights(tensors[:4], tensors[4:], k=k, g=g, s_index=s_index))

    assert torch.autograd.gradcheck(fn, (*weights, *s))


def test_str_weights_matches_the_naive_formula_with_shared_and_unused_layers() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(shape, requires_grad=True) for shape, _ in _LAYERS]
    s = [torch.full(shape, -1.5, requires_grad=True) for _, shape in _LAYERS[:3]]
    s_index = [0, 1, 2, 0]
    naive_w = [w.detach().clone().requires_grad_() for w in weights]
    naive_s = [x.detach().clone().requires_grad_() for x in s]
    upstream = [torch.randn(w.shape) for w in weights]

    outs = str_weights(weights, s, k=1.5, s_index=s_index)
    naive = [
        _naive_str(w, naive_s[j], 1.5, "sigmoid") for w, j in zip(naive_w, s_index, strict=True)
    ]
    for out, expected in zip(outs, naive, strict=True):
        torch.testing.assert_close(out, expected)
        assert (out == 0).any() and (out != 0).any()
    # the second layer's output is not used: neither it nor its own s gets a gradient
    used = [0, 2, 3]
    sum((outs[i] * upstream[i]).sum() for i in used).backward()
    sum((naive[i] * upstream[i]).sum() for i in used).backward()
    for i in used:
        torch.testing.assert_close(weights[i].grad, naive_w[i].grad)
    assert weights[1].grad is None and s[1].grad is None
    for j in (0, 2):
        torch.testing.assert_close(s[j].grad, naive_s[j].grad)


def test_str_weights_checks_s_index() -> None:
    w, s = torch.randn(3, 3), torch.zeros(())
    with pytest.raises(ValueError, match="s_index"):
        str_weights([w, w], [s], s_index=[0, 1])
    with pytest.raises(ValueError, match="s_index"):
        str_weights([w, w], [s])


def test_straight_through_passes_the_gradient_unchanged() -> None:
    w = torch.tensor([0.5, -2.0, 3.0], requires_grad=True)
    out = straight_through(w, lambda t: t * (t.abs() > 1))
    torch.testing.assert_close(out, torch.tensor([0.0, -2.0, 3.0]))
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_threshold_functions() -> None:
    s = torch.tensor([-3.0, 0.0, 1.5])
    torch.testing.assert_close(resolve_threshold_function("sigmoid")(s), torch.sigmoid(s))
    torch.testing.assert_close(resolve_threshold_function("exp")(s), torch.exp(s))
    assert set(THRESHOLD_FUNCTIONS) == {"sigmoid", "exp"}
    with pytest.raises(ValueError, match="'sigmod' \\(did you mean 'sigmoid'\\?\\)"):
        resolve_threshold_function("sigmod")
    # the paper's s_init: g and g' are exactly 0 in float32, so only weight decay moves s
    assert float(torch.sigmoid(torch.tensor(-3200.0))) == 0.0


def test_cubic_sparsity_values() -> None:
    assert cubic_sparsity(0, 10, 20, 0.9) == 0.0
    assert cubic_sparsity(5, 10, 20, 0.9, initial=0.1) == 0.1
    assert cubic_sparsity(10, 10, 20, 0.9, initial=0.1) == pytest.approx(0.1)
    assert cubic_sparsity(15, 10, 20, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(20, 10, 20, 0.9) == 0.9  # exactly s_f at t1
    assert cubic_sparsity(25, 10, 20, 0.9) == 0.9
    assert cubic_sparsity(10, 10, 10, 0.9) == 0.9  # end <= start: a jump at start


def test_magnitude_mask_exact_count_with_ties() -> None:
    weight = torch.ones(7, 9)
    for sparsity in (0.0, 0.25, 0.5, 0.999, 1.0):
        mask = magnitude_mask(weight, sparsity)
        assert int((~mask).sum()) == round(sparsity * 63)
    torch.manual_seed(0)
    w = torch.randn(50)
    mask = magnitude_mask(w, 0.3)
    assert w.abs()[~mask].max() < w.abs()[mask].min()


def test_global_magnitude_masks_drop_the_smallest_of_all_layers() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(4, 5), 3 * torch.randn(10)]
    flat = torch.cat([w.abs().flatten() for w in weights])
    th = float(flat.kthvalue(12).values)
    assert all(bool(m.all()) for m in global_magnitude_masks(weights, 0.0))
    masks = global_magnitude_masks(weights, 0.4)
    assert sum(int((~m).sum()) for m in masks) == 12
    for w, m in zip(weights, masks, strict=True):
        assert m.shape == w.shape
        assert (w.abs()[~m] <= th).all() and (w.abs()[m] > th).all()


def test_update_points() -> None:
    assert update_point(4, 5, 30, 10) is None
    assert [update_point(t, 5, 30, 10) for t in (5, 14, 15, 24, 25, 29)] == [5, 5, 15, 15, 25, 25]
    assert update_point(30, 5, 30, 10) == 30  # always an update at the end
    assert update_point(99, 5, 30, 10) == 30
