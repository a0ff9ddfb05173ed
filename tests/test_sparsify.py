"""strsparse.sparsify: targets chosen by include/exclude patterns."""

from __future__ import annotations

import pytest
from torch import nn

import strsparse


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_include_or_exclude_matching_nothing() -> None:
    with pytest.raises(ValueError, match="include pattern 'fc' matches no"):
        strsparse.sparsify(_model(), "gmp", include=["fc"], sparsity=0.5)
    with pytest.raises(ValueError, match="exclude pattern 'layer1.*' matches no"):
        strsparse.sparsify(_model(), "magnitude", exclude=["layer1.*"], sparsity=0.5)
