"""``to_sparse``: a finalized model rewritten to run its Linear and Conv2d layers sparse.

The model is traced with ``torch.fx`` and its graph rewritten:

- every ``nn.Conv2d`` becomes a ``SparseConv2d`` working on channel-major activations
  ``(C, N, H, W)``; a BatchNorm right after it is folded into its weights and bias, and a
  following residual add and ReLU / ReLU6 are fused into its epilogue;
- every ``nn.Linear`` becomes a ``SparseLinear`` (a following ReLU fused);
- activations stay channel-major through ops that do not care about the layout (pooling,
  element-wise activations, adds of two channel-major tensors) and are transposed back to
  the standard layout wherever anything else reads them.

Per-layer rule: a layer is kept dense (PyTorch's kernel) when its density is above
``max_density`` — at such densities the sparse kernel is not faster (see the benchmark
sweep in ``benchmarks/sparse_inference.py``); a 0%-sparse layer is always dense.

A model that ``torch.fx`` cannot trace gets its Linear and Conv2d modules swapped in place
(no folding or fusion).

Transformer layers come first: Hugging Face's ``Conv1D`` becomes the ``nn.Linear`` it is
transposed, and PyTorch's ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``, which
read their weights directly, are rebuilt from separate projection layers
(``attention.py``) where one of those runs sparse.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from strsparse.errors import OptionError
from strsparse.inference._native import backend
from strsparse.inference.attention import (
    SparseMultiheadAttention,
    SparseTransformerEncoderLayer,
    attention_projections,
    conv1d_as_linear,
    is_hf_projection,
    supported_attention,
)
from strsparse.inference.layers import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_MODULES,
    SparseConv2d,
    SparseLinear,
    channel_major_max_pool2d,
    global_avg_pool2d,
)
from strsparse.inference.replay import Replayer
from strsparse.inference.slices import map_slices

__all__ = ["DEFAULT_MAX_DENSITY", "SparseModel", "SparsePlan", "to_sparse"]

logger = logging.getLogger(__name__)

# Densities above which a layer stays dense, from benchmarks/sparse_inference.py (single
# layers swept over sparsity, batch 1 and 8, one thread): the sparse kernel stops beating
# PyTorch's dense one at about 30% density for Linear layers and k x k convs and 50% for 1x1
# convs; the limits leave a margin. Depthwise convs (9 weights a channel) always run the
# kernel, which avoids PyTorch's transposes between layouts. A "stem" conv (a large kernel on
# the few channels of an image, such as ResNet's 7x7 on RGB) gives PyTorch little to work with
# and the kernel a small input: ResNet-50's 3->64 7x7 at 224x224 broke even at 40% density
# (batch 1) and was 1.2-1.3x faster at 33%, where a 3x3 on RGB was not.
DEFAULT_MAX_DENSITY = {
    "linear": 0.3,
    "pointwise": 0.4,
    "conv": 0.25,
    "depthwise": 1.0,
    "stem": 0.35,
}
_STEM_MAX_CHANNELS = 4
_STEM_MIN_KERNEL = 25  # kernel height x width: 5x5 or more

_RELU_MODULES = (nn.ReLU,)
_ACT_FUNCTIONS = {F.relu: (0.0, math.inf), torch.relu: (0.0, math.inf), F.relu6: (0.0, 6.0)}
_ACT_METHODS = {"relu": (0.0, math.inf), "relu_": (0.0, math.inf)}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)

# ops that act on every element or every (H, W) plane alike: fine on (C, N, H, W) tensors
_LAYOUT_FREE_MODULES = (
    *ELEMENTWISE_MODULES,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_LAYOUT_FREE_FUNCTIONS = {
    *ELEMENTWISE_FUNCTIONS,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.dropout,
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    torch.add,
    torch.mul,
    torch.sub,
}
_LAYOUT_FREE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "mul", "sub", "contiguous"}


def _swap01(x: Tensor) -> Tensor:
    """Standard (N, C, H, W) <-> channel-major (C, N, H, W)."""
    if x.dim() != 4:
        raise OptionError(f"expected a 4-D activation, got shape {tuple(x.shape)}")
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous():
        return backend().swap01(x)
    return x.transpose(0, 1).contiguous()


@dataclass
class SparsePlan:
    """Which layers run sparse: ``{layer name: "sparse" | "dense"}`` (the names of the
    original model's Conv2d / Linear modules)."""

    modes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, str]:
        return dict(self.modes)


@dataclass
class _Chain:
    """A conv / linear node and the nodes fused into it."""

    head: fx.Node
    tail: fx.Node
    bn: nn.Module | None = None
    residual: fx.Node | None = None
    clamp: tuple[float, float] = (-math.inf, math.inf)
    nodes: list[fx.Node] = field(default_factory=list)


def _finalized_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its parametrizations baked in (``finalize`` on a copy).

    ``remove_parametrizations`` edits the parametrized class, which a deep copy shares with
    the original, so the copy's modules are put back on their plain class by hand.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        names = list(cast(nn.ModuleDict, module.parametrizations).keys())
        values = {name: getattr(module, name).detach().clone() for name in names}
        module.__class__ = type(module).__bases__[0]
        del module._modules["parametrizations"]
        for name, value in values.items():
            module.register_parameter(name, nn.Parameter(value, requires_grad=False))
    return model.eval()


def _convertible_conv(m: nn.Module) -> bool:
    if type(m) is not nn.Conv2d:
        return False
    return (
        m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and m.stride[0] == m.stride[1]
        and m.weight.dtype == torch.float32
    )


def _foldable_bn(m: nn.Module) -> bool:
    return (
        type(m) is nn.BatchNorm2d
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
    )


def _activation(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[float, float] | None:
    if node.op == "call_module":
        m = modules[str(node.target)]
        if type(m) is nn.ReLU:
            return (0.0, math.inf)
        if type(m) is nn.ReLU6:
            return (0.0, 6.0)
        if type(m) is nn.Hardtanh:
            return (float(m.min_val), float(m.max_val))
        return None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target]
    return None


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fold_bn(weight: Tensor, bias: Tensor | None, bn: Any) -> tuple[Tensor, Tensor]:
    """BatchNorm after a conv, folded: ``W' = W * g / sqrt(v + eps)``,
    ``b' = (b - m) * g / sqrt(v + eps) + beta``."""
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -bn.running_mean.float() * scale
    if bias is not None:
        shift = shift + bias.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    w = weight.float() * scale.view(-1, *([1] * (weight.dim() - 1)))
    return w, shift


def _density(weight: Tensor) -> float:
    return float(weight.count_nonzero()) / max(1, weight.numel())


def _choose_mode(kind: str, weight: Tensor, max_density: Mapping[str, float]) -> str:
    if not backend().available:
        return "dense"
    density = _density(weight)
    if density > max_density[kind] or (density >= 1.0 and kind != "depthwise"):
        return "dense"
    return "sparse"


def _max_density(value: float | Mapping[str, float] | None) -> dict[str, float]:
    limits = dict(DEFAULT_MAX_DENSITY)
    if value is None:
        return limits
    if isinstance(value, Mapping):
        unknown = set(value) - set(limits)
        if unknown:
            raise OptionError(
                f"max_density keys {sorted(unknown)} are unknown; use {sorted(limits)}"
            )
        limits.update({k: float(v) for k, v in value.items()})
    else:
        limits = dict.fromkeys(limits, float(value))
    for key, v in limits.items():
        if not 0.0 <= v <= 1.0:
            raise OptionError(f"max_density[{key!r}] must be in [0, 1], got {v}")
    return limits


def _layer_kind(module: Any) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
        return "depthwise"
    if tuple(module.kernel_size) == (1, 1):
        return "pointwise"
    kh, kw = module.kernel_size
    if module.in_channels <= _STEM_MAX_CHANNELS and kh * kw >= _STEM_MIN_KERNEL:
        return "stem"
    return "conv"


def _layer_modes(
    gm: fx.GraphModule, max_density: Mapping[str, float], forced: Mapping[str, str] | None
) -> dict[str, str]:
    """ "sparse" or "dense" for every Linear / Conv2d module called once in the graph (a
    module called from several places is left as it is: each call would fuse other ops)."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = modules[str(node.target)]
            if _convertible_conv(m) or type(m) is nn.Linear:
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    modes: dict[str, str] = {}
    for name, count in calls.items():
        if count != 1:
            continue
        if forced is not None:
            if name not in forced:
                raise OptionError(f"the saved plan has no entry for layer {name!r}")
            modes[name] = forced[name]
        else:
            module = modules[name]
            modes[name] = _choose_mode(_layer_kind(module), module.weight.detach(), max_density)
    return modes


def _build_layer(
    module: Any,  # an nn.Linear or an nn.Conv2d
    chain: _Chain | None,
    mode: str,
    structure_only: bool,
) -> SparseLinear | SparseConv2d:
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    clamp = chain.clamp if chain is not None else (-math.inf, math.inf)
    if chain is not None and chain.bn is not None:
        weight, bias = _fold_bn(weight, bias, chain.bn)
    w = None if structure_only else weight
    if isinstance(module, nn.Linear):
        return SparseLinear(
            module.in_features, module.out_features, w, bias, mode=mode, clamp=clamp
        )
    return SparseConv2d(
        module.in_channels,
        module.out_channels,
        tuple(module.kernel_size),
        module.stride[0],
        tuple(module.padding),
        tuple(module.dilation),
        module.groups,
        w,
        bias,
        mode=mode,
        clamp=clamp,
        channel_major=mode == "sparse",
    )


def _plan_chains(
    gm: fx.GraphModule, modes: Mapping[str, str]
) -> tuple[dict[fx.Node, _Chain], dict[fx.Node, str]]:
    """Fusion chains (by tail node) and the layout of every node: "cm" (channel-major) or
    "std". Sparse convs work channel-major; layers kept dense work in the standard layout."""
    modules = dict(gm.named_modules())
    layout: dict[fx.Node, str] = {}
    open_tails: dict[fx.Node, _Chain] = {}  # tail -> chain that may still grow
    chains: dict[fx.Node, _Chain] = {}

    def grow(chain: _Chain, node: fx.Node) -> None:
        del open_tails[chain.tail]
        chain.nodes.append(node)
        chain.tail = node
        open_tails[node] = chain

    nodes: list[fx.Node] = list(gm.graph.nodes)
    for node in nodes:
        args = [a for a in node.all_input_nodes]
        if node.op == "call_module":
            m = modules[str(node.target)]
            if str(node.target) in modes:
                chain = _Chain(head=node, tail=node, nodes=[node])
                open_tails[node] = chain
                sparse_conv = type(m) is nn.Conv2d and modes[str(node.target)] == "sparse"
                layout[node] = "cm" if sparse_conv else "std"
                continue
        # can this node grow the chain that produced its input?
        grew = False
        for a in args:
            grown = open_tails.get(a)
            if grown is None or _sole_user(a) is not node:
                continue
            chain = grown
            head_is_conv = type(modules[str(chain.head.target)]) is nn.Conv2d
            act = _activation(node, modules)
            if (
                head_is_conv
                and node.op == "call_module"
                and len(chain.nodes) == 1
                and _foldable_bn(modules[str(node.target)])
            ):
                chain.bn = modules[str(node.target)]
            elif (
                head_is_conv
                and node.op == "call_function"
                and node.target in _ADD_FUNCTIONS
                and chain.residual is None
                and chain.clamp == (-math.inf, math.inf)
                and len(node.args) == 2
                and not node.kwargs
                and all(isinstance(x, fx.Node) for x in node.args)
            ):
                other: Any = node.args[1] if node.args[0] is a else node.args[0]
                if other is a or layout.get(other) != layout[chain.head]:
                    continue
                chain.residual = other
            elif act is not None and chain.clamp == (-math.inf, math.inf):
                chain.clamp = act
            else:
                continue
            layout[node] = layout[chain.head]
            grow(chain, node)
            grew = True
            break
        if grew:
            continue
        layout[node] = "cm" if _layout_free(node, modules, layout) else "std"
    for chain in open_tails.values():
        chains[chain.tail] = chain
    return chains, layout


def _layout_free(
    node: fx.Node, modules: Mapping[str, nn.Module], layout: Mapping[fx.Node, str]
) -> bool:
    inputs = node.all_input_nodes
    if not inputs or any(layout.get(a) != "cm" for a in inputs):
        return False
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) and m.return_indices:
            return False
        return isinstance(m, _LAYOUT_FREE_MODULES)
    if node.op == "call_function":
        return node.target in _LAYOUT_FREE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _LAYOUT_FREE_METHODS
    return False


def _native_max_pool(
    node: fx.Node, modules: Mapping[str, nn.Module]
) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of an ``nn.MaxPool2d`` the native kernel can run."""
    if node.op != "call_module":
        return None
    m = modules[str(node.target)]
    if type(m) is not nn.MaxPool2d or m.ceil_mode or m.return_indices:
        return None
    params = []
    for value in (m.kernel_size, m.stride, m.padding, m.dilation):
        if isinstance(value, tuple):
            if len(set(value)) != 1:
                return None
            value = value[0]
        params.append(int(value))
    kernel, stride, padding, dilation = params
    if dilation != 1 or len(node.args) != 1 or node.kwargs:
        return None
    return kernel, stride, padding


def _is_global_avg_pool(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` averages each (H, W) plane to one value (``adaptive_avg_pool2d`` to 1x1)."""
    if node.op == "call_module":
        m = modules[str(node.target)]
        size = getattr(m, "output_size", None)
        ok = type(m) is nn.AdaptiveAvgPool2d
    elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        ok = set(node.kwargs) <= {"output_size"}
    else:
        return False
    return ok and len(node.args) >= 1 and size in (1, (1, 1), [1, 1])


def _rewrite(
    gm: fx.GraphModule,
    max_density: Mapping[str, float],
    forced: Mapping[str, str] | None,
) -> tuple[fx.GraphModule, SparsePlan]:
    modes = _layer_modes(gm, max_density, forced)
    chains, layout = _plan_chains(gm, modes)
    in_chain = {n for c in chains.values() for n in c.nodes}
    modules = dict(gm.named_modules())
    plan = SparsePlan()
    graph = fx.Graph()
    env: dict[tuple[fx.Node, str], fx.Node] = {}

    def value(node: fx.Node, want: str) -> fx.Node:
        key = (node, want)
        if key not in env:
            have = layout[node]
            env[key] = graph.call_function(_swap01, (env[(node, have)],))
        return env[key]

    def mapped(arg: Any, want: str) -> Any:
        return fx.node.map_arg(arg, lambda n: value(n, want))

    new_modules: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        if node in in_chain and node not in chains:
            continue  # fused into its chain's tail
        if node in chains:
            chain = chains[node]
            head = chain.head
            name = str(head.target)
            layer = _build_layer(modules[name], chain, modes[name], forced is not None)
            plan.modes[name] = modes[name]
            new_modules[name] = layer
            in_layout = layout[head]
            args = [value(cast(fx.Node, head.args[0]), in_layout)]
            if chain.residual is not None:
                args.append(value(chain.residual, in_layout))
            out = graph.call_module(name, tuple(args))
            env[(node, in_layout)] = out
            continue
        want = layout.get(node, "std")
        pool = _native_max_pool(node, modules)
        if pool is not None:  # either layout: both keep each (H, W) plane contiguous
            env[(node, want)] = graph.call_function(
                channel_major_max_pool2d, (value(node.args[0], want), *pool)
            )
            continue
        if _is_global_avg_pool(node, modules):  # either layout: a mean of each plane
            env[(node, want)] = graph.call_function(
                global_avg_pool2d, (value(cast(fx.Node, node.args[0]), want),)
            )
            continue
        if node.op == "output":
            graph.output(mapped(node.args[0], "std"))
            continue

        def copy_arg(n: fx.Node, want: str = want) -> fx.Node:
            return value(n, want)

        new = graph.node_copy(node, copy_arg)
        env[(node, want)] = new
    _link_planes(chains, new_modules)
    _let_return_early(chains, new_modules)
    for name, sparse_layer in new_modules.items():
        gm.delete_submodule(name)
        gm.add_submodule(name, sparse_layer)
    result = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    result.graph.lint()
    result.delete_all_unused_submodules()
    return result, plan


def _link_planes(chains: Mapping[fx.Node, _Chain], layers: Mapping[str, nn.Module]) -> None:
    """Let each sparse conv whose output is read only by a sparse k x k conv (as its input)
    write that output straight into the padded planes the k x k conv reads."""
    by_head = {chain.head: chain for chain in chains.values()}
    for tail, chain in chains.items():
        producer = layers.get(str(chain.head.target))
        user = _sole_user(tail)
        if not isinstance(producer, SparseConv2d) or producer.mode != "sparse" or user is None:
            continue
        consumer_chain = by_head.get(user)
        if consumer_chain is None or user.args[0] is not tail or consumer_chain.residual is tail:
            continue
        consumer = layers.get(str(user.target))
        if isinstance(consumer, SparseConv2d) and consumer.reads_planes:
            producer.output_planes = (
                (int(consumer.padding[0]), int(consumer.padding[1])),
                consumer.stride,
            )


def _let_return_early(chains: Mapping[fx.Node, _Chain], layers: Mapping[str, nn.Module]) -> None:
    """Let a sparse conv's product on several threads return before it is done where only
    sparse convs read its output (as their input or their fused residual): each finishes it
    in the kernels before reading (the general path of ``SparseConv2d.forward`` first waits
    for it), so nothing reads the output unfinished."""
    chain_of = {node: chain for chain in chains.values() for node in chain.nodes}

    def sparse_conv(chain: _Chain | None) -> bool:
        layer = layers.get(str(chain.head.target)) if chain is not None else None
        return isinstance(layer, SparseConv2d) and layer.mode == "sparse" and layer.channel_major

    for tail, chain in chains.items():
        if sparse_conv(chain) and tail.users:
            layer = cast(SparseConv2d, layers[str(chain.head.target)])
            layer.returns_early = all(sparse_conv(chain_of.get(user)) for user in tail.users)


class _SwappedConv(nn.Module):
    """A ``SparseConv2d`` taking and returning standard (N, C, H, W) tensors."""

    def __init__(self, conv: SparseConv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return _swap01(self.conv(_swap01(x)))


def _swap_layers(
    model: nn.Module,
    max_density: Mapping[str, float],
    forced: Mapping[str, str] | None,
    done: Collection[str] = (),
) -> tuple[nn.Module, SparsePlan]:
    """Every Linear and Conv2d module (but those named in ``done``) swapped in place."""
    plan = SparsePlan()
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if name and name not in done and (type(m) is nn.Linear or _convertible_conv(m))
    ]
    for name, m in targets:
        if forced is not None:
            if name not in forced:
                raise OptionError(f"the saved plan has no entry for layer {name!r}")
            mode = forced[name]
        else:
            mode = _choose_mode(_layer_kind(m), m.weight.detach(), max_density)
        plan.modes[name] = mode
        layer = _build_layer(m, None, mode, forced is not None)
        new: nn.Module = layer
        if isinstance(layer, SparseConv2d) and layer.channel_major:
            new = _SwappedConv(layer)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model, plan


def _inner_mode(
    name: str, weight: Tensor, max_density: Mapping[str, float], forced: Mapping[str, str] | None
) -> str:
    if forced is not None:  # a file saved before these layers could run sparse has no entry
        return forced.get(name, "dense")
    return _choose_mode("linear", weight, max_density)


def _open_transformers(
    model: nn.Module, max_density: Mapping[str, float], forced: Mapping[str, str] | None
) -> tuple[nn.Module, dict[str, str]]:
    """``model`` with its transformer layers made convertible, and the modes of the layers
    inside PyTorch's transformer modules (which torch.fx does not enter, so the passes after
    this one leave them alone).

    Hugging Face ``Conv1D`` layers become ``nn.Linear`` ones (converted later, as any). An
    ``nn.MultiheadAttention`` becomes a ``SparseMultiheadAttention`` and an
    ``nn.TransformerEncoderLayer`` a ``SparseTransformerEncoderLayer`` where one of their
    layers runs sparse; otherwise they stay as they are, with PyTorch's fused kernels. The
    feed-forward layers of decoder layers, which PyTorch calls as layers, are swapped in place.
    """
    structure_only = forced is not None
    modes: dict[str, str] = {}

    def put(name: str, new: nn.Module) -> None:
        nonlocal model
        if not name:
            model = new
            return
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)

    def mode(name: str, linear: nn.Linear) -> str:
        modes[name] = _inner_mode(name, linear.weight.detach(), max_density, forced)
        return modes[name]

    def build(linear: nn.Linear, mode: str, relu: bool = False) -> SparseLinear:
        layer = cast(SparseLinear, _build_layer(linear, None, mode, structure_only))
        if relu:
            layer.clamp = (0.0, math.inf)
        return layer

    def prefixed(name: str, child: str) -> str:
        return f"{name}.{child}" if name else child

    for name, m in list(model.named_modules()):
        # a file saved before Conv1D layers were converted names none of them
        if is_hf_projection(m) and (forced is None or name in forced):
            put(name, conv1d_as_linear(m))
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MultiheadAttention) and supported_attention(m):
            parts = attention_projections(m)
            chosen = {part: mode(prefixed(name, part), lin) for part, lin in parts.items()}
            if "sparse" in chosen.values():
                layers = {part: build(lin, chosen[part]) for part, lin in parts.items()}
                put(name, SparseMultiheadAttention(m.num_heads, m.batch_first, **layers))
    for name, m in list(model.named_modules()):
        if not isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            continue
        first = mode(prefixed(name, "linear1"), m.linear1)
        second = mode(prefixed(name, "linear2"), m.linear2)
        if isinstance(m, nn.TransformerDecoderLayer):  # which calls them as layers
            if first == "sparse":
                m.register_module("linear1", build(m.linear1, first))
            if second == "sparse":
                m.register_module("linear2", build(m.linear2, second))
        elif "sparse" in (first, second) or isinstance(m.self_attn, SparseMultiheadAttention):
            relu = m.activation is F.relu or isinstance(m.activation, nn.ReLU)
            linear1, linear2 = build(m.linear1, first, relu), build(m.linear2, second)
            put(name, SparseTransformerEncoderLayer(m, linear1, linear2, relu_fused=relu))
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            isinstance(c, SparseTransformerEncoderLayer) for c in m.layers
        ):
            m.use_nested_tensor = False  # its nested-tensor path reads the first layer's weights
    return model, modes


# PyTorch's transformer modules, whose forward torch.fx cannot trace: as the model itself,
# their layers are swapped in place without a warning (a trace would fuse nothing in them)
_TRANSFORMER_ROOTS = (
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.MultiheadAttention,
)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with the layers ``_open_transformers`` made kept whole as well."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (SparseMultiheadAttention, SparseTransformerEncoderLayer, SparseLinear)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


_PER_SAMPLE_FUNCTIONS = {
    _swap01,
    channel_major_max_pool2d,
    global_avg_pool2d,
    F.relu,
    torch.relu,
    F.relu6,
    F.hardtanh,
    F.adaptive_avg_pool2d,
    F.avg_pool2d,
    F.dropout,
    operator.add,
    operator.iadd,
    operator.mul,
    torch.add,
    torch.mul,
}


def _per_sample(net: fx.GraphModule) -> bool:
    """Whether ``net`` computes each sample of a batch on its own (only ops known to), so
    that a batch can run in slices: then a slice's activations stay in the CPU's caches."""
    modules = dict(net.named_modules())
    placeholders = 0
    for node in net.graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
        elif node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                return False
        elif node.op == "call_module":
            m = modules[str(node.target)]
            if not isinstance(m, (SparseConv2d, SparseLinear, *_LAYOUT_FREE_MODULES)):
                return False
        elif node.op == "call_function":
            if node.target is torch.flatten:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                if start != 1 or len(node.args) > 2 or "end_dim" in node.kwargs:
                    return False
            elif node.target not in _PER_SAMPLE_FUNCTIONS:
                return False
        elif node.op == "call_method":
            if node.target not in ("relu", "relu_", "add", "mul", "contiguous"):
                return False
        else:
            return False
    return placeholders == 1


_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.dropout}


def _split_tail(net: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule] | None:
    """``(head, tail)`` with ``net(x) == tail(head(x))``, where ``tail`` is the chain of
    Linear layers (and elementwise ops) that ends the network, fed by one batch-first tensor:
    a batch run in slices runs its tail once on the whole batch, so the Linear layers read
    their weights once instead of once a slice. ``None`` where the network does not end so."""
    modules = dict(net.named_modules())

    def step(node: fx.Node) -> str | None:
        """'linear', 'elementwise' or None: what ``node`` is as a link of the tail."""
        others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node)]
        if not node.args or not isinstance(node.args[0], fx.Node) or others:
            return None
        if len(node.users) != 1:
            return None
        if node.op == "call_module":
            m = modules[str(node.target)]
            if isinstance(m, SparseLinear):
                return "linear"
            return "elementwise" if type(m) in ELEMENTWISE_MODULES else None
        if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
            return "elementwise"
        if node.op == "call_method" and node.target in ("relu", "relu_"):
            return "elementwise"
        return None

    output = next(n for n in net.graph.nodes if n.op == "output")
    node = output.args[0]
    chain: list[fx.Node] = []
    start = None
    while isinstance(node, fx.Node) and (kind := step(node)) is not None:
        chain.append(node)
        if kind == "linear":
            start = len(chain)
        node = node.args[0]
    if start is None:
        return None
    chain = chain[:start][::-1]  # from the first Linear layer of the tail to the output
    split = chain[0].args[0]
    assert isinstance(split, fx.Node)
    in_tail = set(chain)
    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in net.graph.nodes:
        if n.op != "output" and n not in in_tail:
            env[n] = head.node_copy(n, lambda a: env[a])
    head.output(env[split])
    tail = fx.Graph()
    env = {split: tail.placeholder("x")}
    for n in chain:
        env[n] = tail.node_copy(n, lambda a: env[a])
    tail.output(env[chain[-1]])
    return fx.GraphModule(net, head), fx.GraphModule(net, tail)


def _native_node(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` runs only native calls (and views): what a replay can hold."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, SparseConv2d):
            return m.mode == "sparse" and m.channel_major
        return isinstance(m, SparseLinear) and m.mode == "sparse"
    if node.op == "call_function":
        return node.target in (_swap01, channel_major_max_pool2d, global_avg_pool2d, torch.flatten)
    return node.op == "call_method" and node.target in ("flatten", "view")


def _subgraph(net: fx.GraphModule, start: fx.Node | None, end: fx.Node) -> fx.GraphModule:
    """The part of ``net`` from ``start``'s value (``None``: the input) to ``end``'s (or to
    the output, when ``end`` is the output node), where ``start`` is the one value the nodes
    after it read from those before."""
    graph = fx.Graph()
    nodes = list(net.graph.nodes)
    first = 0 if start is None else nodes.index(start) + 1
    env: dict[fx.Node, fx.Node] = {} if start is None else {start: graph.placeholder("x")}
    for n in nodes[first : nodes.index(end) + 1]:
        env[n] = graph.node_copy(n, lambda a: env[a])
    if end.op != "output":
        graph.output(env[end])
    return fx.GraphModule(net, graph)


Segment = tuple[fx.GraphModule | None, fx.GraphModule, fx.GraphModule | None]


def _replayable_segment(net: fx.GraphModule) -> Segment | None:
    """``(prefix, middle, suffix)`` with ``net(x) == suffix(middle(prefix(x)))``: ``middle``
    the longest run of native ops (the most layers) between two points where one value passes
    on, which a replay can hold; ``prefix`` and ``suffix`` (``None`` where empty) hold the
    ops around it that are not native (a first conv or a classifier kept dense, a softmax),
    run layer by layer. ``None`` where no layer runs natively."""
    modules = dict(net.named_modules())
    nodes = list(net.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    foreign_before = [0]  # foreign_before[i]: non-native nodes among nodes[:i]
    layers_before = [0]  # the same for layers (call_module)
    for n in nodes:
        foreign_before.append(foreign_before[-1] + (not _native_node(n, modules)))
        layers_before.append(layers_before[-1] + (n.op == "call_module"))
    cuts = []  # indices after which one value alone passes on
    live: set[fx.Node] = set()
    for i, node in enumerate(nodes):
        live = {n for n in live if last_use[n] > i}
        if last_use[node] > i:
            live.add(node)
        if node.op != "output" and live == {node}:
            cuts.append(i)
    best: tuple[int, int, int, int] | None = None  # (layers, nodes, start, end)
    for a, s in enumerate(cuts):
        for e in cuts[a + 1 :]:
            if foreign_before[e + 1] - foreign_before[s + 1]:
                break  # a later end only adds the same foreign op
            score = (layers_before[e + 1] - layers_before[s + 1], e - s, s, e)
            if score[0] and (best is None or score[:2] > best[:2]):
                best = score
    if best is None:
        return None
    _, _, s, e = best
    output = nodes[-1]
    prefix = None if nodes[s].op == "placeholder" else _subgraph(net, None, nodes[s])
    suffix = None if output.args[0] is nodes[e] else _subgraph(net, nodes[e], output)
    if prefix is None and suffix is None:
        return None, net, None
    return prefix, _subgraph(net, None if prefix is None else nodes[s], nodes[e]), suffix


# A batch runs in slices of about this many input values per slice (one 224x224 image is
# 150K): the intermediate activations of a slice then stay in cache instead of memory.
_SLICE_VALUES = 2**17


class SparseModel(nn.Module):
    """What ``to_sparse`` returns: the rewritten network ``net`` and its per-layer plan.

    When ``net`` computes every sample on its own (``per_sample``), a large batch runs in
    slices of a few samples, whose activations stay in the CPU's caches; outputs are the same.
    """

    def __init__(self, net: nn.Module, plan: dict[str, str], per_sample: bool) -> None:
        super().__init__()
        self.net = net
        self.sparse_plan = dict(plan)
        self.per_sample = per_sample
        # (head, tail) of a sliced batch: the tail runs once on the whole batch. They share
        # net's layers, and are kept out of the module tree so that no state is stored twice.
        split = _split_tail(net) if per_sample and isinstance(net, fx.GraphModule) else None
        self._split: tuple[fx.GraphModule, fx.GraphModule] | None = split
        # the forward pass of net (and of the head of a sliced batch), its longest run of
        # native layers replayed in one native call (see replay.py)
        graph = net if isinstance(net, fx.GraphModule) else None
        self._replay_net = _replayer(graph, graph) if graph is not None else None
        self._replay_head = _replayer(graph, split[0]) if graph and split else None
        self.eval()

    @property
    def replay(self) -> bool:
        """Whether forward passes made only of native calls are recorded and replayed in one
        call (the default); ``False`` runs every layer from Python."""
        return self._replay_net is not None and self._replay_net.enabled

    @replay.setter
    def replay(self, value: bool) -> None:
        for replayer in (self._replay_net, self._replay_head):
            if replayer is not None:
                replayer.enabled = bool(value)

    def _whole(self, x: Tensor) -> Tensor:
        return self._replay_net(x) if self._replay_net is not None else self.net(x)

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
            return self.net(*args, **kwargs)
        (x,) = args
        if not self.per_sample or x.dim() < 2:
            return self._whole(x)
        per_sample = max(1, x[0].numel())
        size = max(1, _SLICE_VALUES // per_sample)
        if x.shape[0] <= size:
            return self._whole(x)
        parts = x.split(size)
        tail = None
        head: Callable[[Tensor], Tensor] = self._whole
        if self._split is not None:
            assert self._replay_head is not None
            head, tail = self._replay_head, self._split[1]
        threads = torch.get_num_threads()
        if threads > 1 and backend().native:  # slices side by side, one thread each
            out = torch.cat(map_slices(head, parts, threads))
        else:
            out = torch.cat([head(part) for part in parts])
        return out if tail is None else tail(out)


def _replayer(net: fx.GraphModule, part: fx.GraphModule) -> Replayer:
    """A replayer of ``part`` (``net`` or its head): of the whole of it where every op is
    native, else of its longest run of native layers, the ops before and after it running
    layer by layer."""
    segment = _replayable_segment(part)
    if segment is None:  # the recording will say why it cannot replay
        return Replayer(net, part)
    prefix, middle, suffix = segment
    return Replayer(net, middle, prefix=prefix, suffix=suffix)


@torch.no_grad()
def to_sparse(
    model: nn.Module,
    *,
    max_density: float | Mapping[str, float] | None = None,
    _plan: Mapping[str, str] | None = None,
) -> SparseModel:
    """A copy of ``model`` whose Linear and Conv2d layers run strsparse's sparse kernels.

    ``model`` is a finalized model (``strsparse.finalize``; a still-sparsified one is
    finalized on a copy). It is not changed. The result is a plain ``nn.Module`` for
    inference (``eval`` mode; call it under ``torch.inference_mode()``) on float32 CPU
    tensors; its outputs match the dense model's to float32 rounding. BatchNorm layers after
    convs are folded in, and residual adds and ReLUs fused into the layers. PyTorch's
    attention and transformer layers and Hugging Face's ``Conv1D`` have their Linear layers
    converted too (see ``attention.py``).

    Per-layer rule: a layer denser than ``max_density`` (a number, or per layer kind
    ``{"linear": .., "pointwise": .., "conv": .., "depthwise": .., "stem": ..}``; defaults in
    ``DEFAULT_MAX_DENSITY``)
    stays dense, as does every layer when the native kernels are unavailable (with a
    warning). ``sparse_model.sparse_plan`` records each layer's choice; the rewritten
    network is ``sparse_model.net``.
    """
    limits = _max_density(max_density)
    model = _finalized_copy(model)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            raise OptionError(
                f"to_sparse runs float32 models; this one has {p.dtype} parameters: "
                "call model.float() first"
            )
        if p.device.type != "cpu":
            raise OptionError(
                f"to_sparse runs on the CPU; this model is on {p.device}: call model.cpu() first"
            )
    model, inner = _open_transformers(model, limits, _plan)
    traced = None
    if not isinstance(model, _TRANSFORMER_ROOTS):  # whose forward checks its inputs' values
        try:
            traced = _trace(model)
        except Exception as exc:  # fx cannot trace data-dependent control flow and the like
            warnings.warn(
                f"torch.fx could not trace {type(model).__name__} ({exc}); its Linear and "
                "Conv2d layers are swapped one by one, without BatchNorm folding or fusion",
                RuntimeWarning,
                stacklevel=2,
            )
    if traced is None:
        net, plan = _swap_layers(model, limits, _plan, done=inner)
        per_sample = False
    else:
        net, plan = _rewrite(traced, limits, _plan)
        # slices pay for the sparse kernels (their activations stay in cache) but cost PyTorch's
        # dense kernels their batch efficiency: only where most layers run sparse
        n_sparse = sum(mode == "sparse" for mode in plan.modes.values())
        per_sample = 2 * n_sparse >= len(plan.modes) > 0 and _per_sample(net)
    plan.modes.update(inner)
    result = SparseModel(net, plan.to_dict(), per_sample)
    for attr in ("input_shape", "classifier_name"):
        if hasattr(model, attr):
            setattr(result, attr, getattr(model, attr))
    counts = {"sparse": 0, "dense": 0}
    for mode in plan.modes.values():
        counts[mode] += 1
    logger.info(
        "to_sparse: %d layers sparse, %d dense (%s kernels)",
        counts["sparse"],
        counts["dense"],
        backend().isa,
    )
    return result
