"""Whole-model API: attach a method to every eligible weight, advance it, bake it in."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from strsparse.errors import OptionError, StrsparseError, did_you_mean
from strsparse.methods.base import (
    LayerWeight,
    SparsityMethod,
    get_method,
    get_parametrization,
    parametrization_chain,
    raw_weight,
)
from strsparse.methods.structured import (
    GateFollower,
    attach_structured,
    default_exclusions,
    structured_candidates,
)
from strsparse.methods.target import TargetController

__all__ = [
    "DenseTensor",
    "PretrainedWeightsError",
    "SparsifiedPickleError",
    "SparsityHandle",
    "dense_tensors",
    "eligible_layers",
    "finalize",
    "load_pretrained",
    "sparse_layers",
    "select_layers",
    "sparsify",
]

logger = logging.getLogger(__name__)

# Embedding tables have 2-D weights but are lookups, not matrix products: sparsifying them is
# opt-in, through an include pattern that names them.
_OPT_IN_TYPES = (nn.Embedding, nn.EmbeddingBag)
# Normalisation scales are never sparsified, even when >= 2-D (LayerNorm over (T, D)).
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)
# The parametrize machinery's own modules hold the raw tensors; they are never layers.
_INTERNAL_TYPES = (parametrize.ParametrizationList, SparsityMethod)


@dataclass
class SparsityHandle:
    """What ``sparsify`` attached: the layers, the method, its options; advances schedules."""

    method: str
    options: dict[str, Any]
    layers: dict[str, LayerWeight] = field(repr=False)
    # model-wide logic of the method (STR's target controller), stepped after ``update``
    controller: TargetController | None = field(default=None, repr=False)
    method_cls: type[SparsityMethod] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.method_cls = get_method(self.method)

    @property
    def parametrizations(self) -> dict[str, SparsityMethod]:
        """Layer name -> the method's parametrization on that layer."""
        return dict(zip(self.layers, SparsityMethod.attached(self.layers), strict=True))

    def step(self, step: int, total_steps: int) -> None:
        """Advance training-dependent state (GMP masks, ST-3 thresholds) to optimizer step
        ``step`` of ``total_steps``; call it once per optimizer step (a no-op for STR)."""
        if total_steps <= 0:
            raise OptionError(f"total_steps={total_steps} must be positive")
        first = next(iter(self.layers.values()))
        if get_parametrization(first) is None:
            raise OptionError(
                f"this {self.method!r} handle's layers are no longer sparsified "
                "(strsparse.finalize removed the method): there is nothing to step; "
                "sparsify the model again to continue pruning"
            )
        self.method_cls.update(self.layers, step, total_steps)
        if self.controller is not None:
            self.controller.step(self.layers, step, total_steps)

    def target_status(self) -> dict[str, Any] | None:
        """The target and where training stands: ``target`` (the final value), ``scheduled``
        (the schedule at the last step) and ``achieved`` (measured at the last step), as a
        sparsity, a fraction of dense FLOPs, or a fraction of filters or rank-one components
        removed (``kind``: ``sparsity``, ``flops``, ``filters``, ``ranks``); None without a
        target."""
        c = self.controller
        if c is None:
            return None
        return {
            "kind": c.kind,
            "target": c.target,
            "scheduled": c.scheduled_target,
            "achieved": c.achieved_target,
        }

    def threshold_parameters(self) -> list[nn.Parameter]:
        """The learnable thresholds (STR's ``s``), each once even when shared."""
        seen: dict[int, nn.Parameter] = {}
        for p in self.parametrizations.values():
            for s in p.learnable_thresholds():
                seen.setdefault(id(s), s)
        return list(seen.values())


def _is_weight_name(tensor: str) -> bool:
    """``weight`` (Linear, Conv, Hugging Face projections), ``*_weight`` (MultiheadAttention's
    ``in_proj_weight``) and ``weight_*`` (RNNs' ``weight_ih_l0``): the matrices a module
    multiplies by. Other >= 2-D parameters (a ViT's ``pos_embed``, ``cls_token``) are not."""
    return tensor == "weight" or tensor.endswith("_weight") or tensor.startswith("weight_")


def _layer_name(module_name: str, tensor: str) -> str:
    """``fc`` for ``fc.weight``; ``rnn.weight_ih_l0`` for any other tensor name."""
    if tensor == "weight":
        return module_name
    return f"{module_name}.{tensor}" if module_name else tensor


@dataclass
class _Tensor:
    """One >= 2-D floating-point parameter and every (name, module, tensor) that holds it."""

    raw: Tensor
    users: list[tuple[str, nn.Module, str]]

    @property
    def primary(self) -> tuple[str, nn.Module, str]:
        """The user a tied tensor is named after: the first that is not an embedding table
        (the output layer of tied input/output embeddings), else the first."""
        for user in self.users:
            if not isinstance(user[1], _OPT_IN_TYPES):
                return user
        return self.users[0]

    def layer(self) -> tuple[str, LayerWeight]:
        name, module, tensor = self.primary
        tied = tuple(u for u in self.users if u is not self.primary)
        return name, LayerWeight(module, tensor, tied)


def _tensors(model: nn.Module) -> list[_Tensor]:
    """Every >= 2-D floating-point parameter of ``model`` once (tied ones grouped), in
    ``named_modules`` order; parametrized tensors by their raw ``original``."""
    groups: dict[int, _Tensor] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, _INTERNAL_TYPES):
            continue
        tensors = list(getattr(module, "_parameters", {}))
        if parametrize.is_parametrized(module):
            tensors += [t for t in module.parametrizations if t not in tensors]
        for tensor in tensors:
            raw = raw_weight(module, tensor)
            if raw is None or raw.dim() < 2 or not raw.is_floating_point():
                continue
            user = (_layer_name(module_name, tensor), module, tensor)
            groups.setdefault(id(raw), _Tensor(raw, [])).users.append(user)
    return list(groups.values())


def _dense_reason(group: _Tensor, include: Sequence[str]) -> str | None:
    """Why ``group`` is never a sparsify candidate, or None if it is one."""
    name, module, tensor = group.primary
    if isinstance(module, _NORM_TYPES):
        return "normalization parameter"
    if not _is_weight_name(tensor):
        return f"not a weight matrix (parameter {tensor!r})"
    if isinstance(module, _OPT_IN_TYPES):
        names = [u[0] for u in group.users]
        if not any(_matches(n, include) for n in names):
            return f"embedding: opt in with include=[{name!r}, ...]"
    return None


def eligible_layers(
    model: nn.Module, include: Sequence[str] | None = None
) -> dict[str, LayerWeight]:
    """The weight tensors ``sparsify`` can attach to, by layer name: every >= 2-D parameter
    named ``weight``, ``*_weight`` or ``weight_*`` (Linear, Conv, an LSTM's ``weight_ih_l0``,
    MultiheadAttention's ``in_proj_weight``), except normalization scales and embedding tables
    (those only when an ``include`` pattern names them). A Parameter shared by several
    modules is one layer, named after its first non-embedding user."""
    layers: dict[str, LayerWeight] = {}
    for group in _tensors(model):
        if _dense_reason(group, include or ()) is None:
            name, layer = group.layer()
            layers[name] = layer
    return layers


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(patterns: Sequence[str], names: list[str], option: str) -> None:
    if isinstance(patterns, str):
        raise OptionError(
            f"{option}={patterns!r} must be a list of glob patterns, e.g. [{patterns!r}]"
        )
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise OptionError(
                f"{option} pattern {pattern!r} matches no sparsifiable layer"
                f"{did_you_mean(pattern, names)}; layers are: {shown}"
            )


def _names(name: str, layer: LayerWeight) -> list[str]:
    """The layer's name and those of its tied users (patterns may name any of them)."""
    return [name, *(n for n, _, _ in layer.tied)]


def select_layers(
    model: nn.Module,
    *,
    structure: str = "weight",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, LayerWeight]:
    """The layers ``sparsify`` would attach to, by name: the eligible ones (or, for a
    structured STR, the structured candidates) filtered by ``include``/``exclude``. A pattern
    matching nothing, or patterns leaving nothing, is an ``OptionError``. Touches nothing, so
    it also checks a configuration on a model built on the meta device."""
    if structure == "weight":
        candidates = eligible_layers(model, include)
    else:
        candidates = structured_candidates(model, structure)
    if not candidates:
        what = {"filter": "conv or Linear layer", "rank": "LowRankLinear layer"}
        raise OptionError(
            f"{type(model).__name__} has no "
            f"{what.get(structure, '>= 2-dim weight tensor')} to sparsify"
        )
    names = list(candidates)
    if include is not None:
        _check_patterns(include, [a for n in names for a in _names(n, candidates[n])], "include")
        names = [n for n in names if any(_matches(a, include) for a in _names(n, candidates[n]))]
    elif structure != "weight":
        left_out = default_exclusions(model, structure)
        if left_out:
            logger.info("structure=%r leaves out the output layers %s", structure, sorted(left_out))
        names = [n for n in names if n not in left_out]
    if exclude is not None:
        _check_patterns(exclude, [a for n in names for a in _names(n, candidates[n])], "exclude")
        names = [
            n for n in names if not any(_matches(a, exclude) for a in _names(n, candidates[n]))
        ]
    if not names:
        raise OptionError("include/exclude leave no layer to sparsify")

    return {name: candidates[name] for name in names}


def sparsify(
    model: nn.Module,
    method: str,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    **options: Any,
) -> SparsityHandle:
    """Attach sparsity ``method`` to every eligible weight tensor of ``model``.

    Eligible (see ``eligible_layers``): every >= 2-D weight matrix a module owns - Linear,
    Conv1d/2d/3d, ConvTranspose, third-party projections, each of an RNN's ``weight_ih_l*``
    and ``weight_hh_l*``, MultiheadAttention's ``in_proj_weight``; biases and norm layers stay
    dense. A layer is named after its module (``"fc"``), or ``"<module>.<tensor>"`` when the
    tensor is not called ``weight`` (``"rnn.weight_ih_l0"``). ``include``/``exclude`` are glob
    patterns over those names (``"layer1.*"``, ``"fc"``); a pattern matching no layer is an
    error. A Parameter shared by several modules (tied embeddings) is one layer: selected
    when a pattern selects any of its users (and left dense when ``exclude`` names any of
    them), it gets one parametrization attached to every user, so all of them compute with
    the same sparse tensor during training and after ``finalize``.

    ``options`` go to the method (see ``list_methods()``), e.g.
    ``sparsify(model, "str", init_threshold=-3200)`` or ``sparsify(model, "gmp", sparsity=0.9)``.
    The model is changed in place; the returned handle advances schedules with ``step``.
    """
    if not isinstance(model, nn.Module):
        hint = f", e.g. strsparse.create_model({model!r})" if isinstance(model, str) else ""
        raise OptionError(
            f"sparsify needs the model itself (an nn.Module), got {type(model).__name__} "
            f"{model!r:.60}; build it first{hint}"
        )
    method_cls = get_method(method)
    parsed = method_cls.parse_options(options)
    structure = getattr(parsed, "structure", "weight")  # STR's filter / rank structures
    layers = select_layers(model, structure=structure, include=include, exclude=exclude)
    for name, layer in layers.items():
        if get_parametrization(layer) is not None:
            raise OptionError(
                f"layer {name!r} is already sparsified; call strsparse.finalize(model) first"
            )
        if layer.tied:
            logger.info(
                "layer %r shares its weight with %s: one sparse tensor serves all of them",
                name,
                ", ".join(repr(n) for n, _, _ in layer.tied),
            )

    if structure != "weight":
        attach_structured(model, layers, parsed)
        logger.info("sparsified %d layers with %r, structure=%r", len(layers), method, structure)
        return SparsityHandle(
            method=method,
            options=dict(options),
            layers=layers,
            controller=TargetController.build(model, layers, parsed),
        )
    parametrizations = method_cls.create(layers, parsed)
    for name, layer in layers.items():
        device = layer.raw.device
        if device.type != "meta":  # a meta model's state stays where to_empty() can't wipe it
            parametrizations[name].to(device=device)  # STR's s beside a weight already on a GPU
        for module, tensor in layer.users:
            parametrize.register_parametrization(module, tensor, parametrizations[name])
            # the parametrized class is the module's own
            type(module).__getstate__ = _refuse_pickling  # type: ignore[method-assign]
            if isinstance(module, nn.RNNBase) and _release_flat_weights not in _hooks(module):
                module.register_forward_hook(_release_flat_weights)
    method_cls.attach(model, layers)
    controller = (
        TargetController.build(model, layers, parsed) if method_cls.supports_target else None
    )
    logger.info("sparsified %d layers with %r", len(layers), method)
    return SparsityHandle(
        method=method, options=dict(options), layers=layers, controller=controller
    )


class SparsifiedPickleError(StrsparseError, RuntimeError):
    """A sparsified model was pickled whole (``torch.save(model)``)."""


def _refuse_pickling(module: nn.Module) -> None:
    raise SparsifiedPickleError(
        f"a sparsified model (here its {type(module).__name__}) cannot be saved whole with "
        "torch.save(model) "
        "(torch pickles no parametrized module): save model.state_dict() instead (it loads "
        "into the same model sparsified with the same options), or call "
        "strsparse.finalize(model) first to save a plain model"
    )


def _release_flat_weights(module: nn.RNNBase, inputs: object, output: object) -> None:
    """Forward hook of a sparsified RNN: drop the autograd history of its cached weights.

    ``nn.RNNBase`` keeps the tensors of its last forward in ``_flat_weights`` (re-read from
    the parametrizations at every forward, so training sees the sparse weights); left
    attached to the graph they would make ``copy.deepcopy(model)`` fail.
    """
    module._flat_weights = [None if w is None else w.detach() for w in module._flat_weights]


def _hooks(module: nn.Module) -> list[object]:
    return list(module._forward_hooks.values())


def sparse_layers(model: nn.Module) -> dict[str, LayerWeight]:
    """The sparsified weight tensors of ``model`` by layer name (see ``sparsify``)."""
    layers = {}
    for group in _tensors(model):
        name, layer = group.layer()
        if get_parametrization(layer) is not None:
            layers[name] = layer
    return layers


@dataclass(frozen=True)
class DenseTensor:
    """A >= 2-D parameter that is not sparsified, and why."""

    name: str
    shape: tuple[int, ...]
    reason: str
    tied: tuple[str, ...] = ()  # the other modules holding the same Parameter


def dense_tensors(model: nn.Module) -> list[DenseTensor]:
    """Every >= 2-D floating-point parameter of ``model`` that no method sparsifies, with the
    reason: an embedding not opted in, not a weight matrix (``pos_embed``), a normalization
    parameter, or not selected (``include``/``exclude``, or ``sparsify`` not called)."""
    groups = [(g, *g.layer()) for g in _tensors(model)]
    any_sparse = any(get_parametrization(layer) is not None for _, _, layer in groups)
    unselected = "not selected by include/exclude" if any_sparse else "not sparsified"
    dense = []
    for group, name, layer in groups:
        if get_parametrization(layer) is not None:
            continue
        reason = _dense_reason(group, ()) or unselected
        dense.append(
            DenseTensor(name, tuple(group.raw.shape), reason, tuple(n for n, _, _ in layer.tied))
        )
    return dense


def _private_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before a parametrization is removed.

    torch creates one class per parametrized module, but ``copy.deepcopy`` shares it between
    the copy and the original, and removing a parametrization deletes the class's property:
    finalizing a copy would break the original.
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


@torch.no_grad()
def finalize(model: nn.Module) -> nn.Module:
    """Bake the effective sparse weights into plain parameters, in place.

    The parametrizations are removed, so the model's ``state_dict`` loads with
    ``strict=True`` into the unmodified architecture and gives the same outputs. A tied
    Parameter stays one Parameter shared by its modules, holding the sparse values.
    """
    for module in model.modules():
        if parametrize.is_parametrized(module):
            _private_class(module)
    for layer in sparse_layers(model).values():
        p = get_parametrization(layer)
        if p is not None:
            p.release()
        (module, tensor), *others = layer.users
        # the first user writes the effective tensor into the shared raw Parameter; the
        # others then only drop their parametrization (applying it again would threshold
        # the already sparse values a second time)
        parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
        for other, other_tensor in others:
            parametrize.remove_parametrizations(other, other_tensor, leave_parametrized=False)
    for module in model.modules():  # a structured gate's followers (BatchNorm, a bias)
        if not parametrize.is_parametrized(module):
            continue
        for tensor in list(cast(nn.ModuleDict, module.parametrizations).keys()):
            if any(isinstance(p, GateFollower) for p in parametrization_chain(module, tensor)):
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
    for module in model.modules():
        if isinstance(module, nn.RNNBase) and not parametrize.is_parametrized(module):
            for key, hook in list(module._forward_hooks.items()):
                if hook is _release_flat_weights:
                    del module._forward_hooks[key]
            module._init_flat_weights()  # the plain Parameters again
    return model


class PretrainedWeightsError(StrsparseError, ValueError):
    """A pretrained ``state_dict`` does not fit the model it is loaded into."""


class _RawView(LayerWeight):
    """A sparsified layer seen through its raw weight, for re-running a method's ``create``."""

    @property
    def weight(self) -> Tensor:
        return self.raw


def _plain_keys(model: nn.Module) -> dict[str, str]:
    """Plain key -> parametrized key of every parametrized tensor:
    ``"fc.weight"`` -> ``"fc.parametrizations.weight.original"``."""
    keys = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if parametrize.is_parametrized(module):
            prefix = f"{module_name}." if module_name else ""
            for tensor in module.parametrizations:
                keys[f"{prefix}{tensor}"] = f"{prefix}parametrizations.{tensor}.original"
    return keys


@torch.no_grad()
def load_pretrained(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    handle: SparsityHandle | None = None,
    strict: bool = True,
) -> nn.Module:
    """Load a dense checkpoint (plain keys such as ``"fc.weight"``, as saved by the bare model,
    torchvision, timm or ``finalize``) into a model that is already sparsified.

    Each plain key of a sparsified tensor goes to its raw tensor
    (``"fc.parametrizations.weight.original"``); the methods' own state (STR's ``s``, masks,
    schedules) is kept from ``model``. A tied Parameter saved under one of its users' names
    only (as Hugging Face's checkpoints do) fills all of them. With ``strict`` every other
    key must match, as in ``load_state_dict``.

    Pass ``handle`` (what ``sparsify`` returned) to recompute the state a method derived from
    the weights at ``sparsify`` time from the loaded ones: one-shot magnitude masks, and
    STR's initial thresholds and its check that they do not zero a layer. Without it only the
    weights change. Loading before ``sparsify`` needs none of this:
    ``model.load_state_dict(dense); sparsify(model, ...)``.
    """
    plain = _plain_keys(model)
    state = {plain.get(key, key): value for key, value in state_dict.items()}
    for layer_name, layer in sparse_layers(model).items():
        keys = [plain[_key(n, t)] for n, _, t in ((layer_name, None, layer.tensor), *layer.tied)]
        present = [k for k in keys if k in state]
        for key in keys:
            if present and key not in state:
                state[key] = state[present[0]]
    for key, value in model.state_dict().items():
        if ".parametrizations." in f".{key}" and not key.endswith(".original"):
            state.setdefault(key, value)  # the methods' own state stays
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise PretrainedWeightsError(
            f"the checkpoint does not fit {type(model).__name__}: {err}; check that it belongs "
            "to this architecture, or pass strict=False to load only the matching keys"
        ) from err
    if handle is not None:
        _recreate(handle)
    return model


def _recreate(handle: SparsityHandle) -> None:
    """Run the method's ``create`` again on the layers' raw weights and take its state."""
    parsed = handle.method_cls.parse_options(handle.options)
    if getattr(parsed, "structure", "weight") != "weight":
        return  # structured gates do not depend on the weights
    views = {
        name: _RawView(layer.module, layer.tensor, layer.tied)
        for name, layer in handle.layers.items()
    }
    fresh = handle.method_cls.create(views, parsed)
    for p, name in zip(SparsityMethod.attached(handle.layers), handle.layers, strict=True):
        p.load_state_dict(fresh[name].state_dict())


def _key(layer_name: str, tensor: str) -> str:
    """The plain state_dict key of a layer user: ``"fc"`` -> ``"fc.weight"``;
    ``"rnn.weight_ih_l0"`` stays."""
    if tensor != "weight":
        return layer_name
    return f"{layer_name}.weight" if layer_name else "weight"
