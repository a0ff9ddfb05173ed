"""Training-step cost of each sparsity method relative to the dense model, side by side.

Run by hand:  python benchmarks/train_step.py [--model lenet5] [--batch-size 128] [--repeats 7]

Every configuration is timed in interleaved rounds (dense, str, st3, ... then again), so a
slow phase of the machine hits all of them alike; the figure reported per method is the
median step time divided by the dense median of the same run. A second table times the
soft-threshold reparameterization alone: the custom autograd Function against the naive
four-op formula.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import strsparse
from strsparse.models import create_model, default_input_shape

METHOD_OPTIONS: dict[str, dict] = {
    "dense": {},
    "str": {"init_threshold": -8.0},
    "st3": {"sparsity": 0.9, "start": 0.0, "end": 1.0},
    "gmp": {"sparsity": 0.9, "start": 0.0, "end": 1.0},
    "dnw": {"sparsity": 0.9},
    "magnitude": {"sparsity": 0.9},
}


def make_step(
    model_name: str, method: str, batch_size: int, total_steps: int
) -> Callable[[], None]:
    torch.manual_seed(0)
    model = create_model(model_name)
    handle = None
    if method != "dense":
        handle = strsparse.sparsify(model, method, **METHOD_OPTIONS[method])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch_size, *default_input_shape(model_name))
    y = torch.randint(0, 10, (batch_size,))
    loss_fn = nn.CrossEntropyLoss()
    state = {"step": 0}

    def step() -> None:
        if handle is not None:
            handle.step(state["step"] % total_steps, total_steps)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        state["step"] += 1

    return step


def time_rounds(fns: dict[str, Callable[[], None]], steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def naive_soft_threshold(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.sign(w) * torch.relu(torch.abs(w) - t)


def reparam_fns(shape: tuple[int, ...]) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    w = torch.randn(shape, requires_grad=True)
    s = torch.tensor(-3.0, requires_grad=True)
    grad = torch.randn(shape)

    def run(fn: Callable) -> Callable[[], None]:
        def call() -> None:
            out = fn(w, torch.sigmoid(s))
            torch.autograd.backward(out, grad)

        return call

    return {"naive": run(naive_soft_threshold), "function": run(strsparse.soft_threshold)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    total = args.steps * (args.repeats + 1) + 3
    steps = {m: make_step(args.model, m, args.batch_size, total) for m in METHOD_OPTIONS}
    medians = time_rounds(steps, args.steps, args.repeats)
    dense = medians["dense"]
    print(f"training step, {args.model}, batch {args.batch_size}, {args.threads} threads")
    print(f"{'method':<10} {'ms/step':>9} {'vs dense':>9}")
    for name, t in medians.items():
        print(f"{name:<10} {1000 * t:>9.2f} {t / dense:>8.3f}x")

    print("\nsoft-threshold reparameterization alone (forward + backward)")
    print(f"{'weight shape':<18} {'naive ms':>9} {'Function ms':>12} {'speed-up':>9}")
    for shape in [(512, 1600), (256, 256, 3, 3), (2048, 512, 1, 1)]:
        m = time_rounds(reparam_fns(shape), args.steps, args.repeats)
        print(
            f"{'x'.join(map(str, shape)):<18} {1000 * m['naive']:>9.3f} "
            f"{1000 * m['function']:>12.3f} {m['naive'] / m['function']:>8.2f}x"
        )


if __name__ == "__main__":
    main()
