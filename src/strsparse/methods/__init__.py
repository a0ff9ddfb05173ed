"""Sparsity methods, each a ``torch.nn.utils.parametrize`` parametrization in a registry."""

from strsparse.methods import soft_threshold  # noqa: F401  (registers "str")
from strsparse.methods.base import (
    SparsityMethod,
    get_method,
    get_parametrization,
    list_methods,
    raw_weight,
    register_method,
)

__all__ = [
    "SparsityMethod",
    "get_method",
    "get_parametrization",
    "list_methods",
    "raw_weight",
    "register_method",
]
