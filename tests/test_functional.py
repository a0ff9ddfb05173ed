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
