"""A timm-style model registry: ``@register_model``, ``create_model``, ``list_models``.

Each model family lives in its own file and registers one builder function per named
architecture. A builder takes keyword-only arguments (``num_classes``, ``in_channels`` and
family-specific options) and returns an ``nn.Module``. ``create_model`` checks the name and the
keyword arguments against the builder's signature before calling it, so a typo surfaces as a
``ValueError`` that names the bad value and the closest valid one, not as a ``KeyError`` or a
``TypeError`` deep inside a constructor.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from strsparse.errors import OptionError, did_you_mean

__all__ = [
    "check_positive_float",
    "check_positive_int",
    "classifier_name",
    "create_model",
    "declared_classifier_name",
    "default_input_shape",
    "list_models",
    "model_options",
    "register_model",
]

logger = logging.getLogger(__name__)

ModelBuilder = Callable[..., nn.Module]
_F = TypeVar("_F", bound=ModelBuilder)

_MODELS: dict[str, ModelBuilder] = {}


def register_model(fn: _F) -> _F:
    """Register a model builder under its function name and return it unchanged.

    The builder must take only keyword arguments with defaults, so that ``create_model`` can
    validate option names against its signature.
    """
    name = fn.__name__
    if name in _MODELS:
        raise OptionError(f"model {name!r} is already registered; choose a different name")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def _get_builder(name: str) -> ModelBuilder:
    if not isinstance(name, str) or name not in _MODELS:
        valid = list_models()
        raise OptionError(
            f"unknown model {name!r}{did_you_mean(name, valid)}; valid models: {', '.join(valid)}"
        )
    return _MODELS[name]


def model_options(name: str) -> dict[str, Any]:
    """The keyword arguments model ``name`` accepts, with their defaults.

    Useful to validate a configuration file before building anything.
    """
    builder = _get_builder(name)
    return {
        p.name: p.default
        for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is an int >= 1, else raise a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_positive_float(value: object, name: str) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise OptionError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    ``num_classes`` and ``in_channels`` default to the model's own defaults (1000 / 3 for the
    ImageNet models, 10 / 3 for the CIFAR ResNets, 10 / 1 for the 28x28 models). Other keyword
    arguments are family options (e.g. ``width_multiplier`` for ``mobilenet_v1``); an option the
    model does not accept raises ``ValueError`` listing the accepted ones.
    """
    builder = _get_builder(name)
    accepted = model_options(name)
    for key in kwargs:
        if key not in accepted:
            raise OptionError(
                f"model {name!r} got an unknown option {key!r}{did_you_mean(key, accepted)}; "
                f"accepted options: {', '.join(sorted(accepted))}"
            )
    if num_classes is not None:
        kwargs["num_classes"] = check_positive_int(num_classes, "num_classes")
    if in_channels is not None:
        kwargs["in_channels"] = check_positive_int(in_channels, "in_channels")
    return builder(**kwargs)


def declared_classifier_name(model: nn.Module) -> str | None:
    """The ``classifier_name`` ``model`` declares (looking through ``torch.compile``), if any."""
    declared = getattr(getattr(model, "_orig_mod", model), "classifier_name", None)
    return declared if isinstance(declared, str) else None


def classifier_name(model: nn.Module) -> str:
    """Full dotted name of ``model``'s classifier layer (the rest is the "backbone").

    Every model in this package sets a class attribute ``classifier_name`` (``"fc"`` for the
    ResNets and MobileNetV1, ``"fc3"`` for the LeNets); this function reads it, looking through
    a ``torch.compile`` wrapper. For other
    models it falls back to the last registered module with a weight of >= 2 dims, which is the
    classifier in the usual ``features -> head`` layout.
    """
    declared = declared_classifier_name(model)
    if declared is not None:
        return declared
    target = getattr(model, "_orig_mod", model)
    last: str | None = None
    for module_name, module in target.named_modules():
        weight = getattr(module, "weight", None)
        if module_name and weight is not None and getattr(weight, "ndim", 0) >= 2:
            last = module_name
    if last is None:
        raise OptionError(
            f"cannot find a classifier in {type(target).__name__}: it declares no "
            "`classifier_name` attribute and has no layer with a >= 2-dim weight"
        )
    logger.debug(
        "%s declares no classifier_name; using last weighted layer %r", type(target).__name__, last
    )
    return last


def default_input_shape(name: str, **kwargs: Any) -> tuple[int, ...]:
    """The per-sample input shape (C, H, W) model ``name`` is built for (its ``input_shape``):
    3x224x224 for the ImageNet models, 3x32x32 for the CIFAR ones, 1x28x28 for the LeNets."""
    with torch.device("meta"):  # no memory, no initialisation cost
        model = create_model(name, **kwargs)
    return tuple(getattr(model, "input_shape"))  # noqa: B009  (set by every registered model)
