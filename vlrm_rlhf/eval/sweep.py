"""Merge-parameter sweeps: every grid point merged in memory into one loaded model, evaluated, tabulated, plotted.

Grid keys are parsed and checked by ``merge.grid``.
``run_sweep`` writes ``sweep.csv`` and ``sweep.png`` and can save the best point as a real merged directory,
built by the disk engine with the same parameters (bit-identical to the model that was evaluated).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import did_you_mean
from ..files import OutputExistsError, check_not_overlapping, write_csv_atomic, write_figure_atomic
from ..merge import methods as M
from ..merge.engine import MergeError
from ..merge.grid import GridError, check_grid, grid_points, parse_grid, point_overrides
from ..merge.recipe import Recipe, RecipeError, parse_recipe

__all__ = ["SweepError", "check_metric", "plot_sweep", "pref_evaluator", "pref_metrics", "run_sweep", "sweep_prefs"]

Evaluate = Callable[[Any, Any], Mapping[str, float]]
SweepError = GridError  # one error class for bad grids, keys, metrics and sweep outputs


def check_metric(metric: str, metrics: Collection[str]) -> None:
    """``--metric`` must be one of the evaluation's ``metrics`` (checked before any point is evaluated)."""
    if metric not in metrics:
        raise SweepError(f"--metric {metric!r} is not a metric of this evaluation{did_you_mean(metric, metrics)} "
                         f"(metrics: {', '.join(metrics)})")


# ---- outputs ---------------------------------------------------------------------------------------------
def _label(point: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in point.items())


def plot_sweep(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str, path: Path,
               title: str = "merge sweep", *, force: bool = True) -> None:
    """One key: every metric against it; two keys: ``metric`` against the first, a line per second-key value;
    more: the best points as bars. Written atomically (PNG, Agg canvas: no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    best = max(rows, key=lambda r: _score(r, metric))
    if len(keys) == 1:
        k = keys[0]
        names = [c for c in rows[0] if c not in keys and c != "n" and _is_num(rows[0][c])]
        for c in names:
            ax.plot([r[k] for r in rows], [r[c] for r in rows], marker="o", ms=3,
                    lw=2.5 if c == metric else 1.2, label=c, zorder=3 if c == metric else 2)
        ax.axvline(best[k], color="grey", ls=":", lw=1, label=f"best {metric}: {k}={best[k]:g}")
        ax.set_xlabel(k)
        ax.set_ylabel("metric")
    elif len(keys) == 2:
        k1, k2 = keys
        for v2 in dict.fromkeys(r[k2] for r in rows):
            sub = [r for r in rows if r[k2] == v2]
            ax.plot([r[k1] for r in sub], [r[metric] for r in sub], marker="o", ms=3, label=f"{k2}={v2:g}")
        star = f"best: {_label({k: best[k] for k in keys})}"
        ax.plot([best[k1]], [best[metric]], marker="*", ms=14, color="black", ls="", label=star)
        ax.set_xlabel(k1)
        ax.set_ylabel(metric)
    else:
        top = sorted(rows, key=lambda r: -_score(r, metric))[:25]
        ax.barh(range(len(top)), [r[metric] for r in top], color="tab:blue")
        ax.set_yticks(range(len(top)), [_label({k: r[k] for k in keys}) for r in top], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(metric)
        ax.set_title(f"{title}: best {len(top)} of {len(rows)} points by {metric}")
    if len(keys) <= 2:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.set_title(f"{title} ({len(rows)} points)")
    write_figure_atomic(fig, path, force=force, dpi=120)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _score(row: Mapping[str, Any], metric: str) -> float:
    v = row[metric]
    return v if _is_num(v) and not math.isnan(v) else -math.inf


# ---- the sweep -------------------------------------------------------------------------------------------
def run_sweep(
    recipe: Recipe | str | Path,
    grid: Mapping[str, Sequence[float]] | Sequence[str],
    evaluate: Evaluate,
    *,
    out_dir: str | Path,
    metric: str = "overall",
    save_best: str | Path | None = None,
    seed: int | None = None,
    dtype: str | None = None,
    progress: bool = True,
    force: bool = False,
    metrics: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Merge every grid point in memory, ``evaluate(model, processor) -> {metric: value}`` it, and write
    ``out_dir/sweep.csv`` + ``sweep.png``; ``save_best`` builds the best point (by ``metric``) to disk.

    ``metrics``: the names ``evaluate`` returns, when known in advance, so that ``metric`` is checked before any
    model loads (otherwise after the first point). ``save_best`` may not overlap the recipe's inputs.
    Returns one row per point: the grid values, then the metrics.
    """
    from tqdm.auto import tqdm

    from ..merge.inmemory import InMemoryMerger

    if metrics is not None:
        check_metric(metric, list(metrics))
    recipe_file = None if isinstance(recipe, Recipe) else Path(recipe)
    recipe = recipe if isinstance(recipe, Recipe) else parse_recipe(Path(recipe))
    if save_best is not None:
        check_not_overlapping(save_best, [*recipe.input_paths(), ("recipe", recipe_file)], what="--save-best")
    grid = dict(grid) if isinstance(grid, Mapping) else parse_grid(grid)
    if not grid or not all(grid.values()):
        raise SweepError("empty grid: give at least one key with values")
    for note in check_grid(recipe, grid):
        warnings.warn(note, stacklevel=2)
    out_dir = Path(out_dir)
    outputs = [out_dir / "sweep.csv", out_dir / "sweep.png"]
    if not force and (clash := [str(p) for p in outputs if p.exists()]):
        raise OutputExistsError(f"{', '.join(clash)} already exist(s); pass --force to replace")
    if save_best is not None and Path(save_best).exists() and not force:
        raise OutputExistsError(f"--save-best directory {save_best} already exists; pass --force to replace it")
    points = grid_points(grid)
    with warnings.catch_warnings(record=True) as caught:  # the recipe's own inert settings are not swept: drop
        warnings.simplefilter("always")
        merger = InMemoryMerger(recipe, dtype=dtype, seed=seed, progress=progress)
    own = set(M.inert_parameter_warnings(recipe.merge_method, recipe.parameters or {},
                                         [s.params or {} for s in merger.plan.models]))
    for w in caught:
        if str(w.message) not in own:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        notes = []
        for p in points:  # every point is validated before the first evaluation
            try:
                notes += merger.check(point_overrides(recipe, p))
            except (MergeError, RecipeError) as e:
                raise SweepError(f"grid point {_label(p)}: {e}") from e
        for note in dict.fromkeys(notes):
            warnings.warn(note, stacklevel=2)
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / "sweep.partial.csv"
        rows: list[dict[str, Any]] = []
        bar = tqdm(points, desc=f"sweep ({recipe.merge_method})", unit="point", disable=not progress)
        for p in bar:
            merger.apply(point_overrides(recipe, p))
            metrics = dict(evaluate(merger.model, merger.processor))
            if metric not in metrics:
                raise SweepError(f"metric {metric!r} is not among the evaluation's metrics: {', '.join(metrics)}")
            rows.append({**p, **{k: v for k, v in metrics.items() if k not in p}})
            write_csv_atomic(rows, partial, force=True)  # progress survives a crash, under a name that says it is partial
            bar.set_postfix({metric: f"{metrics[metric]:.4g}"})
    finally:
        merger.close()
    write_csv_atomic(rows, outputs[0], force=force)
    plot_sweep(rows, list(grid), metric, outputs[1], title=f"{recipe.merge_method} sweep", force=force)
    partial.unlink(missing_ok=True)
    if save_best is not None:
        from ..merge import build

        best = max(rows, key=lambda r: _score(r, metric))
        best_recipe = merger.recipe_for(point_overrides(recipe, {k: best[k] for k in grid}))
        build(best_recipe, save_best, force=force, seed=merger.seed, dtype=dtype, progress=progress)
    return rows


def pref_metrics(records: Sequence[Any]) -> list[str]:
    """The metric names ``pref_evaluator`` returns on ``records`` (what ``--metric`` may name)."""
    from .records import CATEGORY_ORDER

    cats = {r.category for r in records}
    return ["overall", "macro", *(c for c in CATEGORY_ORDER if c in cats), *sorted(cats - set(CATEGORY_ORDER)),
            "tie_rate", "n"]


def pref_evaluator(records: Sequence[Any], *, tol: float = 0.0, mode: str = "vlrm") -> Evaluate:
    """An ``evaluate`` callback: preference accuracy of the in-memory model on ``records``
    (overall, macro, per category, tie_rate, n) with ``VLRewardScorer(model, processor, mode=mode)``."""
    from ..reward.scorer import VLRewardScorer
    from .prefs import evaluate_prefs

    def evaluate(model: Any, processor: Any) -> dict[str, float]:
        res = evaluate_prefs(VLRewardScorer(model, processor, mode=mode), records, tol=tol, progress=False)  # type: ignore[arg-type]
        return {**res.accuracy_by_category(), "tie_rate": res.metrics["tie_rate"], "n": res.metrics["n"]}

    return evaluate


def sweep_prefs(
    recipe: Recipe | str | Path,
    grid: Mapping[str, Sequence[float]] | Sequence[str],
    records: Sequence[Any],
    *,
    out_dir: str | Path,
    metric: str = "overall",
    save_best: str | Path | None = None,
    seed: int | None = None,
    tol: float = 0.0,
    progress: bool = True,
    force: bool = False,
) -> list[dict[str, Any]]:
    """``run_sweep`` scored by preference accuracy on already-loaded records (``load_pref_records``)."""
    return run_sweep(recipe, grid, pref_evaluator(records, tol=tol), out_dir=out_dir, metric=metric,
                     save_best=save_best, seed=seed, progress=progress, force=force, metrics=pref_metrics(records))
