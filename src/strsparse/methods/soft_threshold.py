"""STR: Soft Threshold weight Reparameterization (Kusupati et al., ICML 2020).

W_hat = sign(W) * relu(|W| - k * g(s)) with a learnable ``s``: an ordinary ``nn.Parameter``,
so plain weight decay reaches it (the paper's eq. 6) and each layer learns its own budget.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from strsparse.errors import did_you_mean
from strsparse.functional import THRESHOLD_FUNCTIONS, resolve_threshold_function, soft_threshold
from strsparse.methods.base import LayerWeight, SparsityMethod, register_method

__all__ = ["InitThresholdWarning", "SoftThreshold", "SoftThresholdOptions"]

logger = logging.getLogger(__name__)

GRANULARITIES = ("layer", "channel", "weight", "global")
# "weight": unstructured (a threshold on every weight); "filter" and "rank" are built by
# strsparse.methods.structured
STRUCTURES = ("weight", "filter", "rank")

# A layer whose initial threshold already zeroes this fraction of its weights gets a warning:
# such a layer may be all zeros from the first step and never learn.
_INIT_PRUNED_WARNING = 0.1


class InitThresholdWarning(UserWarning):
    """The initial STR threshold already zeroes many weights of a freshly built layer.

    Meaningless when trained weights are loaded right after ``sparsify`` (a restore or a
    resume), which filter it out.
    """


@dataclass(frozen=True)
class SoftThresholdOptions:
    """Options of ``sparsify(model, "str", ...)``.

    granularity: one ``s`` per layer (the paper's default), per output channel, per weight,
        or one ``s`` shared by all sparsified layers ('global', Appendix A.5.1).
    g: threshold function, 'sigmoid' (CNNs) or 'exp' (low-rank RNNs); threshold = k * g(s).
    init_threshold: the paper's s_init (-3200 for ResNet-50, -12800 for MobileNetV1): very
        negative values keep every weight dense until weight decay has moved ``s``.
    structure: 'weight' (unstructured, the default), 'filter' (one importance value per
        output filter of every conv and Linear) or 'rank' (one per rank-one component of every
        ``LowRankLinear``); see ``strsparse.methods.structured``. ``g`` defaults to 'exp' for
        'rank' (the paper's choice for low-rank RNNs) and to 'sigmoid' otherwise.
    """

    granularity: str = "layer"
    g: str | None = None
    k: float = 1.0
    init_threshold: float = -3200.0
    structure: str = "weight"

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(
                f"unknown structure {self.structure!r}{did_you_mean(self.structure, STRUCTURES)}; "
                f"valid: {', '.join(STRUCTURES)}"
            )
        if self.g is None:
            object.__setattr__(self, "g", "exp" if self.structure == "rank" else "sigmoid")
        if self.structure != "weight" and self.granularity == "weight":
            raise ValueError(
                f"granularity='weight' has no meaning for structure={self.structure!r} (one "
                "importance value per filter or component); use 'layer', 'channel' (one "
                "threshold per filter or component) or 'global'"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {self.granularity!r}"
                f"{did_you_mean(self.granularity, GRANULARITIES)}; "
                f"valid: {', '.join(GRANULARITIES)}"
            )
        resolve_threshold_function(self.g)
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or self.k <= 0:
            raise ValueError(f"k={self.k!r} must be a positive number")
        if isinstance(self.init_threshold, bool) or not isinstance(
            self.init_threshold, (int, float)
        ):
            raise ValueError(f"init_threshold={self.init_threshold!r} must be a number")


def _threshold_shape(weight_shape: torch.Size, granularity: str, axis: int = 0) -> tuple[int, ...]:
    if granularity == "channel":  # (C_out, 1, 1, ...), or (1, C_out, 1, ...) for axis 1
        return tuple(n if d == axis else 1 for d, n in enumerate(weight_shape))
    if granularity == "weight":
        return tuple(weight_shape)
    return ()


@register_method
class SoftThreshold(SparsityMethod):
    """STR's parametrization: soft-thresholds the raw weight by the learnable k * g(s)."""

    name = "str"
    Options = SoftThresholdOptions

    def __init__(
        self,
        weight_shape: torch.Size,
        options: SoftThresholdOptions,
        shared_s: nn.Parameter | None = None,
        axis: int = 0,
    ) -> None:
        """``axis``: the weight's output-channel axis (``granularity="channel"``)."""
        super().__init__()
        self.granularity = options.granularity
        self.g_name = options.g
        self.k = float(options.k)
        if shared_s is None:
            shape = _threshold_shape(weight_shape, options.granularity, axis)
            shared_s = nn.Parameter(torch.full(shape, float(options.init_threshold)))
        self.s = shared_s

    def threshold_tensor(self) -> Tensor:
        """k * g(s), broadcastable against the weight."""
        return self.k * THRESHOLD_FUNCTIONS[self.g_name](self.s)

    def forward(self, weight: Tensor) -> Tensor:
        return soft_threshold(weight, self.threshold_tensor().to(weight.dtype))

    def threshold(self) -> float:
        with torch.no_grad():
            return float(self.threshold_tensor().mean())

    def extra_repr(self) -> str:
        return f"granularity={self.granularity!r}, g={self.g_name!r}, k={self.k}"

    @classmethod
    def create(
        cls, layers: Mapping[str, LayerWeight], options: SoftThresholdOptions
    ) -> dict[str, SparsityMethod]:
        shared = None
        if options.granularity == "global":
            shared = nn.Parameter(torch.tensor(float(options.init_threshold)))
        parametrizations: dict[str, SparsityMethod] = {}
        for name, layer in layers.items():
            p = cls(layer.weight.shape, options, shared, layer.output_axis)
            _warn_if_pruned_at_init(name, layer.weight, p)
            parametrizations[name] = p
        return parametrizations


@torch.no_grad()
def _warn_if_pruned_at_init(name: str, weight: Tensor, p: SoftThreshold) -> None:
    threshold = p.threshold_tensor().to(weight.device)
    pruned = float((weight.abs() <= threshold).float().mean())
    if pruned >= _INIT_PRUNED_WARNING:
        warnings.warn(
            f"STR layer {name!r}: the initial threshold k*g(init_threshold) = "
            f"{float(threshold.mean()):.3g} already zeroes {pruned:.0%} of its weights "
            f"(mean |w| = {float(weight.abs().mean()):.3g}); such a layer may never learn. "
            "Use a more negative init_threshold (the paper uses -3200 for ResNet-50).",
            InitThresholdWarning,
            stacklevel=5,  # user -> sparsify -> create -> no_grad wrapper -> here
        )
