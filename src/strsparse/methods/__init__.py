"""Sparsity methods, each a ``torch.nn.utils.parametrize`` parametrization in a registry."""

from strsparse.methods import (
    dnw,  # noqa: F401  (registers "dnw")
    gmp,  # noqa: F401  (registers "gmp")
    magnitude,  # noqa: F401  (registers "magnitude")
    soft_threshold,  # noqa: F401  (registers "str")
    st3,  # noqa: F401  (registers "st3")
)
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
