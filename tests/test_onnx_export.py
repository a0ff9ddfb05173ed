"""ONNX export: the exported model runs in onnxruntime with PyTorch's outputs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import strsparse
from strsparse.inference import export_onnx, to_sparse, verify_onnx

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnx and onnxruntime are not installed (pip install 'strsparse[onnx]')",
)


@needs_ort
@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [("resnet20", {}, (3, 32, 32)), ("lenet5", {}, (1, 28, 28))],
)
def test_round_trip_in_onnxruntime(name: str, kwargs: dict, shape: tuple, tmp_path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = strsparse.create_model(name, in_channels=shape[0], **kwargs)
    strsparse.sparsify(model, "magnitude", sparsity=0.9)
    model.eval()
    path = export_onnx(model, tmp_path / "model.onnx", torch.randn(2, *shape))
    assert strsparse.sparse_layers(model)  # the model passed in is not finalized
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *shape)  # another batch size: the batch dimension is dynamic
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.inference_mode():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


@needs_ort
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # attention's shape checks
def test_a_transformer_round_trip_in_onnxruntime(tmp_path) -> None:
    """PyTorch's encoder and attention layers, still sparsified, exported with a dynamic batch."""
    import onnxruntime as ort

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.Sequential(
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 3)
    )
    strsparse.sparsify(model, "magnitude", sparsity=0.9)
    model.eval()
    path = export_onnx(model, tmp_path / "encoder.onnx", torch.randn(2, 10, 32))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 10, 32)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.inference_mode():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


@needs_ort
def test_verify_catches_a_wrong_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 6))
    other = nn.Sequential(nn.Linear(6, 3)).eval()
    with pytest.raises(ValueError, match="differ"):
        verify_onnx(path, other, torch.randn(2, 6))


def test_export_refuses_a_to_sparse_model(tmp_path) -> None:
    sparse = to_sparse(nn.Sequential(nn.Linear(6, 3)))
    with pytest.raises(ValueError, match="not the one to_sparse made"):
        export_onnx(sparse, tmp_path / "m.onnx", torch.randn(1, 6))
    assert not (tmp_path / "m.onnx").exists()


def test_bad_example_inputs(tmp_path) -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        export_onnx(nn.Linear(2, 2), tmp_path / "m.onnx", [1, 2])


@needs_ort
def test_slim_model_round_trip(tmp_path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = strsparse.create_model("lenet5").eval()
    with torch.no_grad():
        model.conv2.weight[:12] = 0.0  # 12 of conv2's 32 filters zeroed: slim removes them
    small = strsparse.slim(model)
    assert small.conv2.out_channels == 20
    path = export_onnx(small, tmp_path / "slim.onnx", torch.randn(1, 1, 28, 28))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 28, 28)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.inference_mode():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)
