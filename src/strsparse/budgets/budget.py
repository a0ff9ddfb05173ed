"""Sparsity budgets: how sparse each layer is, as a mapping layer name -> fraction.

A budget learned by STR can be handed to GMP, DNW or magnitude pruning (the paper's
budget transfer, Section 4.1 and Table 4).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from strsparse.atomic import write_atomic
from strsparse.budgets.paper import paper_budget_info
from strsparse.errors import BudgetError, MissingFileError
from strsparse.methods.base import check_fraction, zero_fraction
from strsparse.sparsify import eligible_layers, sparse_layers

__all__ = ["Budget", "load_paper_budget"]


def _layer_shapes(model_or_shapes: nn.Module | Mapping[str, tuple[int, ...]]) -> dict[str, tuple]:
    if isinstance(model_or_shapes, nn.Module):
        return {n: tuple(m.weight.shape) for n, m in eligible_layers(model_or_shapes).items()}
    return {n: tuple(s) for n, s in model_or_shapes.items()}


class Budget(Mapping[str, float]):
    """An immutable mapping layer name -> sparsity fraction in [0, 1].

    Layer names are full dotted module names (``layer1.0.conv1``, ``fc``).
    """

    def __init__(self, sparsities: Mapping[str, float]) -> None:
        self._sparsities = {
            str(name): check_fraction(value, f"budget[{name!r}]", allow_one=True)
            for name, value in sparsities.items()
        }

    def __getitem__(self, name: str) -> float:
        return self._sparsities[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sparsities)

    def __len__(self) -> int:
        return len(self._sparsities)

    def __repr__(self) -> str:
        return f"Budget({len(self)} layers)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def uniform(
        cls, model_or_shapes: nn.Module | Mapping[str, tuple[int, ...]], sparsity: float
    ) -> Budget:
        """The same sparsity for every eligible layer."""
        value = check_fraction(sparsity, "sparsity")
        return cls(dict.fromkeys(_layer_shapes(model_or_shapes), value))

    @classmethod
    def erk(
        cls, model_or_shapes: nn.Module | Mapping[str, tuple[int, ...]], sparsity: float
    ) -> Budget:
        """Erdős–Rényi-Kernel budget (Evci et al., 2020, RigL).

        Layer density is proportional to sum(dims) / prod(dims) of its weight, e.g.
        (C_in + C_out + kH + kW) / (C_in C_out kH kW) for a conv, scaled so the overall
        sparsity is ``sparsity``; layers that would exceed density 1 are kept dense and the
        rest rescaled.
        """
        target = check_fraction(sparsity, "sparsity")
        shapes = _layer_shapes(model_or_shapes)
        numel = {n: math.prod(s) for n, s in shapes.items()}
        raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
        kept = (1.0 - target) * sum(numel.values())
        dense: set[str] = set()
        while True:
            budget_left = kept - sum(numel[n] for n in dense)
            scale = budget_left / sum(raw[n] * numel[n] for n in shapes if n not in dense)
            over = [n for n in shapes if n not in dense and scale * raw[n] > 1.0]
            if not over:
                break
            dense.add(max(over, key=lambda n: raw[n]))
        return cls({n: 0.0 if n in dense else 1.0 - scale * raw[n] for n in shapes})

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module) -> Budget:
        """The sparsity each sparsified layer has now (all eligible layers of a plain model)."""
        layers = sparse_layers(model) or eligible_layers(model)
        return cls({name: zero_fraction(m.weight) for name, m in layers.items()})

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> Budget:
        """Read a CSV with columns ``layer`` and ``sparsity`` (a fraction)."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"budget file {str(path)!r} does not exist")
        reader = csv.DictReader(io.StringIO(path.read_text()))
        if reader.fieldnames is None or not {"layer", "sparsity"} <= set(reader.fieldnames):
            raise BudgetError(
                f"budget file {str(path)!r} needs the columns 'layer' and 'sparsity'; "
                f"it has {reader.fieldnames}"
            )
        sparsities: dict[str, float] = {}
        for line, row in enumerate(reader, start=2):
            try:
                sparsities[row["layer"]] = float(row["sparsity"])
            except (TypeError, ValueError):
                raise BudgetError(
                    f"{path}:{line}: sparsity {row['sparsity']!r} of layer {row['layer']!r} "
                    "is not a number"
                ) from None
        return cls(sparsities)

    @classmethod
    def from_paper(cls, name: str) -> Budget:
        """A budget published in the STR paper's appendix, e.g. ``"resnet50-str-90.23"``;
        ``strsparse.budgets.list_paper_budgets()`` lists them."""
        return cls(paper_budget_info(name).fractions)

    # -- use ------------------------------------------------------------------------------
    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write ``layer,sparsity`` rows atomically; returns the path."""
        path = Path(path)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["layer", "sparsity"])
        writer.writerows([name, repr(value)] for name, value in self.items())
        return write_atomic(path, buf.getvalue())

    def overall(self, model_or_shapes: nn.Module | Mapping[str, tuple[int, ...]]) -> float:
        """Parameter-weighted sparsity of the budget's layers in ``model_or_shapes``."""
        shapes = _layer_shapes(model_or_shapes)
        missing = [n for n in self if n not in shapes]
        if missing:
            raise BudgetError(f"budget layers not in the model: {', '.join(missing[:5])}")
        total = sum(math.prod(shapes[n]) for n in self)
        return sum(self[n] * math.prod(shapes[n]) for n in self) / total


def load_paper_budget(name: str) -> Budget:
    """The published budget ``name`` as a :class:`Budget` (fractions in [0, 1)).

    >>> budget = load_paper_budget("resnet50-str-90.23")
    >>> round(budget["fc"], 4)
    0.645
    """
    return Budget.from_paper(name)
