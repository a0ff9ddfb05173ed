"""Small stand-ins for third-party layers the tests cannot install."""

from __future__ import annotations

import torch
from torch import nn


class Conv1D(nn.Module):
    """Hugging Face GPT-2's projection layer: weight stored in x out, ``x @ W + b``."""

    def __init__(self, nf: int, nx: int) -> None:  # (out features, in features), as HF's
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)  # (in, out)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias
