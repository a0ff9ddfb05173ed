"""strsparse.plots writes real, complete images (the format of the suffix), atomically."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from strsparse.flops import profile
from strsparse.plots import plot_budgets, plot_metrics, plot_thresholds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, folder) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert data.endswith(b"IEND\xaeB`\x82")  # the closing chunk: a complete file
    assert len(data) > 10_000
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no temp file left


@pytest.fixture(scope="module")
def small_profile():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    return profile(model, (3, 16, 16))


BUDGETS = {
    "uniform": {"0": 0.9, "2": 0.9, "5": 0.9},
    "learnt": {"0": 0.5, "2": 0.95, "5": 0.7},
}


def test_plot_budgets_with_flops(tmp_path, small_profile):
    out = plot_budgets(BUDGETS, tmp_path / "budgets.png", flops_profile=small_profile, title="t")
    assert out == tmp_path / "budgets.png"
    _assert_png(out, tmp_path)


def test_plot_budgets_alone_creates_folders(tmp_path):
    out = plot_budgets(BUDGETS, tmp_path / "figs" / "b.png")
    _assert_png(out, tmp_path / "figs")


def test_plot_budgets_rejects_bad_input(tmp_path, small_profile):
    with pytest.raises(ValueError, match="fraction"):
        plot_budgets({"pct": {"0": 90.0}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'conv9'"):
        plot_budgets({"b": {"conv9": 0.5}}, tmp_path / "x.png", flops_profile=small_profile)
    with pytest.raises(ValueError, match="at least one"):
        plot_budgets({}, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layers", [3, 20])  # legend, then colour bar
def test_plot_thresholds(tmp_path, layers):
    history = {f"layer{i}.conv": [0.0, 0.0, 0.01 * i, 0.02 * i] for i in range(layers)}
    _assert_png(plot_thresholds(history, tmp_path / "thr.png"), tmp_path)


def test_plot_thresholds_rejects_ragged_history(tmp_path):
    with pytest.raises(ValueError, match="same non-zero number"):
        plot_thresholds({"a": [0.0, 1.0], "b": [0.0]}, tmp_path / "thr.png")


def test_plot_metrics(tmp_path):
    epochs = list(range(1, 11))
    series = {"top1_%": [10.0 * i for i in range(10)], "loss": [1 / (i + 1) for i in range(10)]}
    _assert_png(plot_metrics(epochs, series, tmp_path / "m.png"), tmp_path)
    with pytest.raises(ValueError, match="'loss' has 3 values"):
        plot_metrics(epochs, {"loss": [1.0, 2.0, 3.0]}, tmp_path / "m2.png")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "m.png").write_bytes(b"old")

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        plot_metrics([0, 1], {"loss": [1.0, 0.5]}, tmp_path / "m.png")
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]
    assert (tmp_path / "m.png").read_bytes() == b"old"  # the previous file is intact


def test_thresholds_accept_scalar_tensors(tmp_path):
    # What a training loop logs: g(s) as 0-dim tensors, one per epoch.
    history = {"fc": [torch.sigmoid(torch.tensor(s)) for s in (-5.0, -4.0, -3.0)]}
    _assert_png(plot_thresholds(history, tmp_path / "t.png", epochs=[1, 2, 3]), tmp_path)


@pytest.mark.parametrize(("suffix", "magic"), [(".pdf", b"%PDF-"), (".svg", b"<?xml")])
def test_the_suffix_picks_the_format(tmp_path, suffix, magic):
    path = plot_budgets(BUDGETS, tmp_path / f"m{suffix}")
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [f"m{suffix}"]
    _assert_png(
        plot_metrics([0, 1], {"loss": [1.0, 0.5]}, tmp_path / "png" / "m"), tmp_path / "png"
    )


def test_an_unknown_suffix_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"'\.pdff' \(did you mean 'pdf'\?\).*\.png"):
        plot_budgets(BUDGETS, tmp_path / "m.pdff")
    assert list(tmp_path.iterdir()) == []


def test_plot_budgets_has_one_title(tmp_path, small_profile, monkeypatch):
    from strsparse import plots

    figures = []
    save = plots._save_atomic
    monkeypatch.setattr(
        plots, "_save_atomic", lambda fig, path: figures.append(fig) or save(fig, path)
    )
    plot_budgets(BUDGETS, tmp_path / "b.png", flops_profile=small_profile, title="run: sparsity")
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert fig._suptitle is None and titles.count("run: sparsity") == 1
    assert not any("sparsity budget" in t for t in titles)  # the default gave way to the title
