"""Building blocks the sparsity methods understand beyond plain Linear and Conv layers.

``LowRankLinear`` stores a (out, in) matrix as the product of two factors, W = W1 W2, as
FastGRNN's low-rank projections do (Kusupati et al., NeurIPS 2018). STR's rank structure
(``sparsify(model, "str", structure="rank")``) sits between the factors and zeroes whole
rank-one components; ``strsparse.slim`` then cuts the factors to the surviving rank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from strsparse.errors import OptionError

__all__ = ["LowRankLinear"]


class LowRankLinear(nn.Module):
    """``y = x W^T`` with W = weight1 @ weight2 of rank at most ``rank``, no bias.

    weight1: (out_features, rank), weight2: (rank, in_features). Computed as two thin
    products, so the cost is rank * (in + out) per input row instead of in * out.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, *, init_std: float | None = None
    ) -> None:
        super().__init__()
        for value, name in ((in_features, "in_features"), (out_features, "out_features")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise OptionError(f"rank must be an integer >= 1, got {rank!r}")
        self.in_features = in_features
        self.out_features = out_features
        # the product of two N(0, std^2) factors has entries of variance rank * std^4:
        # choose std so that W's entries have the scale of a Kaiming-uniform Linear's
        std = init_std if init_std is not None else (1.0 / (3.0 * in_features * rank)) ** 0.25
        self.weight1 = nn.Parameter(torch.randn(out_features, rank) * std)  # (out, r)
        self.weight2 = nn.Parameter(torch.randn(rank, in_features) * std)  # (r, in)

    @property
    def rank(self) -> int:
        """The number of rank-one components stored (zeroed ones included)."""
        return int(self.weight2.shape[0])

    @property
    def weight(self) -> Tensor:
        """The effective (out, in) matrix W1 W2 (with any parametrization applied)."""
        return self.weight1 @ self.weight2

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.weight2), self.weight1)  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
