"""Sparsity budgets published in the STR paper (Kusupati et al., ICML 2020, Tables 6-8).

>>> from strsparse.budgets import list_paper_budgets, load_paper_budget
>>> budget = load_paper_budget("resnet50-str-90.23")  # a strsparse.Budget, fractions
"""

from strsparse.budgets.paper import (
    PaperBudget,
    list_paper_budgets,
    load_paper_budget,
    paper_budget_info,
    paper_layer_table,
)

__all__ = [
    "PaperBudget",
    "list_paper_budgets",
    "load_paper_budget",
    "paper_budget_info",
    "paper_layer_table",
]
