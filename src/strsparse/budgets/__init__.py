"""Sparsity budgets: :class:`Budget` (layer name -> sparsity) and the STR paper's published ones.

>>> from strsparse.budgets import Budget, list_paper_budgets, load_paper_budget
>>> budget = load_paper_budget("resnet50-str-90.23")  # a strsparse.Budget, fractions
"""

from strsparse.budgets.budget import Budget, load_paper_budget
from strsparse.budgets.paper import (
    PaperBudget,
    list_paper_budgets,
    paper_budget_info,
    paper_layer_table,
)

__all__ = [
    "Budget",
    "PaperBudget",
    "list_paper_budgets",
    "load_paper_budget",
    "paper_budget_info",
    "paper_layer_table",
]
