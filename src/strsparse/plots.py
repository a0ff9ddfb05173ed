"""Pictures of budgets, FLOPs, thresholds and training curves, written as PNG files.

- :func:`plot_budgets`: per-layer sparsity of several budgets side by side and, given a dense
  :class:`~strsparse.flops.FlopsProfile`, each budget's per-layer FLOPs ``(1 - s_l) * FLOPs_l``
  (the STR paper's Figures 8 and 9, Kusupati et al., ICML 2020).
- :func:`plot_thresholds`: each layer's threshold over epochs (the paper's Figure 1).
- :func:`plot_metrics`: accuracy, sparsity or any other series over epochs.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend
switch, nothing is ever shown) and written atomically: a temporary file in the same folder,
then a rename, so an interrupted run never leaves a half-written PNG.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strsparse.atomic import write_atomic
from strsparse.errors import OptionError, did_you_mean
from strsparse.formatting import human

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from strsparse.flops import FlopsProfile

__all__ = ["plot_budgets", "plot_metrics", "plot_thresholds"]

logger = logging.getLogger(__name__)

_DPI = 120


def _new_figure(width: float, height: float) -> Figure:
    # Imported here so that importing strsparse (or the training loop) stays fast.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _image_format(fig: Figure, path: Path) -> str:
    """The format ``path``'s suffix names (``m.pdf`` -> pdf); PNG without a suffix."""
    if not path.suffix:
        return "png"
    fmt = path.suffix[1:].lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise OptionError(
            f"cannot write a plot as {path.name!r}: unknown image suffix {path.suffix!r}"
            f"{did_you_mean(fmt, supported)}; use one of "
            f"{', '.join('.' + s for s in sorted(supported))}"
        )
    return fmt


def _save_atomic(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` in the format of ``path``'s suffix (PNG, PDF, SVG, ...), atomically."""
    path = Path(path)
    fmt = _image_format(fig, path)  # the temporary file's name has no telling suffix
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=_DPI))
    logger.debug("wrote %s", path)
    return path


def _percent_axis(ax: Any) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _layer_order(
    budgets: Mapping[str, Mapping[str, float]], flops_profile: FlopsProfile | None
) -> list[str]:
    if flops_profile is not None:
        layers = [r.name for r in flops_profile.weight_layers]
        known = set(layers)
        for name, budget in budgets.items():
            unknown = [layer for layer in budget if layer not in known]
            if unknown:
                raise OptionError(
                    f"budget {name!r} names layers the FLOPs profile lacks: "
                    f"{', '.join(map(repr, unknown[:5]))}; profile the same model the budget "
                    "is for"
                )
        return layers
    order: list[str] = []
    seen: set[str] = set()
    for budget in budgets.values():
        for layer in budget:
            if layer not in seen:
                seen.add(layer)
                order.append(layer)
    return order


def _check_fractions(budgets: Mapping[str, Mapping[str, float]]) -> None:
    for name, budget in budgets.items():
        for layer, value in budget.items():
            if not 0.0 <= float(value) <= 1.0:
                raise OptionError(
                    f"budget {name!r}: sparsity of {layer!r} is {value!r}, not a fraction in "
                    "[0, 1]; give sparsities as fractions (90% -> 0.9)"
                )


def plot_budgets(
    budgets: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    flops_profile: FlopsProfile | None = None,
    title: str | None = None,
) -> Path:
    """Grouped per-layer sparsity bars of several budgets (name -> layer -> fraction).

    With ``flops_profile`` (a dense profile of the model the budgets are for) a second panel
    shows each layer's sparse FLOPs ``(1 - s_l) * FLOPs_l`` per budget, with the dense FLOPs
    as black ticks; layers a budget leaves out count as dense. ``title`` replaces the
    sparsity panel's. Writes the image format of ``path``'s suffix (PNG, PDF, SVG, ...; PNG
    without one) and returns the path.
    """
    if not budgets:
        raise OptionError("plot_budgets needs at least one budget")
    _check_fractions(budgets)
    layers = _layer_order(budgets, flops_profile)
    if not layers:
        raise OptionError("the budgets name no layers; nothing to plot")
    n_layers, n_budgets = len(layers), len(budgets)
    panels = 2 if flops_profile is not None else 1
    width = min(max(8.0, 0.1 * n_layers * (n_budgets + 1) + 2.0), 30.0)
    # Room below the axes for the rotated layer names (about 0.07 inch per character).
    labels_height = 0.4 + 0.07 * max(len(layer) for layer in layers)
    fig = _new_figure(width, 3.4 * panels + 0.6 + labels_height)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]

    import numpy as np

    x = np.arange(n_layers)
    bar = 0.8 / n_budgets
    offsets = (np.arange(n_budgets) - (n_budgets - 1) / 2) * bar
    colors = [f"C{i % 10}" for i in range(n_budgets)]

    ax = axes[0]
    for (name, budget), offset, color in zip(budgets.items(), offsets, colors, strict=True):
        values = [100.0 * float(budget.get(layer, 0.0)) for layer in layers]
        ax.bar(x + offset, values, bar, label=name, color=color)
    ax.set_ylabel("layer sparsity")
    ax.set_ylim(0, 100)
    _percent_axis(ax)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small")
    ax.set_title(title or "Per-layer sparsity budget")  # the figure's one title

    if flops_profile is not None:
        ax = axes[1]
        dense = np.array([flops_profile[layer].flops for layer in layers], dtype=float)
        all_sparse = []
        for (name, budget), offset, color in zip(budgets.items(), offsets, colors, strict=True):
            sparse = dense * (1.0 - np.array([float(budget.get(lay, 0.0)) for lay in layers]))
            all_sparse.append(sparse)
            total = sparse.sum()
            ax.bar(x + offset, sparse, bar, color=color, label=f"{name}: {human(total)} FLOPs")
        ax.scatter(x, dense, marker="_", s=60, color="black", label="dense", zorder=3)
        positive = np.concatenate([dense, *all_sparse])
        positive = positive[positive > 0]
        if positive.size and positive.max() / positive.min() > 100:
            ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human(v)))
        ax.set_ylabel("FLOPs per layer (MACs)")
        ax.grid(axis="y", alpha=0.3, which="major")
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small")
        ax.set_title("Per-layer FLOPs, (1 - s) x dense FLOPs")

    axes[-1].set_xticks(x, layers, rotation=90, fontsize="x-small" if n_layers > 30 else "small")
    axes[-1].set_xlim(-0.6, n_layers - 0.4)
    return _save_atomic(fig, path)


def plot_thresholds(
    history: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    epochs: Sequence[float] | None = None,
    title: str | None = None,
) -> Path:
    """Each layer's threshold (layer -> one value per epoch) over training (paper Figure 1).

    Layers are coloured by their depth (first to last, as given); up to 12 are named in a
    legend, more get a colour bar. Writes the image format of ``path``'s suffix (PNG without
    one) and returns the path.
    """
    if not history:
        raise OptionError("plot_thresholds needs at least one layer's history")
    lengths = {len(v) for v in history.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise OptionError(
            f"every layer needs the same non-zero number of values; got lengths {sorted(lengths)}"
        )
    (length,) = lengths
    xs = list(range(length)) if epochs is None else list(epochs)
    if len(xs) != length:
        raise OptionError(f"epochs has {len(xs)} values but each history has {length}")

    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig = _new_figure(8.0, 4.8)
    ax = fig.subplots()
    cmap = colormaps["viridis"]
    n = len(history)
    norm = Normalize(vmin=0, vmax=max(n - 1, 1))
    for i, (layer, values) in enumerate(history.items()):
        ax.plot(xs, [float(v) for v in values], color=cmap(norm(i)), lw=1.2, label=layer)
    ax.set_xlabel("epoch")
    if all(float(e).is_integer() for e in xs):
        ax.xaxis.set_major_locator(_integer_locator())
    ax.set_ylabel("threshold g(s)")
    ax.grid(alpha=0.3)
    if n <= 12:
        ax.legend(fontsize="small")
    else:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax)
        bar.set_label("layer index (input to output)")
        bar.locator = _integer_locator()
        bar.update_ticks()
    ax.set_title(title or "Per-layer threshold over training")
    return _save_atomic(fig, path)


def plot_metrics(
    epochs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """One panel per series (e.g. ``{"top1_%": [...], "sparsity_%": [...]}``) over ``epochs``.

    Separate panels because the series have different units. A series name ending in ``%``
    gets a percent axis. Values that are missing (``nan``) leave gaps. Writes the image format
    of ``path``'s suffix (PNG without one) and returns the path.
    """
    if not series:
        raise OptionError("plot_metrics needs at least one series")
    xs = [float(e) for e in epochs]
    for name, values in series.items():
        if len(values) != len(xs):
            raise OptionError(
                f"series {name!r} has {len(values)} values but there are {len(xs)} epochs"
            )
    n = len(series)
    fig = _new_figure(8.0, 1.2 + 2.2 * n)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for i, (ax, (name, values)) in enumerate(zip(axes, series.items(), strict=True)):
        ys = [float(v) if v is not None else math.nan for v in values]
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, ms=3, color=f"C{i % 10}")
        ax.set_ylabel(name)
        if name.endswith("%"):
            _percent_axis(ax)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    if all(e.is_integer() for e in xs):
        axes[-1].xaxis.set_major_locator(_integer_locator())
    if title:
        fig.suptitle(title)
    return _save_atomic(fig, path)
