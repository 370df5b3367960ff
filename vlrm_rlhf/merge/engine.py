"""Streaming merge executor: recipe → per-tensor merge plan → sharded, atomic Hugging Face directory.

Tensors are read lazily from the inputs, merged one at a time and appended to pre-planned shards, so peak
memory is bounded by a few copies of the largest tensor, not by model size.
"""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import VLRMError
from ..files import atomic_output_dir
from . import methods as M
from .checkpoint import Checkpoint, CheckpointError
from .embeddings import OutputVocab, RowPlan, Vocab, build_output_vocab, gather_rows, plan_rows
from .recipe import Recipe, RecipeError, parse_recipe, resolve
from .schedules import (
    check_ranges,
    check_swap,
    iter_settings,
    layer_of,
    schedules_in,
    split_layer,
    swap_keeps,
    tensor_name,
)
from .writer import ShardWriter, TensorSpec, plan_shards, write_index

log = logging.getLogger(__name__)
_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
ANCESTOR_WARN_RATIO = 0.5  # ‖τ‖/‖θ_base‖ above this: the base is probably not the models' common ancestor


class MergeError(VLRMError, ValueError):
    """A merge that cannot proceed; the message names the tensor and models at fault."""


@dataclass
class Source:
    """A participating input: name (its path), role, recipe entry and open checkpoint."""

    name: str
    role: str
    ckpt: Checkpoint
    params: dict | None
    entry: int | None = None  # index in recipe.models of the entry whose parameters apply (set_parameters)


@dataclass
class Producer:
    """How one output tensor is made: copied from a source, merged, or merged row by row (vocab)."""

    kind: str  # "copy" | "merge" | "vocab"
    source: str | None = None  # copy: source name
    key: str | None = None  # copy: module key in the source; merge/vocab: canonical text key
    rows: RowPlan | None = None


class MergePlan:
    """Everything decided before any tensor is merged: inputs, output names/shapes, producers."""

    def __init__(self, recipe: Recipe, *, dtype: str | None = None, seed: int | None = None, allow_pickle: bool = False):
        self.recipe = recipe
        self.method = M.get_method(recipe.merge_method)
        self.seed = seed if seed is not None else recipe.seed
        if self.method.stochastic and self.seed is None:
            self.seed = 0
            warnings.warn(f"{recipe.merge_method} is random and the recipe sets no seed; using seed: 0", stacklevel=2)
        self._open(allow_pickle)
        lv = self.lvlm.ckpt
        out_name = dtype or recipe.out_dtype or recipe.dtype
        self.out_dtype = _DT[out_name] if out_name else lv.dtype(lv.text["embed_tokens.weight"])
        self._check_pairing()
        self._build_vocab()
        self._build_producers()
        self._check_schedules()
        for w in M.inert_parameter_warnings(recipe.merge_method, recipe.parameters or {}, [m.params or {} for m in self.models]):
            warnings.warn(w, stacklevel=2)

    # ---- inputs -----------------------------------------------------------------------------------------
    def _open(self, allow_pickle: bool) -> None:
        r = self.recipe
        opened: dict[str, Checkpoint] = {}

        def ck(path: str, role: str) -> Checkpoint:
            if path not in opened:
                opened[path] = Checkpoint(path, role, allow_pickle=allow_pickle)  # type: ignore[arg-type]
            return opened[path]

        self.models: list[Source] = []
        for i, m in enumerate(r.models):
            if m.role == "base":
                continue
            self.models.append(Source(m.model, m.role, ck(m.model, m.role), m.parameters, i))
        base_path = r.base_path()
        base_i = next((i for i, m in enumerate(r.models) if m.model == base_path), None)
        base_entry = r.models[base_i] if base_i is not None else None
        if base_path is None:
            if self.method.requires_base:
                raise RecipeError(f"merge_method {r.merge_method} needs `base_model:` (the shared pretrained LM)")
            self.base = None
        elif not self.method.requires_base:
            # mergekit semantics: for methods without a base (linear), base_model is one more weighted input
            self.base = None
            if all(m.name != base_path for m in self.models):
                role = base_entry.role if base_entry and base_entry.role != "base" else "base"
                self.models.append(Source(base_path, role, ck(base_path, role), base_entry.parameters if base_entry else None,
                                          base_i))
        else:
            role = base_entry.role if base_entry and base_entry.role != "base" else "base"
            self.base = Source(base_path, role, ck(base_path, role), base_entry.parameters if base_entry else None, base_i)
            # a model that is also the base is the base, not a second input (mergekit semantics)
            self.models = [m for m in self.models if m.name != base_path]
        self.lvlm = next(s for s in [*self.models, *([self.base] if self.base else [])] if s.role == "lvlm")
        self.rm = next((s for s in [*self.models, *([self.base] if self.base else [])] if s.role == "rm"), None)
        n = len(self.models)
        if n < self.method.min_inputs or (self.method.max_inputs is not None and n > self.method.max_inputs):
            raise RecipeError(
                f"merge_method {r.merge_method} takes {self.method.min_inputs}"
                f"{'' if self.method.max_inputs == self.method.min_inputs else '+'} non-base model(s), got {n}"
                + (" (slerp: set base_model to one model and list one other)" if r.merge_method == "slerp" else "")
            )

    def set_parameters(self, recipe: Recipe) -> None:
        """Swap in the parameter values of ``recipe``, which must name the same method, models and roles.

        The hook for in-memory sweeps (merge/inmemory.py): inputs, vocabulary and producers stay as planned.
        """
        old, new = self.recipe, recipe
        entries = [[(m.model, m.role) for m in r.models] for r in (old, new)]
        same = (new.merge_method == old.merge_method and new.base_path() == old.base_path()
                and new.output == old.output and entries[0] == entries[1])
        if not same:
            raise RecipeError("set_parameters: the new recipe must keep merge_method, base_model, output and models; "
                              "only parameter values may change")
        for s in self.sources:
            s.params = new.models[s.entry].parameters if s.entry is not None else None
        self.recipe = new

    @property
    def sources(self) -> list[Source]:
        return ([self.base] if self.base else []) + self.models

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

    def _build_vocab(self) -> None:
        owner = self.lvlm
        base = self.base or owner
        donors = [s for s in self.models if s is not owner and s is not base]
        self.vocabs = {s.name: Vocab.from_tokenizer(s.name, s.ckpt.tokenizer()) for s in self.sources}
        self.out_vocab: OutputVocab = build_output_vocab(
            self.vocabs[owner.name], self.vocabs[base.name], [self.vocabs[d.name] for d in donors]
        )
        if self.out_vocab.by_index:
            warnings.warn("some inputs ship no tokenizer: embedding rows are matched by index", stacklevel=2)

    # ---- outputs ------------------------------------------------------------------------------------------
    def _build_producers(self) -> None:
        lv = self.lvlm.ckpt
        out = self.recipe.output
        self.producers: dict[str, Producer] = {}
        self.specs: dict[str, TensorSpec] = {}
        canon_of = {mk: c for c, mk in lv.text.items()}
        for mk in lv.ckpt_key:
            c = canon_of.get(mk)
            if c == "lm_head.weight" and out == "vlrm":
                continue
            if c is None:
                self._add(mk, Producer("copy", self.lvlm.name, mk), lv.shape(mk))
            elif c in ("embed_tokens.weight", "lm_head.weight"):
                rows = self._row_plan(c)
                shape = (rows.out_rows, *lv.shape(mk)[1:])
                self._add(mk, Producer("vocab", key=c, rows=rows), shape)
            else:
                self._add(mk, Producer("merge", key=c), lv.shape(mk))
        if out == "vlrm":
            assert self.rm is not None
            score = next((k for k in self.rm.ckpt.other if k.endswith("score.weight")), None)
            if score is None:
                raise MergeError(f"reward model {self.rm.name} has no score.weight tensor")
            self._add("score.weight", Producer("copy", self.rm.name, score), self.rm.ckpt.shape(score))

    def _add(self, name: str, p: Producer, shape: tuple[int, ...]) -> None:
        src = self._source(p.source) if p.kind == "copy" else None
        dtype = self.out_dtype if (src is None or src.ckpt.dtype(p.key).is_floating_point) else src.ckpt.dtype(p.key)
        self.producers[name] = p
        self.specs[name] = TensorSpec(tuple(shape), dtype)

    def _source(self, name: str) -> Source:
        return next(s for s in self.sources if s.name == name)

    def _row_plan(self, canon: str) -> RowPlan:
        rows = {s.name: s.ckpt.shape(s.ckpt.text[canon])[0] for s in self.sources if canon in s.ckpt.text}
        base = self.base or self.lvlm
        if canon not in base.ckpt.text:
            raise MergeError(f"{canon} is needed for output {self.recipe.output} but base {base.name} lacks it")
        merge_srcs = [s.name for s in self.models if s.name in rows]
        return plan_rows(self.out_vocab, rows, self.vocabs, base.name, self.lvlm.name, merge_srcs)

    # ---- per-tensor merge -------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Decoder layers of the base text model (Mllama's cross-attention layers not counted)."""
        if not hasattr(self, "_n_layers"):
            idx = [i for c in self.lvlm.ckpt.text if (i := layer_of(c)) is not None]
            self._n_layers = 1 + max(idx) if idx else 0
        return self._n_layers

    def _check_schedules(self) -> None:
        """Range checks of per-layer schedules and ``layer_swap`` against the base's layer count."""
        r, n = self.recipe, self.n_layers
        try:
            if r.layer_swap is not None:
                check_swap(r.layer_swap, n)
            data = {"parameters": r.parameters, "models": [{"parameters": m.parameters} for m in r.models]}
            for where, _, setting in iter_settings(data):
                for loc, sched in schedules_in(setting, where):
                    check_ranges(sched, n, loc)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        self._checked = r

    def _t(self, canon: str) -> float:
        split = split_layer(canon)
        if not split:
            return 0.0
        n = self.n_layers
        return split[0] / (n - 1) if n > 1 else 1.0

    def _params(self, canon: str) -> tuple[list[dict], dict]:
        if getattr(self, "_checked", None) is not self.recipe:  # parameters were swapped in (set_parameters)
            self._check_schedules()
        name = tensor_name(canon)
        t, layer, n = self._t(canon), layer_of(canon), self.n_layers
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

    def _generator(self, canon: str) -> torch.Generator | None:
        if not self.method.stochastic:
            return None
        g = torch.Generator()
        g.manual_seed((int(self.seed) * 1_000_003 + zlib.crc32(canon.encode())) % (2**63))
        return g

    def _merge(self, canon: str, base: torch.Tensor | None, tensors: list[torch.Tensor]) -> torch.Tensor:
        if swap_keeps(self.recipe.layer_swap, canon):  # layer_swap: the LVLM's own tensor, bit-identical
            if self.base is self.lvlm:
                return base
            return tensors[[s for s in self.models if canon in s.ckpt.text or base is not None].index(self.lvlm)]
        per, shared = self._params(canon)
        if len(tensors) != len(per):  # models lacking the tensor, with no base to stand in for them
            have = [s for s in self.models if canon in s.ckpt.text]
            per = [p for s, p in zip(self.models, per) if s in have]
        try:
            return M.merge_tensor(self.method, base, tensors, per, shared, self._generator(canon))
        except ValueError as e:
            raise MergeError(f"tensor {canon}: {e}") from e

    def produce(self, name: str) -> torch.Tensor:
        """Compute one output tensor (in the output dtype)."""
        p = self.producers[name]
        spec = self.specs[name]
        if p.kind == "copy":
            src = self._source(p.source)
            out = src.ckpt.get(p.key).to(spec.dtype)
            if out.is_floating_point() and not bool(torch.isfinite(out).all()):
                raise MergeError(f"non-finite values (NaN/Inf) in input tensor {p.key} of {src.role} model {src.name}")
            return out
        base = self.base.ckpt.get(self.base.ckpt.text[p.key]) if self.base else None
        # a model without this tensor (an RM has no lm_head) contributes the base's: a zero task vector
        srcs = [s for s in self.models if p.key in s.ckpt.text or base is not None]
        tensors = [s.ckpt.get(s.ckpt.text[p.key]) if p.key in s.ckpt.text else base for s in srcs]
        inputs = ([(self.base, base)] if self.base else []) + list(zip(srcs, tensors))
        if self.method.name not in _PROPAGATES_NAN:  # masking methods could silently drop a NaN: check inputs
            _check_inputs_finite(p.key, inputs)
        if p.kind == "merge":
            _check_shapes(p.key, self.base, base, srcs, tensors)
            out = self._merge(p.key, base, tensors)
        else:
            out = self._merge_vocab(p, base, srcs, tensors, spec)
        self._track_ancestor(p.key, base, srcs, tensors)
        out = out.to(spec.dtype)
        if out.is_floating_point() and not math.isfinite(float(out.sum())):  # NaN/Inf propagate into the sum
            if bool(torch.isfinite(out).all()):  # only the sum overflowed: the values are fine
                return out
            _check_inputs_finite(p.key, inputs)
            raise MergeError(f"merge produced non-finite values in {name} (overflow in {spec.dtype}?)")
        return out

    def _merge_vocab(self, p: Producer, base, srcs, tensors, spec: TensorSpec) -> torch.Tensor:
        rp = p.rows
        assert rp is not None
        by = {s.name: t for s, t in zip(srcs, tensors)}
        bname = self.base.name if self.base else None
        width = spec.shape[1:]
        for s, t in zip(srcs, tensors):
            if tuple(t.shape[1:]) != tuple(width):
                raise MergeError(f"tensor {p.key}: {s.role} {s.name} has shape {tuple(t.shape)}, expected (*, {width})")
        if rp.contiguous():
            k = len(rp.merge_out)
            merged = self._merge(p.key, base[:k] if base is not None else None, [by[s.name][:k] for s in srcs])
        else:
            b = base if base is not None else by[self.lvlm.name]  # no base: the LVLM's vocab is the reference
            parts = [gather_rows(by[s.name], rp.merge_src.get(s.name, rp.merge_src.get(bname)), b) for s in srcs]
            bb = gather_rows(base, rp.merge_src[bname], base) if base is not None else None
            merged = self._merge(p.key, bb, parts)
        if not rp.copies and len(rp.merge_out) == spec.shape[0] and rp.contiguous():
            return merged
        out = torch.zeros(spec.shape, dtype=merged.dtype)
        out.index_copy_(0, rp.merge_out, merged)
        for sname, o, i in rp.copies:
            src = self._source(sname)
            out.index_copy_(0, o, src.ckpt.get(src.ckpt.text[p.key]).index_select(0, i).to(merged.dtype))
        return out

    # ---- diagnostics -------------------------------------------------------------------------------------------
    _anc: dict[str, list[float]]

    def _track_ancestor(self, canon: str, base, srcs, tensors) -> None:
        """Record the sampled relative task-vector size of each weight matrix (≤ 64k strided elements)."""
        if base is None or base.dim() < 2 or canon.startswith(("embed_tokens", "lm_head")):
            return
        if not hasattr(self, "_anc"):
            self._anc = {}
        b = base.reshape(-1)
        step = max(1, b.numel() // 65536)
        bs = b[::step].float()
        bn = float(bs.norm())
        for s, t in zip(srcs, tensors):
            if t.shape == base.shape and t is not base and bn > 0:
                self._anc.setdefault(s.name, []).append(float((t.reshape(-1)[::step].float() - bs).norm()) / bn)

    def ancestor_report(self) -> dict[str, float]:
        """Median over weight matrices of ‖θ_i − θ_base‖ / ‖θ_base‖ per model (sampled)."""
        return {n: float(torch.tensor(r).median()) for n, r in getattr(self, "_anc", {}).items() if r}


_PROPAGATES_NAN = ("linear", "task_arithmetic", "slerp")  # any NaN/Inf input reaches the output


def _check_inputs_finite(key: str, inputs) -> None:
    """Name the input holding NaN/Inf (a sum is a cheap first pass: NaN/Inf propagate into it)."""
    for s, t in inputs:
        if t.is_floating_point() and not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
            raise MergeError(f"non-finite values (NaN/Inf) in input tensor {key} of {s.role} model {s.name}")


def _check_shapes(canon: str, base_src, base, srcs, tensors) -> None:
    ref_src, ref = (base_src, base) if base is not None else (srcs[0], tensors[0])
    for s, t in zip(srcs, tensors):
        if tuple(t.shape) != tuple(ref.shape):
            raise MergeError(
                f"shape mismatch for {canon}: {s.role} {s.name} has {tuple(t.shape)}, "
                f"{ref_src.role} {ref_src.name} has {tuple(ref.shape)}"
            )


def build(
    recipe: Recipe | str | Path | dict,
    out_dir: str | Path,
    *,
    force: bool = False,
    dtype: str | None = None,
    seed: int | None = None,
    allow_pickle: bool = False,
    max_shard_size: int | str = "2GB",
    progress: bool = True,
) -> Path:
    """Build a VLRM (``output: vlrm``) or merged LVLM (``output: lvlm``) directory from a recipe."""
    from .output import finalize_output  # late import: output.py imports transformers model classes

    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe if not isinstance(recipe, str) else Path(recipe))
    try:
        plan = MergePlan(recipe, dtype=dtype, seed=seed, allow_pickle=allow_pickle)
    except CheckpointError as e:
        raise MergeError(str(e)) from e
    shards = plan_shards(plan.specs, max_shard_size)
    total = sum(s.nbytes for s in plan.specs.values())
    with atomic_output_dir(out_dir, force=force) as tmp:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"merge ({recipe.merge_method})", disable=not progress)
        done = 0
        # one writer thread: tensor i is written while tensor i + 1 is merged (both release the GIL)
        with ThreadPoolExecutor(max_workers=1) as io:
            for fname, names in shards.items():
                w = ShardWriter(tmp / fname, names, plan.specs, {"format": "pt"})
                pending = None
                for n in names:
                    t = plan.produce(n)
                    if pending is not None:
                        pending.result()
                    pending = io.submit(w.write, n, t)
                    del t
                    done += 1
                    bar.update(plan.specs[n].nbytes)
                    bar.set_postfix(tensors=f"{done}/{len(plan.specs)}")
                if pending is not None:
                    pending.result()
                w.close()
        bar.close()
        write_index(tmp, shards, plan.specs)
        for name, r in plan.ancestor_report().items():
            if r > ANCESTOR_WARN_RATIO:
                warnings.warn(
                    f"base {plan.base.name} does not look like the common ancestor of {name}: "
                    f"‖θ − θ_base‖/‖θ_base‖ ≈ {r:.2f} (fine-tunes are usually < 0.3). Check `base_model`.",
                    stacklevel=2,
                )
        finalize_output(plan, tmp)
    return Path(out_dir)
