"""Typed, strictly validated run configuration: ``load_config``, ``save_config``.

A run is described by one YAML file (one per experiment, as in the STR authors' code) plus
``dotted.key=value`` overrides from the command line:

>>> cfg = load_config("fashion_mnist_str", ["optim.lr=0.05", "sparsity.options.init_threshold=-5"])
>>> cfg.optim.lr, cfg.sparsity.options["init_threshold"]
(0.05, -5)

Every section is a frozen dataclass checked on construction, so a configuration built in
code (``dataclasses.replace(cfg.optim, lr=0.05)``) is validated like one read from YAML.
Loading is strict: an unknown key, a wrong type, a value outside its range or an unknown
name raises ``ConfigError`` (a ``ValueError``) whose one-line message names the full dotted
key, the bad value, what is allowed and the closest valid spelling. A misspelled key is never
silently ignored. Free-form mappings (``model.kwargs``, ``sparsity.options``) accept any keys;
they are checked later by the model and the sparsity method.

YAML 1.1 quirk: PyYAML reads ``1e-4`` (no dot, or no sign in the exponent) as the *string*
``"1e-4"``. The loader here resolves such scalars as floats, and float fields also accept
strings that parse as floats, so ``weight_decay: 1e-4`` means what it says. Likewise only
``true`` / ``false`` are booleans (YAML 1.2): ``amp: off`` is the string ``"off"``, not False.
Duplicate keys in a mapping are an error, not a silent "last one wins".
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import yaml

from strsparse.atomic import write_atomic
from strsparse.data import list_datasets
from strsparse.errors import StrsparseError, closest_match
from strsparse.methods import list_methods
from strsparse.models import list_models

__all__ = [
    "AMP_MODES",
    "OPTIMIZERS",
    "SCHEDULES",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "SparsityConfig",
    "SyntheticConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "list_configs",
    "load_config",
    "parse_override",
    "save_config",
]

# the names ``optim.name`` and ``schedule.name`` accept (the trainer implements each)
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "multistep", "constant")
AMP_MODES = ("off", "bf16", "fp16")
# optim.lr_scaling: how the learning rate follows the number of torchrun processes
LR_SCALINGS = ("none", "linear")
DENSE = "dense"  # sparsity.method of a dense baseline: the model is not sparsified

_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class ConfigError(StrsparseError, ValueError):
    """An invalid configuration: the message names the key, the value and what is allowed."""


# -- validation helpers ----------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _show(value: Any) -> str:
    """A short rendering of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _did_you_mean(value: str, valid: Sequence[str], prefix: str = "") -> str:
    """'did you mean 'optim.lr'? ' for the closest valid name (a full dotted key), or ''."""
    match = closest_match(value, valid)
    return f"did you mean {_join(prefix, match)!r}? " if match else ""


def _check_choice(value: str, valid: Sequence[str], key: str) -> None:
    if value not in valid:
        raise ConfigError(
            f"invalid value for {key!r}: {_show(value)}; {_did_you_mean(value, valid)}"
            f"allowed: {', '.join(valid)}"
        )


def _check_range(
    value: float | None,
    key: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
) -> None:
    """Raise unless ``value`` (None passes: optional fields) satisfies the bounds."""
    if value is None:
        return
    if gt is not None and not value > gt:
        raise ConfigError(f"invalid value for {key!r}: {_show(value)}; must be > {gt}")
    if ge is not None and not value >= ge:
        raise ConfigError(f"invalid value for {key!r}: {_show(value)}; must be >= {ge}")
    if lt is not None and not value < lt:
        raise ConfigError(f"invalid value for {key!r}: {_show(value)}; must be < {lt}")


def _type_name(tp: Any) -> str:
    """'float', 'int or null', 'list of str', 'mapping' ... for error messages."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        optional = " or null" if type(None) in args else ""
        return " or ".join(names) + optional
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "list [" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _type_error(value: Any, tp: Any, key: str) -> ConfigError:
    return ConfigError(
        f"invalid type for {key!r}: {_show(value)} ({type(value).__name__}); "
        f"expected {_type_name(tp)}"
    )


def _plain(value: Any, key: str) -> Any:
    """``value`` as plain YAML data (tuples become lists); anything else is an error, so that
    free-form mappings survive ``save_config`` / ``load_config`` unchanged."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"invalid key in {key!r}: {_show(k)}; keys must be strings")
            out[k] = _plain(v, _join(key, k))
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(
        f"invalid type for {key!r}: {_show(value)} ({type(value).__name__}); "
        "expected plain data (null, bool, number, string, list or mapping)"
    )


def _coerce(value: Any, tp: Any, key: str, shown: Any = None) -> Any:
    """``value`` checked against the annotation ``tp`` and converted where lossless:
    int -> float, a float-looking string -> float, list -> tuple, mapping -> section."""
    origin, args = get_origin(tp), get_args(tp)
    shown = tp if shown is None else shown  # the annotation named in a type error
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(value, shown, key)
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, shown)
    if value is None:
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # `train:` alone: defaults
            return tp()
        raise _type_error(value, shown, key)
    if tp is Any:
        return _plain(value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, shown, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(value, shown, key)
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string: accept it
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None:
            raise _type_error(value, shown, key)
        if not math.isfinite(number):
            raise ConfigError(f"invalid value for {key!r}: {_show(value)}; must be finite")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(value, shown, key)
    if origin is tuple:
        if isinstance(value, str) and args[-1] is Ellipsis and args[0] is str:
            value = [value]  # include: conv1  ==  include: [conv1]
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, shown, key)
        if args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"invalid value for {key!r}: {_show(value)}; expected {_type_name(shown)}"
            )
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(value, shown, key)
        return _plain(value, key)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _section_from_dict(tp, value, key)
        raise _type_error(value, shown, key)
    raise TypeError(f"unsupported config annotation {tp!r} for {key!r}")  # a bug here


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        hints = get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _section_from_dict(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Build section ``cls`` from ``data``, rejecting unknown keys with a suggestion."""
    names = list(_hints(cls))
    for key, value in data.items():
        if key not in names:
            full = _join(prefix, str(key))
            raise ConfigError(
                f"unknown key {full!r} (value {_show(value)}); "
                f"{_did_you_mean(str(key), names, prefix)}allowed: {', '.join(names)}"
            )
    kwargs = {k: _coerce(v, _hints(cls)[k], _join(prefix, k)) for k, v in data.items()}
    return cls(**kwargs)


class _Section:
    """Base of the config sections: type-checks and converts every field on construction,
    then runs the section's own range and name checks (``_check``)."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name, tp in _hints(type(self)).items():
            value = _coerce(getattr(self, name), tp, _join(self._prefix, name))
            object.__setattr__(self, name, value)  # frozen dataclasses
        self._check()

    def _check(self) -> None:
        """Range and name checks (after types); overridden per section."""

    def _key(self, name: str) -> str:
        return _join(self._prefix, name)


# -- the sections ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig(_Section):
    """``model``: a registered architecture (``strsparse.models.list_models()``).

    ``num_classes`` / ``in_channels`` default to the dataset's; ``kwargs`` go to the model
    builder (e.g. ``width_multiplier`` of MobileNetV1).
    """

    _prefix: ClassVar[str] = "model"

    name: str = "lenet5"
    num_classes: int | None = None
    in_channels: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def _check(self) -> None:
        _check_choice(self.name, list_models(), self._key("name"))
        _check_range(self.num_classes, self._key("num_classes"), ge=1)
        _check_range(self.in_channels, self._key("in_channels"), ge=1)


@dataclass(frozen=True)
class SyntheticConfig(_Section):
    """``data.synthetic``: sizes of the seeded random dataset (``data.name: synthetic``).

    Samples of class c are a fixed random template of that class plus unit Gaussian noise,
    so a model can learn them; ``shape`` is one sample's (C, H, W) (or any 1-3 dims).
    """

    _prefix: ClassVar[str] = "data.synthetic"

    num_train: int = 2048
    num_val: int = 512
    num_classes: int = 10
    shape: tuple[int, ...] = (1, 28, 28)
    seed: int = 0

    def _check(self) -> None:
        _check_range(self.num_train, self._key("num_train"), ge=1)
        _check_range(self.num_val, self._key("num_val"), ge=1)
        _check_range(self.num_classes, self._key("num_classes"), ge=2)
        _check_range(self.seed, self._key("seed"), ge=0)
        if not 1 <= len(self.shape) <= 3 or min(self.shape) < 1:
            raise ConfigError(
                f"invalid value for {self._key('shape')!r}: {list(self.shape)}; expected 1 to 3 "
                "positive sizes, e.g. [1, 28, 28] (C, H, W)"
            )


@dataclass(frozen=True)
class DataConfig(_Section):
    """``data``: which dataset and how to batch it (see ``strsparse.data``).

    ``root``: the dataset directory (Fashion-MNIST: Debian's ``dataset-fashion-mnist`` location
    when null; ImageFolder: required, holding ``train/`` and ``val/``). ``train_limit`` /
    ``val_limit`` keep the first N samples (smoke tests). ``image_size``: ImageFolder crop size.
    ``augment``: random crop (2 px padding) + horizontal flip for the in-memory image datasets
    (ImageFolder always augments its training split). ``num_classes``: ImageFolder's class
    count when known (ImageNet: 1000), so a checkpoint can be rebuilt without the data.
    """

    _prefix: ClassVar[str] = "data"

    name: str = "fashion_mnist"
    root: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0
    train_limit: int | None = None
    val_limit: int | None = None
    image_size: int = 224
    augment: bool = False
    num_classes: int | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def _check(self) -> None:
        _check_choice(self.name, list_datasets(), self._key("name"))
        _check_range(self.batch_size, self._key("batch_size"), ge=1)
        _check_range(self.eval_batch_size, self._key("eval_batch_size"), ge=1)
        _check_range(self.num_workers, self._key("num_workers"), ge=0)
        _check_range(self.train_limit, self._key("train_limit"), ge=1)
        _check_range(self.val_limit, self._key("val_limit"), ge=1)
        _check_range(self.image_size, self._key("image_size"), ge=1)
        _check_range(self.num_classes, self._key("num_classes"), ge=1)


@dataclass(frozen=True)
class SparsityConfig(_Section):
    """``sparsity``: the method passed to ``strsparse.sparsify`` (``dense``: none).

    ``include`` / ``exclude``: glob patterns over full dotted module names. ``options``:
    the method's keyword arguments (STR: ``init_threshold``, ``granularity``, ``g``, ``k``;
    GMP/ST-3/DNW: ``sparsity``, ``start``, ``end``, ...). ``budget``: per-layer targets from a
    CSV file, a checkpoint / run directory (budget transfer) or a paper budget name.
    """

    _prefix: ClassVar[str] = "sparsity"

    method: str = "str"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    budget: str | None = None

    def _check(self) -> None:
        _check_choice(self.method, [*list_methods(), DENSE], self._key("method"))


@dataclass(frozen=True)
class OptimConfig(_Section):
    """``optim``: optimizer and weight decay.

    STR's sparsity is driven by weight decay on the threshold ``s`` (Kusupati et al., 2020,
    eq. 6), so ``threshold_weight_decay`` (null: same as ``weight_decay``) is its main knob.
    ``norm_bias_decay``: also decay norm-layer parameters and biases (the authors' code did).
    ``lr_scaling``: under torchrun every process takes ``data.batch_size`` samples per step,
    so the global batch grows with the number of processes and an epoch has fewer steps;
    ``linear`` multiplies ``lr`` by the number of processes (Goyal et al., 2017), ``none``
    keeps it.
    """

    _prefix: ClassVar[str] = "optim"

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 5e-5
    threshold_weight_decay: float | None = None
    norm_bias_decay: bool = False
    lr_scaling: str = "none"

    def _check(self) -> None:
        _check_choice(self.name, OPTIMIZERS, self._key("name"))
        _check_choice(self.lr_scaling, LR_SCALINGS, self._key("lr_scaling"))
        _check_range(self.lr, self._key("lr"), gt=0.0)
        _check_range(self.momentum, self._key("momentum"), ge=0.0, lt=1.0)
        for i, beta in enumerate(self.betas):
            _check_range(beta, f"{self._key('betas')}[{i}]", ge=0.0, lt=1.0)
        _check_range(self.eps, self._key("eps"), gt=0.0)
        _check_range(self.weight_decay, self._key("weight_decay"), ge=0.0)
        _check_range(self.threshold_weight_decay, self._key("threshold_weight_decay"), ge=0.0)
        if self.nesterov and (self.name != "sgd" or self.momentum == 0.0):
            raise ConfigError(
                f"invalid value for {self._key('nesterov')!r}: True; Nesterov momentum needs "
                f"optim.name=sgd and optim.momentum > 0 (got {self.name!r}, {self.momentum})"
            )


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    """``schedule``: the learning-rate schedule, a pure function of the step.

    ``warmup_epochs``: linear warmup (the paper: 5 epochs, lr * (e + 1) / 5); ``min_lr``:
    cosine floor; ``step_size`` / ``milestones`` / ``gamma``: step and multistep decay.
    """

    _prefix: ClassVar[str] = "schedule"

    name: str = "cosine"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    step_size: int = 30
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def _check(self) -> None:
        _check_choice(self.name, SCHEDULES, self._key("name"))
        _check_range(self.warmup_epochs, self._key("warmup_epochs"), ge=0.0)
        _check_range(self.min_lr, self._key("min_lr"), ge=0.0)
        _check_range(self.step_size, self._key("step_size"), ge=1)
        _check_range(self.gamma, self._key("gamma"), gt=0.0)
        for i, m in enumerate(self.milestones):
            _check_range(m, f"{self._key('milestones')}[{i}]", ge=1)
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ConfigError(
                f"invalid value for {self._key('milestones')!r}: {list(self.milestones)}; "
                "must be strictly increasing epochs"
            )
        if self.name == "multistep" and not self.milestones:
            raise ConfigError(
                f"{self._key('milestones')!r} is empty; schedule.name=multistep needs epochs "
                "to decay at, e.g. schedule.milestones=[30,60,90]"
            )


@dataclass(frozen=True)
class TrainConfig(_Section):
    """``train``: the loop.

    ``amp``: autocast dtype on CUDA (``off``, ``bf16``, ``fp16`` with a grad scaler); the
    trainer trains in fp32 on CPU. ``channels_last``: NHWC memory format on CUDA.
    ``max_steps_per_epoch``: cut epochs short (smoke tests, benchmarks). ``num_threads``:
    CPU threads (null: chosen by the trainer). ``save_every``: keep every N-th epoch's
    checkpoint besides ``last.pt`` / ``best.pt`` (0: none). ``checkpoint_every_steps``: also
    write ``last.pt`` every N optimizer steps inside an epoch, for pre-emptible jobs; a
    resume from it is exact (0: at epoch ends only).
    """

    _prefix: ClassVar[str] = "train"

    epochs: int = 10
    label_smoothing: float = 0.0
    amp: str = "off"
    channels_last: bool = False
    log_every: int = 50
    quiet: bool = False
    max_steps_per_epoch: int | None = None
    deterministic: bool = True
    grad_clip: float | None = None
    num_threads: int | None = None
    save_every: int = 0
    checkpoint_every_steps: int = 0
    tensorboard: bool = True

    def _check(self) -> None:
        _check_range(self.epochs, self._key("epochs"), ge=1)
        _check_range(self.label_smoothing, self._key("label_smoothing"), ge=0.0, lt=1.0)
        _check_choice(self.amp, AMP_MODES, self._key("amp"))
        _check_range(self.log_every, self._key("log_every"), ge=1)
        _check_range(self.max_steps_per_epoch, self._key("max_steps_per_epoch"), ge=1)
        _check_range(self.grad_clip, self._key("grad_clip"), gt=0.0)
        _check_range(self.num_threads, self._key("num_threads"), ge=1)
        _check_range(self.save_every, self._key("save_every"), ge=0)
        _check_range(self.checkpoint_every_steps, self._key("checkpoint_every_steps"), ge=0)


@dataclass(frozen=True)
class Config(_Section):
    """A whole run. The run directory is ``output_dir / name``; ``device`` is ``auto``
    (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def _check(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ConfigError(
                f"invalid value for 'name': {_show(self.name)}; the run name must be a "
                "non-empty directory name without '/' (it becomes output_dir/name)"
            )
        _check_range(self.seed, "seed", ge=0)
        if not _DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(
                f"invalid value for 'device': {_show(self.device)}; "
                f"{_did_you_mean(self.device, ['auto', 'cpu', 'cuda'])}"
                "allowed: auto, cpu, cuda, cuda:N"
            )
        if self.schedule.min_lr > self.optim.lr:
            raise ConfigError(
                f"invalid value for 'schedule.min_lr': {self.schedule.min_lr}; must not "
                f"exceed optim.lr ({self.optim.lr})"
            )


# -- YAML ------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads ``1e-4`` / ``5E3`` as floats."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise ConfigError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1}: "
                "each key may appear once"
            )
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.2 floats that YAML 1.1 (PyYAML) leaves as strings: an exponent without a dot or
# without a sign (1e-4, 5e3, 1.5E3). Integers never match (an exponent is required).
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789.")
)
# YAML 1.2 booleans: only true/false. YAML 1.1 also reads on/off/yes/no as booleans, which
# would turn ``amp: off`` into False and ``name: no`` into a bool.
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in _StrictLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class _Dumper(yaml.SafeDumper):
    """Block-style sections; lists of scalars on one line (``shape: [1, 28, 28]``)."""


def _represent_list(dumper: _Dumper, data: list[Any]) -> yaml.Node:
    flat = all(not isinstance(v, (list, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)
# quote strings that our loader would read as floats ("1e-4"), besides YAML 1.1's non-strings
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None


# -- shipped configs -------------------------------------------------------------------------


def _shipped_dir() -> Any:
    return resources.files("strsparse") / "configs"


def list_configs() -> list[str]:
    """Names of the configurations shipped with strsparse (``load_config(name)``), sorted."""
    folder = _shipped_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_source(path_or_name: str | os.PathLike[str]) -> tuple[str, str]:
    """(YAML text, a name for messages) of a config file or a shipped config's name."""
    path = Path(path_or_name)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
    name = str(path_or_name)
    if path.is_dir():
        raise ConfigError(
            f"{name!r} is a directory, not a config file: pass a YAML file or the name of a "
            "shipped config ('strsparse list configs')"
        )
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    shipped = list_configs()
    if stem in shipped:
        return (_shipped_dir() / f"{stem}.yaml").read_text(encoding="utf-8"), stem
    if path.suffix in (".yaml", ".yml") or os.sep in name or "/" in name:
        raise ConfigError(f"config file not found: {name!r}")
    raise ConfigError(
        f"unknown config {name!r}: neither a file nor a shipped config; "
        f"{_did_you_mean(stem, shipped)}'strsparse list configs' lists the {len(shipped)} "
        "shipped ones"
    )


# -- overrides -------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.05'`` -> (['optim', 'lr'], 0.05). The value is read as YAML, so
    negative numbers, ``null``, ``true``, lists (``[conv1,fc]``) and mappings work."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise ConfigError(
            f"invalid override {text!r}: expected dotted.key=value, "
            "e.g. optim.lr=0.05 or sparsity.include=[conv1,fc]"
        )
    value = _yaml_load(raw, f"override {text!r}")  # an empty value is null, as in YAML
    return parts, _as_text_if_str_field(parts, value, raw)


def _as_text_if_str_field(parts: list[str], value: Any, raw: str) -> Any:
    """For a string field, keep the override's text (``name=2024`` is the run name '2024',
    ``name=yes`` is 'yes', not True); ``null`` stays None."""
    cls: Any = Config
    tp: Any = None
    for i, part in enumerate(parts):
        hints = _hints(cls) if isinstance(cls, type) and dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return value
        tp = hints[part]
        if i < len(parts) - 1:
            cls = tp
    is_str = tp is str or (get_origin(tp) in (Union, types.UnionType) and str in get_args(tp))
    if is_str and value is not None and isinstance(value, (bool, int, float)):
        return raw.strip()
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the raw config mapping ``data`` with ``dotted.key=value`` overrides applied
    (checked later, like the YAML itself)."""
    out = _deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"invalid override {text!r}: {where!r} is {_show(child)}, not a section"
                )
            node = child
        node[parts[-1]] = value
    return out


def _deepcopy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


# -- public entry points ---------------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A validated ``Config`` from plain data (a parsed YAML file, a checkpoint's copy)."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"a config must be a mapping of sections, got {type(data).__name__}: {_show(data)}"
        )
    return _section_from_dict(Config, data, "")


def load_config(path_or_name: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config file, or a shipped config by name (``list_configs()``), apply
    ``dotted.key=value`` overrides and validate. Raises ``ConfigError`` on any problem."""
    if isinstance(overrides, str):
        overrides = [overrides]
    text, source = _read_source(path_or_name)
    data = _yaml_load(text, source)
    if data is None:  # defaults under the name 'run' would hide a wrong or unsaved file
        raise ConfigError(
            f"{source}: the config is empty; give at least the sections that differ from the "
            "defaults, e.g. 'name: my_run' (a shipped config is a starting point: "
            "'strsparse list configs')"
        )
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: a config must be a mapping of sections, got {type(data).__name__}"
        )
    return config_from_dict(apply_overrides(data, overrides))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """``cfg`` as plain data (tuples as lists): what ``save_config`` writes and checkpoints
    store; ``config_from_dict`` turns it back into an equal ``Config``."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` as YAML atomically (temporary file, then rename); returns the path."""
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    return write_atomic(path, text)
