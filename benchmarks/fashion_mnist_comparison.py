"""STR (with a target, with its paper knobs, with a FLOPs target) against its peers on
Fashion-MNIST's real test split: the same model, epochs, recipe and augmentation for all.

One command regenerates ``benchmarks/results/fashion_mnist.csv`` (one row per run), the
Markdown table of means and spreads over seeds, and the two plots (top-1 against sparsity and
against FLOPs):

    python benchmarks/fashion_mnist_comparison.py --jobs 2

Runs are independent processes with one CPU thread each (``--jobs`` at a time), in two phases:
first every method that starts from scratch, then the two that reuse a phase-1 run (GMP with
the budget STR learned, the paper's budget transfer; one-shot global magnitude pruning of the
dense model, then fine-tuning). Each run's directory sits under ``--out``/runs; a finished
run is not trained again, so an interrupted sweep picks up where it stopped.

Methods (CSV labels): ``dense``; ``str_target`` (STR with ``sparsity=target``); ``str_lambda``
(STR with the paper's knobs: a small sweep of the decay on ``s``, the ``option`` column names
the value; its ``target`` is empty); ``st3``; ``gmp`` (uniform budget); ``gmp_global`` (one
global magnitude ranking); ``gmp_str_budget`` (GMP with the per-layer budget ``str_target``
learned, same seed); ``dnw``; ``magnitude_finetune`` (global one-shot magnitude pruning of
the dense run, then ``--finetune-fraction`` of the epochs at a tenth of the learning rate;
its ``train_time_rel`` counts the dense training too); ``str_flops`` (STR with a FLOPs target
set to what uniform GMP costs at the same target sparsity, so methods can be compared at
equal FLOPs). ``train_time_rel`` is a run's training time over the dense run's (same model
and seed, same machine load), ``flops`` the sparse forward FLOPs of the final model
(multiply-accumulates, ``strsparse.flops``).

``--tiny`` runs every method once on a few batches (the tests use it).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = (
    "dense",
    "str_target",
    "str_lambda",
    "st3",
    "gmp",
    "gmp_global",
    "gmp_str_budget",
    "dnw",
    "magnitude_finetune",
    "str_flops",
)
COLUMNS = (
    "model",
    "method",
    "target",
    "seed",
    "sparsity",
    "top1",
    "flops",
    "train_time_rel",
    "option",
    "epochs",
    "train_time_s",
)
# STR's decay on s for the str_lambda rows: around the values that gave 90-99% on these models
LAMBDAS = {"lenet5": (5e-3, 1e-2, 2e-2), "lenet_300_100": (5e-3, 1e-2, 2e-2)}
EPOCHS = {"lenet5": 8, "lenet_300_100": 20}


@dataclass(frozen=True)
class Run:
    """One training run of the sweep."""

    model: str
    method: str
    seed: int
    epochs: int
    target: float | None = None
    option: str = ""
    overrides: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        target = "" if self.target is None else f"_{self.target:g}"
        option = f"_{self.option}" if self.option else ""
        return f"{self.model}_{self.method}{target}{option}_s{self.seed}"


def base_config(model: str, seed: int, epochs: int, data: dict[str, Any]) -> dict[str, Any]:
    """The shared recipe (the default job's): SGD lr 0.1 momentum 0.9, weight decay 5e-4,
    cosine with one warmup epoch, label smoothing 0.1, batch 128, no augmentation."""
    return {
        "name": "run",
        "seed": seed,
        "device": "cpu",
        "model": {"name": model},
        "data": {"name": "fashion_mnist", "batch_size": 128, "augment": False, **data},
        "sparsity": {"method": "dense", "options": {}},
        "optim": {
            "name": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "threshold_weight_decay": 0.0,
        },
        "schedule": {"name": "cosine", "warmup_epochs": min(1, epochs)},
        "train": {
            "epochs": epochs,
            "label_smoothing": 0.1,
            "quiet": True,
            "tensorboard": False,
            "num_threads": 1,
        },
    }


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    node = cfg
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = value


def uniform_gmp_flops(model: str, target: float) -> float:
    """The fraction of dense FLOPs a uniform ``target`` budget costs on ``model``."""
    import strsparse
    from strsparse import flops

    net = strsparse.create_model(model)
    profile = flops.profile(net, net.input_shape, budget=strsparse.Budget.uniform(net, target))
    return profile.overall.sparse_flops / profile.overall.flops


def plan(
    models: Sequence[str],
    targets: Sequence[float],
    seeds: Sequence[int],
    epochs: dict[str, int],
    methods: Sequence[str],
) -> tuple[list[Run], list[Run]]:
    """(phase 1, phase 2) runs."""
    first: list[Run] = []
    second: list[Run] = []
    for model in models:
        e = epochs[model]
        for seed in seeds:
            first.append(Run(model, "dense", seed, e))
            if "str_lambda" in methods:
                for lam in LAMBDAS[model]:
                    first.append(
                        Run(
                            model,
                            "str_lambda",
                            seed,
                            e,
                            option=f"lambda={lam:g}",
                            overrides={
                                "sparsity.method": "str",
                                "sparsity.options": {"init_threshold": -6.5},
                                "optim.threshold_weight_decay": lam,
                            },
                        )
                    )
            for t in targets:
                options = {
                    "str_target": ("str", {"sparsity": t}),
                    "st3": ("st3", {"sparsity": t}),
                    "gmp": ("gmp", {"sparsity": t}),
                    "gmp_global": ("gmp", {"sparsity": t, "scope": "global"}),
                    "dnw": ("dnw", {"sparsity": t}),
                }
                for label, (method, opts) in options.items():
                    if label in methods:
                        first.append(
                            Run(
                                model,
                                label,
                                seed,
                                e,
                                t,
                                overrides={"sparsity.method": method, "sparsity.options": opts},
                            )
                        )
                if "str_flops" in methods:
                    budget = uniform_gmp_flops(model, t)
                    first.append(
                        Run(
                            model,
                            "str_flops",
                            seed,
                            e,
                            t,
                            option=f"flops={budget:.4f}",
                            overrides={
                                "sparsity.method": "str",
                                "sparsity.options": {"flops": round(budget, 6)},
                            },
                        )
                    )
                if "gmp_str_budget" in methods:
                    second.append(Run(model, "gmp_str_budget", seed, e, t))
                if "magnitude_finetune" in methods:
                    second.append(Run(model, "magnitude_finetune", seed, e, t))
    return first, second


@dataclass(frozen=True)
class Sweep:
    out: Path
    data: dict[str, Any]
    finetune_fraction: float
    max_steps: int | None


def _config(run: Run, sweep: Sweep, runs_dir: Path) -> Any:
    from strsparse.config import config_from_dict

    cfg = base_config(run.model, run.seed, run.epochs, sweep.data)
    cfg["name"] = run.name
    cfg["output_dir"] = str(runs_dir)
    if sweep.max_steps is not None:
        cfg["train"]["max_steps_per_epoch"] = sweep.max_steps
    for key, value in run.overrides.items():
        _set(cfg, key, value)
    if run.method == "gmp_str_budget":
        source = Run(run.model, "str_target", run.seed, run.epochs, run.target)
        _set(cfg, "sparsity.method", "gmp")
        _set(cfg, "sparsity.options", {})
        _set(cfg, "sparsity.budget", str(runs_dir / source.name))
    return config_from_dict(cfg)


def execute(run: Run, sweep: Sweep) -> dict[str, Any]:
    """Train ``run`` (in a worker process, one thread) and return its CSV row."""
    import torch

    torch.set_num_threads(1)
    runs_dir = sweep.out / "runs"
    if run.method == "magnitude_finetune":
        return _magnitude_finetune(run, sweep, runs_dir)
    from strsparse.training import train

    result = train(_config(run, sweep, runs_dir))
    summary = json.loads(result.summary_path.read_text())
    return _row(run, summary["final"], summary["train_time_s"])


def _row(run: Run, final: dict[str, Any], train_time: float) -> dict[str, Any]:
    return {
        "model": run.model,
        "method": run.method,
        "target": "" if run.target is None else run.target,
        "seed": run.seed,
        "sparsity": final["sparsity"],
        "top1": final["top1"],
        "flops": final["sparse_flops"],
        "option": run.option,
        "epochs": run.epochs,
        "train_time_s": train_time,
    }


def _magnitude_finetune(run: Run, sweep: Sweep, runs_dir: Path) -> dict[str, Any]:
    """Global one-shot magnitude pruning of the dense run's model, then fine-tuning at a
    tenth of the learning rate (cosine) for ``finetune_fraction`` of the epochs."""
    import torch
    from torch import nn

    import strsparse
    from strsparse import flops
    from strsparse.data import build_datasets, build_loaders
    from strsparse.training import evaluate, restore_model

    dense = Run(run.model, "dense", run.seed, run.epochs)
    done = runs_dir / run.name / "row.json"
    if done.is_file():
        return json.loads(done.read_text())
    model, cfg, _ = restore_model(runs_dir / dense.name)
    torch.manual_seed(run.seed)
    strsparse.sparsify(model, "magnitude", sparsity=run.target, scope="global")
    train_ds, val_ds, _ = build_datasets(cfg.data)
    train_loader, val_loader = build_loaders(train_ds, val_ds, cfg.data, seed=run.seed)
    epochs = max(1, round(sweep.finetune_fraction * run.epochs))
    steps_per_epoch = len(train_loader)
    if sweep.max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, sweep.max_steps)
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    step = 0
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch, (x, y) in enumerate(train_loader):
            if batch >= steps_per_epoch:
                break
            for group in opt.param_groups:
                group["lr"] = 0.01 * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = criterion(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    elapsed = time.perf_counter() - start
    metrics = evaluate(model, val_loader, device="cpu")
    profile = flops.profile(model, tuple(model.input_shape))
    final = {
        "sparsity": strsparse.sparsity_report(model).sparsity,
        "top1": metrics["top1"],
        "sparse_flops": profile.overall.sparse_flops,
    }
    dense_summary = json.loads((runs_dir / dense.name / "summary.json").read_text())
    row = _row(run, final, dense_summary["train_time_s"] + elapsed)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row))
    return row


def run_all(runs: Sequence[Run], sweep: Sweep, jobs: int) -> list[dict[str, Any]]:
    if jobs <= 1:
        return [execute(r, sweep) for r in runs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(execute, runs, [sweep] * len(runs)))


def with_relative_time(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dense = {(r["model"], r["seed"]): r["train_time_s"] for r in rows if r["method"] == "dense"}
    for r in rows:
        base = dense.get((r["model"], r["seed"]))
        r["train_time_rel"] = r["train_time_s"] / base if base else math.nan
    return rows


def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in ("model", "method", "target", "seed", "option"))


def _other_rows(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of an earlier sweep in ``path`` that this one did not redo (another model,
    say), so that sweeps run one after another add up to one CSV."""
    if not path.is_file():
        return []
    done = {_key(r) for r in rows}
    kept = []
    for r in csv.DictReader(path.open()):
        if _key(r) in done:
            continue
        row: dict[str, Any] = dict(r)
        for k in ("sparsity", "top1", "flops", "train_time_rel", "train_time_s"):
            row[k] = float(row[k]) if row[k] else math.nan
        row["target"] = float(row["target"]) if row["target"] else ""
        row["seed"] = int(row["seed"])
        kept.append(row)
    return kept


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    from strsparse.atomic import write_atomic

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(r.get(k, "")) for k in COLUMNS})
    write_atomic(path, buf.getvalue())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _groups(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["model"], r["method"], str(r["target"]), r["option"])
        groups.setdefault(key, []).append(r)
    return groups


def _mean_spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    spread = (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (model, method, target): top-1, sparsity and FLOPs as mean ±
    half the range over seeds, and the training time relative to dense."""
    order = {m: i for i, m in enumerate(METHODS)}
    lines = [
        "| model | target | method | top-1 % | sparsity % | FLOPs (K) | time vs dense | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = _groups(rows)
    for key in sorted(
        groups,
        key=lambda k: (k[0], k[2] == "", k[2], order.get(k[1], 99), k[3]),
    ):
        model, method, target, option = key
        rs = groups[key]
        label = f"{method} ({option})" if option else method
        lines.append(
            f"| {model} | {target or '-'} | {label} | {_mean_spread([r['top1'] for r in rs])} | "
            f"{_mean_spread([r['sparsity'] for r in rs], 100)} | "
            f"{_mean_spread([r['flops'] for r in rs], 1e-3, 1)} | "
            f"{statistics.fmean(r['train_time_rel'] for r in rs):.2f} | {len(rs)} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """top-1 against sparsity and against FLOPs, one panel per model, means over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from strsparse.atomic import write_atomic

    models = sorted({r["model"] for r in rows})
    paths = []
    for x_key, x_label, name, log in (
        ("sparsity", "sparsity (%)", "top1_vs_sparsity.png", False),
        ("flops", "forward FLOPs (MACs)", "top1_vs_flops.png", True),
    ):
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            groups = _groups([r for r in rows if r["model"] == model])
            by_method: dict[str, list[tuple[float, float]]] = {}
            for (_, method, _, _), rs in groups.items():
                label = method
                x = statistics.fmean(r[x_key] * (100 if x_key == "sparsity" else 1) for r in rs)
                y = statistics.fmean(r["top1"] for r in rs)
                by_method.setdefault(label, []).append((x, y))
            for method in METHODS:
                if method not in by_method:
                    continue
                pts = sorted(by_method[method])
                style = "*" if method == "dense" else "o-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method, ms=5)
            ax.set_title(model)
            ax.set_xlabel(x_label)
            ax.set_ylabel("top-1 (%)")
            if log:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        path = out / name
        write_atomic(path, buf.getvalue())
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "lenet_300_100"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.90, 0.95, 0.98, 0.99])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", nargs="+", default=[], help="MODEL=N overrides, e.g. lenet5=4")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (1 thread each)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--finetune-fraction", type=float, default=0.5)
    parser.add_argument(
        "--train-limit", type=int, default=None, help="train on the first N images only"
    )
    parser.add_argument("--tiny", action="store_true", help="a few batches, for the tests")
    args = parser.parse_args(argv)

    epochs = dict(EPOCHS)
    for item in args.epochs:
        model, _, n = item.partition("=")
        epochs[model] = int(n)
    data: dict[str, Any] = {}
    if args.train_limit is not None:
        data["train_limit"] = args.train_limit
    max_steps = None
    if args.tiny:
        data = {
            "name": "synthetic",
            "batch_size": 32,
            "synthetic": {"num_train": 128, "num_val": 64, "num_classes": 10},
        }
        max_steps = 4
        epochs = {m: 2 for m in args.models}
    sweep = Sweep(args.out, data, args.finetune_fraction, max_steps)
    first, second = plan(args.models, args.targets, args.seeds, epochs, args.methods)
    if "dense" not in args.methods:
        first = [r for r in first if r.method != "dense" or "magnitude_finetune" in args.methods]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = run_all(first, sweep, args.jobs) + run_all(second, sweep, args.jobs)
    # times are relative to the dense run of the same model and seed, wherever it was run
    rows = with_relative_time(rows + _other_rows(args.out / "fashion_mnist.csv", rows))
    write_csv(rows, args.out / "fashion_mnist.csv")
    from strsparse.atomic import write_atomic

    write_atomic(args.out / "fashion_mnist.md", table(rows))
    plot(rows, args.out)
    print(table(rows))
    print(f"{len(rows)} runs in {time.perf_counter() - start:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
