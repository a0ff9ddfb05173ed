"""STR: Soft Threshold weight Reparameterization (Kusupati et al., ICML 2020).

W_hat = sign(W) * relu(|W| - k * g(s)) with a learnable ``s``: an ordinary ``nn.Parameter``,
so plain weight decay reaches it (the paper's eq. 6) and each layer learns its own budget.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from strsparse.errors import OptionError, did_you_mean
from strsparse.functional import (
    THRESHOLD_FUNCTIONS,
    initial_threshold,
    resolve_threshold_function,
    str_weights,
    threshold_to_s,
)
from strsparse.methods.base import (
    LayerWeight,
    SparsityMethod,
    check_fraction,
    check_schedule_options,
    parametrization_chain,
    register_method,
    threshold_parameter,
)

__all__ = ["InitThresholdWarning", "SoftThreshold", "SoftThresholdOptions"]

logger = logging.getLogger(__name__)

# init_threshold="auto": each layer's s_init from its own weights
AUTO = "auto"

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
        negative values keep every weight dense until weight decay has moved ``s``. None:
        -3200 without a target; with a target, each layer's s starts where k * g(s) is its
        1% magnitude quantile (the smallest over layers for a global ``s``), or with
        structure='filter' or 'rank' where it is 1% of the importance values' start (1).
        'auto' does the same (unstructured) without a target: the start for fine-tuning a
        pretrained model, whose weights' scale a fixed s_init cannot know (-3200 stays dense
        in any short run; -4 already zeroes most of some pretrained layers).
    structure: 'weight' (unstructured, the default), 'filter' (one importance value per
        output filter of every conv and Linear) or 'rank' (one per rank-one component of every
        ``LowRankLinear``); see ``strsparse.methods.structured``. ``g`` defaults to 'exp' for
        'rank' (the paper's choice for low-rank RNNs) and for a ``flops`` target (a sigmoid
        threshold never exceeds k, and the weights of a convolution followed by BatchNorm grow
        past it) or a target with structure='filter' (the importance values of the filters
        that matter grow past k = 1), and to 'sigmoid' otherwise.
    sparsity: a target: training ends at this fraction of zeros over the sparsified weights,
        each layer still learning its own threshold (``strsparse.methods.target``); with
        structure='filter' or 'rank', the fraction of their filters or rank-one components
        removed.
    flops: a target as a fraction of the dense forward FLOPs (``strsparse.flops``) instead;
        needs ``input_shape`` (one sample's, e.g. (3, 32, 32)) unless the model carries an
        ``input_shape`` attribute (the zoo's models do). With structure='filter' or 'rank'
        the FLOPs are those of the model ``strsparse.slim`` makes: a removed filter takes
        the next layer's input channel with it.
    start, end: the target's cubic schedule, as an optimizer step (int) or a fraction of
        training (float); the target is held from ``end`` on.
    """

    granularity: str = "layer"
    g: str | None = None
    k: float = 1.0
    init_threshold: float | str | None = None
    structure: str = "weight"
    sparsity: float | None = None
    flops: float | None = None
    start: int | float = 0.0
    end: int | float = 0.7
    input_shape: tuple[int, ...] | None = None

    @property
    def g_name(self) -> str:
        """``g`` once resolved (the default follows ``structure``)."""
        if self.g is not None:
            return self.g
        exp = self.structure == "rank" or self.flops is not None
        return "exp" if exp or (self.structure == "filter" and self.has_target) else "sigmoid"

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise OptionError(
                f"unknown structure {self.structure!r}{did_you_mean(self.structure, STRUCTURES)}; "
                f"valid: {', '.join(STRUCTURES)}"
            )
        if self.g is None:
            object.__setattr__(self, "g", self.g_name)
        if self.structure != "weight" and self.granularity == "weight":
            raise OptionError(
                f"granularity='weight' has no meaning for structure={self.structure!r} (one "
                "importance value per filter or component); use 'layer', 'channel' (one "
                "threshold per filter or component) or 'global'"
            )
        if self.granularity not in GRANULARITIES:
            raise OptionError(
                f"unknown granularity {self.granularity!r}"
                f"{did_you_mean(self.granularity, GRANULARITIES)}; "
                f"valid: {', '.join(GRANULARITIES)}"
            )
        resolve_threshold_function(self.g_name)
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or self.k <= 0:
            raise OptionError(f"k={self.k!r} must be a positive number")
        if self.init_threshold not in (None, AUTO) and (
            isinstance(self.init_threshold, bool)
            or not isinstance(self.init_threshold, (int, float))
        ):
            raise OptionError(
                f"init_threshold={self.init_threshold!r} must be a number (s_init, e.g. -3200) "
                f"or {AUTO!r} (from each layer's weights)"
            )
        _check_target(self)
        if self.init_threshold is None and not self.has_target:
            object.__setattr__(self, "init_threshold", -3200.0)  # the paper's s_init
        if self.init_threshold == AUTO and self.structure != "weight":
            raise OptionError(
                f"init_threshold='auto' works with structure='weight'; give structure="
                f"{self.structure!r} a number, e.g. init_threshold=-3200"
            )

    @property
    def has_target(self) -> bool:
        return self.sparsity is not None or self.flops is not None


def _check_target(options: SoftThresholdOptions) -> None:
    """Validate the target options of STR (``sparsity``, ``flops``, ``start``, ``end``)."""
    sparsity = getattr(options, "sparsity", None)
    flops = getattr(options, "flops", None)
    if sparsity is not None and flops is not None:
        raise OptionError(
            f"STR got both sparsity={sparsity!r} and flops={flops!r}; give one target (in a "
            "config, set the other to null: sparsity.options.sparsity=null)"
        )
    if sparsity is not None:
        check_fraction(sparsity, "sparsity")
    if flops is not None and (
        isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 < flops <= 1
    ):
        raise OptionError(
            f"flops={flops!r} must be a fraction of the dense FLOPs in (0, 1], e.g. 0.05"
        )
    if flops is not None and getattr(options, "granularity", "layer") == "global":
        raise OptionError(
            f"flops={flops!r} needs a threshold per layer: with granularity='global' one "
            "threshold cannot keep a cheap layer from emptying while it prunes the costly "
            "ones; use granularity='layer', 'channel' or 'weight' (or sparsity= with 'global')"
        )
    check_schedule_options(getattr(options, "start", 0.0), getattr(options, "end", 1.0))


def _threshold_shape(weight_shape: torch.Size, granularity: str, axis: int = 0) -> tuple[int, ...]:
    if granularity == "channel":  # (C_out, 1, 1, ...), or (1, C_out, 1, ...) for axis 1
        return tuple(n if d == axis else 1 for d, n in enumerate(weight_shape))
    if granularity == "weight":
        return tuple(weight_shape)
    return ()


class _BatchedWeight:
    """One layer's effective weight computed ahead by ``_LayerBatch``, with what it was
    computed from: it is used only while all of that still holds."""

    __slots__ = ("grad_enabled", "out", "s_version", "weight", "weight_version")

    def __init__(self) -> None:
        self.out: Tensor | None = None
        self.weight: Tensor | None = None
        self.weight_version = self.s_version = -1
        self.grad_enabled = False

    def get(self, weight: Tensor, s: Tensor) -> Tensor | None:
        if (
            self.out is not None
            and self.weight is weight
            and self.weight_version == weight._version
            and self.s_version == s._version
            and self.grad_enabled == torch.is_grad_enabled()
        ):
            return self.out
        return None

    def clear(self) -> None:
        self.out = self.weight = None


@register_method
class SoftThreshold(SparsityMethod):
    """STR's parametrization: soft-thresholds the raw weight by the learnable k * g(s).

    Inside a forward of the model given to ``sparsify`` the weights of all its STR layers
    are computed together, in one autograd node (see ``_LayerBatch``); anywhere else (a
    sub-module called alone, ``module.weight`` read directly, ``torch.compile``) each layer
    computes its own, with the same values and gradients.
    """

    name = "str"
    Options = SoftThresholdOptions
    supports_target = True

    def __init__(
        self,
        weight_shape: torch.Size,
        options: SoftThresholdOptions,
        shared_s: nn.Parameter | None = None,
        axis: int = 0,
        *,
        like: Tensor | None = None,
    ) -> None:
        """``axis``: the weight's output-channel axis (``granularity="channel"``); ``like``:
        the weight, whose device and dtype ``s`` takes."""
        super().__init__()
        self.granularity = options.granularity
        self.g_name = options.g_name
        self.k = float(options.k)
        if shared_s is None:
            shape = _threshold_shape(weight_shape, options.granularity, axis)
            init = options.init_threshold
            init = init if isinstance(init, (int, float)) else -3200.0  # create() sets auto ones
            shared_s = threshold_parameter(shape, init, like)
        self.s = shared_s
        self._batched = _BatchedWeight()
        self._batch: _LayerBatch | None = None

    def threshold_tensor(self) -> Tensor:
        """k * g(s), broadcastable against the weight."""
        return self.k * THRESHOLD_FUNCTIONS[self.g_name](self.s)

    def forward(self, weight: Tensor) -> Tensor:
        out = self._batched.get(weight, self.s)
        if out is not None:
            return out
        return str_weights([weight], [self.s], k=self.k, g=self.g_name)[0]

    def threshold(self) -> float:
        with torch.no_grad():
            return float(self.threshold_tensor().mean())

    def learnable_thresholds(self) -> list[nn.Parameter]:
        return [self.s]

    def release(self) -> None:
        if self._batch is not None:
            self._batch.discard(self)
        self._batch = None

    def extra_repr(self) -> str:
        return f"granularity={self.granularity!r}, g={self.g_name!r}, k={self.k}"

    @classmethod
    def create(
        cls, layers: Mapping[str, LayerWeight], options: SoftThresholdOptions
    ) -> dict[str, SparsityMethod]:
        init = _initial_s(layers, options)
        shared = None
        if options.granularity == "global":
            first = next(iter(layers.values()), None)
            like = first.weight if first is not None else None
            shared = threshold_parameter((), min(init.values()), like)
        parametrizations: dict[str, SparsityMethod] = {}
        for name, layer in layers.items():
            p = cls(layer.weight.shape, options, shared, layer.output_axis, like=layer.weight)
            if shared is None:
                p.s.data.fill_(init[name])
            _warn_if_pruned_at_init(name, layer.weight, p)
            parametrizations[name] = p
        return parametrizations

    @classmethod
    def attach(cls, model: nn.Module, layers: Mapping[str, LayerWeight]) -> None:
        members = []
        for layer in layers.values():
            chain = parametrization_chain(layer.module, layer.tensor)
            # only a parametrization that sees the raw weight itself can be computed ahead;
            # tied users share it and its raw weight, so one member serves them all
            if isinstance(chain[0], cls) and chain[0]._batch is None:
                members.append((chain, chain[0]))
        if members:
            batch = _LayerBatch(model, members)
            for _, p in members:
                p._batch = batch


class _LayerBatch:
    """Computes the effective weights of all STR layers of a model in one call per forward.

    A forward pre-hook on the model hands every layer its weight, computed by one
    ``str_weights`` call (one autograd node instead of one per layer, one g(s) per distinct
    ``s``); each layer's parametrization returns it when it is asked for the weight it was
    computed from (same tensor, unchanged since, same grad mode), else computes its own. A
    forward hook drops the weights when the forward ends, even on an error, so nothing
    outlives the step. Skipped while tracing or compiling and inside
    ``parametrize.cached()``, which caches per layer itself.
    """

    def __init__(
        self,
        root: nn.Module,
        members: list[tuple[parametrize.ParametrizationList, SoftThreshold]],
    ) -> None:
        self.members = members  # (the layer's ParametrizationList, its SoftThreshold)
        self.k, self.g = members[0][1].k, members[0][1].g_name
        self._hooks = [
            root.register_forward_pre_hook(self.before_forward),
            root.register_forward_hook(self.after_forward, always_call=True),
        ]

    def before_forward(self, module: nn.Module, args: Any) -> None:
        if (
            torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
            or parametrize._cache_enabled
        ):
            return
        weights: list[Tensor] = []
        s: list[Tensor] = []
        s_index: list[int] = []
        position: dict[int, int] = {}
        for chain, p in self.members:
            weights.append(chain.original)
            s_param = p.s
            j = position.setdefault(id(s_param), len(s))
            if j == len(s):
                s.append(s_param)
            s_index.append(j)
        outs = str_weights(weights, s, k=self.k, g=self.g, s_index=s_index)
        grad_enabled = torch.is_grad_enabled()
        for (_, p), weight, j, out in zip(self.members, weights, s_index, outs, strict=True):
            cache = p._batched
            cache.out, cache.weight, cache.grad_enabled = out, weight, grad_enabled
            cache.weight_version, cache.s_version = weight._version, s[j]._version

    def after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        for _, p in self.members:
            p._batched.clear()

    def discard(self, p: SoftThreshold) -> None:
        """Stop computing ``p``'s layer; with no layer left, remove the hooks."""
        p._batched.clear()
        self.members = [(chain, q) for chain, q in self.members if q is not p]
        if not self.members:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []


def _initial_s(
    layers: Mapping[str, LayerWeight], options: SoftThresholdOptions
) -> dict[str, float]:
    """Each layer's s_init: the option, or ('auto', or a target and no option) the s whose
    threshold is the layer's 1% magnitude quantile."""
    auto = options.init_threshold == AUTO or (options.init_threshold is None and options.has_target)
    if not auto:
        init = -3200.0 if options.init_threshold is None else float(options.init_threshold)
        return dict.fromkeys(layers, init)
    return {
        name: threshold_to_s(initial_threshold(module.weight) / options.k, options.g_name)
        for name, module in layers.items()
    }


@torch.no_grad()
def _warn_if_pruned_at_init(name: str, weight: Tensor, p: SoftThreshold) -> None:
    if weight.is_meta:  # no values yet (a model built on the meta device)
        return
    threshold = p.threshold_tensor().to(weight.device)
    pruned = float((weight.abs() <= threshold).float().mean())
    if pruned >= _INIT_PRUNED_WARNING:
        warnings.warn(
            f"STR layer {name!r}: the initial threshold k*g(init_threshold) = "
            f"{float(threshold.mean()):.3g} already zeroes {pruned:.0%} of its weights "
            f"(mean |w| = {float(weight.abs().mean()):.3g}); such a layer may never learn. "
            "Use a more negative init_threshold (the paper uses -3200 for ResNet-50), or "
            "init_threshold='auto' to start from each layer's weights (fine-tuning).",
            InitThresholdWarning,
            stacklevel=5,  # user -> sparsify -> create -> no_grad wrapper -> here
        )
