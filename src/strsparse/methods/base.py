"""What every sparsity method shares: the parametrization base class, options and the registry.

A method is a ``torch.nn.utils.parametrize`` parametrization attached to a module's ``weight``:
it maps the raw weight to the effective (sparse) one, and its learnable state (STR's ``s``)
and buffers (masks, current targets) live in the parametrization module, so they are part of
the model's ``state_dict`` and reach the optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from strsparse.errors import OptionError, did_you_mean

__all__ = [
    "SCOPES",
    "LayerWeight",
    "SparsityMethod",
    "check_fraction",
    "check_schedule_options",
    "check_target_options",
    "get_method",
    "get_parametrization",
    "is_conv1d",
    "list_methods",
    "output_axis",
    "parametrization_chain",
    "raw_weight",
    "register_method",
    "resolve_step",
    "resolve_targets",
    "schedule_window",
    "threshold_parameter",
    "zero_fraction",
]

_REGISTRY: dict[str, type[SparsityMethod]] = {}

M = TypeVar("M", bound="type[SparsityMethod]")
S = TypeVar("S", bound="SparsityMethod")


class SparsityMethod(nn.Module):
    """Base parametrization: ``forward(raw_weight) -> effective_weight``.

    Subclasses set ``name`` and ``Options`` (a dataclass of the method's options) and
    implement ``create`` (one parametrization per layer, possibly sharing state) and, when
    their state follows training progress, ``update``.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    # learns its thresholds, so a sparsity/FLOPs target can steer them (the model-level
    # handle then runs a ``strsparse.methods.target.TargetController``)
    supports_target: ClassVar[bool] = False

    def threshold(self) -> float | None:
        """The layer's current magnitude threshold for reports (mean if it varies), if any."""
        return None

    def learnable_thresholds(self) -> list[nn.Parameter]:
        """The parameters that set this layer's threshold and learn it (STR's ``s``, which
        may be shared with other layers); none for methods whose threshold follows a
        schedule."""
        return []

    def thresholded(self, weight: Tensor) -> Tensor:
        """The tensor whose entries this layer's thresholds compare against, given its stored
        ``weight``: the weight itself, or a structured method's importance vector."""
        return weight

    def release(self) -> None:
        """Called by ``finalize`` before this parametrization leaves its module: drop
        model-wide state that refers to it."""

    def extra_repr(self) -> str:
        return f"method={self.name!r}"

    @classmethod
    def attached(cls: type[S], layers: Mapping[str, nn.Module | LayerWeight]) -> list[S]:
        """This method's parametrization on each of ``layers``, in order."""
        found = []
        for name, layer in layers.items():
            p = get_parametrization(layer)
            if not isinstance(p, cls):
                what = type(p).__name__ if p is not None else "no method"
                raise OptionError(f"layer {name!r} is not sparsified with {cls.name!r} ({what})")
            found.append(p)
        return found

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> Any:
        """Build ``cls.Options`` from keyword options; unknown names are a clear error."""
        fields = [f.name for f in dataclasses.fields(cls.Options)]
        for key in options:
            if key not in fields:
                raise OptionError(
                    f"unknown option {key!r} for method {cls.name!r}{did_you_mean(key, fields)}; "
                    f"valid options: {', '.join(fields)}"
                )
        return cls.Options(**options)

    @classmethod
    def create(cls, layers: Mapping[str, LayerWeight], options: Any) -> dict[str, SparsityMethod]:
        """One parametrization per layer (name -> parametrization) for ``options``."""
        raise NotImplementedError

    @classmethod
    def update(cls, layers: Mapping[str, LayerWeight], step: int, total_steps: int) -> None:
        """Advance state that depends on training progress; the default has none."""

    @classmethod
    def attach(cls, model: nn.Module, layers: Mapping[str, LayerWeight]) -> None:
        """Model-wide set-up once every layer in ``layers`` (weights of sub-modules of
        ``model``) carries its parametrization; the default has none."""


def register_method(cls: M) -> M:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise OptionError(f"a sparsity method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of the registered sparsity methods."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[SparsityMethod]:
    """The method class registered as ``name``; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        valid = list_methods()
        raise OptionError(
            f"unknown sparsity method {name!r}{did_you_mean(str(name), valid)}; "
            f"valid methods: {', '.join(valid)}"
        ) from None


@dataclass(frozen=True, eq=False)
class LayerWeight:
    """One weight tensor a method sparsifies: parameter ``tensor`` of ``module``.

    Most layers have one (``Linear.weight``: ``tensor="weight"``, named after the module);
    an ``nn.LSTM`` has several (``weight_ih_l0``, ``weight_hh_l0``, ...; named
    ``"<module>.<tensor>"``). A Parameter shared by several modules (tied input and output
    embeddings) is one ``LayerWeight`` whose other users are ``tied``: the parametrization is
    attached to every user, so all of them compute with the same sparse tensor.
    """

    module: nn.Module
    tensor: str = "weight"
    tied: tuple[tuple[str, nn.Module, str], ...] = ()  # (name, module, tensor) of other users

    @property
    def weight(self) -> Tensor:
        """The effective tensor (the sparse one once a method is attached)."""
        return getattr(self.module, self.tensor)

    @property
    def raw(self) -> Tensor:
        """The stored tensor: the parametrization's ``original`` when sparsified."""
        return raw_weight(self.module, self.tensor)

    @property
    def output_axis(self) -> int:
        """The weight's output-channel axis (see ``output_axis``)."""
        return output_axis(self.module, self.tensor)

    @property
    def users(self) -> tuple[tuple[nn.Module, str], ...]:
        """Every (module, tensor) that holds this Parameter, this one first."""
        return ((self.module, self.tensor), *((m, t) for _, m, t in self.tied))


def output_axis(module: nn.Module, tensor: str = "weight") -> int:
    """The axis of ``module``'s ``tensor`` that indexes output channels.

    0 for Linear (out x in), Conv (C_out x C_in x k...), an RNN's ``weight_ih_l0``
    (4H x in) and MultiheadAttention's ``in_proj_weight`` (3E x E); 1 for transposed
    convolutions (C_in x C_out/groups x k...) and for Hugging Face's ``Conv1D`` (GPT-2's
    projections), whose weight is in x out. Per-channel thresholds (STR's
    ``granularity="channel"``) and ST-3's per-channel rescaling run along it.
    """
    if tensor == "weight" and (
        isinstance(module, nn.modules.conv._ConvTransposeNd) or is_conv1d(module)
    ):
        return 1
    return 0


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (GPT-2's linear layer, weight in x out),
    recognised by class name (also once parametrized) so that transformers is not needed."""
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)


def _unpack(layer: nn.Module | LayerWeight, tensor: str) -> tuple[nn.Module, str]:
    if isinstance(layer, LayerWeight):
        return layer.module, layer.tensor
    return layer, tensor


def parametrization_chain(module: nn.Module, tensor: str) -> parametrize.ParametrizationList:
    """``module.parametrizations[tensor]``: the raw tensor (``original``) and the
    parametrizations applied to it, in order."""
    chains = cast(nn.ModuleDict, module.parametrizations)  # set by register_parametrization
    return cast(parametrize.ParametrizationList, chains[tensor])


def get_parametrization(
    layer: nn.Module | LayerWeight, tensor: str = "weight"
) -> SparsityMethod | None:
    """The sparsity method attached to ``layer``'s ``tensor`` (a module and a parameter name,
    or a ``LayerWeight``), or None."""
    module, tensor = _unpack(layer, tensor)
    if not parametrize.is_parametrized(module, tensor):
        return None
    for p in parametrization_chain(module, tensor):
        if isinstance(p, SparsityMethod):
            return p
    return None


def raw_weight(layer: nn.Module | LayerWeight, tensor: str = "weight") -> Tensor:
    """The stored (un-thresholded) tensor of a layer: ``original`` when parametrized."""
    module, tensor = _unpack(layer, tensor)
    if parametrize.is_parametrized(module, tensor):
        return parametrization_chain(module, tensor).original
    value: Tensor = getattr(module, tensor)
    return value


def resolve_step(value: int | float, total_steps: int, option: str) -> int:
    """A schedule point given as a step count (int) or a fraction of training (float in [0, 1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{option}={value!r} must be a step (int) or a fraction of training")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise OptionError(
                f"{option}={value} is a fraction of training and must lie in [0, 1]; "
                "pass an int for an absolute step"
            )
        return round(value * total_steps)
    if value < 0:
        raise OptionError(f"{option}={value} must be >= 0")
    return value


def check_schedule_options(start: int | float, end: int | float) -> None:
    """Validate ``start``/``end`` (a step as int, or a fraction of training as float)."""
    resolve_step(start, 1, "start")
    resolve_step(end, 1, "end")
    if type(start) is type(end) and end < start:
        raise OptionError(f"end={end!r} comes before start={start!r}; pruning must end after it")


def schedule_window(start: int | float, end: int | float, total_steps: int) -> tuple[int, int]:
    """The schedule's first and last step for a run of ``total_steps`` optimizer steps.

    Steps count from 0, so a fraction resolves to at most the last step, ``total_steps - 1``
    (``end=1.0`` means "at the last step"); an int beyond it is an error, since the final
    target would never be reached.
    """
    last = total_steps - 1
    first_step = min(resolve_step(start, total_steps, "start"), last)
    last_step = resolve_step(end, total_steps, "end")
    if isinstance(end, float):
        last_step = min(last_step, last)
    elif last_step > last:
        raise OptionError(
            f"end={end} is after the last step {last} of total_steps={total_steps}: the final "
            "sparsity would never be reached; pass a smaller end or a fraction such as 0.75"
        )
    if last_step < first_step:
        raise OptionError(
            f"end={end!r} (step {last_step}) comes before start={start!r} (step {first_step}) "
            f"with total_steps={total_steps}; pruning must end after it starts"
        )
    return first_step, last_step


def check_fraction(value: float, option: str, *, allow_one: bool = False) -> float:
    """Validate a sparsity fraction: [0, 1) (or [0, 1] with ``allow_one``)."""
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not upper_ok:
        interval = "[0, 1]" if allow_one else "[0, 1)"
        hint = "; it is a fraction, not a percentage" if isinstance(value, (int, float)) else ""
        raise OptionError(f"{option}={value!r} must be a fraction in {interval}{hint}")
    return float(value)


SCOPES = ("layer", "global")


def check_target_options(
    method: str, sparsity: float | None, budget: Mapping[str, float] | None, scope: str = "layer"
) -> None:
    """Validate the options shared by the mask-based methods: one of ``sparsity`` (a fraction)
    or ``budget`` (layer -> fraction), and a ``scope`` that a budget allows."""
    if sparsity is None and budget is None:
        raise OptionError(
            f"method {method!r} needs a target: give sparsity=<fraction in [0, 1)>, e.g. 0.9, "
            "or budget=<layer -> sparsity>, e.g. Budget.erk(model, 0.9)"
        )
    if sparsity is not None and budget is not None:
        raise OptionError(
            f"method {method!r} got both sparsity={sparsity!r} and a budget; give only one"
        )
    if sparsity is not None:
        check_fraction(sparsity, "sparsity")
    if budget is not None and not isinstance(budget, Mapping):
        raise OptionError(
            f"budget must map layer names to sparsities (a strsparse.Budget or a dict), "
            f"got {type(budget).__name__}; read a CSV with Budget.from_csv(path)"
        )
    if scope not in SCOPES:
        raise OptionError(
            f"unknown scope {scope!r}{did_you_mean(scope, SCOPES)}; valid: {', '.join(SCOPES)}"
        )
    if budget is not None and scope != "layer":
        raise OptionError(
            f"scope={scope!r} ranks all layers together and cannot follow a per-layer budget; "
            "use scope='layer' with a budget, or sparsity=<fraction> with scope='global'"
        )


@torch.no_grad()
def resolve_targets(
    names: list[str], sparsity: float | None, budget: Mapping[str, float] | None
) -> dict[str, float]:
    """Per-layer target sparsity from one ``sparsity`` or a per-layer ``budget`` (options
    already checked by ``check_target_options``)."""
    if budget is None:
        assert sparsity is not None  # check_target_options: one of the two is given
        return dict.fromkeys(names, float(sparsity))
    missing = [n for n in names if n not in budget]
    extra = [n for n in budget if n not in names]
    if extra:
        hint = did_you_mean(extra[0], names)
        raise OptionError(
            f"budget names layers that are not sparsified here: {', '.join(extra[:5])}"
            f"{' ...' if len(extra) > 5 else ''}{hint}; check include/exclude or the budget's model"
        )
    if missing:
        raise OptionError(
            f"budget has no entry for layers {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; add them or exclude them from sparsify"
        )
    return {n: check_fraction(budget[n], f"budget[{n!r}]", allow_one=True) for n in names}


def threshold_parameter(
    shape: tuple[int, ...], value: float, like: Tensor | None = None
) -> nn.Parameter:
    """A learnable threshold (STR's ``s``, a structured gate's) filled with ``value``, on
    ``like``'s device and in its dtype (a model already on a GPU, or in half precision, gets
    its thresholds there too). A weight on the meta device has no values yet: the threshold
    then starts on the CPU with its real value."""
    if like is None or like.is_meta or not like.is_floating_point():
        return nn.Parameter(torch.full(shape, float(value)))
    return nn.Parameter(torch.full(shape, float(value), device=like.device, dtype=like.dtype))


@torch.no_grad()
def zero_fraction(t: Tensor) -> float:
    """Fraction of exact zeros in ``t``."""
    return float((t == 0).sum()) / max(t.numel(), 1)
