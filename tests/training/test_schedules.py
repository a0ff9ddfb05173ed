"""Learning-rate schedules (strsparse.training.schedules): pure functions of the step."""

from __future__ import annotations

import pytest

from strsparse.training import (
    learning_rate,
)


def test_warmup_is_linear_per_step_then_cosine() -> None:
    kw = dict(base_lr=1.0, total_steps=100, steps_per_epoch=10, warmup_epochs=2)
    assert learning_rate(0, **kw) == pytest.approx(1 / 20)
    assert learning_rate(9, **kw) == pytest.approx(10 / 20)  # end of epoch 1: lr * 1/2
    assert learning_rate(19, **kw) == pytest.approx(1.0)  # end of warmup
    assert learning_rate(20, **kw) == pytest.approx(1.0)  # cosine starts at base_lr
    assert learning_rate(60, **kw) == pytest.approx(0.5)  # half way through the cosine
    assert learning_rate(100, **kw) == pytest.approx(0.0)
    assert learning_rate(99, **kw) < 1e-3


def test_cosine_ends_at_min_lr() -> None:
    kw = dict(base_lr=0.1, total_steps=50, steps_per_epoch=5, min_lr=0.001)
    assert learning_rate(0, **kw) == pytest.approx(0.1)
    assert learning_rate(50, **kw) == pytest.approx(0.001)
    values = [learning_rate(t, **kw) for t in range(51)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_step_multistep_and_constant() -> None:
    kw = dict(base_lr=1.0, total_steps=100, steps_per_epoch=10, gamma=0.1)
    multi = dict(kw, name="multistep", milestones=[3, 6])
    assert learning_rate(29, **multi) == pytest.approx(1.0)
    assert learning_rate(30, **multi) == pytest.approx(0.1)
    assert learning_rate(59, **multi) == pytest.approx(0.1)
    assert learning_rate(60, **multi) == pytest.approx(0.01)
    step = dict(kw, name="step", step_size=4)
    assert learning_rate(39, **step) == pytest.approx(1.0)
    assert learning_rate(40, **step) == pytest.approx(0.1)
    assert learning_rate(80, **step) == pytest.approx(0.01)
    assert learning_rate(77, **dict(kw, name="constant")) == 1.0
    assert learning_rate(4, **dict(kw, name="constant", warmup_epochs=1)) == pytest.approx(0.5)


def test_unknown_schedule_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="did you mean 'cosine'"):
        learning_rate(0, base_lr=1.0, total_steps=10, steps_per_epoch=1, name="cosin")
