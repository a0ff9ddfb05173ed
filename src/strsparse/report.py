"""Per-layer sparsity of a sparsified model, as a table or CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from strsparse.methods.base import SparsityMethod, get_parametrization
from strsparse.sparsify import DenseTensor, dense_tensors, sparse_layers

__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report"]


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    threshold: float | None
    tied: tuple[str, ...] = ()  # other modules computing with the same (shared) weight

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights."""
        return 1.0 - self.nonzero / self.params if self.params else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """One row per sparsified layer plus totals over them; ``dense`` lists the >= 2-D
    parameters left dense, each with the reason."""

    layers: tuple[LayerSparsity, ...]
    dense: tuple[DenseTensor, ...] = ()
    vector_params: int = 0  # entries of 0-D/1-D parameters (biases, norm scales): never sparse

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

    def _rows(self) -> list[list[str]]:
        rows = []
        for r in self.layers:
            threshold = "" if r.threshold is None else f"{r.threshold:.4g}"
            shape = "x".join(map(str, r.shape))
            rows.append(
                [r.name, shape, str(r.params), str(r.nonzero), f"{100 * r.sparsity:.2f}", threshold]
            )
        return rows

    _HEADER = ("layer", "shape", "params", "nonzero", "sparsity_%", "threshold")

    def to_table(self) -> str:
        """A fixed-width text table with a total row."""
        rows = self._rows()
        total = ["total", "", str(self.params), str(self.nonzero), f"{100 * self.sparsity:.2f}", ""]
        widths = [max(len(x) for x in col) for col in zip(self._HEADER, *rows, total, strict=True)]

        def line(cells: list[str] | tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "-" * len(line(total))
        lines = [line(self._HEADER), rule, *map(line, rows), rule, line(total)]
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

    def to_csv(self, path: str | Path | None = None) -> str:
        """CSV text (one row per layer, then 'total'); also written to ``path`` if given."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self._HEADER)
        writer.writerows(self._rows())
        writer.writerow(["total", "", self.params, self.nonzero, f"{100 * self.sparsity:.2f}", ""])
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    def __str__(self) -> str:
        return self.to_table()


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Measure every sparsified layer: params, nonzero weights, sparsity and threshold; and
    list the >= 2-D parameters left dense with the reason (an embedding not opted in, not a
    weight matrix, excluded)."""
    rows = []
    for name, layer in sparse_layers(model).items():
        weight = layer.weight  # the effective (sparse) weight
        rows.append(
            LayerSparsity(
                name=name,
                shape=tuple(weight.shape),
                params=weight.numel(),
                nonzero=int(torch.count_nonzero(weight)),
                threshold=get_parametrization(layer).threshold(),
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
    return SparsityReport(tuple(rows), tuple(dense_tensors(model)), vectors)
