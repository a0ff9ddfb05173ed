"""Training-step cost of each sparsity method relative to the dense model, side by side.

Run by hand:
    python benchmarks/train_step.py --model resnet20 --batch-size 64 --threads 1 2
    python benchmarks/train_step.py --model resnet50 --batch-size 16 --methods dense str --steps 1

Every configuration is timed in interleaved rounds (dense, str, st3, ... then again), so a
slow phase of the machine hits all of them alike. A round's time is the process CPU time of
``--steps`` steps (forward, backward, SGD); each method's round is divided by the dense round
next to it, and the table gives the median ratio and its range (min-max) over the rounds.
``str/layer`` is STR with each layer computing its own weight (the model-wide batch
released), as when a sub-module runs alone.

Peak memory of a step is the highest total of tensor memory allocated during one step (after
two warm-up steps) above what was allocated when it began: every allocation and free of
PyTorch's CPU allocator, in order, as the profiler records them (``profile_memory=True``).

glibc's malloc gives freed memory back to the operating system and faults it in again at
thresholds it adapts to the process's history, so the same dense step may spend anywhere from
0 to 30% of its time in page faults depending on what ran before it. The benchmark fixes those
thresholds (``mallopt``; ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` do the same
for any program) so that every configuration runs on recycled memory.

A last table times the soft-threshold reparameterization of one layer alone: the custom
autograd Function against the naive four-op formula.
"""

from __future__ import annotations

import os

# Waiting OpenMP threads spin by default; on a busy machine that spinning becomes most of the
# process's CPU time at 2 threads. Passive waiting (set before torch loads OpenMP) makes the
# CPU time count work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import ctypes.util  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import strsparse  # noqa: E402
from strsparse.methods import get_parametrization  # noqa: E402
from strsparse.models import create_model, default_input_shape  # noqa: E402
from strsparse.sparsify import sparse_layers  # noqa: E402

METHOD_OPTIONS: dict[str, tuple[str | None, dict]] = {
    "dense": (None, {}),
    "str": ("str", {"init_threshold": -8.0}),
    "str/layer": ("str", {"init_threshold": -8.0}),
    "st3": ("st3", {"sparsity": 0.9, "start": 0.0, "end": 1.0}),
    "gmp": ("gmp", {"sparsity": 0.9, "start": 0.0, "end": 1.0}),
    "dnw": ("dnw", {"sparsity": 0.9}),
    "magnitude": ("magnitude", {"sparsity": 0.9}),
}


def steady_malloc() -> bool:
    """Stop glibc from returning freed memory to the system between steps (see above)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 2**31 - 1) and mallopt(m_mmap_threshold, 32 * 2**20))


def make_step(
    model_name: str, config: str, batch_size: int, total_steps: int
) -> Callable[[], None]:
    torch.manual_seed(0)
    model = create_model(model_name)
    method, options = METHOD_OPTIONS[config]
    handle = None
    if method is not None:
        handle = strsparse.sparsify(model, method, **options)
    if config == "str/layer":
        for layer in sparse_layers(model).values():
            get_parametrization(layer).release()
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


def time_rounds(
    fns: dict[str, Callable[[], None]], steps: int, rounds: int, warmup: int = 2
) -> dict[str, list[float]]:
    """CPU seconds per call of each function, one sample per interleaved round."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.process_time()
            for _ in range(steps):
                fn()
            samples[name].append((time.process_time() - start) / steps)
    return samples


def peak_step_memory(step: Callable[[], None]) -> int:
    """Peak bytes of tensor memory allocated during one call of ``step`` above its start."""
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


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
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--methods", nargs="+", default=list(METHOD_OPTIONS), choices=list(METHOD_OPTIONS)
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--reparam", action="store_true", help="also time the reparameterization")
    args = parser.parse_args()
    steady = steady_malloc()
    configs = ["dense"] + [m for m in args.methods if m != "dense"]
    total = args.steps * args.rounds + 2

    memory: dict[str, int] = {}
    if not args.no_memory:
        torch.set_num_threads(1)
        for config in configs:
            memory[config] = peak_step_memory(make_step(args.model, config, args.batch_size, total))

    for threads in args.threads:
        torch.set_num_threads(threads)
        steps = {c: make_step(args.model, c, args.batch_size, total) for c in configs}
        samples = time_rounds(steps, args.steps, args.rounds)
        dense = samples["dense"]
        print(
            f"\ntraining step, {args.model}, batch {args.batch_size}, {threads} thread(s), "
            f"{args.rounds} rounds of {args.steps} steps, process CPU time"
            + ("" if steady else ", malloc thresholds not fixed")
        )
        print(f"{'method':<10} {'ms/step':>9} {'vs dense':>9} {'range':>13} {'peak MiB':>9}")
        for name, times in samples.items():
            ratios = [t / d for t, d in zip(times, dense, strict=True)]
            peak = f"{memory[name] / 2**20:>9.1f}" if name in memory else f"{'-':>9}"
            print(
                f"{name:<10} {1000 * statistics.median(times):>9.2f} "
                f"{statistics.median(ratios):>8.3f}x {min(ratios):>6.3f}-{max(ratios):<6.3f} {peak}"
            )

    if args.reparam:
        torch.set_num_threads(args.threads[0])
        print("\nsoft-threshold reparameterization alone (forward + backward)")
        print(f"{'weight shape':<18} {'naive ms':>9} {'Function ms':>12} {'speed-up':>9}")
        for shape in [(512, 1600), (256, 256, 3, 3), (2048, 512, 1, 1)]:
            m = {
                k: statistics.median(v)
                for k, v in time_rounds(reparam_fns(shape), args.steps, args.rounds).items()
            }
            print(
                f"{'x'.join(map(str, shape)):<18} {1000 * m['naive']:>9.3f} "
                f"{1000 * m['function']:>12.3f} {m['naive'] / m['function']:>8.2f}x"
            )


if __name__ == "__main__":
    main()
