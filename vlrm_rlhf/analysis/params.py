"""Parameter view: per layer and module, the size of each task vector τ = θ_model − θ_base and their cosines.

For a recipe's LVLM, its LLM (or RM) and their base, and optionally the recipe's merged model (merged in memory,
one tensor at a time): absolute norms ‖τ‖, relative norms ‖τ‖/‖θ_base‖ and cos(τ_LVLM, τ_LLM) per module
(``self_attn.q_proj`` … ``mlp.down_proj``, the norms) and per layer aggregate (``attention``, ``mlp``,
``layer``: the tensors taken together as one vector). Tensors are read one at a time (memory-mapped) and
reduced in float64. Layers are base-model indices; Mllama's cross-attention layers have no task vector here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..merge.checkpoint import Checkpoint
from ..merge.schedules import layer_of
from . import AnalysisError

AGGREGATES = ("attention", "mlp", "layer")
_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "gate_proj", "up_proj", "down_proj")


def module_of(canon: str) -> tuple[int, str] | None:
    """(layer, module) of a canonical layer key: ``layers.3.self_attn.q_proj.weight`` → (3, ``self_attn.q_proj``)."""
    layer = layer_of(canon)
    if layer is None:
        return None
    rest = canon.split(".", 2)[2]
    return layer, re.sub(r"\.(weight|bias)$", "", rest)


def group_of(module: str) -> str:
    """``attention`` (self_attn.*), ``mlp`` (mlp.*), ``norm`` (*norm*) or ``other``."""
    if module.startswith("self_attn."):
        return "attention"
    if module.startswith("mlp."):
        return "mlp"
    return "norm" if "norm" in module else "other"


def module_sort_key(module: str) -> tuple:
    """Columns in reading order: attention (q, k, v, o), MLP (gate, up, down), norms, then the aggregates."""
    if module in AGGREGATES:
        return (9, AGGREGATES.index(module), module)
    rank = {"attention": 0, "mlp": 1, "norm": 2, "other": 3}[group_of(module)]
    last = module.rsplit(".", 1)[-1]
    return (rank, _ORDER.index(last) if last in _ORDER else len(_ORDER), module)


@dataclass
class _Sums:
    """Running float64 reductions for one (layer, module) cell."""

    numel: int = 0
    bb: float = 0.0
    aa: float = 0.0
    oo: float = 0.0
    ao: float = 0.0
    mm: float = 0.0
    ma: float = 0.0
    mo: float = 0.0

    def add(self, b: torch.Tensor, a: torch.Tensor, o: torch.Tensor, m: torch.Tensor | None) -> None:
        self.numel += b.numel()
        self.bb += float(b @ b)
        self.aa += float(a @ a)
        self.oo += float(o @ o)
        self.ao += float(a @ o)
        if m is not None:
            self.mm += float(m @ m)
            self.ma += float(m @ a)
            self.mo += float(m @ o)

    def merge(self, other: _Sums) -> None:
        for f in ("numel", "bb", "aa", "oo", "ao", "mm", "ma", "mo"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


def _cos(xy: float, xx: float, yy: float) -> float:
    d = math.sqrt(xx * yy)
    return xy / d if d > 0 else float("nan")


def _rel(xx: float, bb: float) -> float:
    return math.sqrt(xx / bb) if bb > 0 else float("nan")


def task_vector_table(
    lvlm: Checkpoint,
    other: Checkpoint,
    base: Checkpoint,
    *,
    other_role: str = "llm",
    merged: Callable[[str], torch.Tensor] | None = None,
    progress: bool = False,
) -> list[dict]:
    """One row per (layer, module) and per (layer, aggregate), streaming one tensor at a time.

    ``merged(canon)``, when given, returns the merged model's tensor for a canonical key (adds τ_merged columns).
    """
    from tqdm.auto import tqdm

    keys = [k for k in base.text if module_of(k) is not None]
    for ck, role in ((lvlm, "lvlm"), (other, other_role)):
        missing = [k for k in keys if k not in ck.text]
        if missing:
            raise AnalysisError(f"{role} model {ck.path} lacks {missing[0]} that base {base.path} has")
    cells: dict[tuple[int, str], _Sums] = {}
    for k in tqdm(keys, desc="task vectors", disable=not progress):
        layer, module = module_of(k)
        b = base.get(base.text[k]).reshape(-1).double()
        a = lvlm.get(lvlm.text[k]).reshape(-1).double() - b
        o = other.get(other.text[k]).reshape(-1).double() - b
        if a.shape != b.shape or o.shape != b.shape:
            raise AnalysisError(f"shape mismatch for {k} between base, lvlm and {other_role}")
        m = merged(k).reshape(-1).double() - b if merged is not None else None
        cells.setdefault((layer, module), _Sums()).add(b, a, o, m)
    for (layer, module), s in list(cells.items()):
        for agg in ("layer", {"attention": "attention", "mlp": "mlp"}.get(group_of(module))):
            if agg is not None:
                cells.setdefault((layer, agg), _Sums()).merge(s)
    o_ = other_role
    rows = []
    for (layer, module), s in sorted(cells.items(), key=lambda kv: (kv[0][0], module_sort_key(kv[0][1]))):
        row = {"layer": layer, "module": module,
               "group": module if module in AGGREGATES else group_of(module), "numel": s.numel,
               "base_norm": math.sqrt(s.bb),
               "tau_lvlm_norm": math.sqrt(s.aa), "tau_lvlm_rel": _rel(s.aa, s.bb),
               f"tau_{o_}_norm": math.sqrt(s.oo), f"tau_{o_}_rel": _rel(s.oo, s.bb),
               f"cos_lvlm_{o_}": _cos(s.ao, s.aa, s.oo)}
        if merged is not None:
            row.update({"tau_merged_norm": math.sqrt(s.mm), "tau_merged_rel": _rel(s.mm, s.bb),
                        "cos_merged_lvlm": _cos(s.ma, s.mm, s.aa), f"cos_merged_{o_}": _cos(s.mo, s.mm, s.oo)})
        rows.append(row)
    return rows


def params_for_recipe(recipe, *, other_role: str | None = None, merged: bool = True,
                      progress: bool = False) -> tuple[list[dict], dict[str, str]]:
    """Task-vector table for a recipe's LVLM, LLM (or RM) and base; also returns the model names (for titles).

    With ``merged``, the recipe's merged model is computed in memory tensor by tensor (``MergeExecutor.produce``).
    """
    from ..merge.engine import MergePlan
    from ..merge.executor import MergeExecutor
    from ..merge.recipe import Recipe, parse_recipe

    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe if not isinstance(recipe, str) else Path(recipe))
    roles = {m.role: m.model for m in recipe.models}
    if other_role is None:
        other_role = "llm" if "llm" in roles else "rm" if "rm" in roles else None
        if other_role is None:
            raise AnalysisError("the recipe has no `role: llm` or `role: rm` model to compare the LVLM with")
    if other_role not in ("llm", "rm") or other_role not in roles:
        raise AnalysisError(f"--other {other_role}: the recipe has no model with that role "
                            f"(roles: {', '.join(sorted(r for r in roles if r))})")
    base_path = recipe.base_path()
    if base_path is None or base_path in (roles["lvlm"], roles[other_role]):
        raise AnalysisError("the parameter view needs the shared base LM as `base_model:` (or a `role: base` model), "
                            "distinct from the LVLM and the " + other_role)
    lvlm, other, base = Checkpoint(roles["lvlm"], "lvlm"), Checkpoint(roles[other_role], other_role), Checkpoint(base_path, "base")
    fn = None
    if merged:
        plan = MergePlan(recipe)
        executor = MergeExecutor(plan, track_ancestry=False)
        fn = lambda canon: executor.produce(plan.lvlm.ckpt.text[canon])  # noqa: E731
    rows = task_vector_table(lvlm, other, base, other_role=other_role, merged=fn, progress=progress)
    names = {"lvlm": roles["lvlm"], other_role: roles[other_role], "base": base_path,
             "merged": recipe.name or f"{recipe.merge_method} merge", "other_role": other_role}
    return rows, names


def quantities(rows: Sequence[dict], other_role: str) -> list[tuple[str, str]]:
    """(column, human label) of every quantity that gets its own heatmap."""
    o = other_role.upper()
    q = [("tau_lvlm_rel", "‖τ_LVLM‖ / ‖θ_base‖"), (f"tau_{other_role}_rel", f"‖τ_{o}‖ / ‖θ_base‖"),
         (f"cos_lvlm_{other_role}", f"cos(τ_LVLM, τ_{o})"), ("tau_lvlm_norm", "‖τ_LVLM‖"),
         (f"tau_{other_role}_norm", f"‖τ_{o}‖")]
    if rows and "tau_merged_rel" in rows[0]:
        q += [("tau_merged_rel", "‖τ_merged‖ / ‖θ_base‖"), ("cos_merged_lvlm", "cos(τ_merged, τ_LVLM)"),
              (f"cos_merged_{other_role}", f"cos(τ_merged, τ_{o})")]
    return q


def write_params(out: Path, rows: Sequence[dict], names: dict[str, str]) -> list[Path]:
    """``params.csv`` and one heatmap PNG per quantity (layers × modules, aggregates right of the white line)."""
    from ..files import write_csv_atomic
    from .plots import table_heatmap

    o = names["other_role"]
    files = [write_csv_atomic(rows, out / "params.csv")]
    modules = sorted({r["module"] for r in rows}, key=module_sort_key)
    split = sum(m not in AGGREGATES for m in modules)
    who = f"LVLM {Path(names['lvlm']).name}, {o.upper()} {Path(names[o]).name}, base {Path(names['base']).name}"
    for col, label in quantities(rows, o):
        files.append(table_heatmap(out / f"params_{col}.png", rows, col, row_key="layer", col_key="module",
                                   col_order=modules, split_after=split, title=f"{label} per layer and module\n{who}",
                                   cbar_label=label, diverging=col.startswith("cos")))
    return files
