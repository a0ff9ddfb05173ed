"""Fast sparse inference on the CPU, and export for deployment.

- ``to_sparse(model)``: the model with its Linear and Conv2d layers running native sparse
  kernels (BatchNorm folded, residual adds and ReLUs fused) where that is faster, attention
  and transformer layers included;
- ``save_sparse`` / ``load_sparse``: such a model in safetensors, its size in proportion to
  its density;
- ``export_onnx(model, path, example_inputs)``: the model as ONNX, checked in onnxruntime.
"""

from strsparse.inference._native import backend, set_isa
from strsparse.inference.attention import SparseMultiheadAttention, SparseTransformerEncoderLayer
from strsparse.inference.convert import DEFAULT_MAX_DENSITY, to_sparse
from strsparse.inference.layers import SparseConv2d, SparseLinear
from strsparse.inference.onnx_export import export_onnx, verify_onnx
from strsparse.inference.serialize import load_sparse, save_sparse

__all__ = [
    "DEFAULT_MAX_DENSITY",
    "SparseConv2d",
    "SparseLinear",
    "SparseMultiheadAttention",
    "SparseTransformerEncoderLayer",
    "backend",
    "export_onnx",
    "load_sparse",
    "save_sparse",
    "set_isa",
    "to_sparse",
    "verify_onnx",
]
