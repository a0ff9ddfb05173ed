"""The layer-wise sparsity budgets published in the STR paper's appendix, shipped as data.

Kusupati et al. (ICML 2020), Appendix Tables 6, 7 and 8 list, for every weight layer, the
sparsity (in percent) of:

- ResNet-50 on ImageNet-1K learnt by STR at 16 overall sparsities from 79.55% to 99.10%
  (Table 6), e.g. ``resnet50-str-90.23``;
- 90%-sparse ResNet-50 budgets of Uniform, ERK, SNFS, VD and STR-GS (global threshold)
  (Table 7): ``resnet50-uniform-90``, ``resnet50-erk-90``, ``resnet50-snfs-90``,
  ``resnet50-vd-90``, ``resnet50-gs-90``; Table 7's STR column is ``resnet50-str-90.23``;
- 90%-sparse MobileNetV1 budgets of STR and GMP (Table 8): ``mobilenet_v1-str-89.01``,
  ``mobilenet_v1-gmp-89.03``.

The numbers live in ``data/<model>.csv``: a ``layer`` column (this package's module names,
e.g. ``layer1.0.downsample.0`` or ``blocks.3.dw``), the dense ``params`` and ``flops`` the
tables publish for the layer, and one column per budget (percent, as published).
``data/summary.csv`` holds each budget's published Overall and Backbone rows.

A name ending in a number is the budget's *nominal* sparsity; the Table 7 baselines are
nominally 90% but their published overall sparsities differ slightly (ERK 90.07, SNFS 90.06,
VD 90.27, GS 89.54): :func:`paper_budget_info` gives the published figures.
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

from strsparse.errors import BudgetError, did_you_mean

__all__ = [
    "PaperBudget",
    "list_paper_budgets",
    "paper_budget_info",
    "paper_layer_table",
]

_MODELS = ("resnet50", "mobilenet_v1")
_LAYER_COLUMNS = ("layer", "params", "flops")


@dataclass(frozen=True)
class PaperBudget:
    """One published budget: per-layer sparsity in percent plus the table's summary rows."""

    name: str
    model: str
    method: str
    table: str
    overall_percent: float
    backbone_percent: float
    sparsity_percent: Mapping[str, float]

    @property
    def fractions(self) -> dict[str, float]:
        """Layer name -> sparsity as a fraction (percent / 100)."""
        return {layer: value / 100.0 for layer, value in self.sparsity_percent.items()}


@dataclass(frozen=True)
class _ModelTable:
    params: Mapping[str, int]
    flops: Mapping[str, int]
    budgets: Mapping[str, Mapping[str, float]]


def _read_csv(filename: str) -> list[dict[str, str]]:
    text = (
        resources.files("strsparse.budgets").joinpath("data").joinpath(filename).read_text("utf-8")
    )
    return list(csv.DictReader(io.StringIO(text)))


@functools.cache
def _model_table(model: str) -> _ModelTable:
    rows = _read_csv(f"{model}.csv")
    budget_names = [c for c in rows[0] if c not in _LAYER_COLUMNS]
    return _ModelTable(
        params=MappingProxyType({r["layer"]: int(r["params"]) for r in rows}),
        flops=MappingProxyType({r["layer"]: int(r["flops"]) for r in rows}),
        budgets=MappingProxyType(
            {
                name: MappingProxyType({r["layer"]: float(r[name]) for r in rows})
                for name in budget_names
            }
        ),
    )


@functools.cache
def _catalog() -> Mapping[str, PaperBudget]:
    catalog: dict[str, PaperBudget] = {}
    for row in _read_csv("summary.csv"):
        name = row["budget"]
        catalog[name] = PaperBudget(
            name=name,
            model=row["model"],
            method=row["method"],
            table=row["table"],
            overall_percent=float(row["overall"]),
            backbone_percent=float(row["backbone"]),
            sparsity_percent=_model_table(row["model"]).budgets[name],
        )
    return MappingProxyType(catalog)


def list_paper_budgets(model: str | None = None) -> list[str]:
    """Names of the published budgets (all of them, or those of ``model``), in table order."""
    if model is not None and model not in _MODELS:
        raise BudgetError(f"no paper budgets for model {model!r}; models with budgets: {_MODELS}")
    return [n for n, b in _catalog().items() if model is None or b.model == model]


def paper_budget_info(name: str) -> PaperBudget:
    """The published budget ``name`` with its table, method and Overall/Backbone rows."""
    catalog = _catalog()
    if name not in catalog:
        valid = list(catalog)
        raise BudgetError(
            f"unknown paper budget {name!r}{did_you_mean(name, valid)}; "
            f"valid names: {', '.join(valid)}"
        )
    return catalog[name]


def paper_layer_table(model: str) -> dict[str, tuple[int, int]]:
    """Layer name -> (dense params, dense FLOPs) as the paper's table for ``model`` lists them.

    Useful to compute a budget's overall sparsity or FLOPs without building the model.
    """
    if model not in _MODELS:
        raise BudgetError(f"no paper table for model {model!r}; models with tables: {_MODELS}")
    table = _model_table(model)
    return {layer: (table.params[layer], table.flops[layer]) for layer in table.params}
