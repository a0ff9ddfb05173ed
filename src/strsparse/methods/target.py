"""A sparsity (or FLOPs) target for STR: one shared pressure that steers every layer's ``s``.

STR's final sparsity is set indirectly by the weight decay on ``s`` (Kusupati et al., 2020,
eq. 6). ``sparsify(model, "str", sparsity=0.95)`` replaces that knob with a controller: each
optimizer step it measures the (cost-weighted) density D of the sparsified weights, compares
it with a cubic schedule D*_t that goes from dense to the target between ``start`` and
``end`` and then holds, and moves every threshold by one shared, signed amount rho,

    s_e <- s_e + rho * c_l * w_e * (d log g / ds)(s_e),   w_e = max(-log(t_e / k), 1)
    (log t_e moves by rho * c_l * w_e * (d log g / ds)(s_e)^2),

on top of the optimizer's own update of ``s`` from the task gradient. rho comes from a PI
controller on the log-density error e = ln D - ln D*_t (the same relative miss means the
same at 50% and at 99% sparsity), divided by the measured elasticity -d ln D / d log t (how
many weights sit just above the thresholds: STR piles them up there, so a fixed gain would
oscillate on one model and crawl on another) and clipped. The pressure is applied
decoupled from the optimizer, as AdamW decouples weight decay: its strength does not depend
on the learning rate, momentum or Adam's normalisation, so the target is held even when the
learning rate has decayed. w_e is the profile of the paper's decay (which moves s by
lambda * |s|, and |s| ~ -log(t / k) for small thresholds), so layers with small weights drift
faster, as with the decay, but it never falls below 1, so the drift has no fixed point (the
decay cannot lift a sigmoid threshold past 0.5). Because it is a common drift, not a
threshold, each layer still settles where its own task gradient balances it: layers whose
weights matter push their threshold back, the others drift up, and the budget is learned.
The drift is the gradient step of a penalty on log t, so it reaches ``s`` through the same
factor d log g / ds as the task gradient: where a sigmoid threshold nears k and the task
gradient fades, the drift fades with it, and the balance between the two, which is what sets
each layer's budget, does not depend on where on the sigmoid a layer sits (a drift fixed in
log-t units pushed small layers onto the flat of the sigmoid, t -> k, where their task
gradient could no longer pull them back).
c_l is 1 for a sparsity target and (FLOPs per weight / the largest)^(1/4) for a FLOPs target.
Structured STR (``structure="filter"`` or ``"rank"``) takes a target too: the thresholds then
compare against each layer's importance vector m, so the density is the fraction of filters
(or rank-one components) still alive, and the target the fraction removed; with ``flops``,
the density is the share of the dense FLOPs that the model ``strsparse.slim`` would make
still costs (``ChannelFlops``).
A layer whose weights are all zero is not pushed further up (it gets no task gradient to
come back with), and one that zeroes nothing is not pulled further down; under a FLOPs
target the push fades out as a layer nears a floor (``layer_floor``), and a layer left below
it has its thresholds lowered until it is back at the floor, so none is emptied.

The controller's state (its integral, the last step, the scheduled and achieved density)
lives in buffers of a module shared by every layer's parametrization: it is in the model's
``state_dict``, a resumed run continues exactly, and every rank of a data-parallel job, with
the same weights, computes the same update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from strsparse.errors import OptionError
from strsparse.functional import cubic_sparsity
from strsparse.methods.base import LayerWeight, get_parametrization, raw_weight, schedule_window

__all__ = [
    "ChannelFlops",
    "ControllerGains",
    "TargetController",
    "density_error",
    "flops_costs",
    "flops_pressure",
    "layer_floor",
    "register_flops_counter",
    "log_threshold_gradient",
    "register_channel_flops",
]


def density_error(density: float, target_density: float) -> float:
    """e = ln(D) - ln(D*): positive while the model is denser than the target.

    The log makes one error mean the same relative miss at 50% and at 99% sparsity.
    """
    eps = 1e-12
    return math.log(max(density, eps)) - math.log(max(target_density, eps))


def log_threshold_gradient(g: str, s: Tensor) -> Tensor:
    """d log g(s) / ds for the threshold functions: sigmoid(-s) for sigmoid, 1 for exp."""
    if g == "sigmoid":
        return torch.sigmoid(-s)
    if g == "exp":
        return torch.ones_like(s)
    raise OptionError(f"no log-derivative for threshold function g={g!r}")


def _threshold_method(layer: LayerWeight) -> Any:
    """The learned-threshold parametrization (STR's) on ``layer``: its ``s``, ``k``,
    ``g_name`` and ``threshold_tensor()``."""
    p = get_parametrization(layer)
    if p is None:
        raise OptionError(f"{layer!r} carries no sparsity parametrization")
    return p


def _thresholded(layer: LayerWeight) -> Tensor:
    """What ``layer``'s thresholds compare against: its stored weight, or a structured
    gate's importance vector (one entry per filter or rank-one component)."""
    return _threshold_method(layer).thresholded(raw_weight(layer))


# the target's kind for each structure of STR: what a density counts
TARGET_KINDS = {"weight": "sparsity", "filter": "filters", "rank": "ranks"}


# (model, one sample's input shape) -> ({module name: (FLOPs, params)}, total dense FLOPs):
# ``strsparse.flops`` registers its counter here when it is imported (it sits above the
# methods in the package's layers, so the methods cannot import it)
FlopsCounter = Callable[[nn.Module, tuple[int, ...]], tuple[dict[str, tuple[int, int]], int]]
_FLOPS_COUNTER: list[FlopsCounter] = []


def register_flops_counter(counter: FlopsCounter) -> None:
    """Install the FLOPs counter a FLOPs target uses (``strsparse.flops`` does, on import)."""
    _FLOPS_COUNTER[:] = [counter]


def flops_costs(
    model: nn.Module, layers: Mapping[str, Any], input_shape: tuple[int, ...]
) -> tuple[dict[str, float], float]:
    """(layer -> dense FLOPs per weight, FLOPs that no sparsified layer holds) of one forward
    pass of ``model`` on ``input_shape``, counted by ``strsparse.flops``."""
    if not _FLOPS_COUNTER:
        raise RuntimeError("no FLOPs counter registered: import strsparse.flops first")
    records, total = _FLOPS_COUNTER[0](model, input_shape)
    missing = [n for n in layers if n not in records]
    if missing:
        raise OptionError(
            f"the FLOPs counter sees no module for layers {', '.join(missing[:5])}; a FLOPs "
            "target needs layers that are modules of their own (Linear, Conv)"
        )
    costs = {n: records[n][0] / max(records[n][1], 1) for n in layers}
    fixed = total - sum(records[n][0] for n in layers)
    return costs, float(fixed)


def flops_pressure(costs: Mapping[str, float], exponent: float = 0.25) -> dict[str, float]:
    """Each layer's share of the drift for a FLOPs target: (FLOPs per weight)^exponent over
    the largest, so the costliest weights feel the full drift and a fully connected layer
    (1 FLOP per weight) next to a convolution with 784 feels 784^-0.25 = 0.19 of it."""
    top = max(costs.values(), default=0.0)
    if top <= 0.0:  # nothing counted: an even share
        return dict.fromkeys(costs, 1.0)
    return {n: (c / top) ** exponent for n, c in costs.items()}


@dataclass(frozen=True)
class ChannelFlops:
    """The FLOPs of the model ``slim`` would make of a structured model, as a function of
    which filters (rank-one components) are alive: what a FLOPs target with a structure
    counts.

    Every channel belongs to a class that slim keeps or removes whole (channels tied by an
    addition, the CIFAR ResNets' shortcut, a depthwise conv: ``strsparse.slim``). A class is
    alive while any gated filter that produces it is, or always (``base``) where an ungated
    layer produces it, the model's input or output holds it, or an operation slim cannot
    follow keeps it. A gated depthwise conv (``cuts``) removes the channels whose filter it
    lost whatever produced them, unless the class is ``frozen``. Each counted layer (a
    ``term``) costs its dense FLOPs times the alive fraction of its input channels and of its
    output channels (1 for a side it does not couple: a depthwise conv's or a pool's output,
    a rank-one component's); whatever no class changes is ``fixed``. As slim does, a tensor
    left without any channel keeps its first one (``tensors``: the classes of each tensor of
    the graph, in order).

    ``classes``: gated layer -> class of each of its filters (``cuts``: of each depthwise
    filter); ``inputs`` / ``outputs``: (class, term) of every input / output channel of every
    term, a flattened channel once per feature, so a Linear after a flatten sees the share of
    its features.
    """

    classes: dict[str, Tensor]
    cuts: dict[str, Tensor]
    base: Tensor
    frozen: Tensor
    flops: Tensor
    inputs: tuple[Tensor, Tensor]
    outputs: tuple[Tensor, Tensor]
    tensors: list[Tensor]
    fixed: float
    total: float
    _sides: list[tuple[Tensor, Tensor, Tensor, Tensor]] = field(init=False, repr=False)
    _gated: Tensor = field(init=False, repr=False)
    _members: tuple[Tensor, Tensor] = field(init=False, repr=False)

    def to(self, device: torch.device) -> ChannelFlops:
        return ChannelFlops(
            {n: c.to(device) for n, c in self.classes.items()},
            {n: c.to(device) for n, c in self.cuts.items()},
            self.base.to(device),
            self.frozen.to(device),
            self.flops.to(device),
            (self.inputs[0].to(device), self.inputs[1].to(device)),
            (self.outputs[0].to(device), self.outputs[1].to(device)),
            [t.to(device) for t in self.tensors],
            self.fixed,
            self.total,
        )

    def __post_init__(self) -> None:
        # what does not change between calls: per side, each entry's weight 1 / (its term's
        # channels) and the share of a term without channels on that side (1); the gated
        # filters' classes in one index
        sides = []
        for cls, term in (self.inputs, self.outputs):
            ones = torch.ones_like(cls, dtype=self.flops.dtype)
            count = torch.zeros_like(self.flops).index_add_(0, term, ones)
            sides.append((cls, term, (1.0 / count.clamp_min(1))[term], (count == 0).to(ones)))
        object.__setattr__(self, "_sides", sides)
        gated = list(self.classes.values())
        empty = torch.zeros(0, dtype=torch.long, device=self.base.device)
        object.__setattr__(self, "_gated", torch.cat(gated) if gated else empty)
        members = torch.cat(self.tensors) if self.tensors else empty
        which = torch.cat(
            [torch.full_like(t, i) for i, t in enumerate(self.tensors)] if self.tensors else [empty]
        )
        object.__setattr__(self, "_members", (members, which))

    def fraction(self, alive: Mapping[str, Tensor]) -> float:
        """The slim model's FLOPs over the dense model's, with ``alive`` (layer -> bool per
        filter) the gated filters that survive."""
        cls_alive = self.base.clone()
        if self.classes:
            masks = torch.cat([alive[name] for name in self.classes]).to(cls_alive.device)
            cls_alive[self._gated[masks]] = True
        for name, classes in self.cuts.items():
            keep = alive[name].to(classes.device) | self.frozen[classes]
            cls_alive[classes] &= keep
        self._keep_one(cls_alive)
        a = cls_alive.to(self.flops.dtype)
        kept = self.flops
        for cls, term, weight, empty in self._sides:
            kept = kept * empty.index_add(0, term, a[cls] * weight)
        return (self.fixed + float(kept.sum())) / self.total

    def _keep_one(self, cls_alive: Tensor) -> None:
        """Give every tensor left without channels its first one back, in graph order (as
        slim does, so a later tensor may find one of its channels kept already)."""
        members, which = self._members
        count = torch.zeros(len(self.tensors), dtype=torch.int32, device=cls_alive.device)
        count.index_add_(0, which, cls_alive[members].to(torch.int32))
        for i in (count == 0).nonzero().flatten().tolist():  # rare: no sync beyond this one
            classes = self.tensors[i]
            if len(classes) and not bool(cls_alive[classes].any()):
                cls_alive[classes[0]] = True

    def prices(self) -> dict[str, float]:
        """Gated layer -> the dense FLOPs that depend on one of its filters, on average: its
        share of every term that reads or writes its channels, divided among the filters
        that write the same class (a residual stream goes only when all of them go; a
        depthwise filter alone removes its channel, and counts in full)."""
        depends = torch.zeros_like(self.base, dtype=self.flops.dtype)
        for cls, term, weight, _ in self._sides:  # a term's FLOPs over its channels
            depends.index_add_(0, cls, self.flops[term] * weight)
        writers = torch.zeros_like(depends).index_add_(
            0, self._gated, torch.ones_like(self._gated, dtype=depends.dtype)
        )
        shared = depends / writers.clamp_min(1)
        prices = {n: float(shared[c].mean()) for n, c in self.classes.items()}
        prices.update({n: float(depends[c].mean()) for n, c in self.cuts.items()})
        return prices


# (model, gated layers, one sample's input shape, structure) -> ChannelFlops:
# ``strsparse.slimming`` registers its channel analysis here when it is imported
ChannelFlopsBuilder = Callable[[nn.Module, Mapping[str, Any], tuple[int, ...], str], ChannelFlops]
_CHANNEL_FLOPS: list[ChannelFlopsBuilder] = []


def register_channel_flops(builder: ChannelFlopsBuilder) -> None:
    """Install what a structured FLOPs target counts with (``strsparse.slimming`` does)."""
    _CHANNEL_FLOPS[:] = [builder]


def layer_floor(numel: int, target_density: float) -> int:
    """The fewest weights (filters, rank-one components) a layer keeps under a FLOPs or a
    structured target: 1% of it, or half the density a uniform budget would give it when
    that is less, and at least one. The drift fades out as a layer nears it: an emptied layer
    cuts the network, and its weights get no task gradient to come back with."""
    return max(1, math.ceil(min(0.01, 0.5 * target_density) * numel))


# with a FLOPs target no threshold stays below this fraction of its layer's largest weight
# (see TargetController._hold_reach)
REACH = 1e-3


@dataclass(frozen=True)
class ControllerGains:
    """Gains of the per-step controller, in log-threshold units per step:
    rho = clip((proportional * e + integral * sum(e)) / elasticity, -max_rate, max_rate), the
    elasticity -d ln D / d log t measured by moving every threshold by ``probe`` (at least
    ``min_elasticity``). With proportional = 0.5 each step closes about half the gap."""

    proportional: float = 0.5
    integral: float = 0.02
    max_rate: float = 0.5
    probe: float = 0.05
    min_elasticity: float = 0.2


# Structured STR: a layer's importance values start equal (1) and part only as training
# tells the filters apart, so a threshold that reaches them early prunes most of them at
# once, at random. No step goes further than the probe looked: from its start (1% of the
# values) the threshold needs about 90 steps to reach them, which they spend parting.
STRUCTURED_GAINS = ControllerGains(max_rate=ControllerGains.probe)
# Under a FLOPs target the costly filters, which the task needs most, have to go: their
# task gradient held the thresholds back against a drift of 0.05 a step (LeNet-5 at a 30%
# target lagged the schedule by 11 to 22 points of FLOPs for most of training). The halving of a
# step that would cross the schedule (``_within_gap``) still bounds each step.
STRUCTURED_FLOPS_GAINS = ControllerGains(max_rate=0.15)


class TargetController(nn.Module):
    """Drives STR's thresholds to a density schedule with one shared, decoupled pressure.

    The model-level handle owns it (``SparsityHandle.step`` calls :meth:`step` once per
    optimizer step, before the forward pass); its buffers (``integral``, ``last_step``,
    ``scheduled``, ``achieved``, ``rate``) are registered under every STR parametrization of
    the model, so they are part of ``state_dict`` and an interrupted run resumes exactly.

    ``costs``: layer name -> cost of one weight (1 for a sparsity target, FLOPs per weight
    for a FLOPs target). ``fixed_cost`` is the cost that no threshold controls (dense layers,
    pooling) and counts in the density. ``target_density`` is 1 - sparsity, or the FLOPs
    fraction. ``pressure_weights``: layer name -> c_l, the relative pressure (default 1).
    ``kind``: ``"sparsity"``, ``"flops"``, or for structured STR ``"filters"`` / ``"ranks"``
    (the fraction of filters or rank-one components removed). ``channel_flops``: for a FLOPs
    target with a structure, the slim model's FLOPs as a function of the filters alive
    (``costs`` then go unused).
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        *,
        target_density: float,
        kind: str,
        start: int | float,
        end: int | float,
        costs: Mapping[str, float] | None = None,
        pressure_weights: Mapping[str, float] | None = None,
        fixed_cost: float = 0.0,
        min_kept: Mapping[str, int] | None = None,
        gains: ControllerGains | None = None,
        channel_flops: ChannelFlops | None = None,
    ) -> None:
        super().__init__()
        self.layer_names = list(layer_names)
        self.integral: Tensor
        self.last_step: Tensor
        self.scheduled: Tensor
        self.achieved: Tensor
        self.rate: Tensor
        self.target_density = float(target_density)
        self.kind = kind
        self.start, self.end = start, end
        self.costs = {n: float((costs or {}).get(n, 1.0)) for n in self.layer_names}
        self.pressure_weights = {
            n: float((pressure_weights or {}).get(n, 1.0)) for n in self.layer_names
        }
        self.fixed_cost = float(fixed_cost)
        self.min_kept = {n: int((min_kept or {}).get(n, 0)) for n in self.layer_names}
        self.gains = gains or ControllerGains()
        self.channel_flops = channel_flops
        # thresholds on importance values, which move in whole filters (see step)
        self.structured = kind in ("filters", "ranks") or channel_flops is not None
        self.register_buffer("integral", torch.zeros((), dtype=torch.float64))
        self.register_buffer("last_step", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("scheduled", torch.ones((), dtype=torch.float64))
        self.register_buffer("achieved", torch.ones((), dtype=torch.float64))
        self.register_buffer("rate", torch.zeros((), dtype=torch.float64))
        self._profiles: dict[str, Tensor] = {}

    @property
    def target(self) -> float:
        """The final target as the user gave it: sparsity (of weights, filters or rank-one
        components), or the fraction of dense FLOPs."""
        return self._value(self.target_density)

    def _value(self, density: float) -> float:
        return density if self.kind == "flops" else 1.0 - density

    @property
    def scheduled_target(self) -> float:
        """The schedule's value at the last step (sparsity or FLOPs fraction)."""
        return self._value(float(self.scheduled))

    @property
    def achieved_target(self) -> float:
        """The measured value at the last step (sparsity or FLOPs fraction)."""
        return self._value(float(self.achieved))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, target={self.target:g}, start={self.start!r}, end={self.end!r}"

    @classmethod
    def build(
        cls, model: nn.Module, layers: Mapping[str, Any], options: Any
    ) -> TargetController | None:
        """The controller for a method's options (STR's ``sparsity`` or ``flops``, ``start``,
        ``end``, ``input_shape``) on ``layers`` of ``model``; None without a target."""
        if getattr(options, "sparsity", None) is None and getattr(options, "flops", None) is None:
            return None
        if options.flops is None:
            return cls.for_options(layers, options)
        shape = options.input_shape or getattr(model, "input_shape", None)
        if shape is None:
            raise OptionError(
                "a FLOPs target needs one sample's input shape to count FLOPs: pass "
                "input_shape=(C, H, W) (the model has no input_shape attribute)"
            )
        structure = getattr(options, "structure", "weight")
        if structure != "weight":
            if not _CHANNEL_FLOPS:
                raise RuntimeError("no channel analysis registered: import strsparse.slimming")
            channel_flops = _CHANNEL_FLOPS[0](model, layers, tuple(shape), structure)
            return cls.for_options(
                layers,
                options,
                channel_flops=channel_flops,
                pressure_weights=flops_pressure(channel_flops.prices()),
            )
        costs, fixed = flops_costs(model, layers, tuple(shape))
        return cls.for_options(
            layers, options, costs=costs, fixed_cost=fixed, pressure_weights=flops_pressure(costs)
        )

    @classmethod
    def for_options(
        cls,
        layers: Mapping[str, LayerWeight],
        options: object,
        *,
        costs: Mapping[str, float] | None = None,
        fixed_cost: float = 0.0,
        pressure_weights: Mapping[str, float] | None = None,
        channel_flops: ChannelFlops | None = None,
    ) -> TargetController:
        """The controller for STR's options (``sparsity`` or ``flops``), attached to
        ``layers``. A FLOPs target needs ``costs`` (FLOPs per weight of each layer) and
        ``fixed_cost`` (FLOPs no threshold controls), or with a structure ``channel_flops``."""
        sparsity = getattr(options, "sparsity", None)
        flops = getattr(options, "flops", None)
        start = getattr(options, "start", 0.0)
        end = getattr(options, "end", 0.7)
        if sparsity is not None:
            kind = TARGET_KINDS[getattr(options, "structure", "weight")]
            controller = cls(
                list(layers),
                target_density=1.0 - float(sparsity),
                kind=kind,
                start=start,
                end=end,
                pressure_weights=pressure_weights,
                gains=None if kind == "sparsity" else STRUCTURED_GAINS,
                # a layer without filters cuts the network, and gets no gradient to return
                min_kept=None
                if kind == "sparsity"
                else {
                    n: layer_floor(_thresholded(m).numel(), 1.0 - float(sparsity))
                    for n, m in layers.items()
                },
            )
        else:
            if flops is None or (costs is None and channel_flops is None):
                raise OptionError("a FLOPs target needs the FLOPs per weight of every layer")
            floors = {
                n: layer_floor(_thresholded(m).numel(), float(flops)) for n, m in layers.items()
            }
            # the least the target can reach: with a structure, every gated layer at its
            # floor; without, every sparsified weight gone
            if channel_flops is not None:
                least = channel_flops.fraction(
                    {
                        n: torch.arange(_thresholded(m).numel(), device=_thresholded(m).device)
                        < floors[n]
                        for n, m in layers.items()
                    }
                )
                why = "the model costs with every gated layer at its fewest filters"
                fix = "gate more layers"
            else:
                assert costs is not None  # checked above
                total = fixed_cost + sum(
                    costs[n] * _thresholded(m).numel() for n, m in layers.items()
                )
                least = fixed_cost / total
                why, fix = "the layers left dense cost", "sparsify more layers"
            if least >= float(flops):
                raise OptionError(
                    f"flops={flops} is below what {why} ({least:.4f} of the dense FLOPs); "
                    f"raise the target or {fix}"
                )
            controller = cls(
                list(layers),
                target_density=float(flops),
                kind="flops",
                start=start,
                end=end,
                costs=costs,
                fixed_cost=fixed_cost,
                pressure_weights=pressure_weights,
                gains=None if channel_flops is None else STRUCTURED_FLOPS_GAINS,
                min_kept=floors,
                channel_flops=channel_flops,
            )
        controller.attach(layers)
        return controller

    def attach(self, layers: Mapping[str, LayerWeight]) -> None:
        """Register this controller under every layer's parametrization, so that its buffers
        are in the model's ``state_dict`` and move with the model (created beside the weights,
        as every method's state is)."""
        first = next(iter(layers.values()), None)
        if first is not None and not raw_weight(first).is_meta:
            self.to(raw_weight(first).device)
            if self.channel_flops is not None:
                self.channel_flops = self.channel_flops.to(raw_weight(first).device)
        for module in layers.values():
            _threshold_method(module).add_module("target_controller", self)

    # -- measuring ------------------------------------------------------------------------
    @torch.no_grad()
    def _alive(
        self,
        layers: Mapping[str, LayerWeight],
        rate: float = 0.0,
        direction: Mapping[str, float] | None = None,
    ) -> dict[str, Tensor]:
        """Layer name -> which weights (filters) are above their threshold, after moving the
        thresholds by ``rate`` in ``direction`` when given."""
        alive = {}
        for name in self.layer_names:
            module = layers[name]
            p = _threshold_method(module)
            weight = p.thresholded(raw_weight(module))
            threshold = p.threshold_tensor().to(weight.dtype)
            if direction is not None:
                shift = rate * direction[name] * self._profiles[name]
                threshold = threshold * torch.exp(shift).to(weight.dtype)
            alive[name] = weight.abs() > threshold
        return alive

    def kept_weights(
        self,
        layers: Mapping[str, LayerWeight],
        rate: float = 0.0,
        direction: Mapping[str, float] | None = None,
    ) -> dict[str, int]:
        """Layer name -> number of weights above their threshold, after moving the
        thresholds by ``rate`` in ``direction`` when given (one device sync)."""
        return self._counts(self._alive(layers, rate, direction))

    def _counts(self, alive: Mapping[str, Tensor]) -> dict[str, int]:
        counts = torch.stack([mask.sum() for mask in alive.values()]).tolist()
        return dict(zip(self.layer_names, counts, strict=True))

    def _measure(
        self,
        layers: Mapping[str, LayerWeight],
        rate: float = 0.0,
        direction: Mapping[str, float] | None = None,
    ) -> tuple[dict[str, int], float]:
        """(``kept_weights``, the density they give) after moving the thresholds by
        ``rate`` in ``direction``."""
        alive = self._alive(layers, rate, direction)
        kept = self._counts(alive)
        if self.channel_flops is not None:
            return kept, self.channel_flops.fraction(alive)
        return kept, self.density(layers, kept)

    def density(
        self, layers: Mapping[str, LayerWeight], kept: Mapping[str, int] | None = None
    ) -> float:
        """Cost-weighted fraction of weights above their threshold (plus the fixed cost);
        under a structured FLOPs target, the slim model's fraction of the dense FLOPs."""
        if kept is None or self.channel_flops is not None:
            return self._measure(layers)[1]
        nonzero = self.fixed_cost
        total = self.fixed_cost
        for name in self.layer_names:
            cost = self.costs[name]
            nonzero += cost * kept[name]
            total += cost * _thresholded(layers[name]).numel()
        return nonzero / total if total > 0 else 1.0

    def _direction(
        self, layers: Mapping[str, LayerWeight], kept: Mapping[str, int], sign: float
    ) -> dict[str, float]:
        """Per layer, how far one unit of rate moves its log-threshold in direction ``sign``:
        c_l, or 0 where the layer cannot act (all pruned going up, none pruned going down).
        Going up, a layer with a floor (``min_kept``: a FLOPs or structured target's) feels
        the drift fade linearly from twice its floor to nothing at the floor, so that no
        layer is emptied."""
        out = {}
        for name in self.layer_names:
            n = kept[name]
            floor = self.min_kept[name]
            if sign > 0:
                fade = 1.0 if floor == 0 else min(max((n - floor) / floor, 0.0), 1.0)
                scale = fade if n > 0 else 0.0
            else:
                scale = 1.0 if n < _thresholded(layers[name]).numel() else 0.0
            out[name] = self.pressure_weights[name] * scale
        # the layers that can still act share the drift in proportion to their c_l, the
        # largest moving at the full rate: when the costliest layers reach their floors the
        # others take over at once instead of at their small share of the rate
        if self.kind == "flops":
            # ... and that includes the profile: the layers whose thresholds are smallest
            # (the fully connected ones) set w_e's scale, and once they rest at their floors
            # the costly layer left would otherwise move at a fraction of the rate
            top = max(
                (c * float(self._profiles[name].max()) for name, c in out.items()), default=0.0
            )
        else:
            top = max(out.values(), default=0.0)
        if 0.0 < top < 1.0:
            out = {name: c / top for name, c in out.items()}
        return out

    # -- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, layers: Mapping[str, LayerWeight], step: int, total_steps: int) -> None:
        """Measure the density, compare it with the schedule at ``step`` and move every
        threshold by the controller's shared relative amount (once per step)."""
        start, end = schedule_window(self.start, self.end, total_steps)
        scheduled = 1.0 - cubic_sparsity(step, start, end, 1.0 - self.target_density)
        self._set_profiles(layers)
        kept, density = self._measure(layers)
        self.scheduled.fill_(scheduled)
        self.achieved.fill_(density)
        if step == int(self.last_step):
            return
        structured = self.structured
        if structured and self._nearest_count(layers, density, scheduled):
            self.rate.fill_(0.0)  # on the count nearest the schedule: hold
            self.last_step.fill_(step)
            self._hold_floors(layers)
            return
        g = self.gains
        error = density_error(density, scheduled)
        sign = 1.0 if error >= 0 else -1.0
        direction = self._direction(layers, kept, sign)
        # elasticity: how much ln D moves per unit of log-threshold shift, measured on the
        # weights as they are (STR piles weights up just above the threshold, so it varies a
        # lot); dividing by it makes the loop gain the same on every model
        shifted = self._measure(layers, sign * g.probe, direction)[1]
        elasticity = max(
            abs(math.log(max(density, 1e-12)) - math.log(max(shifted, 1e-12))) / g.probe,
            g.min_elasticity,
        )
        integral = float(self.integral) + g.integral * error / elasticity
        rate = g.proportional * error / elasticity + integral
        if abs(rate) > g.max_rate:
            rate = math.copysign(g.max_rate, rate)
            integral = float(self.integral)  # anti-windup: no integration while clipped
        if math.copysign(1.0, rate) != sign:
            direction = self._direction(layers, kept, -sign)
        if structured:
            rate = self._within_gap(layers, rate, direction, density, scheduled)
        self.integral.fill_(integral)
        self.rate.fill_(rate)
        self.last_step.fill_(step)
        self._push(layers, rate, direction)
        if any(self.min_kept.values()):
            self._hold_floors(layers)
            self._hold_reach(layers)

    def _units(self, layers: Mapping[str, LayerWeight]) -> float:
        """How many filters (rank-one components) a density of 1 is worth: all the
        thresholds gate, or under a FLOPs target that many over the FLOPs they can change
        (a gap then counts in filters of average cost)."""
        entries = sum(_thresholded(layers[name]).numel() for name in self.layer_names)
        cf = self.channel_flops
        return entries if cf is None else entries * cf.total / max(cf.total - cf.fixed, 1e-12)

    def _nearest_count(
        self, layers: Mapping[str, LayerWeight], density: float, scheduled: float
    ) -> bool:
        """Whether the filters alive are the count nearest the schedule: then the step holds
        (no push, no integration). Counts move in whole filters, and the integral's steady
        push against the decay on m and s, still applied there, outlived the decay as the
        learning rate fell: it lowered the thresholds until filters came back (a 50% target
        on LeNet-5 ended 2 filters of 432 off, the integral at -0.039 against a
        proportional term of 0.023). Under a FLOPs target: within half a filter of average
        cost."""
        return abs(density - scheduled) * self._units(layers) <= 0.5

    def _within_gap(
        self,
        layers: Mapping[str, LayerWeight],
        rate: float,
        direction: Mapping[str, float],
        density: float,
        scheduled: float,
    ) -> float:
        """``rate``, halved until the step ends on the side of the schedule it started from
        (or on the count nearest it) and no further from it than it started. A structured
        layer's importance values start equal and part slowly, so one step of a threshold
        that reaches them would prune most of them at once; the probe that measured the
        elasticity looked only ``probe`` ahead. Under a FLOPs target a step may also cross
        the schedule when it ends nearer to it: filters differ in price, and the one that
        closes the gap best may cost more than the gap. (Cheap: one value per filter.)"""
        total = self._units(layers)
        target = scheduled * total  # in filters
        start = density * total - target
        for _ in range(30):
            moved = self._measure(layers, rate, direction)[1] * total
            moved -= target
            same_side = moved * start > 0 or abs(moved) <= 0.5
            if self.channel_flops is not None:
                same_side = same_side or abs(moved) < abs(start)
            if same_side and abs(moved) <= max(abs(start), 0.5):
                break
            rate /= 2
        return rate

    @torch.no_grad()
    def _hold_floors(self, layers: Mapping[str, LayerWeight]) -> None:
        """Lower the thresholds of every layer left with fewer weights than its floor (by
        the last push, or by the optimizer's own step on ``s``) by one common factor, the
        smallest that gives it its floor back: its ``min_kept`` largest ratios |w| / t
        survive. One step of the drift on weights piled up at the threshold can otherwise
        empty a layer, and an empty layer gets no task gradient to recover with."""
        kept = self.kept_weights(layers)
        for name in self.layer_names:
            floor = self.min_kept[name]
            if kept[name] >= floor:
                continue
            p = _threshold_method(layers[name])
            weight = _thresholded(layers[name]).detach()
            t = p.threshold_tensor().detach()
            ratio = (weight.abs() / t.clamp_min(1e-30)).flatten()
            factor = float(torch.topk(ratio, floor).values[-1]) * (1.0 - 1e-3)
            if factor <= 0.0:
                continue  # fewer nonzero raw weights than the floor: nothing to bring back
            if p.g_name == "exp":
                p.s.add_(math.log(factor))
            else:
                # exactly: s = logit(factor * t / k), t / k < 1 after lowering
                u = (t * factor / p.k).clamp(1e-12, 1.0 - 1e-6)
                p.s.copy_(torch.log(u) - torch.log1p(-u))

    @torch.no_grad()
    def _hold_reach(self, layers: Mapping[str, LayerWeight]) -> None:
        """Raise every threshold that fell below ``REACH`` times its layer's largest weight
        back to that value. Below it a layer is dense whatever the threshold, so nothing the
        network computes changes; but one optimizer step can throw ``s`` hundreds of units
        down (a conv before BatchNorm left with a few weights gets huge gradients on its
        threshold), and the drift, at most ``max_rate`` a step, would then need the rest of
        training to bring the layer back: the FLOPs target would be lost for good."""
        for name in self.layer_names:
            p = _threshold_method(layers[name])
            weight = _thresholded(layers[name]).detach()
            top = float(weight.abs().max())
            if top <= 0.0:
                continue
            # g is increasing in s: the lowest s allowed gives t = REACH * top exactly
            u = min(top * REACH / p.k, 1.0 - 1e-6)
            s_low = math.log(u) if p.g_name == "exp" else math.log(u / (1.0 - u))
            p.s.clamp_(min=s_low)

    @torch.no_grad()
    def _set_profiles(self, layers: Mapping[str, LayerWeight]) -> None:
        """How the drift is shared among thresholds: w_e = max(-log(t_e / k), 1), the
        paper's decay profile (decay moves s by lambda * |s|, and |s| ~ -log(t / k) for the
        small thresholds of a sigmoid or exp), so layers whose weights, and thresholds, are
        small drift faster; it never falls below 1, so the drift has no fixed point. Divided
        by its largest value, so that no threshold moves by more than ``max_rate`` a step,
        and times (d log g / ds)^2: the drift acts on ``s`` as a gradient on log t would, so
        it fades where g saturates exactly as the task gradient does (1 for exp)."""
        profiles, slopes = {}, {}
        for name in self.layer_names:
            p = _threshold_method(layers[name])
            t = p.threshold_tensor().detach() / p.k
            profiles[name] = (-torch.log(t.clamp_min(1e-30))).clamp_min(1.0)
            slopes[name] = log_threshold_gradient(p.g_name, p.s.detach()).square()
        top = torch.stack([w.max() for w in profiles.values()]).max()
        self._profiles = {name: w / top * slopes[name] for name, w in profiles.items()}

    def _push(
        self, layers: Mapping[str, LayerWeight], rate: float, direction: Mapping[str, float]
    ) -> None:
        """s_e += rate * direction_l * profile_e / (d log g/ds)(s_e): log-thresholds move by
        rate * c_l * profile_e."""
        if rate == 0.0:
            return
        shift: dict[int, tuple[Tensor, int]] = {}
        params: dict[int, Tensor] = {}
        for name in self.layer_names:
            p = _threshold_method(layers[name])
            s = p.s
            slope = log_threshold_gradient(p.g_name, s).clamp_min(1e-12)
            term = (rate * direction[name]) * self._profiles[name] / slope
            # a shared s (granularity 'global') moves once, by the mean over its layers
            total, count = shift.get(id(s), (torch.zeros_like(s), 0))
            shift[id(s)] = (total + term, count + 1)
            params[id(s)] = s
        for key, (total, count) in shift.items():
            params[key].add_(total / count)
