"""Learning-rate schedules as pure functions of the optimizer step.

The training loop sets every parameter group's ``lr`` from ``learning_rate(step, ...)``
before each optimizer step, so a schedule has no state to save: resuming at step ``t``
gives exactly the learning rate an uninterrupted run has at step ``t``.

Warmup is linear *per step*: ``lr_t = base_lr * (t + 1) / warmup_steps`` for
``t < warmup_steps`` (``warmup_steps = warmup_epochs * steps_per_epoch``). The STR recipe
(Kusupati et al., 2020, ImageNet: 5 warmup epochs) raises the rate once per epoch,
``base_lr * (e + 1) / warmup_epochs``; the per-step ramp reaches the same rate at the end
of each warmup epoch without the jumps, and works for runs shorter than an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from strsparse.config import SCHEDULES
from strsparse.errors import OptionError, did_you_mean

__all__ = ["learning_rate", "warmup_factor"]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup multiplier: ``(step + 1) / warmup_steps`` before ``warmup_steps``, then 1."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def learning_rate(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    steps_per_epoch: int,
    name: str = "cosine",
    warmup_epochs: float = 0.0,
    min_lr: float = 0.0,
    step_size: int = 30,
    gamma: float = 0.1,
    milestones: Sequence[int] = (),
) -> float:
    """The learning rate at optimizer step ``step`` (0-based) of ``total_steps``.

    name:
        ``cosine``: after warmup, ``min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2`` with
        ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` (Loshchilov & Hutter, 2017;
        the STR recipe's schedule), reaching ``min_lr`` at ``total_steps``.
        ``step``: ``base_lr * gamma ** (epoch // step_size)``.
        ``multistep``: ``base_lr * gamma ** (number of milestones <= epoch)``, milestones in epochs.
        ``constant``: ``base_lr``.
    Every schedule is multiplied by the linear warmup factor during the first
    ``warmup_epochs`` (fractional epochs allowed). ``epoch`` here is ``step // steps_per_epoch``.
    """
    if name not in SCHEDULES:
        raise OptionError(
            f"unknown learning-rate schedule {name!r}{did_you_mean(str(name), SCHEDULES)}; "
            f"valid schedules: {', '.join(SCHEDULES)}"
        )
    if steps_per_epoch <= 0 or total_steps <= 0:
        raise OptionError(
            f"steps_per_epoch={steps_per_epoch} and total_steps={total_steps} must be positive"
        )
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    epoch = step // steps_per_epoch
    if name == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif name == "step":
        if step_size <= 0:
            raise OptionError(f"step_size={step_size} must be a positive number of epochs")
        lr = base_lr * gamma ** (epoch // step_size)
    elif name == "multistep":
        lr = base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    else:
        lr = base_lr
    return lr * warmup_factor(step, warmup_steps)
