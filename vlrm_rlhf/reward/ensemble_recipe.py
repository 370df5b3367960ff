"""An in-memory reward ensemble from one merge recipe and a parameter grid, with no checkpoint per member.

``ensemble_from_recipe("vlrm.yaml", "lambda=0.5,0.7,1.0")`` merges the recipe once per grid point through the
sweep's ``InMemoryMerger`` (the same ``MergePlan.produce`` path as ``build``, so each member equals the disk merge
with the same parameters) and keeps one model per point. Members share every tensor the merge does not produce
per point — vision tower, projector, score head, buffers: the same ``Parameter`` objects — and own only their
merged language-model tensors, so K members cost one model plus K − 1 merged language models, and their image
features are computed once per batch (they share the vision path by construction).

Under DeepSpeed ZeRO-3 every member gets its own engine, and engines must not share parameters: use members
built on disk (``build``) there.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..merge.recipe import Recipe, parse_recipe
from .combine import EnsembleError
from .ensemble import EnsembleReward, member_label
from .scorer import VLRewardScorer

__all__ = ["ensemble_from_recipe", "merged_members"]

Grid = str | Sequence[str] | Mapping[str, Sequence[float]]


def clone_sharing(model: torch.nn.Module, own: set[str]) -> torch.nn.Module:
    """A deep copy of ``model`` that owns fresh copies of the tensors named in ``own`` (state_dict names) and
    shares every other parameter and buffer with ``model`` (the same objects: no second copy in memory)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    unknown = own - {n for n, _ in named}
    if unknown:
        raise KeyError(f"{sorted(unknown)[:3]} are not tensors of {type(model).__name__}")
    owned = {id(t) for n, t in named if n in own}
    memo: dict[int, Any] = {id(t): t for n, t in named if id(t) not in owned}
    return copy.deepcopy(model, memo)


def merged_members(recipe: Recipe | str | Path, grid: Grid, *, dtype: str | None = None, seed: int | None = None,
                   progress: bool = False) -> tuple[list[tuple[str, torch.nn.Module]], Any]:
    """One (name, model) per grid point, merged in memory and sharing all unmerged tensors; plus the processor.

    ``grid``: ``"lambda=0.5,0.7,1.0"``, several such specs, or {key: values} (keys and values as in
    ``vlrm-rlhf sweep --grid``; several keys give their cartesian product). Every point is validated before the
    first merge.
    """
    from ..eval.sweep import check_grid, grid_points, parse_grid, point_overrides
    from ..merge.inmemory import InMemoryMerger

    recipe = recipe if isinstance(recipe, Recipe) else parse_recipe(Path(recipe))
    if recipe.output != "vlrm":
        raise EnsembleError(f"an ensemble needs reward models: the recipe's output is {recipe.output!r}, not 'vlrm'")
    parsed = parse_grid([grid] if isinstance(grid, str) else list(grid)) if not isinstance(grid, Mapping) else {
        k: list(v) for k, v in grid.items()}
    for note in check_grid(recipe, parsed):
        warnings.warn(note, stacklevel=2)
    points = grid_points(parsed)
    if len(points) < 2:
        warnings.warn(f"the grid has {len(points)} point: an ensemble of one member", stacklevel=2)
    merger = InMemoryMerger(recipe, dtype=dtype, seed=seed, progress=progress)
    try:
        overrides = [point_overrides(recipe, p) for p in points]
        for p, o in zip(points, overrides, strict=True):
            try:
                merger.check(o)
            except ValueError as e:
                raise EnsembleError(f"grid point {member_label(p)}: {e}") from e
        own = {merger.names[n] for n in merger.merged}  # the tensors each point produces anew
        models = []
        for i, o in enumerate(overrides):
            merger.apply(o)
            models.append(merger.model if i == len(overrides) - 1 else clone_sharing(merger.model, own))
        processor = merger.processor
    finally:
        merger.close()  # drops the cached inputs; the members keep their own tensors
    return [(member_label(p), m.eval()) for p, m in zip(points, models, strict=True)], processor


def ensemble_from_recipe(recipe: Recipe | str | Path, grid: Grid, *, dtype: str | None = None,
                         seed: int | None = None, progress: bool = False, device: str | torch.device | None = None,
                         max_length: int | None = None, max_batch_tokens: int = 8192, **reward_kw: Any) -> EnsembleReward:
    """An ``EnsembleReward`` over the recipe's merges at every grid point, built in memory (see the module doc).

    ``reward_kw``: ``EnsembleReward`` options (``combine``, ``beta``, ``member_normalize``, ``name``,
    ``normalize``, ``clip``, ``non_finite``, ``accelerator``); members are named after their points
    (``lambda_0.5``). ``device``/``max_length``/``max_batch_tokens`` go to every member's scorer.
    """
    members, processor = merged_members(recipe, grid, dtype=dtype, seed=seed, progress=progress)
    scorers = [VLRewardScorer(m, processor, device=device, max_length=max_length, max_batch_tokens=max_batch_tokens)
               for _, m in members]
    reward_kw.setdefault("names", [n for n, _ in members])
    ens = EnsembleReward(scorers, **reward_kw)
    ens._device_pinned = device is not None
    return ens
