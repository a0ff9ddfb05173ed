"""Per-layer sparsity of a sparsified model, as a table or CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from strsparse.methods.base import get_parametrization
from strsparse.sparsify import sparse_layers

__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report"]


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    threshold: float | None

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights."""
        return 1.0 - self.nonzero / self.params if self.params else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """One row per sparsified layer plus totals over them."""

    layers: tuple[LayerSparsity, ...]

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
        return "\n".join([line(self._HEADER), rule, *map(line, rows), rule, line(total)])

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
    """Measure every sparsified layer: params, nonzero weights, sparsity and threshold."""
    rows = []
    for name, module in sparse_layers(model).items():
        weight = module.weight  # the effective (sparse) weight
        rows.append(
            LayerSparsity(
                name=name,
                shape=tuple(weight.shape),
                params=weight.numel(),
                nonzero=int(torch.count_nonzero(weight)),
                threshold=get_parametrization(module).threshold(),
            )
        )
    return SparsityReport(tuple(rows))
