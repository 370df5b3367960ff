"""Per-layer schedules for merge recipes: a parameter's value as a function of depth, and layer swaps.

Depth is always the **base (text) model's layer index** ``0 .. L-1`` (``L`` = the base's number of decoder
layers), i.e. the canonical ``layers.N.`` index of the merge engine. Mllama's interleaved cross-attention layers
have no base counterpart: the engine copies them from the LVLM bit-identically and no schedule ever sees them.

Recipe syntax (mergekit's own forms keep working unchanged: scalars, gradients, ``filter:`` lists)::

    models:
      - model: ../../runs/reasoning/llm
        role: llm
        parameters:
          weight: {schedule: linear, start: 0.2, end: 1.0}          # ramp across depth
          density: {schedule: step, values: [1.0, 0.5], boundaries: [16]}   # layers < 16 → 1.0, ≥ 16 → 0.5
          # separate attention and MLP schedules: mergekit's `filter:` entries, the first match wins
          # weight:
          #   - {filter: self_attn, value: {schedule: linear, start: 0.0, end: 0.9}}
          #   - {filter: mlp, value: {schedule: step, values: [0.0, 1.0], boundaries: [8]}}
          #   - {value: 0.5}                  # everything else (norms, embeddings, lm_head)
    layer_swap: {k: 4, embeddings: true}      # layers 0..3 (and embed_tokens) copied from the LVLM

Schedule kinds (a mapping with a ``schedule`` key wherever a parameter value may go, also inside ``filter:``):

- ``{schedule: linear, start: a, end: b}``: ``a + (b - a) * i / (L - 1)`` at layer ``i`` (``a`` when L = 1).
  The same as mergekit's gradient ``[a, b]``, written so that it reads.
- ``{schedule: step, values: [v0, v1, ..., vn], boundaries: [b1, ..., bn]}``: ``v0`` for layers ``< b1``,
  ``v1`` for ``b1 <= i < b2``, ..., ``vn`` from ``bn`` on; boundaries are strictly increasing layer indices
  in ``1 .. L-1``.
- Both take an optional ``outside: v``: the value for tensors outside the decoder layers (``embed_tokens``, the
  final ``norm``, ``lm_head``). Default: the value at layer 0, which is what mergekit's gradients do.

``layer_swap`` (top level) keeps tensors **bit-identical** from the LVLM instead of merging them:
``k`` (required, ``0 .. L``): layers ``0 .. k-1``; ``embeddings`` (default false): also ``embed_tokens``;
``final`` (default false): also the final ``norm`` and ``lm_head``; ``filter`` (optional): only tensors whose
name contains it (``self_attn`` or ``mlp`` swaps just that part). ``k: 0`` is the plain merge; ``k: L`` with
``embeddings`` and ``final`` gives back the LVLM's language model exactly. (A *soft* swap that merely zeroes
a donor's task vector in the first k layers is ``{schedule: step, values: [0, w], boundaries: [k]}``.)

Everything below is pure: validation of the recipe's structure, range checks once ``L`` is known, and the
value of a schedule at a layer.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..errors import did_you_mean

# The one pattern for a decoder layer in a canonical text-model tensor name: ``layers.<index>.<rest>``
LAYER_RE = re.compile(r"^layers\.(\d+)\.")
EMBEDDINGS = ("embed_tokens.weight",)
FINAL = ("norm.weight", "lm_head.weight")


class LinearSchedule(BaseModel):
    """``start`` at layer 0 to ``end`` at the last layer, linearly."""

    model_config = ConfigDict(extra="forbid")
    schedule: Literal["linear"]
    start: float
    end: float
    outside: float | None = None


class StepSchedule(BaseModel):
    """Piecewise constant: ``values[j]`` between ``boundaries[j-1]`` and ``boundaries[j]``."""

    model_config = ConfigDict(extra="forbid")
    schedule: Literal["step"]
    values: list[float] = Field(min_length=1)
    boundaries: list[int] = Field(default_factory=list)
    outside: float | None = None


Schedule = Annotated[LinearSchedule | StepSchedule, Field(discriminator="schedule")]
_SCHEDULE = TypeAdapter(Schedule)
KINDS: dict[str, type[BaseModel]] = {"linear": LinearSchedule, "step": StepSchedule}


class LayerSwap(BaseModel):
    """Top-level ``layer_swap``: the first ``k`` base layers (and optionally embeddings/final) from the LVLM."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(ge=0)
    embeddings: bool = False
    final: bool = False
    filter: str | None = None


# ---- structural validation (no model needed) ----------------------------------------------------------------
def parse_schedule(value: dict[str, Any], where: str) -> LinearSchedule | StepSchedule:
    """Validate one ``{schedule: ...}`` mapping; errors name ``where`` (e.g. ``models[1].parameters.weight``)."""
    kind = value.get("schedule")
    if kind == "swap":
        raise ValueError(f"{where}: `schedule: swap` is not a parameter value; layer swaps are the top-level key "
                         "`layer_swap: {k: 4}` (copies layers 0..k-1 bit-identically from the LVLM)")
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown schedule kind {kind!r}; known kinds: {', '.join(KINDS)}")
    fields = KINDS[kind].model_fields
    for key in value:
        if key not in fields:
            raise ValueError(f"{where}: unknown key {key!r} in a {kind} schedule{did_you_mean(str(key), fields)} "
                             f"(keys: {', '.join(fields)})")
    try:
        s = _SCHEDULE.validate_python(value)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"][1:]) or "schedule"
        msg = "required key is missing" if err["type"] == "missing" else err["msg"]
        raise ValueError(f"{where}: {kind} schedule key {key!r}: {msg}") from None
    nums = [s.start, s.end] if isinstance(s, LinearSchedule) else list(s.values)
    for x in [*nums, *([s.outside] if s.outside is not None else [])]:
        if not math.isfinite(x):
            raise ValueError(f"{where}: {kind} schedule values must be finite numbers, got {x}")
    if isinstance(s, StepSchedule):
        b = s.boundaries
        if len(s.values) != len(b) + 1:
            raise ValueError(f"{where}: a step schedule needs one more value than boundaries "
                             f"(got {len(s.values)} values and {len(b)} boundaries)")
        if any(x < 1 for x in b) or any(y <= x for x, y in zip(b, b[1:], strict=False)):
            raise ValueError(f"{where}: step boundaries must be strictly increasing layer indices >= 1, got {b}")
    return s


FILTER_KEYS = ("filter", "value")  # the keys of a mergekit ``filter:`` entry


def _walk(setting: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(location, raw value) of every place a schedule may sit in one parameter setting; a filter entry with an
    unknown key or without ``value`` raises (naming the key, with a suggestion)."""
    if isinstance(setting, dict) and "schedule" in setting:
        yield where, setting
    elif isinstance(setting, dict):
        for key in setting:
            if key not in FILTER_KEYS:
                raise ValueError(f"{where}: unknown key {key!r} in a filter entry{did_you_mean(str(key), FILTER_KEYS)} "
                                 f"(keys: {', '.join(FILTER_KEYS)})")
        if "value" not in setting:
            raise ValueError(f"{where}: a filter entry needs `value:` (e.g. {{filter: mlp, value: 0.5}})")
        yield from _walk(setting["value"], where + ".value")
    elif isinstance(setting, list):
        for i, x in enumerate(setting):
            if isinstance(x, dict):
                yield from _walk(x, f"{where}[{i}]")


def iter_settings(data: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """(location, parameter name, setting) of every parameter in a raw recipe mapping (top level, then models)."""
    for name, setting in (data.get("parameters") or {}).items():
        yield f"parameters.{name}", name, setting
    for i, m in enumerate(data.get("models") or []):
        if isinstance(m, dict):
            for name, setting in (m.get("parameters") or {}).items():
                yield f"models[{i}].parameters.{name}", name, setting


def check_recipe_schedules(data: dict[str, Any]) -> None:
    """Validate every ``{schedule: ...}`` in a raw recipe mapping; the error names the key."""
    for where, _, setting in iter_settings(data):
        if isinstance(setting, BaseModel):
            continue
        for loc, raw in _walk(setting, where):
            if not isinstance(raw, BaseModel):
                parse_schedule(raw, loc)


# ---- range checks once L is known ------------------------------------------------------------------------------
def schedules_in(setting: Any, where: str) -> Iterator[tuple[str, LinearSchedule | StepSchedule]]:
    """Every parsed schedule inside one (validated) setting, with its location."""
    if isinstance(setting, LinearSchedule | StepSchedule):
        yield where, setting
    elif isinstance(setting, list):
        for i, x in enumerate(setting):
            value = getattr(x, "value", None)
            yield from schedules_in(value, f"{where}[{i}].value")
    elif hasattr(setting, "value"):
        yield from schedules_in(setting.value, where + ".value")


def check_ranges(schedule: LinearSchedule | StepSchedule, n_layers: int, where: str) -> None:
    """Step boundaries must fall inside the base's layers."""
    if isinstance(schedule, StepSchedule):
        bad = [b for b in schedule.boundaries if not 1 <= b <= n_layers - 1]
        if bad:
            raise ValueError(f"{where}: step boundary {bad[0]} is out of range: the base has {n_layers} layers, "
                             f"so boundaries must lie in 1..{n_layers - 1}")


def check_swap(swap: LayerSwap, n_layers: int) -> None:
    """``layer_swap.k`` must lie in ``0 .. L``."""
    if not 0 <= swap.k <= n_layers:
        raise ValueError(f"layer_swap.k: {swap.k} is out of range: the base has {n_layers} layers (use 0..{n_layers})")


# ---- values ------------------------------------------------------------------------------------------------------
def tensor_name(canon: str) -> str:
    """The name ``filter:`` entries match against, as mergekit sees text-model tensors (``model.layers.0...``)."""
    return canon if canon.startswith("lm_head") else "model." + canon


def split_layer(name: str) -> tuple[int, str] | None:
    """``(index, rest)`` of a name ``layers.<index>.<rest>`` (no ``model.`` prefix), else None."""
    m = LAYER_RE.match(name)
    return (int(m.group(1)), name[m.end():]) if m else None


def layer_of(name: str) -> int | None:
    """Base-layer index of a canonical tensor name (``layers.3.mlp...`` or ``model.layers.3...``), else None."""
    split = split_layer(name.removeprefix("model."))
    return split[0] if split else None


def linear_value(start: float, end: float, layer: int, n_layers: int) -> float:
    """``start`` at layer 0, ``end`` at layer ``n_layers - 1``, linear in between (mergekit's gradient formula)."""
    if n_layers <= 1:
        return start
    t = layer / (n_layers - 1)
    return end if t >= 1 else (1 - t) * start + t * end


def step_value(values: list[float], boundaries: list[int], layer: int) -> float:
    """``values[j]`` where ``j`` = how many boundaries are <= ``layer``."""
    return values[bisect_right(boundaries, layer)]


def schedule_value(schedule: LinearSchedule | StepSchedule, layer: int | None, n_layers: int) -> float:
    """Value of a schedule at base layer ``layer`` (None: a tensor outside the decoder layers)."""
    if layer is None:
        if schedule.outside is not None:
            return schedule.outside
        layer = 0
    if isinstance(schedule, LinearSchedule):
        return linear_value(schedule.start, schedule.end, layer, n_layers)
    return step_value(schedule.values, schedule.boundaries, layer)


def per_layer(schedule: LinearSchedule | StepSchedule, n_layers: int) -> list[float]:
    """The schedule's value at every layer ``0 .. n_layers - 1``."""
    return [schedule_value(schedule, i, n_layers) for i in range(n_layers)]


def swap_keeps(swap: LayerSwap | None, canon: str) -> bool:
    """Whether ``layer_swap`` keeps the canonical text tensor ``canon`` from the LVLM."""
    if swap is None:
        return False
    if swap.filter not in (None, "*") and swap.filter not in tensor_name(canon):
        return False
    layer = layer_of(canon)
    if layer is not None:
        return layer < swap.k
    return (swap.embeddings and canon in EMBEDDINGS) or (swap.final and canon in FINAL)


# ---- what a recipe resolves to, for users to check ------------------------------------------------------------------
_GROUPS = ("attn", "mlp", "other")


def _group(canon: str) -> str:
    rest = canon.split(".", 2)[2] if layer_of(canon) is not None else ""
    return "attn" if rest.startswith("self_attn.") else "mlp" if rest.startswith("mlp.") else "other"


def resolved_table(plan: Any) -> list[dict[str, Any]]:
    """Per-layer parameter values a ``MergePlan`` will use: one row per base layer, then one for ``outside``.

    Columns: ``layer``, ``source`` (``lvlm`` where ``layer_swap`` copies the LVLM's tensors, ``merge`` else,
    ``lvlm/merge`` for a partial swap) and ``ROLE.PARAM`` (``top.PARAM`` for shared parameters) per tensor group
    (``[attn]``, ``[mlp]``, ``[other]``: norms; outside the layers: embeddings, final norm, lm_head); a parameter
    equal across groups at every layer gets one column. Several values in one cell (a filter that picks some
    tensors of a group) are shown as ``a/b``.
    """
    by_layer: dict[Any, list[str]] = {}
    for c in plan.lvlm.ckpt.text:
        by_layer.setdefault(layer_of(c) if layer_of(c) is not None else "outside", []).append(c)
    order = [*sorted(k for k in by_layer if k != "outside"), *(["outside"] if "outside" in by_layer else [])]
    values: dict[str, dict[str, dict[Any, set]]] = {}  # column -> group -> layer -> values
    rows: dict[Any, dict[str, Any]] = {}
    for layer in order:
        kept = [swap_keeps(plan.recipe.layer_swap, c) for c in by_layer[layer]]
        rows[layer] = {"layer": layer, "source": "lvlm" if all(kept) else "lvlm/merge" if any(kept) else "merge"}
        for c in by_layer[layer]:
            per, shared = plan.parameters_for(c)
            cells = [(f"{s.role}.{k}", v) for s, p in zip(plan.models, per, strict=True) for k, v in p.items()]
            for col, v in [*cells, *((f"top.{k}", v) for k, v in shared.items())]:
                values.setdefault(col, {}).setdefault(_group(c), {}).setdefault(layer, set()).add(v)
    for col, groups in values.items():
        same = all(len({frozenset(g.get(layer, ())) for g in groups.values()} - {frozenset()}) <= 1 for layer in order)
        for layer, row in rows.items():
            if same:
                row[col] = _cell(set().union(*(g.get(layer, set()) for g in groups.values())))
            else:
                for gname in _GROUPS:
                    if gname in groups:
                        row[f"{col}[{gname}]"] = _cell(groups[gname].get(layer, set()))
    return list(rows.values())


def _cell(values: set) -> Any:
    if not values:
        return ""
    if len(values) == 1:
        return next(iter(values))
    return "/".join(str(v) for v in sorted(values, key=str))
