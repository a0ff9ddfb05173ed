"""``export_onnx``: a finalized (or slimmed) model as ONNX, checked in onnxruntime.

The exporter is PyTorch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``):
for the convolutional and MLP models strsparse trains it produces the same graph as the
dynamo-based exporter, needs no ``onnxscript`` (the dynamo path's extra dependency) and
exports in a fraction of the time. The weights are written as they are: ONNX runtimes run
them dense (zeros included), which is the baseline ``to_sparse`` is measured against.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from strsparse.atomic import atomic_path
from strsparse.errors import MissingDependencyError, OptionError
from strsparse.inference.convert import _finalized_copy
from strsparse.inference.layers import SparseConv2d, SparseLinear

__all__ = ["DEFAULT_OPSET", "export_onnx", "verify_onnx"]

DEFAULT_OPSET = 17


def _as_tuple(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise OptionError(
            "example_inputs must be a tensor or a sequence of tensors, e.g. "
            "torch.randn(1, 3, 224, 224)"
        )
    return inputs


def verify_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    atol: float = 1e-4,
) -> float:
    """Run ``path`` in onnxruntime on ``example_inputs`` and compare with ``model``; returns
    the largest absolute difference (relative to the outputs' scale when above 1). Raises
    ``ValueError`` if it exceeds ``atol``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError(
            "checking an ONNX export needs onnxruntime: pip install 'strsparse[onnx]' "
            "(or pass verify=False)"
        ) from exc
    inputs = _as_tuple(example_inputs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {
        i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)
    }
    got = session.run(None, feeds)
    with torch.inference_mode():
        expected = model(*inputs)
    expected = (expected,) if isinstance(expected, Tensor) else tuple(expected)
    worst = 0.0
    for e, g in zip(expected, got, strict=True):
        e = e.detach().cpu()
        g = torch.from_numpy(g)
        if tuple(e.shape) != tuple(g.shape):
            raise ValueError(f"onnxruntime gave shape {tuple(g.shape)}, PyTorch {tuple(e.shape)}")
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        worst = max(worst, float((e - g).abs().max()) / scale if e.numel() else 0.0)
    if worst > atol:
        raise ValueError(
            f"the ONNX model's outputs differ from PyTorch's by {worst:.3g} (> atol={atol}); "
            "the export is not faithful"
        )
    return worst


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    opset_version: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write ``model`` to ``path`` as ONNX and, with ``verify``, check it in onnxruntime.

    ``model`` is a finalized or slimmed model, or a still-sparsified one (finalized on a
    copy; ``model`` is not changed). ``example_inputs`` fixes every input's shape except the
    batch dimension, which stays dynamic with ``dynamic_batch``. The file is written
    atomically: a failed export or check leaves nothing behind.
    """
    if any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules()):
        raise OptionError(
            "export_onnx takes the finalized model, not the one to_sparse made: ONNX runtimes "
            "do not have strsparse's sparse kernels. Export the model you passed to to_sparse"
        )
    inputs = _as_tuple(example_inputs)
    plain = _finalized_copy(model)
    input_names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    with torch.inference_mode():
        outputs = plain(*inputs)
    n_out = 1 if isinstance(outputs, Tensor) else len(outputs)
    output_names = [f"output{i}" if n_out > 1 else "output" for i in range(n_out)]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in input_names + output_names}
    path = Path(path)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
            torch.onnx.export(
                plain,
                inputs,
                str(tmp),
                dynamo=False,
                opset_version=opset_version,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        if verify:
            verify_onnx(tmp, plain, inputs, atol=atol)
    return path
