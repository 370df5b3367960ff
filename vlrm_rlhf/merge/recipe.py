"""Merge recipes: mergekit's YAML schema plus ``role`` per model, ``output`` and ``seed``.

A user's mergekit config (``models:`` form) runs unchanged once each model gets a role. Role ``vlrm`` takes the
LVLM's place for a trained VLRM (a value-head checkpoint or an ``XForSequenceClassification``): its reward head
is kept, replaced by the text RM's or mixed with it (``head: keep | rm | mix``, ``head_weights``). Parameter values
keep mergekit's meaning: scalars, gradients (a list interpolated across layers) and ``filter`` entries.
Per-layer schedules (``{schedule: linear|step, ...}``) and the top-level ``layer_swap`` are described in
``schedules.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import VLRMError, did_you_mean
from . import methods as M
from .schedules import LayerSwap, Schedule, check_recipe_schedules, iter_settings, schedule_value

Scalar = bool | int | float | str
ScalarOrGradient = Scalar | list[Scalar]


class RecipeError(VLRMError, ValueError):
    """An invalid recipe; the message names the key and the fix."""


class Conditional(BaseModel):
    """A parameter value restricted to tensors whose name contains ``filter`` (mergekit semantics)."""

    model_config = ConfigDict(extra="forbid")
    value: Schedule | ScalarOrGradient
    filter: str | None = None


Setting = Schedule | Conditional | list[Conditional] | ScalarOrGradient
DTYPES = ("float32", "float16", "bfloat16", "float64")


class ModelEntry(BaseModel):
    """One input model: a directory, its role and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str
    role: Literal["lvlm", "vlrm", "rm", "llm", "base"] | None = None
    parameters: dict[str, Setting] | None = None


class Recipe(BaseModel):
    """A validated merge recipe. Paths are resolved relative to the recipe file."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    output: Literal["vlrm", "lvlm"] = "vlrm"
    seed: int | None = None
    layer_swap: LayerSwap | None = None  # first k base layers copied from the LVLM (schedules.py)
    tokenizer_source: str | None = None  # accepted for mergekit compatibility; the LVLM's tokenizer is used
    chat_template: str | None = None
    name: str | None = None
    # with role vlrm: the output's score head (keep the VLRM's, take the RM's, or mix them with head_weights)
    head: Literal["keep", "rm", "mix"] | None = None
    head_weights: dict[Literal["vlrm", "rm"], float] | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"must be one of {DTYPES}, got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _schedules(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_parameter_names(data)
            check_recipe_schedules(data)
        return data

    @model_validator(mode="after")
    def _roles(self) -> Recipe:
        roles = [m.role for m in self.models]
        for i, m in enumerate(self.models):
            if m.role is None:
                raise ValueError(
                    f"models[{i}] ({m.model}) has no role: add `role: lvlm`, `role: vlrm`, `role: rm` or `role: llm`"
                )
        n_lvlm, n_vlrm = roles.count("lvlm"), roles.count("vlrm")
        if n_lvlm + n_vlrm != 1:
            raise ValueError(f"exactly one model needs `role: lvlm` (or `role: vlrm` for a trained VLRM; found "
                             f"{n_lvlm} lvlm, {n_vlrm} vlrm)")
        self._check_head(n_vlrm == 1, roles.count("rm"))
        if self.output == "vlrm" and not n_vlrm and roles.count("rm") != 1:
            raise ValueError(
                f"output: vlrm needs exactly one model with `role: rm` (found {roles.count('rm')}); "
                "use output: lvlm to merge without a reward model"
            )
        if roles.count("base") > 1:
            raise ValueError("at most one model may have `role: base`; prefer the top-level `base_model` key")
        return self

    def _check_head(self, has_vlrm: bool, n_rm: int) -> None:
        """``head``/``head_weights`` go with role vlrm (output vlrm); rm and mix need exactly one text RM."""
        if not has_vlrm:
            if self.head is not None or self.head_weights is not None:
                raise ValueError("`head:` and `head_weights:` choose the score head of a merge into a trained VLRM: "
                                 "they need a model with `role: vlrm`")
            return
        if self.output != "vlrm":
            raise ValueError("a model with `role: vlrm` (a trained VLRM) needs output: vlrm; use role: lvlm for a "
                             "generative LVLM")
        head = self.head_mode
        if head in ("rm", "mix") and n_rm != 1:
            raise ValueError(f"head: {head} needs exactly one model with `role: rm` (found {n_rm})")
        if n_rm > 1:
            raise ValueError(f"at most one model may have `role: rm` (found {n_rm})")
        if self.head_weights is not None and head != "mix":
            raise ValueError(f"head_weights: only applies to head: mix (head is {head})")

    @property
    def head_mode(self) -> str:
        """The output's score head: ``keep`` (the VLRM's; default with role vlrm), ``rm`` or ``mix``."""
        return self.head or "keep"

    def mix_weights(self) -> tuple[float, float]:
        """(w_vlrm, w_rm) of ``head: mix``: default 0.5 and 0.5."""
        w = self.head_weights or {}
        return float(w.get("vlrm", 0.5)), float(w.get("rm", 0.5))

    # ---- convenience ---------------------------------------------------------------------------------
    def model_of(self, role: str) -> ModelEntry | None:
        return next((m for m in self.models if m.role == role), None)

    def base_path(self) -> str | None:
        """The base model: ``base_model`` or the model with ``role: base``."""
        if self.base_model:
            return self.base_model
        b = self.model_of("base")
        return b.model if b else None

    def input_paths(self) -> list[tuple[str, str]]:
        """(label, path) of every input model, e.g. ``("rm model", "/models/rm")``: what an output must not touch."""
        out = [(f"{m.role} model", m.model) for m in self.models]
        base = self.base_path()
        if base is not None and all(p != base for _, p in out):
            out.append(("base model", base))
        return out

    def resolve_paths(self, root: Path) -> Recipe:
        """Return a copy whose model paths are absolute, resolved against ``root``."""

        def fix(p: str | None) -> str | None:
            if p is None:
                return None
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (root / q).resolve())

        data = self.model_dump()
        data["base_model"] = fix(self.base_model)
        for m in data["models"]:
            m["model"] = fix(m["model"])
        return Recipe.model_validate(data)


def check_parameter_names(data: dict[str, Any]) -> None:
    """Every parameter key of a raw recipe mapping must be one its merge method takes (top level: shared or
    per-model defaults; per model: per-model only); the error names the key, with a suggestion."""
    name = data.get("merge_method")
    if not isinstance(name, str):
        return
    method = M.METHODS.get(name)
    if method is None:
        raise ValueError(M.unknown_method(name))
    shared, per = set(method.shared_params), set(method.input_params)
    for where, key, _ in iter_settings(data):
        top = where.startswith("parameters.")
        allowed = shared | per if top else per
        if key in allowed:
            continue
        if key in shared:
            raise ValueError(f"{where}: {key!r} is a recipe-wide parameter of {name}; put it under the top-level "
                             "`parameters:`")
        raise ValueError(f"{where}: unknown parameter {key!r} for {name}{did_you_mean(str(key), allowed)} "
                         f"(known: {', '.join(sorted(allowed)) or 'none'})")


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-", "union[", "list[")))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _hint(str(e["loc"][-1]))
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return "\n".join(dict.fromkeys(lines))


_HINTS = {
    "slices": "; slice-based recipes are not supported, list whole models under `models:` with a role",
    "modules": "; per-module recipes are not supported, list whole models under `models:`",
    "method": "; did you mean `merge_method`?",
    "base": "; did you mean `base_model`?",
    "params": "; did you mean `parameters`?",
    "weight": "; put `weight` under `parameters:`",
}


def _hint(key: str) -> str:
    return _HINTS.get(key, "")


def parse_recipe(data: dict[str, Any] | str | Path, *, root: Path | None = None) -> Recipe:
    """Validate a recipe from a dict, YAML text or a YAML file path; model paths become absolute."""
    if isinstance(data, Path) or (isinstance(data, str) and "\n" not in data and data.endswith((".yaml", ".yml"))):
        path = Path(data)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        root = root or path.parent
        text = path.read_text()
        where = str(path)
    elif isinstance(data, str):
        text, where = data, "recipe"
    else:
        text, where = None, "recipe"
    if text is not None:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{where} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping with merge_method, models, ...")
    if "slices" in data and "models" not in data:
        raise RecipeError(f"{where}: slices: is not supported; list whole models under `models:` with a role")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        lines = _format_validation(e)
        sep = " " if "\n" not in lines else "\n"  # one problem: one line
        raise RecipeError(f"invalid recipe {where}:{sep}{lines.strip() if sep == ' ' else lines}") from None
    return recipe.resolve_paths(root or Path.cwd())


def evaluate_setting(setting: Setting | None, tensor_name: str, t: float, layer: int | None = None,
                     n_layers: int | None = None) -> Any:
    """Resolve one parameter for a tensor: filters pick an entry, numeric gradients interpolate at ``t``.

    Mirrors mergekit: a list of numbers is a gradient over layers (t in [0, 1]); non-numeric lists pick
    ``values[int(t * (n - 1))]``; a filter matches when it is a substring of the tensor name. A schedule
    takes its value at base layer ``layer`` of ``n_layers`` (``layer`` None: outside the decoder layers).
    """
    if setting is None:
        return None
    if isinstance(setting, BaseModel) and hasattr(setting, "schedule"):
        if n_layers is None:
            raise ValueError(f"a per-layer schedule needs the layer count to resolve for {tensor_name}")
        return schedule_value(setting, layer, n_layers)
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(x, Conditional) for x in setting):
            for cond in setting:
                if cond.filter in (None, "*") or cond.filter in tensor_name:
                    return evaluate_setting(cond.value, tensor_name, t, layer, n_layers)
            return None
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return setting


def resolve(name: str, scopes: list[dict[str, Setting] | None], tensor_name: str, t: float,
            layer: int | None = None, n_layers: int | None = None) -> Any:
    """First non-None value of ``name`` across scopes (model-level before recipe-level)."""
    for scope in scopes:
        if scope and name in scope:
            v = evaluate_setting(scope[name], tensor_name, t, layer, n_layers)
            if v is not None:
                return v
    return None
