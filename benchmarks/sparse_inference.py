"""Inference latency of ``strsparse.to_sparse`` against the dense runtimes a user would pick.

Run by hand (PASSIVE: idle OpenMP threads sleep instead of spinning on the next contender's
cores):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/sparse_inference.py   # models and single layers
    python benchmarks/sparse_inference.py --suite models --lenet-run runs/fashion_mnist_str
    python benchmarks/sparse_inference.py --suite layers --threads 1

Everything runs in one process. For each model the contenders are dense eager PyTorch, dense
``torch.compile``, dense onnxruntime and strsparse's sparse model; they are timed in
interleaved rounds (one call of each, then again), so a busy phase of a shared machine hits
them alike, and the figure reported is each one's median (a sample of a small model is a
run of back-to-back calls lasting about 20 ms). With one thread the time is the
process's CPU time (immune to other processes taking the core); with more threads it is
wall-clock time. Speed-ups are given over each baseline, beside the FLOPs ratio (dense FLOPs
/ sparse FLOPs, counted as in the paper), the physical bound for a kernel that skips zeros.

Models: (a) LeNet-5 on Fashion-MNIST at its trained sparsity (``--lenet-run``: an STR run
directory; without it, LeNet-5 pruned by magnitude to the per-layer budget STR learned in
README's default job); (b) ResNet-50 with the paper's STR budgets 90.23%, 95.15%, 98.05%, and
MobileNetV1 with 89.01%: random weights and BatchNorm statistics, pruned to the budget by
magnitude, finalized; ResNet-50 at 0% checks the per-layer rule. (c) Single Linear, 1x1 and
3x3 layers swept over sparsity; the sparse layer is timed as it runs inside a network (its
input already channel-major).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import strsparse
from strsparse import flops
from strsparse.inference import backend, export_onnx, to_sparse

# What STR learned in README's default job (fashion_mnist_str, 8 epochs).
LENET_STR_BUDGET = {"conv1": 0.61, "conv2": 0.915, "fc1": 0.909, "fc2": 0.908, "fc3": 0.74}


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)


def pruned_model(name: str, budget: dict | str | float | None, **kwargs) -> nn.Module:
    """``name`` with random weights pruned by magnitude to ``budget`` and finalized."""
    torch.manual_seed(0)
    model = strsparse.create_model(name, **kwargs)
    _randomize_bn(model)
    if isinstance(budget, str):
        strsparse.sparsify(model, "magnitude", budget=strsparse.Budget.from_paper(budget))
    elif isinstance(budget, dict):
        strsparse.sparsify(model, "magnitude", budget=strsparse.Budget(budget))
    elif budget:
        strsparse.sparsify(model, "magnitude", sparsity=float(budget))
    return strsparse.finalize(model).eval()


def encoder_model(sparsity: float) -> nn.Module:
    """A small BERT-like encoder (4 layers of width 256, 4 heads, feed-forward 1024; PyTorch's
    ``nn.TransformerEncoder``) with a classifier on every token, random weights pruned by
    magnitude to ``sparsity`` in every layer."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    model = nn.Sequential(
        nn.TransformerEncoder(layer, 4, enable_nested_tensor=False), nn.Linear(256, 10)
    )
    strsparse.sparsify(model, "magnitude", sparsity=sparsity)
    return strsparse.finalize(model).eval()


def lenet_model(run: str | None) -> tuple[nn.Module, str]:
    if run is None:
        return pruned_model("lenet5", LENET_STR_BUDGET), "pruned to STR's learned budget"
    model, _, _ = strsparse.restore_model(run)
    strsparse.finalize(model)
    return model.eval(), f"trained ({Path(run).name})"


def flops_ratio(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    p = flops.profile(model, input_shape)
    return p.overall.flops / max(1, p.overall.sparse_flops)


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no busy-waiting after a call: it would take the core from the next contender
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def time_interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, threads: int
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds; a sample is
    as many back-to-back calls as take about 20 ms (one call of a large model)."""
    clock = time.process_time if threads == 1 else time.perf_counter
    samples: dict[str, list[float]] = {k: [] for k in fns}
    reps: dict[str, int] = {}
    for key, fn in fns.items():  # warm up, and size the samples
        fn()
        start = time.perf_counter()
        fn()
        reps[key] = max(1, min(200, round(0.02 / max(time.perf_counter() - start, 1e-6))))
    for _ in range(rounds):
        for key, fn in fns.items():
            start = clock()
            for _ in range(reps[key]):
                fn()
            samples[key].append((clock() - start) / reps[key])
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_models(args: argparse.Namespace) -> list[dict]:
    specs: list[tuple[str, Callable[[], tuple[nn.Module, str]], tuple[int, ...]]] = []
    if "lenet5" in args.models:
        specs.append(("lenet5", lambda: lenet_model(args.lenet_run), (1, 28, 28)))
    for budget in ("resnet50-str-90.23", "resnet50-str-95.15", "resnet50-str-98.05"):
        if "resnet50" in args.models:
            specs.append(
                (
                    f"resnet50 @ {budget.rsplit('-', 1)[1]}%",
                    lambda b=budget: (pruned_model("resnet50", b), "random, magnitude-pruned"),
                    (3, 224, 224),
                )
            )
    if "resnet50-dense" in args.models:
        specs.append(
            ("resnet50 @ 0%", lambda: (pruned_model("resnet50", None), "random"), (3, 224, 224))
        )
    if "mobilenet_v1" in args.models:
        specs.append(
            (
                "mobilenet_v1 @ 89.01%",
                lambda: (
                    pruned_model("mobilenet_v1", "mobilenet_v1-str-89.01"),
                    "random, magnitude-pruned",
                ),
                (3, 224, 224),
            )
        )
    for sparsity in (0.8, 0.9, 0.95):
        if "encoder" in args.models:
            specs.append(
                (
                    f"encoder @ {100 * sparsity:.0f}%",
                    lambda s=sparsity: (encoder_model(s), "random, magnitude-pruned"),
                    (128, 256),  # 128 tokens
                )
            )
    results = []
    tmp = tempfile.mkdtemp(prefix="strsparse-bench-")
    # the dense baselines do not depend on the zeros: built once per architecture
    dense_cache: dict[tuple[str, int], dict[str, Callable[[], object]]] = {}
    for label, make, shape in specs:
        model, source = make()
        arch = label.split(" @")[0]
        sparse = to_sparse(model)
        ratio = flops_ratio(model, shape)
        n_sparse = sum(m == "sparse" for m in sparse.sparse_plan.values())
        onnx_path = os.path.join(tmp, f"{arch}.onnx")
        if not os.path.exists(onnx_path):
            export_onnx(model, onnx_path, torch.randn(1, *shape))
        for batch in args.batch:
            x = torch.randn(batch, *shape)
            for threads in args.threads:
                torch.set_num_threads(threads)
                key = (arch, batch)
                if key not in dense_cache:
                    compiled = torch.compile(model, dynamic=False) if args.compile else None
                    dense_cache[key] = {"eager": lambda m=model, x=x: m(x)}
                    if compiled is not None:
                        dense_cache[key]["compile"] = lambda c=compiled, x=x: c(x)
                fns = dict(dense_cache[key])
                session = ort_session(onnx_path, threads)
                feed = {"input": x.numpy()}
                fns["onnxruntime"] = lambda s=session, f=feed: s.run(None, f)
                fns["sparse"] = lambda s=sparse, x=x: s(x)
                with torch.inference_mode():
                    med = time_interleaved(fns, args.rounds, threads)
                row = {
                    "model": label,
                    "source": source,
                    "batch": batch,
                    "threads": threads,
                    "flops_ratio": ratio,
                    "sparse_layers": f"{n_sparse}/{len(sparse.sparse_plan)}",
                    "ms": {k: 1e3 * v for k, v in med.items()},
                }
                results.append(row)
                print(_model_line(row), flush=True)
    return results


def _model_line(row: dict) -> str:
    ms = row["ms"]
    parts = [f"{row['model']:<22} b={row['batch']} t={row['threads']}"]
    parts += [f"{k} {v:8.2f} ms" for k, v in ms.items()]
    parts += [f"x{ms[k] / ms['sparse']:.2f} vs {k}" for k in ms if k != "sparse"]
    parts.append(f"FLOPs x{row['flops_ratio']:.1f}")
    return " | ".join(parts)


LAYERS = {
    "linear 4096x4096": lambda: nn.Linear(4096, 4096),
    "1x1 conv 256->256 @56x56": lambda: nn.Conv2d(256, 256, 1, bias=False),
    "3x3 conv 128->128 @56x56": lambda: nn.Conv2d(128, 128, 3, padding=1, bias=False),
    "3x3 conv 256->256 @14x14": lambda: nn.Conv2d(256, 256, 3, padding=1, bias=False),
}
LAYER_INPUT = {
    "linear 4096x4096": (4096,),
    "1x1 conv 256->256 @56x56": (256, 56, 56),
    "3x3 conv 128->128 @56x56": (128, 56, 56),
    "3x3 conv 256->256 @14x14": (256, 14, 14),
}


def bench_layers(args: argparse.Namespace) -> list[dict]:
    results = []
    for name, make in LAYERS.items():
        if args.layers and not any(part in name for part in args.layers):
            continue
        for sparsity in args.sparsities:
            torch.manual_seed(0)
            dense = make().eval()
            if sparsity > 0:
                strsparse.sparsify(dense, "magnitude", sparsity=sparsity)
                strsparse.finalize(dense)
            # forced sparse: the sweep is what sets the per-layer rule
            layer = to_sparse(nn.Sequential(dense), max_density=1.0).net.get_submodule("0")
            for batch in args.batch:
                x = torch.randn(batch, *LAYER_INPUT[name])
                # channel-major, as inside a network (a layer kept dense takes the standard layout)
                standard = x.dim() == 2 or not getattr(layer, "channel_major", True)
                x_in = x if standard else x.transpose(0, 1).contiguous()
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    fns = {
                        "eager": lambda d=dense, x=x: d(x),
                        "sparse": lambda s=layer, xi=x_in: s(xi),
                    }
                    with torch.inference_mode():
                        med = time_interleaved(fns, args.rounds, threads)
                    row = {
                        "layer": name,
                        "sparsity": sparsity,
                        "batch": batch,
                        "threads": threads,
                        "ms": {k: 1e3 * v for k, v in med.items()},
                        "bound": 1.0 / (1.0 - sparsity),
                    }
                    results.append(row)
                    speedup = med["eager"] / med["sparse"]
                    print(
                        f"{name:<26} s={sparsity:.2f} b={batch} t={threads} | eager "
                        f"{row['ms']['eager']:8.3f} ms | sparse {row['ms']['sparse']:8.3f} ms | "
                        f"x{speedup:.2f} (bound x{row['bound']:.0f})",
                        flush=True,
                    )
    return results


def markdown(results: dict[str, list[dict]]) -> str:
    """README tables: per model, batch and threads, each contender's median latency and the
    sparse model's speed-up over it; per layer, the speed-up over eager beside the bound."""
    lines: list[str] = []
    rows = results.get("models", [])
    if rows:
        lines += [
            "| model | batch | threads | eager | compile | onnxruntime | sparse | "
            "vs eager | vs compile | vs onnxruntime | FLOPs ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ms = r["ms"]

            def cell(key: str, ms: dict = ms) -> str:
                return f"{ms[key]:.2f} ms" if key in ms else "-"

            def ratio(key: str, ms: dict = ms) -> str:
                return f"{ms[key] / ms['sparse']:.2f}x" if key in ms else "-"

            lines.append(
                f"| {r['model']} | {r['batch']} | {r['threads']} | {cell('eager')} | "
                f"{cell('compile')} | {cell('onnxruntime')} | {cell('sparse')} | "
                f"{ratio('eager')} | {ratio('compile')} | {ratio('onnxruntime')} | "
                f"{r['flops_ratio']:.1f}x |"
            )
    layers = results.get("layers", [])
    if layers:
        lines.append("")
        keys = sorted({(r["batch"], r["threads"]) for r in layers})
        head = " | ".join(f"b{b} t{t}" for b, t in keys)
        lines += [
            f"| layer | sparsity | bound | {head} |",
            "|---|---|---|" + "---|" * len(keys),
        ]
        for name in dict.fromkeys(r["layer"] for r in layers):
            for sparsity in sorted({r["sparsity"] for r in layers if r["layer"] == name}):
                cells = []
                for b, t in keys:
                    hit = [
                        r
                        for r in layers
                        if r["layer"] == name
                        and r["sparsity"] == sparsity
                        and (r["batch"], r["threads"]) == (b, t)
                    ]
                    ms = hit[0]["ms"] if hit else None
                    cells.append(f"{ms['eager'] / ms['sparse']:.2f}x" if ms else "-")
                lines.append(
                    f"| {name} | {100 * sparsity:g}% | {1 / (1 - sparsity):.0f}x | "
                    + " | ".join(cells)
                    + " |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("models", "layers", "all"), default="all")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["lenet5", "resnet50", "mobilenet_v1", "resnet50-dense", "encoder"],
        help="lenet5, resnet50, mobilenet_v1, resnet50-dense, encoder",
    )
    parser.add_argument("--lenet-run", help="an STR run directory of lenet5 (strsparse train)")
    parser.add_argument(
        "--layers", nargs="+", help="only the single layers whose names contain one of these"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--sparsities",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99],
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--from-json", help="print the Markdown tables of a previous run's JSON file and exit"
    )
    args = parser.parse_args()
    if args.from_json:
        print(markdown(json.loads(Path(args.from_json).read_text())))
        return
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"kernels: {backend().name} ({backend().isa}); torch {torch.__version__}")
    with contextlib.suppress(ImportError):
        import onnxruntime

        print(f"onnxruntime {onnxruntime.__version__}")
    results: dict[str, list[dict]] = {}
    if args.suite in ("models", "all"):
        results["models"] = bench_models(args)
    if args.suite in ("layers", "all"):
        results["layers"] = bench_layers(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
