"""strsparse: sparse-by-design PyTorch training with STR and its peers."""

from strsparse import flops, models
from strsparse.budgets import Budget, list_paper_budgets
from strsparse.errors import StrsparseError
from strsparse.functional import cubic_sparsity, soft_threshold
from strsparse.inference import export_onnx, load_sparse, save_sparse, to_sparse
from strsparse.layers import LowRankLinear
from strsparse.methods import get_parametrization, list_methods
from strsparse.methods.structured import structure_report
from strsparse.models import create_model, list_models
from strsparse.report import SparsityReport, sparsity_report
from strsparse.slimming import SlimError, slim
from strsparse.sparsify import (
    PretrainedWeightsError,
    SparsifiedPickleError,
    SparsityHandle,
    finalize,
    load_pretrained,
    sparse_layers,
    sparsify,
)
from strsparse.training import (
    CheckpointError,
    TrainingDiverged,
    TrainResult,
    evaluate,
    load_checkpoint,
    restore_model,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "CheckpointError",
    "LowRankLinear",
    "PretrainedWeightsError",
    "SparsifiedPickleError",
    "SlimError",
    "SparsityHandle",
    "SparsityReport",
    "StrsparseError",
    "TrainResult",
    "TrainingDiverged",
    "create_model",
    "cubic_sparsity",
    "evaluate",
    "export_onnx",
    "finalize",
    "flops",
    "get_parametrization",
    "list_methods",
    "list_models",
    "list_paper_budgets",
    "load_pretrained",
    "load_checkpoint",
    "load_sparse",
    "models",
    "restore_model",
    "slim",
    "save_sparse",
    "soft_threshold",
    "sparse_layers",
    "sparsify",
    "sparsity_report",
    "structure_report",
    "to_sparse",
    "train",
]
