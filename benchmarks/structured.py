"""Structured STR end to end: the dense-shaped model against its ``strsparse.slim`` copy.

Three parts, each printing a Markdown table (one CPU thread; latency is process CPU time per
forward, median over interleaved rounds, dense and slim alternating in one process):

    python benchmarks/structured.py filter    # lenet5, resnet20 on Fashion-MNIST: "filter"
    python benchmarks/structured.py resnet50  # ResNet-50, half of every layer's filters removed
    python benchmarks/structured.py fastgrnn  # FastGRNN on row-wise Fashion-MNIST: "rank"
    python benchmarks/structured.py recurrent-latency  # those ranks, timed side by side

``filter`` trains each model with ``sparsity.options.structure=filter`` at each threshold
decay (``optim.threshold_weight_decay``) and at each target (``--targets``: the fraction of
filters to remove, ``sparsity.options.sparsity``; ``--flops-targets``: the slim model's share
of the dense FLOPs, ``sparsity.options.flops``), then reports parameters and FLOPs (the paper's
conventions: conv/linear weights, multiply-accumulates) and latency at batch 1 and 32 of
the trained model and of its slim copy, with the test accuracy of both. ``resnet50`` uses
random weights: every filter gate keeps its first half of filters, so each residual stream
loses the same half. ``fastgrnn`` trains a low-rank FastGRNN at several lambda and reports
the ranks reached (r_W, r_U) beside a full-rank FastGRNN and an LSTM of similar size; with
``--targets``, also runs that ask for a fraction of the components instead of a lambda.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import nn

import strsparse
from strsparse import flops
from strsparse.config import load_config
from strsparse.data import build_datasets, build_loaders
from strsparse.methods.structured import StructuredSoftThreshold
from strsparse.models import register_model


def _latency(models: dict[str, nn.Module], inputs: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median CPU seconds of one forward of each model, interleaved over ``rounds``."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model.eval()(inputs)  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                start = time.process_time()
                model(inputs)
                times[name].append(time.process_time() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _accuracy(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    return strsparse.evaluate(model, loader, device="cpu")["top1"]


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.2f}"


def _train(config: dict, workdir: Path) -> nn.Module:
    path = workdir / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    result = strsparse.train(load_config(path))
    model, _, _ = strsparse.restore_model(result.run_dir)
    return model.eval()


# -- filter pruning on Fashion-MNIST ---------------------------------------------------------


def filter_part(args: argparse.Namespace) -> None:
    cfg = load_config("fashion_mnist_str")
    _, val_ds, _ = build_datasets(cfg.data)
    _, val_loader = build_loaders(val_ds, val_ds, cfg.data, seed=0)
    print(
        f"Fashion-MNIST, structure='filter', {args.epochs} epochs, seed 0; latency: 1 thread, "
        f"median of {args.rounds} rounds (ms)\n"
    )
    print(
        _row(
            [
                "model",
                "threshold decay or target",
                "top-1 (trained / slim)",
                "filters kept",
                "params",
                "FLOPs",
                "batch 1",
                "batch 32",
            ]
        )
    )
    print(_row(["---"] * 8))
    with tempfile.TemporaryDirectory() as tmp:
        settings: list[tuple[str, float, dict]] = [
            (f"{decay}", decay, {"init_threshold": args.init_threshold}) for decay in args.decays
        ]
        # a target: the decay left at the default recipe's, which the controller absorbs
        settings += [(f"target {t:.0%}", 5e-3, {"sparsity": t}) for t in args.targets]
        settings += [(f"FLOPs {t:.0%}", 5e-3, {"flops": t}) for t in args.flops_targets]
        for name in args.models:
            for label, decay, options in settings:
                config = {
                    "name": f"{name}_filter_{label.replace(' ', '_')}",
                    "output_dir": tmp,
                    "seed": 0,
                    "model": {"name": name},
                    "data": {"name": "fashion_mnist", "batch_size": 128},
                    "sparsity": {
                        "method": "str",
                        "options": {"structure": "filter", **options},
                    },
                    "optim": {
                        "name": "sgd",
                        "lr": 0.1,
                        "momentum": 0.9,
                        "weight_decay": 5e-4,
                        "threshold_weight_decay": decay,
                    },
                    "schedule": {"name": "cosine", "warmup_epochs": 1},
                    "train": {
                        "epochs": args.epochs,
                        "label_smoothing": 0.1,
                        "num_threads": 1,
                        "quiet": True,
                        "tensorboard": False,
                    },
                }
                model = _train(config, Path(tmp))
                kept = strsparse.structure_report(model)
                alive = sum(a for a, _ in kept.values())
                total = sum(t for _, t in kept.values())
                dense = strsparse.finalize(model).eval()
                shape = tuple(dense.input_shape)
                if name == "resnet20":
                    shape = (1, 28, 28)
                slim = strsparse.slim(dense, torch.randn(1, *shape))
                p_dense, p_slim = flops.profile(dense, shape), flops.profile(slim, shape)
                top_dense, top_slim = _accuracy(dense, val_loader), _accuracy(slim, val_loader)
                lat1 = _latency({"d": dense, "s": slim}, torch.randn(1, *shape), args.rounds)
                lat32 = _latency({"d": dense, "s": slim}, torch.randn(32, *shape), args.rounds)
                print(
                    _row(
                        [
                            name,
                            label,
                            f"{top_dense:.2f}% / {top_slim:.2f}%",
                            f"{alive}/{total}",
                            f"{p_dense.overall.params:,} -> {p_slim.overall.params:,}",
                            f"{p_dense.overall.flops / 1e6:.2f}M -> "
                            f"{p_slim.overall.flops / 1e6:.2f}M",
                            f"{_ms(lat1['d'])} -> {_ms(lat1['s'])}",
                            f"{_ms(lat32['d'])} -> {_ms(lat32['s'])}",
                        ]
                    ),
                    flush=True,
                )


# -- ResNet-50 with half of its filters ----------------------------------------------------


def resnet50_part(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = strsparse.create_model("resnet50")
    strsparse.sparsify(model, "str", structure="filter")
    with torch.no_grad():
        for gate in model.modules():
            if isinstance(gate, StructuredSoftThreshold):
                gate.m[gate.m.numel() // 2 :] = 0.0  # the same half on every residual stream
    dense = strsparse.finalize(model).eval()
    shape = (3, 224, 224)
    slim = strsparse.slim(dense)
    p_dense, p_slim = flops.profile(dense, shape), flops.profile(slim, shape)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        diff = float((dense(x) - slim(x)).abs().max())
    print(f"ResNet-50, random weights, 224x224; 1 thread, median of {args.rounds} rounds\n")
    print(_row(["model", "params", "FLOPs", "batch 1 (ms)", "batch 32 (ms)"]))
    print(_row(["---"] * 5))
    lat1 = _latency({"d": dense, "s": slim}, torch.randn(1, *shape), args.rounds)
    lat32 = _latency({"d": dense, "s": slim}, torch.randn(32, *shape), args.rounds)
    for key, label, p in (("d", "dense", p_dense), ("s", "slim", p_slim)):
        print(
            _row(
                [
                    label,
                    f"{p.overall.params:,}",
                    f"{p.overall.flops / 1e9:.2f}G",
                    _ms(lat1[key]),
                    _ms(lat32[key]),
                ]
            )
        )
    print(
        f"\nspeed-up: {lat1['d'] / lat1['s']:.2f}x at batch 1, {lat32['d'] / lat32['s']:.2f}x "
        f"at batch 32; largest output difference {diff:.1e}"
    )


# -- FastGRNN on row-wise Fashion-MNIST ------------------------------------------------------


class LSTMClassifier(nn.Module):
    """An LSTM over (batch, time, features), classifying its last hidden state."""

    classifier_name = "fc"

    def __init__(self, *, num_classes: int, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_shape = (28, input_size)
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


@register_model
def benchmark_lstm(
    *, num_classes: int = 10, in_channels: int = 28, hidden_size: int = 28
) -> LSTMClassifier:
    """LSTM baseline for the FastGRNN benchmark (registered here, not in the zoo)."""
    return LSTMClassifier(num_classes=num_classes, input_size=in_channels, hidden_size=hidden_size)


def _recurrent_macs(model: nn.Module, steps: int = 28) -> int:
    """Multiply-accumulates of one sequence: the input and hidden projections at every
    step, plus the classifier."""
    if isinstance(model, LSTMClassifier):
        lstm = model.lstm
        per_step = lstm.weight_ih_l0.numel() + lstm.weight_hh_l0.numel()
    else:
        per_step = sum(p.numel() for p in (*model.w.parameters(), *model.u.parameters()))
    return steps * per_step + model.fc.weight.numel()


def _weights(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fastgrnn_part(args: argparse.Namespace) -> None:
    cfg = load_config("fashion_mnist_str", ["data.name=fashion_mnist_rows"])
    _, val_ds, _ = build_datasets(cfg.data)
    _, val_loader = build_loaders(val_ds, val_ds, cfg.data, seed=0)
    hidden = args.hidden
    runs: list[tuple[str, dict, dict]] = []
    if not args.no_baselines:
        runs += [
            ("FastGRNN, full rank", {"hidden_size": hidden}, {"method": "dense"}),
            ("LSTM", {"hidden_size": args.lstm_hidden}, {"method": "dense"}),
        ]
    for lam in args.lambdas:
        runs.append(
            (
                f"FastGRNN + STR rank, lambda {lam}",
                {"hidden_size": hidden, "rank_w": 28, "rank_u": hidden},
                {
                    "method": "str",
                    "options": {"structure": "rank", "init_threshold": args.init_threshold},
                    "lambda": lam,
                },
            )
        )
    for target in args.targets:  # the fraction of rank-one components to remove, no decay
        runs.append(
            (
                f"FastGRNN + STR rank, target {target:.0%}",
                {"hidden_size": hidden, "rank_w": 28, "rank_u": hidden},
                {"method": "str", "options": {"structure": "rank", "sparsity": target}},
            )
        )
    print(
        f"Fashion-MNIST row by row (28 steps x 28 pixels), {args.epochs} epochs, Adam lr 0.01, "
        f"cosine, batch 100, seed 0; latency: 1 thread, median of {args.rounds} rounds (ms)\n"
    )
    print(
        _row(["model", "top-1", "(r_W, r_U)", "params", "MACs / sequence", "batch 1", "batch 32"])
    )
    print(_row(["---"] * 7))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, kwargs, sparsity) in enumerate(runs):
            lam = sparsity.pop("lambda", 0.0)
            name = "benchmark_lstm" if label == "LSTM" else "fastgrnn"
            config = {
                "name": f"run{i}",
                "output_dir": tmp,
                "seed": 0,
                "model": {"name": name, "kwargs": kwargs},
                "data": {"name": "fashion_mnist_rows", "batch_size": 100},
                "sparsity": sparsity,
                "optim": {"name": "adam", "lr": 0.01, "weight_decay": lam},
                "schedule": {"name": "cosine"},
                "train": {
                    "epochs": args.epochs,
                    "num_threads": 1,
                    "quiet": True,
                    "tensorboard": False,
                },
            }
            model = _train(config, Path(tmp))
            slim = strsparse.slim(model)
            ranks = slim.ranks() if hasattr(slim, "ranks") else (None, None)
            shown = "full" if ranks == (None, None) else f"({ranks[0]}, {ranks[1]})"
            top1 = _accuracy(slim, val_loader)
            lat1 = _latency({"m": slim}, torch.randn(1, 28, 28), args.rounds)["m"]
            lat32 = _latency({"m": slim}, torch.randn(32, 28, 28), args.rounds)["m"]
            print(
                _row(
                    [
                        label,
                        f"{top1:.2f}%",
                        shown,
                        f"{_weights(slim):,}",
                        f"{_recurrent_macs(slim):,}",
                        _ms(lat1),
                        _ms(lat32),
                    ]
                ),
                flush=True,
            )


def recurrent_latency_part(args: argparse.Namespace) -> None:
    """Latency of FastGRNN at given ranks against full rank and the LSTM, interleaved in one
    process (weights do not change the time, so fresh models stand in for trained ones)."""
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {
        "FastGRNN, full rank": strsparse.create_model("fastgrnn", hidden_size=args.hidden),
        "LSTM": benchmark_lstm(hidden_size=args.lstm_hidden),
    }
    for ranks in args.ranks:
        r_w, r_u = (int(r) for r in ranks.split(","))
        models[f"FastGRNN ({r_w}, {r_u})"] = strsparse.create_model(
            "fastgrnn", hidden_size=args.hidden, rank_w=r_w, rank_u=r_u
        )
    lat1 = _latency(models, torch.randn(1, 28, 28), args.rounds)
    lat32 = _latency(models, torch.randn(32, 28, 28), args.rounds)
    print(f"28 steps x 28 features; 1 thread, median of {args.rounds} interleaved rounds\n")
    print(_row(["model", "batch 1 (ms)", "batch 32 (ms)"]))
    print(_row(["---"] * 3))
    for name in models:
        print(_row([name, _ms(lat1[name]), _ms(lat32[name])]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("filter")
    p.add_argument("--models", nargs="+", default=["lenet5", "resnet20"])
    p.add_argument("--decays", nargs="*", type=float, default=[0.01, 0.02])
    p.add_argument("--targets", nargs="*", type=float, default=[], help="e.g. 0.5 0.75")
    p.add_argument("--flops-targets", nargs="*", type=float, default=[], help="e.g. 0.5 0.3")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--init-threshold", type=float, default=-3.0)
    p.add_argument("--rounds", type=int, default=20)
    p = sub.add_parser("resnet50")
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("fastgrnn")
    p.add_argument("--lambdas", nargs="*", type=float, default=[0.001, 0.003, 0.01])
    p.add_argument("--targets", nargs="*", type=float, default=[], help="e.g. 0.73 0.89")
    p.add_argument("--no-baselines", action="store_true", help="only the low-rank runs")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lstm-hidden", type=int, default=28)
    p.add_argument("--init-threshold", type=float, default=-8.0)
    p.add_argument("--rounds", type=int, default=20)
    p = sub.add_parser("recurrent-latency")
    p.add_argument("--ranks", nargs="+", default=["27,51", "13,12", "7,3"], help="r_W,r_U")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lstm-hidden", type=int, default=28)
    p.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts: dict[str, Callable[[argparse.Namespace], None]] = {
        "filter": filter_part,
        "resnet50": resnet50_part,
        "fastgrnn": fastgrnn_part,
        "recurrent-latency": recurrent_latency_part,
    }
    parts[args.part](args)


if __name__ == "__main__":
    main()
