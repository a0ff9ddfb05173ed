"""Structured STR: one learnable importance value per filter or per rank-one component.

The STR paper induces low rank in FastGRNN by soft-thresholding a vector along the rank
dimension (Section 4.2, g = exp) and proposes the same for channel pruning: one importance
scalar m_i per output filter, effective output S_g(m, s)_i times filter i, STR applied to the
layer's vector m (Appendix A.5.2). A zeroed entry removes a whole rank-one component or a
whole filter, which ``strsparse.slim`` then cuts out of the model.

``sparsify(model, "str", structure="rank")`` attaches ``StructuredSoftThreshold`` to
``weight2`` (r, in) of every ``LowRankLinear``: W = W1 diag(S_g(m, s)) W2.

``sparsify(model, "str", structure="filter")`` gives every conv and Linear one importance
vector m (init 1) over its output filters. Where the scalar sits is what makes slimming exact:

- a conv (or Linear) whose only consumer is an affine BatchNorm: the BatchNorm's weight and
  bias are scaled by S (its output channel i is S_i * BN(conv)_i, exactly zero when S_i = 0
  whatever the input, so it can be removed with everything that only feeds it), and the conv's
  filter is masked by 1{S_i != 0} so that the zero is visible in the weights. Scaling the conv
  instead would be undone by the BatchNorm's batch statistics in training (BN is invariant to
  a channel's scale), and a zero conv filter followed by BN gives the constant
  beta - gamma * mu / sigma, not zero;
- any other conv or Linear: its weight and bias are scaled by S (output i is S_i * (W_i x + b_i)).

The classifier (a layer whose output reaches the model's output without another conv or Linear
in between) is left out unless ``include`` names it: its outputs are the classes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from strsparse.errors import OptionError
from strsparse.functional import THRESHOLD_FUNCTIONS, soft_threshold, threshold_to_s
from strsparse.layers import LowRankLinear
from strsparse.methods.base import LayerWeight, SparsityMethod, threshold_parameter

__all__ = [
    "GateFollower",
    "StructuredSoftThreshold",
    "TraceFailure",
    "attach_structured",
    "default_exclusions",
    "has_channel_rule",
    "output_layers",
    "structure_report",
    "structured_candidates",
    "trace",
]

logger = logging.getLogger(__name__)


class StructuredSoftThreshold(SparsityMethod):
    """STR on an importance vector m (one entry per output filter or rank-one component).

    ``scale()`` = S_g(m, s) = sign(m) * relu(|m| - k * g(s)), shape (n,). As a parametrization
    it multiplies the tensor's dim-0 slices by ``scale()`` (mode ``"scale"``), or only by
    1{scale != 0} (mode ``"mask"``: the scale itself is applied after the BatchNorm that
    follows, through ``GateFollower``).
    """

    name = "str"

    def __init__(
        self,
        size: int,
        *,
        g: str,
        k: float,
        init_threshold: float,
        granularity: str,
        mode: str = "scale",
        shared_s: nn.Parameter | None = None,
        like: Tensor | None = None,
    ) -> None:
        """``like``: the gated weight, whose device and dtype ``m`` and ``s`` take."""
        super().__init__()
        if mode not in ("scale", "mask"):
            raise OptionError(f"mode must be 'scale' or 'mask', got {mode!r}")
        self.g_name = g
        self.k = float(k)
        self.granularity = granularity
        self.mode = mode
        self.m = threshold_parameter((size,), 1.0, like)  # (n,): each filter's / component's
        if shared_s is None:
            shape = (size,) if granularity == "channel" else ()
            shared_s = threshold_parameter(shape, init_threshold, like)
        self.s = shared_s

    def threshold_tensor(self) -> Tensor:
        return self.k * THRESHOLD_FUNCTIONS[self.g_name](self.s)

    def scale(self) -> Tensor:
        """S_g(m, s): the effective importance of each filter / component, (n,)."""
        return soft_threshold(self.m, self.threshold_tensor().to(self.m.dtype))

    def forward(self, weight: Tensor) -> Tensor:
        scale = self.scale()
        if self.mode == "mask":
            scale = (scale != 0).to(weight.dtype)  # no gradient: the scale acts after BN
        return weight * scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))

    def threshold(self) -> float:
        with torch.no_grad():
            return float(self.threshold_tensor().mean())

    def learnable_thresholds(self) -> list[nn.Parameter]:
        """What the threshold weight decay acts on: the importance vector m and s (the
        paper applies the same lambda to both, Appendix A.5.2 and A.6)."""
        return [self.m, self.s]

    def thresholded(self, weight: Tensor) -> Tensor:
        """The importance vector m: a target counts its entries above the threshold."""
        return self.m

    @torch.no_grad()
    def alive(self) -> int:
        """How many filters / components are nonzero."""
        return int(torch.count_nonzero(self.scale()))

    def extra_repr(self) -> str:
        return (
            f"size={self.m.numel()}, mode={self.mode!r}, granularity={self.granularity!r}, "
            f"g={self.g_name!r}, k={self.k}"
        )


class GateFollower(nn.Module):
    """Parametrization scaling a (C,) tensor (a bias, a BatchNorm weight or bias) by the
    ``scale()`` of a ``StructuredSoftThreshold`` that lives on another tensor.

    The gate is referenced, not registered, so its state is saved once, with its own layer.
    """

    gate: StructuredSoftThreshold

    def __init__(self, gate: StructuredSoftThreshold) -> None:
        super().__init__()
        object.__setattr__(self, "gate", gate)  # not a submodule: no duplicate state_dict keys

    def forward(self, value: Tensor) -> Tensor:
        return value * self.gate.scale().to(value.dtype)


def _weight(module: nn.Module) -> Tensor:
    weight: Tensor = getattr(module, "weight")  # noqa: B009  (typed: nn.Module's is not)
    return weight


def _is_filter_layer(module: nn.Module) -> bool:
    if isinstance(module, _ConvTransposeNd):
        return False  # output channels sit in dim 1 of the weight
    return isinstance(module, (_ConvNd, nn.Linear))


def structured_candidates(model: nn.Module, structure: str) -> dict[str, LayerWeight]:
    """Layers ``structure`` applies to: every ``LowRankLinear``'s factor ``weight2`` for
    ``"rank"`` (named ``"<module>.weight2"``), every conv (not transposed) and Linear weight
    for ``"filter"`` (named after the module)."""
    if structure == "rank":
        return {
            f"{n}.weight2" if n else "weight2": LayerWeight(m, "weight2")
            for n, m in model.named_modules()
            if isinstance(m, LowRankLinear)
        }
    return {n: LayerWeight(m) for n, m in model.named_modules() if _is_filter_layer(m)}


def has_channel_rule(module: nn.Module) -> bool:
    """Whether ``module`` declares how it maps channels (``channel_sources`` and ``slimmed``,
    as the CIFAR ResNets' option-A shortcut does): tracing keeps it whole."""
    return callable(getattr(module, "channel_sources", None)) and callable(
        getattr(module, "slimmed", None)
    )


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps modules with a channel rule (``has_channel_rule``) as leaves
    and remembers which module it was inside, so that a trace failure can name the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None  # the innermost module a trace failure came from

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return has_channel_rule(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


class TraceFailure(RuntimeError):
    """``torch.fx`` could not trace a model; ``layer`` is the module it was inside."""

    def __init__(self, layer: str, cause: BaseException) -> None:
        where = f"layer {layer!r}" if layer else "the model's own forward"
        super().__init__(
            f"torch.fx cannot trace {where}: {type(cause).__name__}: {cause}. Its forward "
            "uses Python control flow or tensor values that a symbolic trace cannot follow"
        )
        self.layer = layer


def trace(model: nn.Module) -> fx.Graph:
    """The ``torch.fx`` graph of ``model``; a failure raises ``TraceFailure`` naming the
    innermost module being traced."""
    tracer = _Tracer()
    try:
        return tracer.trace(model)
    except Exception as exc:
        raise TraceFailure(tracer.failed_in or "", exc) from exc


_WEIGHT_LAYERS = (_ConvNd, nn.Linear, LowRankLinear)


def _module_of(node: fx.Node, modules: Mapping[str, nn.Module]) -> nn.Module | None:
    return modules.get(str(node.target)) if node.op == "call_module" else None


def output_layers(model: nn.Module, graph: fx.Graph) -> set[str]:
    """Weight layers whose output reaches the model's output with no other weight layer in
    between (the classifier)."""
    modules = dict(model.named_modules())
    found: set[str] = set()
    for node in graph.nodes:
        module = _module_of(node, modules)
        if not isinstance(module, _WEIGHT_LAYERS):
            continue
        todo, seen = list(node.users), set()
        while todo:
            user = todo.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                found.add(str(node.target))
                break
            if not isinstance(_module_of(user, modules), _WEIGHT_LAYERS):
                todo.extend(user.users)
    return found


def default_exclusions(model: nn.Module, structure: str) -> set[str]:
    """Layers ``structure`` leaves out unless ``include`` names them: for ``"filter"`` the
    layers whose outputs are the model's outputs (the classes)."""
    if structure != "filter":
        return set()
    try:
        return output_layers(model, trace(model))
    except TraceFailure:
        return set()  # attach_structured warns about the trace


def _batchnorm_after(model: nn.Module, graph: fx.Graph) -> dict[str, str]:
    """layer name -> name of the affine BatchNorm that is its output's only consumer."""
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            uses[str(node.target)] = uses.get(str(node.target), 0) + 1
    for node in graph.nodes:
        module = _module_of(node, modules)
        if module is None or not _is_filter_layer(module):
            continue
        users = list(node.users)
        if len(users) != 1:
            continue
        bn = _module_of(users[0], modules)
        if (
            isinstance(bn, _BatchNorm)
            and bn.affine
            and bn.num_features == _weight(module).shape[0]
            and uses.get(str(users[0].target)) == 1
            and uses.get(str(node.target)) == 1
        ):
            pairs[str(node.target)] = str(users[0].target)
    return pairs


# With a target and no init_threshold, every gate's threshold starts at this fraction of the
# importance values' start (1): all filters alive, and the threshold close enough that the
# target's drift (at most half a unit of log t a step) reaches them in a few steps.
TARGET_START = 0.01


def _initial_s(options: Any) -> float:
    if options.init_threshold is None:  # a target (STR's options set -3200 otherwise)
        return threshold_to_s(TARGET_START / options.k, options.g)
    return float(options.init_threshold)


def _make_gate(
    size: int, options: Any, mode: str, shared: nn.Parameter | None, like: Tensor
) -> StructuredSoftThreshold:
    return StructuredSoftThreshold(
        size,
        g=options.g,
        k=options.k,
        init_threshold=_initial_s(options),
        granularity=options.granularity,
        mode=mode,
        shared_s=shared,
        like=like,
    )


def attach_structured(
    model: nn.Module, layers: Mapping[str, LayerWeight], options: Any
) -> dict[str, StructuredSoftThreshold]:
    """Attach one ``StructuredSoftThreshold`` per layer for ``options.structure``
    (``"filter"`` or ``"rank"``), with the followers that place the scale; returns
    layer name -> gate."""
    shared = None
    if options.granularity == "global" and layers:
        like = next(iter(layers.values())).weight
        shared = threshold_parameter((), _initial_s(options), like)
    gates: dict[str, StructuredSoftThreshold] = {}
    if options.structure == "rank":
        for name, layer in layers.items():
            assert isinstance(layer.module, LowRankLinear)  # what structure_candidates found
            gate = _make_gate(layer.module.rank, options, "scale", shared, layer.weight)
            parametrize.register_parametrization(layer.module, "weight2", gate)  # diag(S) W2
            gates[name] = gate
        return gates
    try:
        bn_after = _batchnorm_after(model, trace(model))
    except TraceFailure as exc:
        warnings.warn(
            f"structure='filter': {exc}; every filter is scaled at its own layer, so a "
            "BatchNorm after a conv undoes the scale in training. Make the forward traceable.",
            UserWarning,
            stacklevel=3,
        )
        bn_after = {}
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        module = layer.module
        bn_name = bn_after.get(name)
        size = _weight(module).shape[0]
        gate = _make_gate(size, options, "mask" if bn_name else "scale", shared, _weight(module))
        parametrize.register_parametrization(module, "weight", gate)
        if bn_name is not None:
            bn = modules[bn_name]
            parametrize.register_parametrization(bn, "weight", GateFollower(gate))
            parametrize.register_parametrization(bn, "bias", GateFollower(gate))
        elif getattr(module, "bias", None) is not None:
            parametrize.register_parametrization(module, "bias", GateFollower(gate))
        gates[name] = gate
    return gates


def structure_report(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every structured layer of ``model``: name -> (alive, total) filters or rank-one
    components (for ``LowRankLinear``: its current rank and its stored rank)."""
    report: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        plist = getattr(module, "parametrizations", None)
        if plist is None:
            continue
        for tensor_name in ("weight", "weight2"):
            if tensor_name not in plist:
                continue
            for p in plist[tensor_name]:
                if isinstance(p, StructuredSoftThreshold):
                    report[name] = (p.alive(), p.m.numel())
    return report
