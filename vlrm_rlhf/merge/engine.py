"""The merge plan: everything decided about a merge before any tensor is read, fixed once built.

``MergePlan`` opens and checks the inputs of a recipe, builds the output vocabulary, decides how each output tensor
is produced (copied, merged, merged row by row) and its shape and dtype, and resolves the recipe's parameters for
any tensor. It is never modified after ``__init__``; ``with_parameters`` / ``with_checkpoints`` derive new plans
(a sweep's next point, inputs held in RAM). ``executor.MergeExecutor`` computes the tensors; ``executor.build``
writes them.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import VLRMError
from . import methods as M
from .checkpoint import Checkpoint
from .embeddings import OutputVocab, RowPlan, Vocab, build_output_vocab, plan_rows
from .recipe import Recipe, RecipeError, resolve
from .schedules import check_ranges, check_swap, iter_settings, layer_of, schedules_in, tensor_name
from .writer import TensorSpec

__all__ = ["MergeError", "MergePlan", "Producer", "Source"]

_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class MergeError(VLRMError, ValueError):
    """A merge that cannot proceed; the message names the tensor and models at fault."""


@dataclass(frozen=True)
class Source:
    """A participating input: name (its path), role, open checkpoint and the parameters of its recipe entry."""

    name: str
    role: str
    ckpt: Checkpoint
    params: dict | None
    entry: int | None = None  # index in recipe.models of the entry whose parameters apply


@dataclass(frozen=True)
class Producer:
    """How one output tensor is made: copied from a source, merged, or merged row by row (vocab)."""

    kind: str  # "copy" | "merge" | "vocab" | "head" (head: mix of a trained VLRM's and the RM's score heads)
    source: str | None = None  # copy: source name
    key: str | None = None  # copy: module key in the source; merge/vocab: canonical text key; head: weight|bias
    rows: RowPlan | None = None


class MergePlan:
    """Everything decided before any tensor is merged: inputs, checks, vocabulary, producers, specs, parameters.

    Attributes (all set in ``__init__``, never changed): ``recipe``, ``method``, ``seed``, ``models`` (non-base
    inputs), ``base``, ``lvlm``, ``rm``, ``out_dtype`` (of merged tensors), ``copy_dtype`` (of copied tensors; None:
    their source's), ``compute_dtype``, ``vocabs``, ``out_vocab``, ``pad_token``/``pad_id`` (the RM's, in the output
    vocabulary), ``vocab_size`` (the output text config's), ``producers`` and ``specs`` (output tensor name -> how it
    is made / its shape and dtype) and ``n_layers``. Building it reads configs, tokenizers and safetensors headers,
    never tensor data, so every check here is a dry run's too.
    """

    def __init__(self, recipe: Recipe, *, dtype: str | None = None, seed: int | None = None, allow_pickle: bool = False,
                 out_dtype: str | None = None):
        self.recipe = recipe
        self.method = M.get_method(recipe.merge_method)
        seed = seed if seed is not None else recipe.seed
        if self.method.stochastic and seed is None:
            seed = 0
            warnings.warn(f"{recipe.merge_method} is random and the recipe sets no seed; using seed: 0", stacklevel=2)
        self.seed = seed
        self.models, self.base = self._open(allow_pickle)
        both = [*self.models, *([self.base] if self.base else [])]
        # the vision owner: the LVLM, or a trained VLRM (role vlrm) that takes its place and brings a reward head
        self.lvlm: Source = next(s for s in both if s.role in ("lvlm", "vlrm"))
        self.rm: Source | None = next((s for s in both if s.role == "rm"), None)
        self._check_inputs()
        lv = self.lvlm.ckpt
        # merged tensors: out_dtype, else dtype, else the LVLM's; copied tensors keep their own unless out_dtype
        out_name = out_dtype or dtype or recipe.out_dtype or recipe.dtype
        for given in (dtype, out_dtype):
            if given is not None and given not in _DT:
                raise RecipeError(f"unknown dtype {given!r}: use one of {', '.join(_DT)}")
        self.out_dtype: torch.dtype = _DT[out_name] if out_name else lv.dtype(lv.text["embed_tokens.weight"])
        copy_name = out_dtype or recipe.out_dtype
        self.copy_dtype: torch.dtype | None = _DT[copy_name] if copy_name else None
        wide = torch.float64 in (self.out_dtype, _DT.get(recipe.dtype or ""))
        self.compute_dtype: torch.dtype = torch.float64 if wide else torch.float32
        self._check_pairing()
        self.vocabs, self.out_vocab = self._build_vocab()
        self.pad_token, self.pad_id = self._pad()
        self.vocab_size: int = self._vocab_size()
        self.producers, self.specs = self._build_producers()
        self._check_tensors()
        # decoder layers of the base text model (Mllama's cross-attention layers not counted)
        idx = [i for c in lv.text if (i := layer_of(c)) is not None]
        self.n_layers: int = 1 + max(idx) if idx else 0
        self._check_schedules(recipe)
        for w in M.inert_parameter_warnings(recipe.merge_method, recipe.parameters or {}, [m.params or {} for m in self.models]):
            warnings.warn(w, stacklevel=2)

    # ---- inputs -----------------------------------------------------------------------------------------
    def _open(self, allow_pickle: bool) -> tuple[list[Source], Source | None]:
        """The non-base inputs and the base (None for a method without one), each path opened once."""
        r = self.recipe
        opened: dict[str, Checkpoint] = {}

        def ck(path: str, role: str) -> Checkpoint:
            if path not in opened:
                opened[path] = Checkpoint(path, role, allow_pickle=allow_pickle)  # type: ignore[arg-type]
            return opened[path]

        models = [Source(m.model, m.role, ck(m.model, m.role), m.parameters, i)
                  for i, m in enumerate(r.models) if m.role != "base"]
        base_path = r.base_path()
        base_i = next((i for i, m in enumerate(r.models) if m.model == base_path), None)
        base_entry = r.models[base_i] if base_i is not None else None
        role = base_entry.role if base_entry and base_entry.role != "base" else "base"
        params = base_entry.parameters if base_entry else None
        if base_path is None:
            if self.method.requires_base:
                raise RecipeError(f"merge_method {r.merge_method} needs `base_model:` (the shared pretrained LM)")
            return models, None
        if not self.method.requires_base:
            # mergekit semantics: for methods without a base (linear), base_model is one more weighted input
            if all(m.name != base_path for m in models):
                models.append(Source(base_path, role, ck(base_path, role), params, base_i))
            return models, None
        # a model that is also the base is the base, not a second input (mergekit semantics)
        return [m for m in models if m.name != base_path], Source(base_path, role, ck(base_path, role), params, base_i)

    def _check_inputs(self) -> None:
        """The method's number of non-base inputs."""
        r, n = self.recipe, len(self.models)
        if n < self.method.min_inputs or (self.method.max_inputs is not None and n > self.method.max_inputs):
            raise RecipeError(
                f"merge_method {r.merge_method} takes {self.method.min_inputs}"
                f"{'' if self.method.max_inputs == self.method.min_inputs else '+'} non-base model(s), got {n}"
                + (" (slerp: set base_model to one model and list one other)" if r.merge_method == "slerp" else "")
            )

    @property
    def sources(self) -> list[Source]:
        """Every input: the base first (if any), then the other models."""
        return ([self.base] if self.base else []) + self.models

    def source(self, name: str) -> Source:
        """The input named ``name`` (its path)."""
        return next(s for s in self.sources if s.name == name)

    def _check_pairing(self) -> None:
        """All language models must share one text architecture and one set of tensors."""
        lv = self.lvlm.ckpt
        lv_type = lv.config.get_text_config().model_type
        allowed = lv.family.backbones(lv_type)
        for s in self.sources:
            if s is self.lvlm:
                continue
            t = s.ckpt.config.get_text_config().model_type
            if t not in allowed:
                raise MergeError(
                    f"{s.role} model {s.name} has a {t} language model but lvlm {self.lvlm.name} has "
                    f"{'/'.join(allowed)} ({lv_type}): merged models must grow from the same language backbone"
                )
        ref = self.base or self.lvlm
        ref_keys = set(ref.ckpt.text) - {"lm_head.weight"}
        for s in self.sources:
            keys = set(s.ckpt.text) - {"lm_head.weight"}
            only_s, only_ref = sorted(keys - ref_keys), sorted(ref_keys - keys)
            if only_s or only_ref:
                k, a, b = (only_s[0], s, ref) if only_s else (only_ref[0], ref, s)
                raise MergeError(
                    f"language-model tensor {k} is present in {a.role} {a.name} but not in {b.role} {b.name}"
                )

    def _build_vocab(self) -> tuple[dict[str, Vocab], OutputVocab]:
        """Each input's vocabulary and the output's (the LVLM's, plus donor-only tokens)."""
        owner = self.lvlm
        base = self.base or owner
        donors = [s for s in self.models if s is not owner and s is not base]
        vocabs = {s.name: Vocab.from_tokenizer(s.name, s.ckpt.tokenizer()) for s in self.sources}
        out_vocab = build_output_vocab(vocabs[owner.name], vocabs[base.name], [vocabs[d.name] for d in donors])
        if out_vocab.by_index:
            warnings.warn("some inputs ship no tokenizer: embedding rows are matched by index", stacklevel=2)
        return vocabs, out_vocab

    @property
    def head_mode(self) -> str | None:
        """The output's score head: None (the RM's, no trained VLRM), or the recipe's ``keep``/``rm``/``mix``."""
        return self.recipe.head_mode if self.lvlm.role == "vlrm" else None

    def _pad(self) -> tuple[str | None, int | None]:
        """The pad token of the model whose head reads the reward (the RM's; a trained VLRM's own when its head is
        kept or mixed) as (string, id in the output vocabulary); warns when it has none (output vlrm)."""
        if self.recipe.output != "vlrm":
            return None, None
        rm = self.rm if self.head_mode in (None, "rm") else self.lvlm
        assert rm is not None
        pad_id = rm.ckpt.config.get_text_config().pad_token_id
        if pad_id is None:
            pad_id = getattr(rm.ckpt.config, "pad_token_id", None)
        ids = self.vocabs[rm.name].ids
        pad_str = None
        if ids is not None:
            if pad_id is None:
                tok = rm.ckpt.tokenizer()
                if tok is not None and tok.pad_token is not None:
                    pad_str, pad_id = tok.pad_token, tok.pad_token_id
            else:
                pad_str = {i: t for t, i in ids.items()}.get(pad_id)
        if pad_str is not None and not self.out_vocab.by_index:
            pad_id = self.out_vocab.ids[pad_str]
        if pad_id is None:
            warnings.warn(f"{'reward model' if rm.role == 'rm' else 'trained VLRM'} {rm.name} has no pad token: the VLRM "
                          "can only score batches of 1", stacklevel=3)
        return pad_str, pad_id

    def _vocab_size(self) -> int:
        """The output's ``text_config.vocab_size``: the LVLM's, grown so that appended ids and the pad id stay below
        it (Mllama's embedding has 8 rows beyond ``vocab_size``, where an appended id would otherwise land)."""
        size = self.lvlm.ckpt.config.get_text_config().vocab_size
        ids = [self.out_vocab.ids[t] for t, _ in self.out_vocab.appended]
        if self.pad_id is not None and not self.out_vocab.by_index:
            ids.append(self.pad_id)
        return max(size, 1 + max(ids, default=-1))

    # ---- outputs ------------------------------------------------------------------------------------------
    def _build_producers(self) -> tuple[dict[str, Producer], dict[str, TensorSpec]]:
        """How each output tensor is made, and its shape and dtype, in the LVLM's tensor order."""
        lv = self.lvlm.ckpt
        out = self.recipe.output
        producers: dict[str, Producer] = {}
        specs: dict[str, TensorSpec] = {}

        def add(name: str, p: Producer, shape: tuple[int, ...]) -> None:
            producers[name] = p
            if p.kind != "copy":
                specs[name] = TensorSpec(tuple(shape), self.out_dtype)
                return
            own = self.source(p.source).ckpt.dtype(p.key)
            cast = self.copy_dtype is not None and own.is_floating_point
            specs[name] = TensorSpec(tuple(shape), self.copy_dtype if cast else own)

        canon_of = {mk: c for c, mk in lv.text.items()}
        head_keys = set(lv.head.values())
        for mk in lv.ckpt_key:
            c = canon_of.get(mk)
            if mk in head_keys or (c == "lm_head.weight" and out == "vlrm"):
                continue
            if c is None:
                add(mk, Producer("copy", self.lvlm.name, mk), lv.shape(mk))
            elif c in ("embed_tokens.weight", "lm_head.weight"):
                rows = self._row_plan(c)
                add(mk, Producer("vocab", key=c, rows=rows), (rows.out_rows, *lv.shape(mk)[1:]))
            else:
                add(mk, Producer("merge", key=c), lv.shape(mk))
        if out == "vlrm":
            self._add_head(add)
        return producers, specs

    def _add_head(self, add) -> None:
        """The output's score head: the RM's, a trained VLRM's (weight and bias, copied bit-identical), or the mix
        ``w_vlrm · head_vlrm + w_rm · head_rm`` (weights and biases alike; an RM head without bias counts 0)."""
        mode, lv = self.head_mode, self.lvlm
        score = None
        if mode != "keep":
            assert self.rm is not None
            score = next((k for k in self.rm.ckpt.other if k.endswith("score.weight")), None)
            if score is None:
                raise MergeError(f"reward model {self.rm.name} has no score.weight tensor")
        if mode in (None, "rm"):
            add("score.weight", Producer("copy", self.rm.name, score), self.rm.ckpt.shape(score))
            return
        if mode == "keep":
            for k, key in lv.ckpt.head.items():
                add(f"score.{k}", Producer("copy", lv.name, key), lv.ckpt.shape(key))
            return
        w_shape, r_shape = lv.ckpt.shape(lv.ckpt.head["weight"]), self.rm.ckpt.shape(score)
        if w_shape != r_shape:
            raise MergeError(f"head: mix needs score heads of one shape: trained VLRM {lv.name} has {list(w_shape)}, "
                             f"reward model {self.rm.name} has {list(r_shape)}")
        add("score.weight", Producer("head", key="weight"), w_shape)
        if "bias" in lv.ckpt.head or any(k.endswith("score.bias") for k in self.rm.ckpt.other):
            add("score.bias", Producer("head", key="bias"), (1,))

    def head_inputs(self, part: str) -> list[tuple[float, Source, str | None]]:
        """``head: mix``: (weight, source, module key or None when it has no such tensor) of each head's ``part``."""
        w_v, w_r = self.recipe.mix_weights()
        assert self.rm is not None
        rm_key = next((k for k in self.rm.ckpt.other if k.endswith(f"score.{part}")), None)
        return [(w_v, self.lvlm, self.lvlm.ckpt.head.get(part)), (w_r, self.rm, rm_key)]

    def _row_plan(self, canon: str) -> RowPlan:
        rows = {s.name: s.ckpt.shape(k)[0] for s in self.sources if (k := s.ckpt.text_key(canon)) is not None}
        base = self.base or self.lvlm
        if base.ckpt.text_key(canon) is None:
            raise MergeError(f"{canon} is needed for output {self.recipe.output} but base {base.name} lacks it")
        merge_srcs = [s.name for s in self.models if s.name in rows]
        lv = self.lvlm.ckpt
        extra = rows[self.lvlm.name] - lv.config.get_text_config().vocab_size  # rows beyond vocab_size (Mllama: 8)
        return plan_rows(self.out_vocab, rows, self.vocabs, base.name, self.lvlm.name, merge_srcs,
                         min_rows=self.vocab_size + extra)

    def _check_tensors(self) -> None:
        """Shapes and dtypes of every merged input tensor, from the headers: a bad input fails before any work."""
        for name, p in self.producers.items():
            if p.kind in ("copy", "head"):
                continue
            have = [(s, k) for s in self.sources if (k := s.ckpt.text_key(p.key)) is not None]
            for s, k in have:
                if not s.ckpt.dtype(k).is_floating_point:
                    raise MergeError(f"tensor {p.key} of {s.role} model {s.name} has non-floating dtype "
                                     f"{s.ckpt.dtype(k)}: only floating tensors can be merged")
            if p.kind == "vocab":
                width = self.specs[name].shape[1:]
                for s, k in have:
                    if s.ckpt.shape(k)[1:] != width:
                        raise MergeError(f"tensor {p.key}: {s.role} {s.name} has shape {s.ckpt.shape(k)}, "
                                         f"expected (*, {', '.join(map(str, width))})")
                continue
            ref, rk = have[0]  # the base first, when there is one
            for s, k in have[1:]:
                if s.ckpt.shape(k) != ref.ckpt.shape(rk):
                    raise MergeError(f"shape mismatch for {p.key}: {s.role} {s.name} has {s.ckpt.shape(k)}, "
                                     f"{ref.role} {ref.name} has {ref.ckpt.shape(rk)}")

    # ---- parameters ---------------------------------------------------------------------------------------
    def _check_schedules(self, recipe: Recipe) -> None:
        """Range checks of ``recipe``'s per-layer schedules and ``layer_swap`` against the base's layer count."""
        n = self.n_layers
        try:
            if recipe.layer_swap is not None:
                check_swap(recipe.layer_swap, n)
            data = {"parameters": recipe.parameters, "models": [{"parameters": m.parameters} for m in recipe.models]}
            for where, _, setting in iter_settings(data):
                for loc, sched in schedules_in(setting, where):
                    check_ranges(sched, n, loc)
        except ValueError as e:
            raise RecipeError(str(e)) from None

    def parameters_for(self, canon: str) -> tuple[list[dict], dict]:
        """The method's parameters for text tensor ``canon``: one dict per non-base model, and the shared ones."""
        name, layer, n = tensor_name(canon), layer_of(canon), self.n_layers
        t = 0.0 if layer is None else layer / (n - 1) if n > 1 else 1.0
        top = self.recipe.parameters or {}
        shared = {k: v for k in self.method.shared_params if (v := resolve(k, [top], name, t, layer, n)) is not None}
        per = []
        for s in self.models:
            p = {k: v for k in self.method.input_params
                 if (v := resolve(k, [s.params, top], name, t, layer, n)) is not None}
            for k, default in self.method.input_params.items():
                if k not in p and default is M.REQUIRED and any(isinstance((sc or {}).get(k), list) for sc in (s.params, top)):
                    raise MergeError(f"{s.role} model {s.name}: no `filter:` entry of parameter {k!r} matches tensor "
                                     f"{name}: add a catch-all entry without filter, e.g. `- {{value: 1.0}}`")
            per.append(p)
        return per, shared

    def casts(self) -> dict[tuple[str, str], int]:
        """Copied tensors whose dtype the output changes (``out_dtype``): (source dtype, output dtype) -> count."""
        out: dict[tuple[str, str], int] = {}
        for name, p in self.producers.items():
            if p.kind == "copy":
                src, dst = self.source(p.source).ckpt.dtype(p.key), self.specs[name].dtype
                if src != dst:
                    key = (str(src).removeprefix("torch."), str(dst).removeprefix("torch."))
                    out[key] = out.get(key, 0) + 1
        return out

    # ---- derived plans ------------------------------------------------------------------------------------
    def with_parameters(self, recipe: Recipe) -> MergePlan:
        """This plan with the parameter values of ``recipe``, which must name the same method, models and roles.

        The hook for in-memory sweeps (merge/inmemory.py): inputs, vocabulary and producers stay as planned.
        """
        old, new = self.recipe, recipe
        entries = [[(m.model, m.role) for m in r.models] for r in (old, new)]
        same = (new.merge_method == old.merge_method and new.base_path() == old.base_path()
                and new.output == old.output and entries[0] == entries[1])
        if not same:
            raise RecipeError("with_parameters: the new recipe must keep merge_method, base_model, output and models; "
                              "only parameter values may change")
        self._check_schedules(new)
        params = {s.name: new.models[s.entry].parameters if s.entry is not None else None for s in self.sources}
        return self._derive(new, {s.name: dataclasses.replace(s, params=params[s.name]) for s in self.sources})

    def with_checkpoints(self, checkpoints: Mapping[str, Any]) -> MergePlan:
        """This plan reading its inputs through ``checkpoints`` (input name -> a ``Checkpoint`` stand-in)."""
        return self._derive(self.recipe, {s.name: dataclasses.replace(s, ckpt=checkpoints.get(s.name, s.ckpt))
                                          for s in self.sources})

    def _derive(self, recipe: Recipe, sources: dict[str, Source]) -> MergePlan:
        """A copy of this plan with another recipe and sources (same names); the rest is shared."""
        plan = copy.copy(self)
        plan.recipe = recipe
        plan.models = [sources[s.name] for s in self.models]
        plan.base = sources[self.base.name] if self.base else None
        plan.lvlm = sources[self.lvlm.name]
        plan.rm = sources[self.rm.name] if self.rm else None
        return plan
