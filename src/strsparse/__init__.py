"""strsparse: sparse-by-design PyTorch training with STR and its peers."""

from strsparse.budget import Budget
from strsparse.functional import cubic_sparsity, soft_threshold
from strsparse.methods import get_parametrization, list_methods
from strsparse.report import SparsityReport, sparsity_report
from strsparse.sparsify import SparsityHandle, finalize, sparse_layers, sparsify

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "SparsityHandle",
    "SparsityReport",
    "cubic_sparsity",
    "finalize",
    "get_parametrization",
    "list_methods",
    "soft_threshold",
    "sparse_layers",
    "sparsify",
    "sparsity_report",
]
