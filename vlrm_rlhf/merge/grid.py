"""Merge-parameter grids: parse ``KEY=a,b,c`` / ``KEY=start:stop:step`` specs, check keys against a recipe's
method, and turn a grid point into the in-memory merger's overrides. Shared by sweeps and in-memory ensembles.

Grid keys: ``lambda`` (alias ``weight``) is the ``weight`` of every non-base model (the paper's λ); ``ROLE.PARAM``
(roles lvlm, rm, llm) is that model's parameter; ``parameters.PARAM`` or a bare ``PARAM`` (density, epsilon, gamma,
t) is a top-level recipe parameter (``parameters.lambda`` is the method's own λ scaling).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from ..errors import VLRMError
from . import methods as M
from .recipe import Recipe

__all__ = ["GridError", "check_grid", "grid_points", "parse_grid", "point_overrides", "valid_keys"]

ROLES = ("lvlm", "vlrm", "rm", "llm")
WEIGHT_KEYS = ("lambda", "weight")  # grid aliases for the weight of every non-base model
NUMERIC = ("weight", "density", "gamma", "epsilon", "lambda", "t")  # sweepable (numeric) merge parameters
TOP = "parameters."
_TOL = 1e-9


class GridError(VLRMError, ValueError):
    """A bad grid or grid key; the message names the culprit and the valid choices."""


def _number(text: str, spec: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise GridError(f"grid {spec!r}: {text.strip()!r} is not a number") from None
    if not math.isfinite(v):
        raise GridError(f"grid {spec!r}: {text.strip()!r} is not finite")
    return v


def _values(text: str, spec: str) -> list[float]:
    """``start:stop:step`` (stop included within float tolerance) or ``a,b,c``."""
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise GridError(f"grid {spec!r}: a range is start:stop:step, got {text!r}")
        start, stop, step = (_number(p, spec) for p in parts)
        if step == 0 or (stop - start) * step < 0:
            raise GridError(f"grid {spec!r}: step {step:g} does not lead from {start:g} to {stop:g}")
        n = math.floor((stop - start) / step + _TOL) + 1
        if n > 10_000:
            raise GridError(f"grid {spec!r}: {n} values; use a larger step")
        vals = [round(start + i * step, 12) for i in range(n)]
        if abs(vals[-1] - stop) <= _TOL * max(1.0, abs(stop)):
            vals[-1] = stop
        return vals
    vals = [_number(p, spec) for p in text.split(",")] if text.strip() else []
    if not vals:
        raise GridError(f"grid {spec!r}: no values (use a,b,c or start:stop:step)")
    dup = next((v for i, v in enumerate(vals) if v in vals[:i]), None)
    if dup is not None:
        raise GridError(f"grid {spec!r}: value {dup:g} is listed twice")
    return vals


def parse_grid(specs: Sequence[str]) -> dict[str, list[float]]:
    """Parse ``KEY=start:stop:step`` / ``KEY=a,b,c`` specs into {key: values}, keys in the given order."""
    grid: dict[str, list[float]] = {}
    seen: dict[str, str] = {}
    for spec in specs:
        key, eq, text = spec.partition("=")
        key = key.strip()
        if not eq or not key:
            raise GridError(f"grid {spec!r}: expected KEY=VALUES, e.g. lambda=0:1:0.1 or density=0.2,0.4")
        canon = "weight" if key in WEIGHT_KEYS else key
        if canon in seen:
            raise GridError(f"grid {spec!r}: key {key!r} is already swept by {seen[canon]!r}")
        seen[canon] = spec
        grid[key] = _values(text, spec)
    if not grid:
        raise GridError("empty grid: give at least one --grid KEY=VALUES")
    return grid


def grid_points(grid: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """The cartesian product of the grid in a fixed order: the first key varies slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _roles(recipe: Recipe) -> list[str]:
    base = recipe.base_path()
    return [m.role for m in recipe.models if m.role != "base" and m.model != base]


def valid_keys(recipe: Recipe) -> list[str]:
    """Grid keys this recipe's merge method accepts."""
    m = M.get_method(recipe.merge_method)
    per = [p for p in NUMERIC if p in m.input_params]
    top = [p for p in NUMERIC if p in m.shared_params or p in m.input_params]
    keys = list(WEIGHT_KEYS) if "weight" in per else []
    keys += [p for p in top if p not in WEIGHT_KEYS] + [TOP + p for p in top]
    return keys + [f"{r}.{p}" for r in _roles(recipe) for p in per]


def check_grid(recipe: Recipe, grid: Mapping[str, Sequence[float]]) -> list[str]:
    """Raise GridError for a key the method does not take; return warnings for keys that cannot take effect."""
    valid = valid_keys(recipe)
    notes = []
    for key in grid:
        if key not in valid:
            raise GridError(f"unknown sweep key {key!r} for merge_method {recipe.merge_method}; "
                             f"valid keys: {', '.join(valid)}")
        param = key.removeprefix(TOP)
        if "." not in param and key not in WEIGHT_KEYS and param in M.get_method(recipe.merge_method).input_params:
            own = [m.role for m in recipe.models if m.role in _roles(recipe) and param in (m.parameters or {})]
            if own:
                notes.append(f"sweep key {key!r} is a top-level default, but {', '.join(own)} set(s) {param} "
                             f"itself, which wins: sweep {', '.join(f'{r}.{param}' for r in own)} instead")
    return notes


def point_overrides(recipe: Recipe, point: Mapping[str, float]) -> dict[str, float]:
    """Merger overrides (``PARAM`` top-level, ``ROLE.PARAM``) of a grid point; role-specific keys beat ``lambda``."""
    out: dict[str, float] = {}
    for key, v in point.items():
        if key in WEIGHT_KEYS:
            out.update({f"{r}.weight": v for r in _roles(recipe)})
    for key, v in point.items():
        if key not in WEIGHT_KEYS:
            out[key.removeprefix(TOP)] = v
    return out
