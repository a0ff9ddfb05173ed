"""The shared user-error base, the did-you-mean helper and the number formatter."""

from __future__ import annotations

import math

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
