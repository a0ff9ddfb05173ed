"""The ``strsparse`` command line: parse arguments, call the library, print the results.

Every command is a thin wrapper over library functions (``strsparse.training``,
``strsparse.export``, ``strsparse.flops``, ``strsparse.plots``); nothing here is needed to use
the library from Python. Errors a user can fix (a bad config key, a missing file, a foreign
checkpoint: a ``strsparse.StrsparseError``, or an ``OSError`` for a file the system refuses)
end the command with exit status 2 and one ``strsparse: error: ...`` line on stderr; a
training run that diverged ends with status 1 and one line. ``--debug`` shows the traceback
instead. Under torchrun only rank 0 prints the line. Any other exception is a bug in
strsparse and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from strsparse.errors import OptionError, StrsparseError
from strsparse.formatting import count as _count
from strsparse.formatting import human
from strsparse.training.loop import TrainingDiverged, slim_totals

if TYPE_CHECKING:  # the commands import the library lazily, so that --help starts fast
    from torch import nn

    from strsparse.config import Config
    from strsparse.flops import FlopsProfile
    from strsparse.sparsify import SparsityHandle
    from strsparse.training import TrainResult

__all__ = ["build_parser", "main"]

PROG = "strsparse"
EXIT_OK = 0
EXIT_FAILED = 1  # the run started and failed: the loss diverged
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

_LIST_KINDS = ("configs", "models", "methods", "budgets")
_CLI_HANDLER_FLAG = "_strsparse_cli_handler"


# -- small output helpers -------------------------------------------------------------------


def _percent(fraction: Any) -> str:
    if fraction is None or (isinstance(fraction, float) and not math.isfinite(fraction)):
        return "n/a"
    return f"{100 * float(fraction):.2f}%"


# -- shared library glue ------------------------------------------------------------------


def _profile(model: nn.Module, input_shape: Sequence[int]) -> FlopsProfile:
    from strsparse.flops import profile

    return profile(model, tuple(int(d) for d in input_shape))


def _totals_lines(profile: FlopsProfile) -> list[str]:
    """'overall'/'backbone' rows: params and FLOPs, dense and sparse."""
    lines = []
    for label, part in (("overall", profile.overall), ("backbone", profile.backbone)):
        params, nonzero = part.params, part.nonzero_params
        flops, sparse = part.flops, part.sparse_flops
        text = f"{label:<9} params {_count(params)}"
        if nonzero != params:
            text += f" (nonzero {_count(nonzero)})"
        text += f"   FLOPs dense {_count(flops)} ({human(flops)})"
        text += f"   sparse {_count(sparse)} ({human(sparse)})"
        lines.append(text)
    return lines


def _restore(
    checkpoint: str, device: str = "cpu"
) -> tuple[nn.Module, Config, SparsityHandle | None]:
    from strsparse.training import restore_model

    return restore_model(checkpoint, device=device)


def _input_shape_of(cfg: Config) -> tuple[int, ...]:
    from strsparse.data import dataset_info

    return tuple(int(d) for d in dataset_info(cfg.data).input_shape)


# -- commands -------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from strsparse.config import load_config
    from strsparse.training import train

    overrides = list(args.overrides)
    if args.budget is not None:
        overrides.append(f"sparsity.budget={json.dumps(str(args.budget))}")
    if args.config is not None:
        cfg = load_config(args.config, overrides)
    elif args.resume is not None:  # the run's own configuration
        from strsparse.config import apply_overrides, config_from_dict
        from strsparse.training import load_checkpoint

        cfg = config_from_dict(apply_overrides(load_checkpoint(args.resume)["config"], overrides))
    else:
        raise OptionError("train needs --config FILE_OR_NAME (or --resume RUN_DIR)")
    if args.budget is not None:
        _check_budget_method(cfg.sparsity.method)
        options = dict(cfg.sparsity.options)
        if options.pop("sparsity", None) is not None:  # the budget replaces a uniform target
            logging.getLogger(__name__).info("--budget replaces sparsity.options.sparsity")
            sparsity = dataclasses.replace(cfg.sparsity, options=options)
            cfg = dataclasses.replace(cfg, sparsity=sparsity)
    if args.quiet:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, quiet=True))
    result = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # one summary per torchrun job
        _print_train_summary(result)
    return EXIT_OK


def _check_budget_method(method: str) -> None:
    """--budget is a per-layer target: only for methods with a ``budget`` option."""
    from strsparse.methods import get_method
    from strsparse.training.build import DENSE

    fields = () if method == DENSE else dataclasses.fields(get_method(method).Options)
    if "budget" not in {f.name for f in fields}:
        raise OptionError(
            f"--budget sets per-layer targets, but the config's sparsity.method is {method!r}, "
            "which takes none (STR learns its own budget); train with a method that follows "
            "one, e.g. add sparsity.method=gmp 'sparsity.options={}'"
        )


def _print_train_summary(result: TrainResult) -> None:
    layers = result.layers
    if layers is not None and layers.layers:
        print(layers.to_table())
        print()
    final = result.final
    best = result.best or {}
    top1 = final.get("top1")
    line = f"top-1 {top1:.2f}%" if top1 is not None else "top-1 n/a"
    if best.get("top1") is not None:
        line += f" (best {best['top1']:.2f}%)"
    if final.get("top5") is not None:
        line += f"   top-5 {final['top5']:.2f}%"
    if final.get("loss") is not None:
        line += f"   loss {final['loss']:.4f}"
    print(line)
    print(f"sparsity {_percent(final.get('sparsity'))}")
    flops, sparse = final.get("flops"), final.get("sparse_flops")
    print(
        f"FLOPs dense {_count(flops)} ({human(flops)}), sparse {_count(sparse)} ({human(sparse)})"
    )
    run_dir = Path(result.run_dir)
    for text in _structure_lines(result.structure, final, flops, run_dir):
        print(text)
    print(f"run directory: {run_dir}")
    plots = run_dir / "plots"
    if plots.is_dir():
        print(f"plots: {plots}")
    print(f"summary: {result.summary_path}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from strsparse import data as data_module
    from strsparse import sparsity_report
    from strsparse.training import evaluate

    model, cfg, _ = _restore(args.checkpoint, args.device)
    data_cfg = cfg.data
    if args.data_root is not None:
        data_cfg = dataclasses.replace(data_cfg, root=str(args.data_root))
    if args.batch_size is not None:
        data_cfg = dataclasses.replace(data_cfg, eval_batch_size=args.batch_size)
    _, val_ds, info = data_module.build_datasets(data_cfg)
    loader = DataLoader(
        val_ds,
        batch_size=data_cfg.eval_batch_size,
        shuffle=False,
        num_workers=data_cfg.num_workers,
    )
    metrics = evaluate(model, loader, device=args.device)
    report = sparsity_report(model)
    profile = _profile(model, info.input_shape)
    print(
        f"checkpoint {args.checkpoint}: {cfg.model.name} on {data_cfg.name} "
        f"({len(cast(Sized, val_ds))} validation samples)"
    )
    print(
        f"top-1 {metrics['top1']:.2f}%   top-5 {metrics['top5']:.2f}%   loss {metrics['loss']:.4f}"
    )
    print(
        f"sparsity {_percent(report.sparsity)} ({_count(report.nonzero)} of "
        f"{_count(report.params)} weights nonzero)"
    )
    for line in _totals_lines(profile):
        print(line)
    _print_structure(model, info.input_shape, profile.overall.flops, args.checkpoint)
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from strsparse import sparsity_report
    from strsparse.export import export_dense

    model, cfg, _ = _restore(args.checkpoint)
    if args.slim and args.format == "dense":
        from strsparse.export import export_slim, load_slim

        out = export_slim(model, cfg, args.output, force=args.force)
        slim_model = load_slim(out)
        before = sum(p.numel() for p in model.parameters())
        after = sum(p.numel() for p in slim_model.parameters())
        print(f"wrote a slim {cfg.model.name} ({before:,} -> {after:,} parameters) to {out}")
        print("load it with strsparse.export.load_slim(path)")
        return EXIT_OK
    if args.format != "dense":
        from strsparse.inference.deploy import convert_run

        lines = convert_run(model, cfg, args.output, args.format, force=args.force, slim=args.slim)
        for line in lines:
            print(line)
        return EXIT_OK
    out = export_dense(model, cfg, args.output, force=args.force)
    report = sparsity_report(model)
    print(f"wrote a dense {cfg.model.name} (sparsity {_percent(report.sparsity)}) to {out}")
    print(
        "load it with strsparse.export.load_dense(path), or create_model + "
        "safetensors.torch.load_file + load_state_dict(strict=True)"
    )
    return EXIT_OK


def _structure_lines(
    structure: Mapping[str, tuple[int, int]] | None,
    totals: Mapping[str, Any],
    flops: float | None,
    source: str | os.PathLike,
) -> list[str]:
    """What a structured run kept and its slim model's size (``slim_params`` and
    ``slim_flops`` of ``totals``), with the command that writes that model."""
    lines = []
    if structure:  # structured STR
        kept = ", ".join(f"{n} {alive}/{total}" for n, (alive, total) in structure.items())
        lines.append(f"kept (filters or rank-one components): {kept}")
    if totals.get("slim_params") is not None:
        slim_flops = totals.get("slim_flops")
        share = f", {_percent(slim_flops / flops)} of dense" if slim_flops and flops else ""
        lines.append(
            f"slim model: {_count(totals['slim_params'])} parameters, FLOPs "
            f"{_count(slim_flops)} ({human(slim_flops)}{share}); write it with: strsparse "
            f"convert {source} -o OUT --slim"
        )
    return lines


def _print_structure(
    model: nn.Module, input_shape: Sequence[int], flops: float, source: str | os.PathLike
) -> None:
    """For a structured model, what each layer kept and its slim model's size: the zeros'
    count understates what removing the filters saves."""
    from strsparse import structure_report

    structure = structure_report(model)
    if structure:
        for line in _structure_lines(structure, slim_totals(model, input_shape), flops, source):
            print(line)


def _cmd_report(args: argparse.Namespace) -> int:
    from strsparse import sparsity_report

    model, cfg, _ = _restore(args.checkpoint)
    shape = _input_shape_of(cfg)
    profile = _profile(model, shape)
    report = sparsity_report(model, flops=profile)
    print(report.to_table())
    print()
    for line in _totals_lines(profile):
        print(line)
    _print_structure(model, shape, profile.overall.flops, args.checkpoint)
    if args.csv is not None:
        report.to_csv(args.csv)
        print(f"wrote {args.csv}")
    return EXIT_OK


def _cmd_budget(args: argparse.Namespace) -> int:
    from strsparse import Budget

    model, _, _ = _restore(args.checkpoint)
    budget = Budget.from_model(model)
    path = budget.to_csv(args.output)
    print(
        f"wrote the budget of {len(budget)} layers (overall sparsity "
        f"{_percent(budget.overall(model))}) to {path}"
    )
    return EXIT_OK


def _cmd_flops(args: argparse.Namespace) -> int:
    from strsparse.flops import profile
    from strsparse.models import create_model, default_input_shape
    from strsparse.training import resolve_budget

    shape = tuple(args.input_shape) if args.input_shape else default_input_shape(args.model)
    model = create_model(args.model, num_classes=args.num_classes)
    budget = resolve_budget(args.budget, model) if args.budget is not None else None
    result = profile(model, shape, budget=budget)
    title = f"{args.model}, input {'x'.join(map(str, shape))}"
    if budget is not None:
        title += f", budget {args.budget} (sparsity {_percent(budget.overall(model))})"
    print(title)
    print(result.to_table())
    print()
    for line in _totals_lines(result):
        print(line)
    if args.csv is not None:
        result.to_csv(args.csv)
        print(f"wrote {args.csv}")
    return EXIT_OK


def _budget_label(spec: str) -> str:
    """A legend label: a paper name as is, a CSV's stem, a run directory's name (also for
    ``RUN/checkpoints/*.pt``)."""
    path = Path(spec)
    if not path.exists():
        return spec
    if path.is_dir():
        return path.resolve().name
    if path.suffix == ".pt" and path.parent.name == "checkpoints":
        return f"{path.resolve().parent.parent.name}/{path.stem}"
    return path.stem


def _cmd_plot_budgets(args: argparse.Namespace) -> int:
    from strsparse import plots
    from strsparse.models import create_model, default_input_shape
    from strsparse.training import resolve_budget

    model = create_model(args.model)
    budgets = {}
    for spec in args.budgets:
        label = _budget_label(spec)
        while label in budgets:
            label += "'"
        budgets[label] = resolve_budget(spec, model)
    profile = _profile(model, default_input_shape(args.model))
    out = plots.plot_budgets(budgets, Path(args.output), flops_profile=profile)
    print(f"wrote {out if out is not None else args.output}")
    return EXIT_OK


def _names(kind: str) -> list[str]:
    if kind == "configs":
        from strsparse.config import list_configs

        return list(list_configs())
    if kind == "models":
        from strsparse.models import list_models

        return list(list_models())
    if kind == "methods":
        from strsparse import list_methods
        from strsparse.training.build import DENSE

        return [*list_methods(), DENSE]
    from strsparse.budgets import list_paper_budgets

    return list(list_paper_budgets())


def _cmd_list(args: argparse.Namespace) -> int:
    if args.kind is not None:
        for name in _names(args.kind):
            print(name)
        return EXIT_OK
    for i, kind in enumerate(_LIST_KINDS):
        print(("\n" if i else "") + f"{kind}:")
        for name in _names(kind):
            print(f"  {name}")
    return EXIT_OK


# -- the parser -----------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the descriptions' and epilogs' line breaks; show defaults where set."""


def _command(
    sub: Any,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    summary: str,
    description: str,
    examples: str,
) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    parser.set_defaults(handler=handler)
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``strsparse`` argument parser with one subparser per command."""
    from strsparse import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Train sparse-by-design networks with STR (Soft Threshold weight "
            "Reparameterization,\nKusupati et al., ICML 2020) and its peers (ST-3, GMP, DNW, "
            "magnitude pruning);\nevaluate, report, export and compare their budgets and FLOPs."
        ),
        epilog=(
            "examples:\n"
            "  strsparse list configs\n"
            "  strsparse train --config fashion_mnist_str train.epochs=5\n"
            "  strsparse report runs/fashion_mnist_str\n"
            "  strsparse flops --model resnet50\n\n"
            "run 'strsparse COMMAND --help' for the options of a command"
        ),
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = _command(
        sub,
        "train",
        _cmd_train,
        "train a model from a YAML config",
        "Train a model from a YAML config (a file or a shipped config name, see\n"
        "'strsparse list configs'), with dotted key=value overrides. The run directory\n"
        "(output_dir/name) receives checkpoints, metrics.csv, TensorBoard logs, plots and\n"
        "summary.json. Rerunning the same config resumes its run; another config under the\n"
        "same name trains into NAME-1 (a finished run is never rewritten). At the end\n"
        "the per-layer sparsity table, accuracy, sparsity and FLOPs are printed.",
        "  strsparse train --config fashion_mnist_str\n"
        "  strsparse train --config my.yaml train.epochs=10 sparsity.options.init_threshold=-3200\n"
        "  strsparse train --config fashion_mnist_gmp --budget runs/fashion_mnist_str\n"
        "  strsparse train --config my.yaml --resume runs/my_run\n",
    )
    p.add_argument(
        "--config",
        "-c",
        metavar="FILE_OR_NAME",
        help="YAML config file, or the name of a shipped config ('strsparse list configs'); "
        "with --resume and no --config, the run's own config",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override a config value by its dotted key, e.g. optim.lr=0.1 or "
        "sparsity.options.init_threshold=-3200 (the value is parsed as YAML)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="resume exactly the run in RUN_DIR, in RUN_DIR, from its checkpoints/last.pt "
        "(a config that changes the run is refused). Without --resume, a run directory "
        "holding a run of the same config resumes; a different config under the same name "
        "goes to NAME-1, NAME-2, ...",
    )
    p.add_argument(
        "--budget",
        metavar="FILE|CHECKPOINT|PAPER_NAME",
        help="per-layer sparsity budget for gmp/dnw/magnitude/st3 (sets "
        "sparsity.budget; replaces a uniform sparsity.options.sparsity): a "
        "layer,sparsity CSV, a checkpoint or run directory "
        "whose learned sparsities to transfer, or a paper budget name "
        "('strsparse list budgets')",
    )
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="log only warnings and errors while training (the final summary is still printed)",
    )

    p = _command(
        sub,
        "eval",
        _cmd_eval,
        "evaluate a checkpoint on its validation set",
        "Evaluate a checkpoint (file or run directory) on the validation set of the dataset\n"
        "its config names: top-1/top-5 accuracy, loss, sparsity and FLOPs (dense and sparse).",
        "  strsparse eval runs/fashion_mnist_str\n"
        "  strsparse eval runs/imagenet_str/checkpoints/best.pt --data-root /data/imagenet "
        "--batch-size 128\n",
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="checkpoint file (.pt) or run directory (uses checkpoints/last.pt)",
    )
    p.add_argument(
        "--data-root",
        metavar="DIR",
        help="dataset directory, if it moved since training (sets data.root)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="evaluation batch size (default: the config's data.eval_batch_size)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        type=_device,
        metavar="DEV",
        help="device to evaluate on: cpu (default), cuda or cuda:N",
    )

    p = _command(
        sub,
        "convert",
        _cmd_convert,
        "export a checkpoint as a plain dense model",
        "Bake the sparse weights of a checkpoint into a plain dense model whose state_dict\n"
        "loads with strict=True into the unmodified architecture. OUT (a directory) gets\n"
        "model.safetensors and config.yaml (model name, num_classes, in_channels, options).\n"
        "Load it with strsparse.export.load_dense(OUT). An existing non-empty OUT is never\n"
        "overwritten unless --force is given and it holds a previous export.",
        "  strsparse convert runs/fashion_mnist_str -o exported/fashion_mnist_str\n"
        "  strsparse convert runs/r50/checkpoints/best.pt -o r50_dense --force\n"
        "  strsparse convert runs/fashion_mnist_str -o lenet_sparse --format sparse\n"
        "  strsparse convert runs/fashion_mnist_str -o lenet_onnx --format onnx\n",
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pt) or run directory"
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output directory (created; must be empty or absent without --force)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace OUT if it already holds a previous export"
    )
    p.add_argument(
        "--slim",
        action="store_true",
        help="remove zeroed filters and rank-one components (strsparse.slim) and write the "
        "smaller architecture beside the weights; load with strsparse.export.load_slim(OUT) "
        "(with --format onnx: the slim model as ONNX)",
    )
    p.add_argument(
        "--format",
        choices=("dense", "sparse", "onnx"),
        default="dense",
        help="dense: plain PyTorch weights (default); sparse: OUT/model.safetensors for "
        "strsparse.load_sparse, running native sparse kernels; onnx: OUT/model.onnx, "
        "checked in onnxruntime",
    )

    p = _command(
        sub,
        "report",
        _cmd_report,
        "per-layer sparsity, thresholds and FLOPs of a checkpoint",
        "Print one row per sparsified layer of a checkpoint: shape, params, nonzero weights,\n"
        "sparsity, threshold and FLOPs (dense and sparse), then the totals.",
        "  strsparse report runs/fashion_mnist_str\n"
        "  strsparse report runs/r50/checkpoints/best.pt --csv r50_layers.csv\n",
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pt) or run directory"
    )
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV to FILE")

    p = _command(
        sub,
        "budget",
        _cmd_budget,
        "write the per-layer sparsity budget a checkpoint learned",
        "Write the per-layer sparsities of a checkpoint's model as a layer,sparsity CSV:\n"
        "the learned budget, to reuse with 'strsparse train --budget' (budget transfer,\n"
        "STR paper Section 4.1) or to plot with 'strsparse plot-budgets'.",
        "  strsparse budget runs/fashion_mnist_str -o str_budget.csv\n"
        "  strsparse train --config fashion_mnist_gmp --budget str_budget.csv\n",
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pt) or run directory"
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="CSV file to write (columns layer,sparsity)",
    )

    p = _command(
        sub,
        "flops",
        _cmd_flops,
        "per-layer FLOPs of a model, dense or at a budget",
        "Print the per-layer parameters and FLOPs (multiply-accumulates, the paper's\n"
        "convention) of a registered model and the totals (overall and backbone, dense and\n"
        "sparse). With --budget, each layer costs (1 - sparsity) of its dense FLOPs.",
        "  strsparse flops --model resnet50\n"
        "  strsparse flops --model resnet50 --budget resnet50-str-90.23\n"
        "  strsparse flops --model resnet20 --input-shape 3 32 32 --num-classes 100 "
        "--csv r20.csv\n",
    )
    p.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="NAME",
        help="registered model name ('strsparse list models')",
    )
    p.add_argument(
        "--input-shape",
        type=_positive_int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="input shape without the batch dimension (default: the model's own: "
        "3 224 224 for ImageNet models, 3 32 32 for CIFAR, 1 28 28 for lenet)",
    )
    p.add_argument(
        "--budget",
        metavar="FILE|CHECKPOINT|PAPER_NAME",
        help="per-layer sparsity budget to cost the sparse FLOPs: a CSV, a "
        "checkpoint or a paper budget name ('strsparse list budgets')",
    )
    p.add_argument(
        "--num-classes",
        type=_positive_int,
        metavar="N",
        help="number of classes of the classifier (default: the model's own)",
    )
    p.add_argument("--csv", metavar="FILE", help="also write the per-layer table as CSV to FILE")

    p = _command(
        sub,
        "plot-budgets",
        _cmd_plot_budgets,
        "plot and compare per-layer sparsity budgets",
        "Plot per-layer sparsity bars (and each layer's FLOPs) for one or more budgets of\n"
        "one architecture, in the style of the STR paper's Figures 8 and 9.",
        "  strsparse plot-budgets resnet50-str-90.23 resnet50-str-98.05 --model resnet50 "
        "-o r50.png\n"
        "  strsparse plot-budgets runs/fashion_mnist_str str_budget.csv --model lenet5 "
        "-o budgets.png\n",
    )
    p.add_argument(
        "budgets",
        nargs="+",
        metavar="BUDGET",
        help="a layer,sparsity CSV, a checkpoint or run directory, or a paper "
        "budget name ('strsparse list budgets')",
    )
    p.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="NAME",
        help="the architecture the budgets are for ('strsparse list models')",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="image file to write (.png, .pdf or .svg)",
    )

    p = _command(
        sub,
        "list",
        _cmd_list,
        "list shipped configs, models, methods or paper budgets",
        "List the names the other commands accept: shipped configs (train --config),\n"
        "registered models (--model), sparsity methods (sparsity.method) and the paper's\n"
        "budgets (--budget). Without KIND, everything, grouped.",
        "  strsparse list\n  strsparse list configs\n  strsparse list budgets\n",
    )
    p.add_argument(
        "kind",
        nargs="?",
        choices=_LIST_KINDS,
        metavar="KIND",
        help=f"what to list: {', '.join(_LIST_KINDS)} (default: all)",
    )
    return parser


def _device(text: str) -> str:
    """A torch device string that this machine has (cpu, cuda, cuda:N, mps)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device; use cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here; use cpu")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


# -- entry point ----------------------------------------------------------------------------


def _setup_logging(quiet: bool) -> None:
    """Show strsparse's log records on stderr: INFO and up, or only warnings with --quiet.

    The handler sits on the root logger (the application's place for it), so records the
    library forwards there are shown too; a handler from an earlier in-process call is
    replaced.
    """
    # under torchrun, the ranks but 0 show warnings only: one log per job, not one per rank
    level = logging.WARNING if quiet or os.environ.get("RANK", "0") != "0" else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _CLI_HANDLER_FLAG, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.setLevel(level)
    setattr(handler, _CLI_HANDLER_FLAG, True)
    root.addHandler(handler)
    logging.getLogger("strsparse").setLevel(level)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``strsparse`` command line with ``argv`` (default ``sys.argv[1:]``); returns
    the exit status (0 success, 2 a usage or input error, 130 interrupted)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # key=value overrides after an option (`--config x --quiet a=1`) land here
            overrides = [e for e in extra if "=" in e and not e.startswith("-")]
            unknown = [e for e in extra if e not in overrides]
            if args.command != "train" or unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
            args.overrides = [*args.overrides, *overrides]
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_ERROR)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    debug = bool(getattr(args, "debug", False))
    # train narrates its progress; the other commands only print their result
    _setup_logging(quiet=args.command != "train" or bool(getattr(args, "quiet", False)))
    try:
        return int(args.handler(args))
    except BrokenPipeError:  # `strsparse list | head`: the reader left; not an error
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_OK
    except KeyboardInterrupt:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # one line per job, not one per torchrun rank
            print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (StrsparseError, OSError) as exc:  # anything else is a bug: its traceback shows
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # one line per job, not one per torchrun rank
            print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED if isinstance(exc, TrainingDiverged) else EXIT_ERROR
