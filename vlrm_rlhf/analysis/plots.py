"""Heatmaps (layers × modules) and curves (metric vs k) as PNG files, with matplotlib's Agg canvas (no pyplot)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..files import write_figure_atomic


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def heatmap(
    path: str | Path,
    matrix: Sequence[Sequence[float]],
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    title: str,
    cbar_label: str,
    xlabel: str = "module",
    ylabel: str = "layer (base-model index)",
    diverging: bool = False,
    split_after: int | None = None,
) -> Path:
    """One heatmap: ``matrix[i][j]`` at row ``rows[i]`` (layers, top = first) and column ``cols[j]``.

    ``diverging`` centres the colour scale on 0 (cosines, drops); NaN cells are grey. ``split_after`` draws a
    vertical line after that many columns (modules | aggregates).
    """
    import matplotlib
    import numpy as np

    data = np.array([[float("nan") if v is None else v for v in r] for r in matrix], dtype=float)
    fig = _figure(max(6.5, 0.55 * len(cols) + 2.5), max(3.2, 0.32 * len(rows) + 2.0))
    ax = fig.add_subplot()
    finite = _finite(data.ravel().tolist())
    kw: dict = {"cmap": "RdBu_r" if diverging else "viridis"}
    if diverging and finite:
        lim = max(abs(v) for v in finite) or 1.0
        kw.update(vmin=-lim, vmax=lim)
    cmap = matplotlib.colormaps[kw.pop("cmap")].with_extremes(bad="0.8")
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest", cmap=cmap, **kw)
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=45, ha="right")
    step = max(1, len(rows) // 24)
    ax.set_yticks(range(0, len(rows), step), labels=list(rows)[::step])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if split_after is not None and 0 < split_after < len(cols):
        ax.axvline(split_after - 0.5, color="white", linewidth=2)
    fig.colorbar(im, ax=ax, label=cbar_label)
    return write_figure_atomic(fig, path, force=True)


def curves(
    path: str | Path,
    x: Sequence[float],
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylims: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Side-by-side panels (y label → {line label → values}), one marker-line per series, shared x;
    ``ylims`` fixes a panel's y range (e.g. accuracy in [0, 1])."""
    fig = _figure(5.0 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (ylabel, series) in zip(axes, panels.items(), strict=True):
        for label, ys in series.items():
            ax.plot(list(x), list(ys), marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if len(x) <= 40:
            ax.set_xticks(list(x))
        if ylims and ylabel in ylims:
            ax.set_ylim(*ylims[ylabel])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return write_figure_atomic(fig, path, force=True)


def table_heatmap(path: str | Path, rows: Sequence[Mapping], value: str, *, row_key: str, col_key: str,
                  col_order: Sequence[str], split_after: int | None = None, **kw) -> Path:
    """Heatmap of ``value`` from long-format rows (one per (row_key, col_key) cell); missing cells are NaN."""
    cells = {(r[row_key], r[col_key]): r.get(value) for r in rows}
    row_ids = sorted({r[row_key] for r in rows})
    matrix = [[cells.get((i, c)) for c in col_order] for i in row_ids]
    return heatmap(path, matrix, [str(i) for i in row_ids], list(col_order), split_after=split_after, **kw)
