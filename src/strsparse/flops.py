"""Parameters and FLOPs per layer, dense and sparse, with the STR paper's conventions.

Conventions (Kusupati et al., ICML 2020, Appendix Tables 6-8):

- **Params** are the weights of convolutions and linear layers only (no biases, no
  BatchNorm): ResNet-50 has 25,502,912.
- **FLOPs** are multiply-accumulates of one sample:

  - a convolution (``Conv1d/2d/3d``, grouped or depthwise) costs its weight count times its
    output positions, ``C_out * C_in / groups * prod(k) * prod(out spatial)`` (ResNet-50's
    ``conv1``: 9,408 x 112 x 112 = 118,013,952); a transposed convolution costs its weight
    count times its *input* positions;
  - a linear layer costs its weight count times the number of positions it is applied at:
    once for a ``(B, D)`` input, ``T`` times for a ``(B, T, D)`` input;
  - average pooling (``AvgPool*``, ``AdaptiveAvgPool*``) is its own record costing the size
    of its input, ``C * H * W`` (ResNet-50: 2048 x 7 x 7 = 100,352). Max pooling, BatchNorm,
    activations and functional ops (``x.mean()``) are not counted, as in the paper;
  - a module called several times in one forward (a recurrent cell) costs the sum of its calls.

- A layer with sparsity ``s_l`` costs ``(1 - s_l) * FLOPs_l`` and keeps ``(1 - s_l) * params_l``
  weights.

The paper's totals differ in one respect: ResNet-50's 4,089,284,608 FLOPs include the average
pool, MobileNetV1's 568,740,352 (Table 8) leave its pool (50,176) out. A :class:`FlopsProfile`
keeps one record per layer and gives totals with and without pooling. Its "backbone" is every
weight layer except the classifier, pooling excluded (Table 6: 4,087,136,256).

>>> from strsparse.models import create_model
>>> prof = profile(create_model("resnet50"), (3, 224, 224))
>>> prof.overall.flops, prof.total_flops(include_pool=False)
(4089284608, 4089184256)
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from strsparse.atomic import write_atomic
from strsparse.errors import did_you_mean

__all__ = ["FlopsProfile", "FlopsSummary", "LayerFlops", "apply_budget", "profile"]

logger = logging.getLogger(__name__)

_POOLS = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_WEIGHT_KINDS = ("conv", "conv_transpose", "linear")


@dataclass(frozen=True)
class LayerFlops:
    """One layer (or pooling op) of a profile, per sample.

    ``nonzero_params`` is counted exactly when the sparsity was measured on the model and is
    ``(1 - sparsity) * params`` when it came from a budget; ``sparse_flops`` is always
    ``(1 - sparsity) * flops``.
    """

    name: str
    kind: str  # "conv", "conv_transpose", "linear" or "pool"
    params: int
    flops: int
    nonzero_params: float
    sparsity: float
    sparse_flops: float
    calls: int = 1


@dataclass(frozen=True)
class FlopsSummary:
    """Totals over a set of records; ``sparsity`` is parameter-weighted."""

    params: int
    flops: int
    nonzero_params: float
    sparse_flops: float

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights: 1 - nonzero_params / params."""
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    @property
    def flops_fraction(self) -> float:
        """Sparse FLOPs as a fraction of dense FLOPs."""
        return self.sparse_flops / self.flops if self.flops else 1.0

    @classmethod
    def of(cls, records: Sequence[LayerFlops]) -> FlopsSummary:
        return cls(
            params=sum(r.params for r in records),
            flops=sum(r.flops for r in records),
            nonzero_params=sum(r.nonzero_params for r in records),
            sparse_flops=sum(r.sparse_flops for r in records),
        )


@dataclass(frozen=True)
class FlopsProfile:
    """Per-layer params and FLOPs of one forward pass, plus totals.

    Records are in module registration order (the order of ``model.named_modules()``, which
    is the paper tables' order for ResNet-50 and MobileNetV1).

    ``classifier`` names the classifier layer (``None`` if the model has no weight layer);
    everything else with a weight is the backbone.
    """

    layers: tuple[LayerFlops, ...]
    classifier: str | None
    input_shape: tuple[int, ...]

    # -- access ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> LayerFlops:
        for record in self.layers:
            if record.name == name:
                return record
        raise KeyError(f"no layer {name!r} in the profile{did_you_mean(name, self.names)}")

    def __iter__(self) -> Iterator[LayerFlops]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.layers]

    @property
    def weight_layers(self) -> tuple[LayerFlops, ...]:
        """The conv and linear records (the ones a budget can name)."""
        return tuple(r for r in self.layers if r.kind in _WEIGHT_KINDS)

    # -- totals ---------------------------------------------------------------------------
    def summary(self, *, include_pool: bool = True, backbone: bool = False) -> FlopsSummary:
        """Totals over all records, or over the backbone (weight layers but the classifier)."""
        if backbone:
            records = [r for r in self.weight_layers if r.name != self.classifier]
        else:
            records = [r for r in self.layers if include_pool or r.kind != "pool"]
        return FlopsSummary.of(records)

    @property
    def overall(self) -> FlopsSummary:
        """Every record, pooling included (ResNet-50's 4,089,284,608 convention)."""
        return self.summary()

    @property
    def backbone(self) -> FlopsSummary:
        """Weight layers except the classifier, no pooling (Table 6's Backbone row)."""
        return self.summary(backbone=True)

    def total_flops(self, *, include_pool: bool = True) -> int:
        """Dense FLOPs; ``include_pool=False`` gives MobileNetV1 Table 8's convention."""
        return self.summary(include_pool=include_pool).flops

    def total_sparse_flops(self, *, include_pool: bool = True) -> float:
        """Sum of (1 - s_l) * FLOPs_l."""
        return self.summary(include_pool=include_pool).sparse_flops

    def with_budget(self, budget: Mapping[str, float]) -> FlopsProfile:
        """This profile with every weight layer's sparsity taken from ``budget``."""
        return apply_budget(self, budget)

    # -- rendering ------------------------------------------------------------------------
    _HEADER = ("layer", "kind", "params", "flops", "sparsity_%", "nonzero_params", "sparse_flops")

    @staticmethod
    def _cells(name: str, kind: str, p: int, f: int, s: float, nz: float, sf: float) -> list[str]:
        return [name, kind, str(p), str(f), f"{100 * s:.2f}", f"{nz:.0f}", f"{sf:.0f}"]

    def _rows(self) -> list[list[str]]:
        return [
            self._cells(
                r.name, r.kind, r.params, r.flops, r.sparsity, r.nonzero_params, r.sparse_flops
            )
            for r in self.layers
        ]

    def _total_rows(self) -> list[list[str]]:
        totals = [
            ("overall", self.overall),
            ("overall_no_pool", self.summary(include_pool=False)),
            ("backbone", self.backbone),
        ]
        return [
            self._cells(label, "", t.params, t.flops, t.sparsity, t.nonzero_params, t.sparse_flops)
            for label, t in totals
        ]

    def to_table(self) -> str:
        """A fixed-width text table, one row per record, then the totals."""

        def fmt(row: list[str]) -> list[str]:
            # Thousands separators for the counts, keep the rest as is.
            return [f"{int(float(c)):,}" if i in (2, 3, 5, 6) else c for i, c in enumerate(row)]

        rows = [fmt(r) for r in self._rows()]
        totals = [fmt(r) for r in self._total_rows()]
        widths = [
            max(len(x) for x in col) for col in zip(self._HEADER, *rows, *totals, strict=True)
        ]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "-" * len(line(totals[0]))
        return "\n".join([line(self._HEADER), rule, *map(line, rows), rule, *map(line, totals)])

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """CSV text (records, then ``overall``, ``overall_no_pool``, ``backbone`` rows).

        Also written atomically to ``path`` if given.
        """
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self._HEADER)
        writer.writerows(self._rows())
        writer.writerows(self._total_rows())
        text = buf.getvalue()
        if path is not None:
            write_atomic(path, text)
        return text

    def __str__(self) -> str:
        return self.to_table()


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _POOLS):
        return "pool"
    return None


def _sparse_record(record: LayerFlops, sparsity: float, nonzero: float) -> LayerFlops:
    return replace(
        record,
        sparsity=sparsity,
        nonzero_params=nonzero,
        sparse_flops=(1.0 - sparsity) * record.flops,
    )


def apply_budget(profile: FlopsProfile, budget: Mapping[str, float]) -> FlopsProfile:
    """``profile`` with each weight layer's sparsity from ``budget`` (layer -> fraction).

    Layers the budget does not name are dense; a budget naming a layer the profile lacks is a
    ``ValueError``. Pure: no forward pass, so many budgets can be costed from one dense profile.
    """
    known = {r.name for r in profile.weight_layers}
    unknown = [name for name in budget if name not in known]
    if unknown:
        raise ValueError(
            f"the budget names layer(s) the model has no conv/linear layer for: "
            f"{', '.join(map(repr, unknown[:5]))}{did_you_mean(unknown[0], sorted(known))} "
            f"(the model's layers: {', '.join(sorted(known)[:8])}, ...)"
        )
    records = []
    for r in profile.layers:
        if r.kind not in _WEIGHT_KINDS:
            records.append(r)
            continue
        value = budget.get(r.name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"budget[{r.name!r}] must be a number in [0, 1], got {value!r}")
        s = float(value)
        if not 0.0 <= s <= 1.0:
            raise ValueError(
                f"budget[{r.name!r}] = {s!r} is not a fraction in [0, 1]; "
                "give sparsities as fractions (90% -> 0.9)"
            )
        records.append(_sparse_record(r, s, (1.0 - s) * r.params))
    return replace(profile, layers=tuple(records))


def _declared_classifier(model: nn.Module) -> str | None:
    target = getattr(model, "_orig_mod", model)  # look through torch.compile
    for obj in (target, type(target)):
        name = getattr(obj, "classifier_name", None)
        if isinstance(name, str):
            return name
    return None


def _example_input(model: nn.Module, shape: tuple[int, ...]) -> Tensor:
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.zeros(shape, device=device, dtype=dtype)


def profile(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    budget: Mapping[str, float] | None = None,
    classifier: str | None = None,
    batched: bool | None = None,
) -> FlopsProfile:
    """Params and FLOPs of every conv, linear and average-pool layer of ``model``, per sample.

    Runs one forward pass on zeros of ``input_shape`` in eval mode under ``torch.no_grad``,
    recording each layer through forward hooks (removed afterwards, even on error; each
    module's training mode is restored). Only modules the forward executes are recorded.

    ``input_shape`` is one sample's shape, e.g. ``(3, 224, 224)``, or a batch's, e.g.
    ``(1, 3, 224, 224)``. With ``batched=None`` a leading batch dimension of 1 is tried first
    and, if the model rejects that, ``input_shape`` is used as a batch; counts are always per
    sample. For models that accept any number of leading dimensions (an MLP), pass one
    sample's shape or say ``batched=True``: ``(8, 784)`` would otherwise read as 8 positions.

    Sparsity per layer is measured from ``model`` (the fraction of exact zeros in
    ``module.weight``, which on a sparsified layer is the effective sparse weight), or, when
    ``budget`` is given (layer name -> fraction, e.g. a :class:`strsparse.Budget`), taken from
    it: unnamed layers are dense, a name the model lacks is a ``ValueError``.

    The classifier is ``classifier`` if given, else the model's ``classifier_name`` attribute,
    else the last conv/linear layer executed.
    """
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {shape}")
    if batched not in (None, True, False):
        raise ValueError(f"batched must be None (guess), True or False, got {batched!r}")
    # One sample gets a leading batch dimension of 1; a batch's shape is used as is.
    attempts = {None: [(1, *shape), shape], True: [shape], False: [(1, *shape)]}[batched]

    names = {m: n for n, m in model.named_modules()}
    modes = {m: m.training for m in model.modules()}
    calls: dict[str, dict] = {}  # name -> kind, params, flops (per sample, summed), calls
    order: list[str] = []
    batch = [1]

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        name = names[module]
        kind = _kind(module)
        n = batch[0]
        if kind == "pool":
            params, flops = 0, inputs[0].numel() // n  # C x H x W of its input
        else:
            params = module.weight.numel()
            if kind == "conv":  # weight count x output positions
                positions = output.numel() // (n * module.out_channels)
            elif kind == "conv_transpose":  # each input position scatters the whole kernel
                positions = inputs[0].numel() // (n * module.in_channels)
            else:  # linear: once per leading non-batch position
                positions = output.numel() // (n * module.out_features)
            flops = params * positions
        if name not in calls:
            calls[name] = {"kind": kind, "params": params, "flops": 0, "calls": 0}
            order.append(name)
        calls[name]["flops"] += flops
        calls[name]["calls"] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if _kind(m) is not None]
    errors: list[BaseException] = []
    try:
        model.eval()
        with torch.no_grad():
            for attempt in attempts:
                calls.clear()
                order.clear()
                batch[0] = attempt[0]
                try:
                    model(_example_input(model, attempt))
                    break
                except (RuntimeError, ValueError, TypeError, IndexError) as err:
                    errors.append(err)
                    logger.debug("forward on shape %s failed: %s", attempt, err)
            else:
                tried = "; ".join(f"{a}: {e}" for a, e in zip(attempts, errors, strict=True))
                raise ValueError(
                    f"the model's forward failed on the input shape(s) tried ({tried}); pass "
                    "one sample's shape, e.g. (3, 224, 224), or a batch's with batched=True"
                ) from errors[-1]
            # Records follow module registration order, like the paper's tables (torchvision
            # registers downsample after conv3 even where a forward runs it first).
            records = _records(model, [n for n in names.values() if n in calls], calls)
            executed = [n for n in order if calls[n]["kind"] in _WEIGHT_KINDS]
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode

    chosen = classifier if classifier is not None else _declared_classifier(model)
    if chosen is None:
        chosen = executed[-1] if executed else None  # the last weight layer run
    elif chosen not in executed:
        raise ValueError(
            f"classifier {chosen!r}{did_you_mean(chosen, executed)} is not a conv/linear layer "
            "executed in the forward"
        )
    result = FlopsProfile(layers=tuple(records), classifier=chosen, input_shape=shape)
    return result if budget is None else apply_budget(result, budget)


def _records(model: nn.Module, order: list[str], calls: dict[str, dict]) -> list[LayerFlops]:
    modules = dict(model.named_modules())
    records = []
    for name in order:
        info = calls[name]
        params, flops = info["params"], info["flops"]
        if info["kind"] == "pool":
            nonzero = 0
        else:
            weight = modules[name].weight  # the effective (sparse) weight when parametrized
            nonzero = int(torch.count_nonzero(weight))
        sparsity = 1.0 - nonzero / params if params else 0.0
        records.append(
            LayerFlops(
                name=name,
                kind=info["kind"],
                params=params,
                flops=flops,
                nonzero_params=float(nonzero),
                sparsity=sparsity,
                sparse_flops=flops * (1.0 - sparsity) if params else float(flops),
                calls=info["calls"],
            )
        )
    return records
