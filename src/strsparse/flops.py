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
  - a module called several times in one forward (a recurrent cell) costs the sum of its calls;
  - each weight matrix of ``nn.LSTM``/``nn.GRU``/``nn.RNN`` is its own record
    (``rnn.weight_ih_l0``, ``rnn.weight_hh_l0_reverse``) costing its weight count per time
    step; ``nn.MultiheadAttention``'s input projection costs its weights per query (q) and
    key (k, v) position and its ``out_proj`` per query position (the products QK^T and AV
    multiply activations and are not counted). Hugging Face's ``Conv1D`` counts as linear.

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
from typing import Any

import torch
from torch import Tensor, nn

from strsparse.atomic import write_atomic
from strsparse.errors import OptionError, did_you_mean
from strsparse.formatting import render_table
from strsparse.layers import LowRankLinear
from strsparse.methods.base import is_conv1d, output_axis
from strsparse.methods.target import register_flops_counter
from strsparse.models.registry import declared_classifier_name

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
_WEIGHT_KINDS = ("conv", "conv_transpose", "linear", "rnn")


@dataclass(frozen=True)
class LayerFlops:
    """One layer (or pooling op) of a profile, per sample.

    ``nonzero_params`` is counted exactly when the sparsity was measured on the model and is
    ``(1 - sparsity) * params`` when it came from a budget; ``sparse_flops`` is always
    ``(1 - sparsity) * flops``.
    """

    name: str
    kind: str  # "conv", "conv_transpose", "linear", "rnn" or "pool"
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
        return render_table(self._HEADER, rows, totals=totals, left=2)

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
    if isinstance(module, (nn.Linear, LowRankLinear)) or is_conv1d(module):  # Conv1D: in x out
        return "linear"
    if isinstance(module, nn.RNNBase):
        return "rnn"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    if isinstance(module, _POOLS):
        return "pool"
    return None


def _rnn_counts(module: nn.RNNBase, inputs: tuple) -> list[tuple[str, int, int]]:
    """(tensor, params, FLOPs per sample) for each weight matrix of an RNN call: every
    matrix multiplies one vector per time step (per direction and layer)."""
    x = inputs[0]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        batch, total_steps = int(x.batch_sizes[0]), x.data.shape[0]  # steps of all sequences
    elif x.dim() == 2:  # unbatched (T, D)
        batch, total_steps = 1, x.shape[0]
    else:
        batch = x.shape[0] if module.batch_first else x.shape[1]
        total_steps = x.shape[0] * x.shape[1]
    counts = []
    for tensor in module._flat_weights_names:
        if tensor.startswith("weight_"):  # not the biases
            params = getattr(module, tensor).numel()
            counts.append((tensor, params, params * total_steps // batch))
    return counts


def _attention_counts(
    module: nn.MultiheadAttention, args: tuple, kwargs: dict
) -> list[tuple[str, int, int]]:
    """(tensor, params, FLOPs per sample) of MultiheadAttention's projections: q for every
    query position, k and v for every key position, ``out_proj`` for every query position.
    (``out_proj`` is applied functionally, so its own forward hook never fires; the
    attention products QK^T and AV multiply activations and are not counted.)"""
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
    if q.dim() == 2:  # unbatched (L, E)
        length, source = q.shape[0], k.shape[0]
    elif module.batch_first:
        length, source = q.shape[1], k.shape[1]
    else:
        length, source = q.shape[0], k.shape[0]
    e = module.embed_dim
    if module.in_proj_weight is not None:  # packed (3E, E)
        projections = [("in_proj_weight", e * e * (length + 2 * source))]
    else:
        projections = [
            ("q_proj_weight", module.q_proj_weight.numel() * length),
            ("k_proj_weight", module.k_proj_weight.numel() * source),
            ("v_proj_weight", module.v_proj_weight.numel() * source),
        ]
    counts = [(t, getattr(module, t).numel(), f) for t, f in projections]
    return [*counts, ("out_proj", module.out_proj.weight.numel(), e * e * length)]


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
        raise OptionError(
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
            raise OptionError(f"budget[{r.name!r}] must be a number in [0, 1], got {value!r}")
        s = float(value)
        if not 0.0 <= s <= 1.0:
            raise OptionError(
                f"budget[{r.name!r}] = {s!r} is not a fraction in [0, 1]; "
                "give sparsities as fractions (90% -> 0.9)"
            )
        records.append(_sparse_record(r, s, (1.0 - s) * r.params))
    return replace(profile, layers=tuple(records))


def _example_input(model: nn.Module, shape: tuple[int, ...]) -> Tensor:
    ref: Tensor | None = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.zeros(shape, device=device, dtype=dtype)


def _call_form(example_inputs: Any) -> tuple[tuple, dict]:
    """``model(*args, **kwargs)`` for a tensor, a tuple of positional inputs or a dict of
    keyword inputs."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    raise OptionError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}; wrap a list in tuple(...)"
    )


def profile(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example_inputs: Tensor | tuple | Mapping[str, Any] | None = None,
    budget: Mapping[str, float] | None = None,
    classifier: str | None = None,
    batched: bool | None = None,
) -> FlopsProfile:
    """Params and FLOPs of every weight layer and average pool of ``model``, per sample.

    Runs one forward pass in eval mode under ``torch.no_grad``, recording each layer through
    forward hooks (removed afterwards, even on error; each module's training mode is
    restored). Only modules the forward executes are recorded. Counted: convolutions,
    transposed convolutions, Linear and Hugging Face ``Conv1D`` layers, each weight matrix of
    ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (once per time step, one record per matrix named like
    the sparsified layer, e.g. ``rnn.weight_ih_l0``), ``nn.MultiheadAttention``'s input
    projections (per query or key position) and its ``out_proj`` (per query position), and
    average pooling.

    The input is zeros of ``input_shape`` or ``example_inputs`` (give exactly one):

    - ``input_shape`` is one sample's shape, e.g. ``(3, 224, 224)``, or a batch's, e.g.
      ``(1, 3, 224, 224)``. With ``batched=None`` a leading batch dimension of 1 is tried
      first and, if the model rejects that, ``input_shape`` is used as a batch. For models
      that accept any number of leading dimensions (an MLP), pass one sample's shape or say
      ``batched=True``: ``(8, 784)`` would otherwise read as 8 positions.
    - ``example_inputs`` is what the model is called with: a tensor (``model(x)``), a tuple
      (``model(*inputs)``) or a dict of keyword inputs (``model(**inputs)``), e.g. token ids
      ``torch.randint(0, vocab, (1, 128))``. The batch size is the leading dimension of the
      first tensor; counts are divided by it.

    Counts are always per sample. Sparsity per layer is measured from ``model`` (the fraction
    of exact zeros in the weight, which on a sparsified layer is the effective sparse
    weight), or, when ``budget`` is given (layer name -> fraction, e.g. a
    :class:`strsparse.Budget`), taken from it: unnamed layers are dense, a name the model
    lacks is a ``ValueError``.

    The classifier is ``classifier`` if given, else the model's ``classifier_name`` attribute,
    else the last weight layer executed.
    """
    if (input_shape is None) == (example_inputs is None):
        raise OptionError(
            "give exactly one of input_shape (one sample's shape, e.g. (3, 224, 224)) and "
            "example_inputs (what the model is called with, e.g. token ids)"
        )
    if batched not in (None, True, False):
        raise OptionError(f"batched must be None (guess), True or False, got {batched!r}")
    if example_inputs is not None:
        args, kwargs = _call_form(example_inputs)
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        if not tensors or tensors[0].dim() == 0:
            raise OptionError(
                "example_inputs holds no tensor with a batch dimension to count per sample; "
                "give e.g. torch.randint(0, vocab, (1, 128)) for token ids"
            )
        shape = tuple(tensors[0].shape[1:])
        attempts = [(args, kwargs, tensors[0].shape[0], tuple(tensors[0].shape))]
    else:
        assert input_shape is not None  # exactly one of the two, checked above
        shape = tuple(int(d) for d in input_shape)
        if not shape or any(d < 1 for d in shape):
            raise OptionError(
                f"input_shape must be a non-empty tuple of positive ints, got {shape}"
            )
        # One sample gets a leading batch dimension of 1; a batch's shape is used as is.
        shapes = {None: [(1, *shape), shape], True: [shape], False: [(1, *shape)]}[batched]
        attempts = [((_example_input(model, a),), {}, a[0], a) for a in shapes]

    names = {m: n for n, m in model.named_modules()}
    modes = {m: m.training for m in model.modules()}
    # record name -> module, tensor, kind, params, flops (per sample, summed), calls
    calls: dict[str, dict] = {}
    order: list[str] = []
    batch = [1]

    def add(module: nn.Module, tensor: str | None, kind: str, params: int, flops: int) -> None:
        name = names[module]
        if tensor is not None and tensor != "weight":
            name = f"{name}.{tensor}" if name else tensor
        if name not in calls:
            calls[name] = {"owner": names[module], "module": module, "tensor": tensor}
            calls[name].update(kind=kind, params=params, flops=0, calls=0)
            order.append(name)
        calls[name]["flops"] += flops
        calls[name]["calls"] += 1

    # module: any layer kind the profile counts (attributes read by kind); output: a tensor
    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        kind = _kind(module)
        n = batch[0]
        if kind is None:  # hooked only where there is a kind
            return
        if kind == "pool":
            add(module, None, kind, 0, args[0].numel() // n)  # C x H x W of its input
        elif kind == "rnn":
            for tensor, params, flops in _rnn_counts(module, args):
                add(module, tensor, "rnn", params, flops)
        elif kind == "attention":
            for tensor, params, flops in _attention_counts(module, args, kwargs):
                target = module.out_proj if tensor == "out_proj" else module
                add(target, "weight" if tensor == "out_proj" else tensor, "linear", params, flops)
        elif isinstance(module, LowRankLinear):
            # both factors, once per leading position; named after the gated factor, as
            # sparsify names the layer ("w.weight2")
            params = _params(module)
            positions = output.numel() // (n * module.out_features)
            add(module, "weight2", kind, params, params * positions)
        else:
            params = _params(module)
            if kind == "conv":  # weight count x output positions
                positions = output.numel() // (n * module.out_channels)
            elif kind == "conv_transpose":  # each input position scatters the whole kernel
                positions = args[0].numel() // (n * module.in_channels)
            else:  # linear: once per leading non-batch position
                positions = output.numel() // (n * module.weight.shape[output_axis(module)])
            add(module, "weight", kind, params, params * positions)

    handles = [
        m.register_forward_hook(hook, with_kwargs=True)
        for m in model.modules()
        if _kind(m) is not None
    ]
    errors: list[BaseException] = []
    try:
        model.eval()
        with torch.no_grad():
            for args, kwargs, n, attempt in attempts:
                calls.clear()
                order.clear()
                batch[0] = n
                try:
                    model(*args, **kwargs)
                    break
                except (RuntimeError, ValueError, TypeError, IndexError) as err:
                    errors.append(err)
                    logger.debug("forward on shape %s failed: %s", attempt, err)
            else:
                if example_inputs is not None:
                    raise OptionError(
                        f"the model's forward failed on example_inputs: {errors[-1]}"
                    ) from errors[-1]
                tried = "; ".join(f"{a[3]}: {e}" for a, e in zip(attempts, errors, strict=True))
                raise OptionError(
                    f"the model's forward failed on the input shape(s) tried ({tried}); pass "
                    "one sample's shape, e.g. (3, 224, 224), or a batch's with batched=True, "
                    "or the inputs themselves with example_inputs=..."
                ) from errors[-1]
            # Records follow module registration order, like the paper's tables (torchvision
            # registers downsample after conv3 even where a forward runs it first); the
            # records of one module (an LSTM's matrices) in the order they were counted.
            ranks = {n: i for i, n in enumerate(names.values())}
            ordered = sorted(order, key=lambda r: ranks[calls[r]["owner"]])
            records = _records(ordered, calls)
            executed = [n for n in order if calls[n]["kind"] in _WEIGHT_KINDS]
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode

    chosen = classifier if classifier is not None else declared_classifier_name(model)
    if chosen is None:
        chosen = executed[-1] if executed else None  # the last weight layer run
    elif chosen not in executed:
        raise OptionError(
            f"classifier {chosen!r}{did_you_mean(chosen, executed)} is not a conv/linear layer "
            "executed in the forward"
        )
    result = FlopsProfile(layers=tuple(records), classifier=chosen, input_shape=shape)
    return result if budget is None else apply_budget(result, budget)


def _params(module: nn.Module) -> int:
    """Weights of a conv / linear layer; both factors of a ``LowRankLinear``."""
    if isinstance(module, LowRankLinear):
        return module.rank * (module.in_features + module.out_features)
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return weight.numel()


@torch.no_grad()
def _low_rank_nonzero(module: LowRankLinear) -> int:
    """Both factors of each rank-one component that is alive (effective, when gated)."""
    alive = module.weight2.ne(0).any(dim=1) & module.weight1.ne(0).any(dim=0)
    return int(alive.sum()) * (module.in_features + module.out_features)


def _records(order: list[str], calls: dict[str, dict]) -> list[LayerFlops]:
    records = []
    for name in order:
        info = calls[name]
        params, flops = info["params"], info["flops"]
        if info["kind"] == "pool":
            nonzero = 0
        elif isinstance(info["module"], LowRankLinear):
            nonzero = _low_rank_nonzero(info["module"])
        else:  # the effective (sparse) weight when parametrized
            weight = getattr(info["module"], info["tensor"])
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


def _weight_layer_flops(
    model: nn.Module, input_shape: tuple[int, ...]
) -> tuple[dict[str, tuple[int, int]], int]:
    """{module name: (dense FLOPs, params)} and the total dense FLOPs, for a FLOPs target."""
    prof = profile(model, input_shape)
    return {r.name: (r.flops, r.params) for r in prof.layers}, prof.overall.flops


register_flops_counter(_weight_layer_flops)
