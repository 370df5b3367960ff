"""In-memory merging for sweeps: plan once, load the output model once, re-merge its language model in place.

``InMemoryMerger`` opens a recipe's ``MergePlan`` once, instantiates the output model once as a real transformers
model (config and processor exactly as ``build`` writes them), keeps the merged tensors' inputs in RAM, and
``apply(overrides)`` re-merges only the merged tensors with new parameter values and copies them into the model's
parameters. A point equals ``build`` with the same parameters bit for bit: the same ``MergeExecutor.produce``
path, parameters through the same recipe (``MergePlan.with_parameters``), the same per-tensor seeds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from tqdm.auto import tqdm

from ..models.loading import pretrained
from . import methods as M
from .checkpoint import Checkpoint, CheckpointError
from .engine import MergeError, MergePlan
from .executor import MergeExecutor
from .recipe import Recipe, RecipeError, parse_recipe

NUMERIC_PARAMS = ("weight", "density", "gamma", "epsilon", "lambda", "t")  # the parameters a sweep can vary


class _CachedCheckpoint:
    """A checkpoint whose listed tensors are held in RAM (read once); everything else is the checkpoint's."""

    def __init__(self, ckpt: Checkpoint, keys: list[str]):
        self._ckpt = ckpt
        self._mem = {k: ckpt.get(k).clone() for k in keys}  # clone: own memory, not the file's pages

        self._sealed = False

    def get(self, module_key: str) -> torch.Tensor:
        t = self._mem.get(module_key)
        if t is not None:
            return t
        if self._sealed:
            raise MergeError(f"{module_key} of {self._ckpt.path} is not held in memory (the files are closed)")
        return self._ckpt.get(module_key)

    def seal(self) -> None:
        """Close the checkpoint's files: from now on only the tensors held in memory can be read."""
        self._ckpt.close()
        self._sealed = True

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._mem.values())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ckpt, name)


def override_recipe(recipe: Recipe, overrides: Mapping[str, Any]) -> Recipe:
    """A copy of ``recipe`` with parameter values replaced: ``PARAM`` sets a top-level parameter,
    ``ROLE.PARAM`` that model's own (a scalar replaces any gradient or filter list)."""
    data = recipe.model_dump()
    roles = {m["role"]: m for m in data["models"]}
    for key, value in overrides.items():
        role, _, param = key.rpartition(".")
        if not param:
            raise RecipeError(f"override {key!r}: empty parameter name")
        if role:
            if role not in roles:
                raise RecipeError(f"override {key!r}: the recipe has no model with role {role!r} "
                                  f"(roles: {', '.join(sorted(roles))})")
            entry = roles[role]
            entry["parameters"] = {**(entry["parameters"] or {}), param: value}
        else:
            data["parameters"] = {**(data["parameters"] or {}), param: value}
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"overrides {dict(overrides)} make an invalid recipe: {e}") from None


def state_dict_names(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Map output tensor names to the model's state_dict names, renamed as ``from_pretrained`` would.

    Fails loudly unless every name maps to exactly one tensor of the right shape and every model tensor
    (tied aliases aside) is covered, so no parameter can be left at its initial value.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    sd = model.state_dict()
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    out: dict[str, str] = {}
    for n in names:
        new, conv = rename_source_key(n, renamings, converters, model.base_model_prefix, sd)
        if conv is not None or new not in sd:
            raise MergeError(f"output tensor {n} has no counterpart in {type(model).__name__} "
                             f"(renamed to {new!r}{', needs a conversion' if conv else ''})")
        out[n] = new
    by_target: dict[str, list[str]] = {}
    for n, t in out.items():
        by_target.setdefault(t, []).append(n)
    clash = next((v for v in by_target.values() if len(v) > 1), None)
    if clash:
        raise MergeError(f"output tensors {clash} all map to {out[clash[0]]} of {type(model).__name__}")
    covered = {sd[t].data_ptr() for t in by_target if sd[t].numel()}
    left = [k for k in sd if k not in by_target and not (sd[k].numel() and sd[k].data_ptr() in covered)]
    if left:
        raise MergeError(f"{type(model).__name__} tensor(s) {left[:3]} are not produced by the merge "
                         f"({len(left)} in all); they would keep their initial values")
    return out


def _skeleton(config, output: str, dtype: torch.dtype):
    """The output model class instantiated from ``config`` without random initialisation."""
    from transformers import AutoModelForImageTextToText, AutoModelForSequenceClassification

    from ..models import modeling  # noqa: F401  (registers the VLRM classes)

    auto = AutoModelForSequenceClassification if output == "vlrm" else AutoModelForImageTextToText
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: a random init, overwritten right after
        return auto.from_config(config, dtype=dtype)
    with no_init_weights():
        return auto.from_config(config, dtype=dtype)


class InMemoryMerger:
    """A merged model kept in memory; ``apply(overrides)`` re-merges it in place for new parameter values.

    ``model`` and ``processor`` are what ``from_pretrained`` of ``build(recipe_for(overrides), dir)`` would give.
    Memory: the merged tensors' inputs (read once) plus the model.
    """

    def __init__(self, recipe: Recipe | str | Path | dict, *, dtype: str | None = None, seed: int | None = None,
                 allow_pickle: bool = False, progress: bool = True):
        from ..models.processing import load_processor
        from .output import finalize_output

        self.recipe = recipe if isinstance(recipe, Recipe) else parse_recipe(
            recipe if not isinstance(recipe, str) else Path(recipe))
        self.dtype = dtype
        try:
            self.plan = MergePlan(self.recipe, dtype=dtype, seed=seed, allow_pickle=allow_pickle)
        except CheckpointError as e:
            raise MergeError(str(e)) from e
        plan = self.plan
        self.seed = plan.seed
        with tempfile.TemporaryDirectory(prefix="vlrm-inmemory-") as tmp:
            finalize_output(plan, Path(tmp))  # config + tokenizer/processor files exactly as `build` writes them
            from transformers import AutoConfig

            config = pretrained(AutoConfig, tmp)
            self.processor = load_processor(tmp)
        self.model = _skeleton(config, self.recipe.output, plan.out_dtype).eval()
        self.names = state_dict_names(self.model, list(plan.specs))  # output name -> model state_dict name
        self.merged = [n for n, p in plan.producers.items() if p.kind in ("merge", "vocab")]
        self._cache_inputs()
        # the ancestry check feeds build()'s warning only: skipped here
        self.executor = MergeExecutor(self.plan, track_ancestry=False)
        sd = self.model.state_dict()
        for n in tqdm(list(plan.specs), desc="in-memory merge (setup)", disable=not progress):
            self._set(sd, n, self.executor.produce(n))
        for c in self._cached:  # copies are set for good; later points only read the tensors held in RAM
            c.seal()
        self.overrides: dict[str, Any] | None = {}  # of the last apply; None after a failed one

    def _cache_inputs(self) -> None:
        """Hold every input tensor the merged outputs read in RAM, so later points never touch the disk."""
        keys = {self.plan.producers[n].key for n in self.merged}
        wrapped: dict[int, _CachedCheckpoint] = {}
        for s in self.plan.sources:
            ck = s.ckpt
            if id(ck) not in wrapped:
                wrapped[id(ck)] = _CachedCheckpoint(ck, [ck.text[k] for k in sorted(keys) if k in ck.text])
        self.plan = self.plan.with_checkpoints({s.name: wrapped[id(s.ckpt)] for s in self.plan.sources})
        self._cached = list(wrapped.values())
        self.cache_bytes = sum(c.nbytes for c in self._cached)

    def _set(self, sd: dict[str, torch.Tensor], name: str, t: torch.Tensor) -> None:
        """Copy a produced tensor into the model (``sd``: its current state_dict, whatever its device)."""
        dst = sd[self.names[name]]  # a detached view of the parameter: copy_ writes through
        if tuple(t.shape) != tuple(dst.shape) or t.dtype != dst.dtype:
            raise MergeError(f"tensor {name}: produced {tuple(t.shape)} {t.dtype}, the model has "
                             f"{tuple(dst.shape)} {dst.dtype}")
        with torch.no_grad():
            dst.copy_(t)

    # ---- parameters --------------------------------------------------------------------------------------
    def recipe_for(self, overrides: Mapping[str, Any]) -> Recipe:
        """The recipe of a point: the original with ``overrides`` (``PARAM`` or ``ROLE.PARAM``) applied."""
        return override_recipe(self.recipe, overrides)

    def check(self, overrides: Mapping[str, Any]) -> list[str]:
        """Validate a point's parameters on every merged tensor (no merging); return inert-setting warnings."""
        recipe = self.recipe_for(overrides)
        plan = self.plan.with_parameters(recipe)
        executor = MergeExecutor(plan, track_ancestry=False)
        empty = torch.empty(0)  # merge_tensor validates every parameter, then returns at once on no elements
        for n in self.merged:
            executor.merge(plan.producers[n].key, empty if plan.base else None, [empty] * len(plan.models))
        return M.inert_parameter_warnings(recipe.merge_method, recipe.parameters or {},
                                          [s.params or {} for s in plan.models])

    def apply(self, overrides: Mapping[str, Any] | None = None) -> None:
        """Re-merge the merged tensors for ``overrides`` (relative to the original recipe) into the model."""
        overrides = dict(overrides or {})
        self.check(overrides)
        self.plan = self.plan.with_parameters(self.recipe_for(overrides))
        self.executor = MergeExecutor(self.plan, track_ancestry=False)
        sd = self.model.state_dict()  # fresh each time: the model may have been moved to another device
        try:
            for n in self.merged:
                self._set(sd, n, self.executor.produce(n))
        except BaseException:
            self.overrides = None  # the model is half-updated: its parameters are unknown
            raise
        self.overrides = overrides

    def close(self) -> None:
        """Drop the cached inputs and the model."""
        self.plan = self.plan.with_checkpoints({s.name: s.ckpt._ckpt for s in self.plan.sources
                                                if isinstance(s.ckpt, _CachedCheckpoint)})
        self.executor = MergeExecutor(self.plan, track_ancestry=False)
        self._cached = []
        self.model = None  # type: ignore[assignment]

    def __enter__(self) -> InMemoryMerger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

