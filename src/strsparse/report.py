"""The per-layer record of a sparsified model: sparsity and threshold of every sparsified
layer, joined with its FLOPs when a profile is given. Training computes it once per epoch;
``summary.json``, the CLI's tables and ``strsparse report`` all read this one record."""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from strsparse.atomic import write_atomic
from strsparse.flops import FlopsProfile
from strsparse.formatting import count, render_table
from strsparse.methods.base import SparsityMethod
from strsparse.sparsify import DenseTensor, dense_tensors, sparse_layers

__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report"]

_HEADER = ("layer", "shape", "params", "nonzero", "sparsity_%", "threshold")
_FLOPS_HEADER = ("flops", "sparse_flops")


@dataclass(frozen=True)
class LayerSparsity:
    """One sparsified layer; ``flops``/``sparse_flops`` (per sample) when a FLOPs profile
    was joined and holds the layer, else None."""

    name: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    threshold: float | None
    flops: int | None = None
    sparse_flops: float | None = None
    tied: tuple[str, ...] = ()  # other modules computing with the same (shared) weight

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights."""
        return (self.params - self.nonzero) / self.params if self.params else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The layer as plain data (``summary.json``'s ``layers`` rows)."""
        row: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "params": self.params,
            "nonzero": self.nonzero,
            "sparsity": self.sparsity,
            "threshold": self.threshold,
        }
        if self.flops is not None:
            row["flops"] = self.flops
            row["sparse_flops"] = self.sparse_flops
        return row


@dataclass(frozen=True)
class SparsityReport:
    """One row per sparsified layer plus totals over them; ``dense`` lists the >= 2-D
    parameters left dense, each with the reason; ``profile`` is the whole model's FLOPs
    profile when one was joined (its totals include dense layers and pooling)."""

    layers: tuple[LayerSparsity, ...]
    dense: tuple[DenseTensor, ...] = ()
    vector_params: int = 0  # entries of 0-D/1-D parameters (biases, norm scales): never sparse
    profile: FlopsProfile | None = None

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def nonzero(self) -> int:
        return sum(r.nonzero for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Overall (parameter-weighted) sparsity of the sparsified layers."""
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def model_totals(self) -> dict[str, float]:
        """The whole model's dense and sparse FLOPs and parameters (``profile.overall``);
        NaN for each when no profile was joined."""
        if self.profile is None:
            keys = ("flops", "sparse_flops", "params", "nonzero_params")
            return dict.fromkeys(keys, math.nan)
        o = self.profile.overall
        return {
            "flops": float(o.flops),
            "sparse_flops": float(o.sparse_flops),
            "params": float(o.params),
            "nonzero_params": float(o.nonzero_params),
        }

    # -- rendering ------------------------------------------------------------------------
    def _columns(self, count: Any, percent: Any, threshold: Any) -> tuple[list, list, list]:
        """(header, rows, total row) with the counts, sparsity and thresholds formatted by
        the given functions; the FLOPs columns only when a profile was joined."""
        with_flops = self.profile is not None
        header = [*_HEADER, *(_FLOPS_HEADER if with_flops else ())]
        rows = []
        for r in self.layers:
            row = [r.name, "x".join(map(str, r.shape)), count(r.params), count(r.nonzero)]
            row += [percent(r.sparsity), "" if r.threshold is None else threshold(r.threshold)]
            if with_flops:
                row += ["" if r.flops is None else count(r.flops)]
                row += ["" if r.sparse_flops is None else count(r.sparse_flops)]
            rows.append(row)
        total = ["total", "", count(self.params), count(self.nonzero), percent(self.sparsity), ""]
        if with_flops:
            total += [count(sum(r.flops or 0 for r in self.layers))]
            total += [count(sum(r.sparse_flops or 0 for r in self.layers))]
        return header, rows, total

    def to_table(self) -> str:
        """A fixed-width text table with a total row, then what stays dense and why."""
        header, rows, total = self._columns(count, lambda s: f"{100 * s:.2f}", lambda t: f"{t:.4g}")
        lines = render_table(header, rows, totals=[total], left=2).splitlines()
        if not self.layers:
            lines.insert(2, "(no sparsified layer)")
        if self.dense:
            lines += ["", "left dense:"]
            for d in self.dense:
                shape = "x".join(map(str, d.shape))
                tied = f" (tied: {', '.join(d.tied)})" if d.tied else ""
                lines.append(f"  {d.name}{tied}  {shape}  {d.reason}")
        if self.vector_params:
            lines.append(f"{self.vector_params} entries of biases and other 1-D parameters: dense")
        tied_rows = [r for r in self.layers if r.tied]
        if tied_rows:
            lines += ["", "tied (one sparse tensor, used by every listed module):"]
            lines += [f"  {r.name}: also {', '.join(r.tied)}" for r in tied_rows]
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """CSV text (one row per layer, then 'total'); also written atomically to ``path``."""
        header, rows, total = self._columns(int, lambda s: f"{100 * s:.4f}", repr)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerows([header, *rows, total])
        text = buf.getvalue()
        if path is not None:
            write_atomic(path, text)
        return text

    def __str__(self) -> str:
        return self.to_table()


@torch.no_grad()
def sparsity_report(model: nn.Module, *, flops: FlopsProfile | None = None) -> SparsityReport:
    """Measure every sparsified layer: params, nonzero weights, sparsity and threshold, and
    each layer's FLOPs from ``flops`` (a ``strsparse.flops.profile`` of ``model``) if given;
    list the >= 2-D parameters left dense with the reason (an embedding not opted in, not a
    weight matrix, excluded)."""
    per_layer = {record.name: record for record in flops.layers} if flops is not None else {}
    rows = []
    layers = sparse_layers(model)
    for (name, layer), method in zip(layers.items(), SparsityMethod.attached(layers), strict=True):
        weight = layer.weight  # the effective (sparse) weight
        record = per_layer.get(name)
        rows.append(
            LayerSparsity(
                name=name,
                shape=tuple(weight.shape),
                params=weight.numel(),
                nonzero=int(torch.count_nonzero(weight)),
                threshold=method.threshold(),
                flops=None if record is None else record.flops,
                sparse_flops=None if record is None else record.sparse_flops,
                tied=tuple(n for n, _, _ in layer.tied),
            )
        )
    vectors = sum(
        p.numel()
        for m in model.modules()
        if not isinstance(m, (parametrize.ParametrizationList, SparsityMethod))
        for p in m.parameters(recurse=False)
        if p.dim() < 2
    )
    return SparsityReport(tuple(rows), tuple(dense_tensors(model)), vectors, flops)
