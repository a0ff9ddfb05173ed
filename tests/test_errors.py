"""The shared user-error base, the did-you-mean helper and the number formatter."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from strsparse.errors import closest_match, did_you_mean
from strsparse.formatting import human


def test_did_you_mean_suggests_only_a_close_name() -> None:
    assert did_you_mean("sgdd", ["sgd", "adam"]) == " (did you mean 'sgd'?)"
    assert did_you_mean("fashoin_mnist", ["fashion_mnist", "synthetic"]).endswith(
        "'fashion_mnist'?)"
    )
    assert did_you_mean("zzzz", ["sgd", "adam"]) == ""
    assert closest_match(3, ["3x", "y"]) == "3x"  # any value is compared by its str


@pytest.mark.parametrize(
    ("value", "text"),
    [(4_089_284_608, "4.09G"), (42_000_000, "42M"), (1_500, "1.5K"), (980, "980"), (0, "0")],
)
def test_human_numbers(value: float, text: str) -> None:
    assert human(value) == text
    assert human(-value) == ("-" + text if value else text)


@pytest.mark.parametrize("value", [None, math.nan, math.inf])
def test_human_unknown_is_na(value: float | None) -> None:
    assert human(value) == "n/a"


def _user_mistakes() -> dict[str, Callable[[], object]]:
    from torch import nn

    import strsparse
    from strsparse import data
    from strsparse.config import load_config
    from strsparse.export import read_spec

    return {
        "method": lambda: strsparse.sparsify(nn.Linear(2, 2), "strr"),
        "option": lambda: strsparse.sparsify(nn.Linear(2, 2), "gmp", sparsty=0.5),
        "pattern": lambda: strsparse.sparsify(nn.Linear(2, 2), "str", include=["fc*"]),
        "model": lambda: strsparse.create_model("resnet5O"),
        "paper budget": lambda: strsparse.Budget.from_paper("resnet50-str-90"),
        "budget file": lambda: strsparse.Budget.from_csv("no/such/budget.csv"),
        "config": lambda: load_config("fashion_mnist_str", ["optim.lrr=0.1"]),
        "dataset": lambda: data.get_dataset("mnist_fashion"),
        "checkpoint": lambda: strsparse.load_checkpoint("no/such/run"),
        "export": lambda: read_spec("no/such/export"),
    }


@pytest.mark.parametrize("mistake", list(_user_mistakes()))
def test_user_mistakes_raise_a_strsparse_error(mistake: str) -> None:
    import strsparse

    with pytest.raises(strsparse.StrsparseError) as info:
        _user_mistakes()[mistake]()
    assert "\n" not in str(info.value).strip()
