"""The merge executor: computes a ``MergePlan``'s output tensors one at a time, and ``build`` writes them.

Tensors are read lazily from the inputs, merged one at a time and appended to pre-planned shards, so peak
memory is bounded by a few copies of the largest tensor, not by model size. ``build`` (streamed to disk) and the
in-memory sweep (merge/inmemory.py) both compute every tensor through ``MergeExecutor.produce``. In ``build``,
element-wise methods read their inputs window by window with direct I/O (merge/reader.py), other inputs are
memory-mapped and read ahead (merge/pages.py), and the math runs on the cores the I/O threads leave free.
"""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from ..files import atomic_output_dir, check_not_overlapping
from ..threads import pinned_threads, usable_cores
from . import methods as M
from .ancestry import ANCESTOR_WARN_RATIO, Ancestry, sample, sample_spans, tracked
from .checkpoint import CheckpointError
from .embeddings import gather_rows
from .engine import MergeError, MergePlan, Producer
from .pages import Prefetcher, mapped_inputs, release
from .reader import DirectReader, Source
from .recipe import Recipe, parse_recipe
from .schedules import swap_keeps
from .writer import ShardWriter, TensorSpec, plan_shards, write_index

__all__ = ["ANCESTOR_WARN_RATIO", "MergeExecutor", "build"]

log = logging.getLogger(__name__)
WRITES_IN_FLIGHT = 4  # output chunks queued for the writer thread (a few MB): smooths bursts of slow writes
STREAM_MIN = 1 << 22  # elements: larger outputs are produced in chunks (``produce_chunks``); tests shrink it
CACHE_SHARE = 0.5  # a build whose inputs and output exceed this share of the available memory keeps them out of the
# page cache as it goes (consumed inputs dropped, the output dropped once written back): else the kernel must reclaim
# the cache under pressure, on the cores the merge runs on
IO_CORES = 2  # cores ``build`` leaves to its reader and writer threads and the kernel's I/O (page faults, writeback)


class MergeExecutor:
    """Computes the output tensors of ``plan`` (``produce``); with ``track_ancestry``, also records how far each
    input is from the base (``ancestor_report``, the check behind ``build``'s "not the common ancestor" warning)."""

    def __init__(self, plan: MergePlan, *, track_ancestry: bool = True):
        self.plan = plan
        self.track_ancestry = track_ancestry
        self._ancestry = Ancestry()
        self.reader: DirectReader | None = None  # set (by ``build``): element-wise merges read through it

    # ---- per-tensor merge -------------------------------------------------------------------------------------
    def _generator(self, canon: str) -> torch.Generator | None:
        """The per-tensor random stream of a stochastic method: seeded by the plan's seed and the tensor name."""
        if not self.plan.method.stochastic:
            return None
        g = torch.Generator()
        g.manual_seed((int(self.plan.seed) * 1_000_003 + zlib.crc32(canon.encode())) % (2**63))
        return g

    def _kept(self, canon: str, base: torch.Tensor | None, tensors: list[torch.Tensor]) -> torch.Tensor | None:
        """The LVLM's own tensor when ``layer_swap`` keeps ``canon`` (bit-identical), else None."""
        plan = self.plan
        if not swap_keeps(plan.recipe.layer_swap, canon):
            return None
        if plan.base is plan.lvlm:
            return base
        have = [s for s in plan.models if s.ckpt.text_key(canon) is not None or base is not None]
        return tensors[have.index(plan.lvlm)]

    def _params(self, canon: str, n: int) -> tuple[list, dict]:
        """Per-model and shared parameters of ``canon`` for the ``n`` models that contribute a tensor."""
        plan = self.plan
        per, shared = plan.parameters_for(canon)
        if n != len(per):  # models lacking the tensor, with no base to stand in for them
            have = [s for s in plan.models if s.ckpt.text_key(canon) is not None]
            per = [p for s, p in zip(plan.models, per) if s in have]
        return per, shared

    def merge(self, canon: str, base: torch.Tensor | None, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Merge text tensor ``canon`` of the base and the non-base models with the plan's parameters."""
        plan = self.plan
        kept = self._kept(canon, base, tensors)
        if kept is not None:
            return kept
        per, shared = self._params(canon, len(tensors))
        try:
            return M.merge_tensor(plan.method, base, tensors, per, shared, self._generator(canon), plan.compute_dtype)
        except ValueError as e:
            raise MergeError(f"tensor {canon}: {e}") from e

    def merge_chunks(self, canon: str, base: torch.Tensor | None, tensors: list[torch.Tensor],
                     out_dtype: torch.dtype | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``merge`` as a stream of flat ``(start, end, values)`` chunks (``methods.merge_tensor_chunks``), rounded
        to ``out_dtype`` when given."""
        plan = self.plan
        kept = self._kept(canon, base, tensors)
        if kept is not None:
            yield 0, kept.numel(), kept.reshape(-1) if out_dtype is None else kept.reshape(-1).to(out_dtype)
            return
        per, shared = self._params(canon, len(tensors))
        it = M.merge_tensor_chunks(plan.method, base, tensors, per, shared, self._generator(canon),
                                   plan.compute_dtype, out_dtype)
        while True:
            try:
                part = next(it)
            except StopIteration:
                return
            except ValueError as e:
                raise MergeError(f"tensor {canon}: {e}") from e
            yield part

    def produce(self, name: str) -> torch.Tensor:
        """Compute one output tensor (in the output dtype)."""
        plan = self.plan
        p = plan.producers[name]
        spec = plan.specs[name]
        if p.kind == "copy":
            src = plan.source(p.source)
            out = src.ckpt.get(p.key).to(spec.dtype)
            if out.is_floating_point() and not _all_finite(out):
                raise MergeError(f"non-finite values (NaN/Inf) in input tensor {p.key} of {src.role} model {src.name}")
            return out
        if p.kind == "head":
            return self._mix_head(p.key, spec)
        base = plan.base.ckpt.get(plan.base.ckpt.text_key(p.key)) if plan.base else None
        # a model without this tensor (an RM has no lm_head) contributes the base's: a zero task vector; a tied
        # model's lm_head is its embedding matrix (``Checkpoint.text_key``)
        keys = {s.name: s.ckpt.text_key(p.key) for s in plan.models}
        srcs = [s for s in plan.models if keys[s.name] is not None or base is not None]
        tensors = [s.ckpt.get(keys[s.name]) if keys[s.name] is not None else base for s in srcs]
        inputs = ([(plan.base, base)] if plan.base else []) + list(zip(srcs, tensors))
        if plan.method.name not in _PROPAGATES_NAN:  # masking methods could silently drop a NaN: check inputs
            _check_inputs_finite(p.key, inputs)
        if p.kind == "merge":
            _check_shapes(p.key, plan.base, base, srcs, tensors)
            out = self.merge(p.key, base, tensors)
        else:
            out = self._merge_vocab(p, base, srcs, tensors, spec)
        if self.track_ancestry:
            self._track_ancestor(p.key, base, srcs, tensors)
        out = out.to(spec.dtype)
        _check_merged_finite(name, p.key, out, inputs)
        return out

    def produce_chunks(self, name: str, *, release_inputs: bool = False) -> Iterator[torch.Tensor]:
        """Output tensor ``name`` as consecutive flat chunks in the output dtype: their concatenation equals
        ``produce(name)`` bit for bit, and an output above ``STREAM_MIN`` elements never exists whole in memory.

        With ``release_inputs``, memory-mapped input pages are given back as soon as they are consumed, so the
        file-backed RSS stays near one chunk per input instead of growing to the size of the inputs.
        """
        plan = self.plan
        p, spec = plan.producers[name], plan.specs[name]
        numel = math.prod(spec.shape)
        if p.kind == "copy" or numel <= STREAM_MIN:
            out = self.produce(name)
            yield out.reshape(-1)
            if release_inputs:
                self._release_inputs(p, out.numel())
            return
        base = plan.base.ckpt.get(plan.base.ckpt.text_key(p.key)) if plan.base else None
        keys = {s.name: s.ckpt.text_key(p.key) for s in plan.models}
        srcs = [s for s in plan.models if keys[s.name] is not None or base is not None]
        tensors = [s.ckpt.get(keys[s.name]) if keys[s.name] is not None else base for s in srcs]
        inputs = ([(plan.base, base)] if plan.base else []) + list(zip(srcs, tensors))
        rp = p.rows
        tail = None
        if p.kind != "merge":  # a vocabulary tensor streams when its merged rows are a prefix of every input
            if not _prefix_rows(rp):
                yield from self._whole(name, p, release_inputs)
                return
            _check_width(p.key, srcs, tensors, spec)
            k = len(rp.merge_out)
            width = math.prod(spec.shape[1:])
            base = base[:k] if base is not None else None
            tensors = [t[:k] for t in tensors]
            tail = (k, spec.shape[0] - k, width)
        else:
            _check_shapes(p.key, plan.base, base, srcs, tensors)
        if plan.method.name not in _PROPAGATES_NAN:
            for src_t in inputs:  # one input at a time, its pages given back before the next is read
                _check_inputs_finite(p.key, [src_t])
                if release_inputs and src_t[0].ckpt.mapped:
                    release(src_t[1].reshape(-1))
        direct = self._direct_sources(name)
        if self.track_ancestry and direct is None:  # a direct read samples the windows as they pass
            self._track_ancestor(p.key, base, srcs, tensors)
        mapped = ([plan.base.ckpt.mapped] if base is not None else []) + [
            s.ckpt.mapped if keys[s.name] is not None else plan.base.ckpt.mapped for s in srcs]
        ins = [t for t, m in zip(([base] if base is not None else []) + tensors, mapped, strict=True) if m]
        if release_inputs:  # the finiteness and ancestry checks above read every page once: give them back
            for t in ins:
                release(t.reshape(-1))
        if direct is not None:
            yield from self._stream_direct(name, p, spec, direct, inputs, srcs, base)
            return
        with mapped_inputs(ins if release_inputs else []):
            yield from self._stream(name, p, spec, base, tensors, inputs, ins, release_inputs)
        if tail is not None and tail[1] > 0:
            k, rest, width = tail
            cdtype = M.work_dtype([t for _, t in inputs], plan.compute_dtype)
            extra = torch.zeros((rest, *spec.shape[1:]), dtype=cdtype)
            for sname, o, i in rp.copies:
                src = plan.source(sname)
                extra.index_copy_(0, o - k, src.ckpt.get(src.ckpt.text_key(p.key)).index_select(0, i).to(cdtype))
            yield extra.to(spec.dtype).reshape(-1)
        if release_inputs:
            self._release_inputs(p, numel)

    def _stream(self, name: str, p: Producer, spec: TensorSpec, base, tensors, inputs, ins,
                release_inputs: bool) -> Iterator[torch.Tensor]:
        """The merged chunks of ``produce_chunks`` in the output dtype; consumed input pages released behind."""
        done = 0
        for _, e, out in self.merge_chunks(p.key, base, tensors, spec.dtype):
            _check_merged_finite(name, p.key, out, inputs)
            yield out
            if release_inputs:
                for t in ins:
                    release(t.reshape(-1), done, e)
            done = e

    def _direct_sources(self, name: str) -> tuple[Source | None, list[Source]] | None:
        """The file ranges (base, models) that ``_stream_direct`` reads for output ``name``, or None when it goes through
        the memory-mapped inputs: no ``reader``, not a plain streamed merge of an element-wise method, a layer the
        LVLM keeps, or an input without a file range (pickle weights)."""
        plan = self.plan
        p = plan.producers[name]
        if (self.reader is None or p.kind != "merge" or not plan.method.elementwise or not streams(plan, name)
                or swap_keeps(plan.recipe.layer_swap, p.key)):
            return None
        base_key = plan.base.ckpt.text_key(p.key) if plan.base else None
        keys = {s.name: s.ckpt.text_key(p.key) for s in plan.models}
        srcs = [s for s in plan.models if keys[s.name] is not None or base_key is not None]
        locs = [plan.base.ckpt.location(base_key) if base_key is not None else None]
        locs += [s.ckpt.location(keys[s.name]) if keys[s.name] is not None else locs[0] for s in srcs]
        dtypes = [plan.base.ckpt.dtype(base_key) if base_key is not None else None]
        dtypes += [s.ckpt.dtype(keys[s.name]) if keys[s.name] is not None else dtypes[0] for s in srcs]
        if any(loc is None for loc in locs[1:]) or (base_key is not None and locs[0] is None):
            return None
        out = [(loc[0], loc[1], loc[2], d) if loc is not None else None for loc, d in zip(locs, dtypes, strict=True)]
        return out[0], out[1:]

    def _stream_direct(self, name: str, p: Producer, spec: TensorSpec, sources, inputs, srcs, base_t
                       ) -> Iterator[torch.Tensor]:
        """``_stream`` for an element-wise method, reading the inputs window by window (``reader.DirectReader``)
        instead of faulting their memory-mapped pages: each window merges to the same output window. The ancestry
        sample (``_track_ancestor``) is cut from the windows as they pass."""
        base_src, model_srcs = sources
        assert self.reader is not None
        flat = ([base_src] if base_src is not None else []) + model_srcs
        numel = math.prod(spec.shape)
        track = self.track_ancestry and tracked(p.key, base_t)
        runs = sample_spans(numel) if track else []
        pieces: list[list[torch.Tensor]] = [[] for _ in flat]
        for ws, we, views in self.reader.windows(flat, numel):
            for a, b in runs:
                if a < we and b > ws:
                    for part, v in zip(pieces, views, strict=True):
                        part.append(v[max(a, ws) - ws : min(b, we) - ws].float())
            base, tensors = (views[0], views[1:]) if base_src is not None else (None, views)
            for _, _, out in self.merge_chunks(p.key, base, tensors, spec.dtype):
                _check_merged_finite(name, p.key, out, inputs)
                if any(out.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() for v in views):
                    out = out.clone()  # never hand the writer a view of a buffer the reader refills
                yield out
        if track:
            own = [src != base_src for src in model_srcs]  # a model lacking the tensor reads the base's
            self._ancestry.record(torch.cat(pieces[0]), [s for s, o in zip(srcs, own, strict=True) if o],
                                  [torch.cat(ps) for ps, o in zip(pieces[1:], own, strict=True) if o])

    def _whole(self, name: str, p: Producer, release_inputs: bool) -> Iterator[torch.Tensor]:
        """The non-streaming path of ``produce_chunks``: one chunk."""
        out = self.produce(name)
        yield out.reshape(-1)
        if release_inputs:
            self._release_inputs(p, out.numel())

    def _release_inputs(self, p: Producer, numel: int) -> None:
        """Give back the mapped pages of every input tensor of ``p`` (safetensors inputs only)."""
        for t in self._mapped_inputs(p):
            release(t.reshape(-1))

    def _mapped_inputs(self, p: Producer) -> list[torch.Tensor]:
        """The memory-mapped input tensors that producing ``p`` reads (lazy views: nothing is read here)."""
        return [src.ckpt.get(key) for src, key in self._input_keys(p) if src.ckpt.mapped]

    def _input_keys(self, p: Producer) -> list[tuple]:
        """(source, module key) of every input tensor that producing ``p`` reads."""
        plan = self.plan
        if p.kind == "copy":
            return [(plan.source(p.source), p.key)]
        if p.kind == "head":
            return [(src, key) for _, src, key in plan.head_inputs(p.key) if key is not None]
        srcs = ([plan.base] if plan.base else []) + list(plan.models)
        return [(s, s.ckpt.text_key(p.key)) for s in srcs if s.ckpt.text_key(p.key) is not None]

    def prefetcher(self, names: list[str]) -> Prefetcher:
        """A ``pages.Prefetcher`` over the inputs of ``names`` (in production order): step i is ``names[i]``."""
        steps = []
        for n in names:  # inputs read directly bypass the page cache: nothing to ask for
            p = self.plan.producers[n]
            locs = [] if self._direct_sources(n) is not None else [src.ckpt.location(key) for src, key in
                                                                   self._input_keys(p)]
            steps.append([loc for loc in locs if loc is not None])
        return Prefetcher(steps)

    def _merge_vocab(self, p: Producer, base, srcs, tensors, spec: TensorSpec) -> torch.Tensor:
        """An embedding or lm_head: the rows shared by the inputs merged, donor-only rows copied (``RowPlan``)."""
        plan, rp = self.plan, p.rows
        assert rp is not None
        by = {s.name: t for s, t in zip(srcs, tensors)}
        bname = plan.base.name if plan.base else None
        _check_width(p.key, srcs, tensors, spec)
        if rp.contiguous():
            k = len(rp.merge_out)
            merged = self.merge(p.key, base[:k] if base is not None else None, [by[s.name][:k] for s in srcs])
        else:
            b = base if base is not None else by[plan.lvlm.name]  # no base: the LVLM's vocab is the reference
            parts = [gather_rows(by[s.name], rp.merge_src.get(s.name, rp.merge_src.get(bname)), b) for s in srcs]
            bb = gather_rows(base, rp.merge_src[bname], base) if base is not None else None
            merged = self.merge(p.key, bb, parts)
        if not rp.copies and len(rp.merge_out) == spec.shape[0] and rp.contiguous():
            return merged
        out = torch.zeros(spec.shape, dtype=merged.dtype)
        out.index_copy_(0, rp.merge_out, merged)
        for sname, o, i in rp.copies:
            src = plan.source(sname)
            out.index_copy_(0, o, src.ckpt.get(src.ckpt.text_key(p.key)).index_select(0, i).to(merged.dtype))
        return out

    def _mix_head(self, part: str, spec: TensorSpec) -> torch.Tensor:
        """``head: mix``: w_vlrm · (the trained VLRM's head) + w_rm · (the RM's), computed in the compute dtype."""
        out = torch.zeros(spec.shape, dtype=self.plan.compute_dtype)
        for w, src, key in self.plan.head_inputs(part):
            if key is not None:
                out += w * src.ckpt.get(key).to(self.plan.compute_dtype).reshape(spec.shape)
        if not bool(torch.isfinite(out).all()):
            raise MergeError(f"non-finite values in the mixed score head ({part})")
        return out.to(spec.dtype)

    # ---- diagnostics -------------------------------------------------------------------------------------------
    def _track_ancestor(self, canon: str, base, srcs, tensors) -> None:
        """Record the sampled relative task-vector size of a weight matrix (``ancestry.sample``)."""
        if not tracked(canon, base):
            return
        own = [t.shape == base.shape and t is not base for t in tensors]
        self._ancestry.record(sample(base), [s for s, o in zip(srcs, own, strict=True) if o],
                              [sample(t) for t, o in zip(tensors, own, strict=True) if o])

    def ancestor_report(self) -> dict[str, float]:
        """Median over the weight matrices produced so far of ‖θ_i − θ_base‖ / ‖θ_base‖ per model (sampled)."""
        return self._ancestry.report()


_PROPAGATES_NAN = ("linear", "task_arithmetic", "slerp")  # any NaN/Inf input reaches the output


def streams(plan: MergePlan, name: str) -> bool:
    """Whether ``produce_chunks`` makes output ``name`` chunk by chunk, never whole in memory: a merged tensor above
    ``STREAM_MIN`` elements, or such a vocabulary tensor whose merged rows are a prefix of every input's."""
    p = plan.producers[name]
    if p.kind == "copy" or math.prod(plan.specs[name].shape) <= STREAM_MIN:
        return False
    return p.kind == "merge" or _prefix_rows(p.rows)


def _prefix_rows(rp) -> bool:
    """A vocabulary tensor's merged rows come first in every input and the copied rows after them."""
    return rp is not None and rp.contiguous() and all(int(o.min()) >= len(rp.merge_out) for _, o, _ in rp.copies
                                                      if o.numel())


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: a sum first (one pass, no temporary; NaN/Inf propagate into it), the exact check only
    when the sum is not finite (it may just have overflowed)."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _check_merged_finite(name: str, key: str, out: torch.Tensor, inputs) -> None:
    """A merged tensor (or chunk) holds no NaN/Inf: else name the input that does, or the overflow."""
    if out.is_floating_point() and not _all_finite(out):
        _check_inputs_finite(key, inputs)
        raise MergeError(f"merge produced non-finite values in {name} (overflow in {out.dtype}?)")


def _check_inputs_finite(key: str, inputs) -> None:
    """Name the input holding NaN/Inf (a sum is a cheap first pass: NaN/Inf propagate into it)."""
    for s, t in inputs:
        if t.is_floating_point() and not _all_finite(t):
            raise MergeError(f"non-finite values (NaN/Inf) in input tensor {key} of {s.role} model {s.name}")


def _check_width(key: str, srcs, tensors, spec: TensorSpec) -> None:
    """Every input of a vocabulary tensor has the output's row width."""
    width = spec.shape[1:]
    for s, t in zip(srcs, tensors):
        if tuple(t.shape[1:]) != tuple(width):
            raise MergeError(f"tensor {key}: {s.role} {s.name} has shape {tuple(t.shape)}, expected (*, {width})")


def _check_shapes(canon: str, base_src, base, srcs, tensors) -> None:
    ref_src, ref = (base_src, base) if base is not None else (srcs[0], tensors[0])
    for s, t in zip(srcs, tensors):
        if tuple(t.shape) != tuple(ref.shape):
            raise MergeError(
                f"shape mismatch for {canon}: {s.role} {s.name} has {tuple(t.shape)}, "
                f"{ref_src.role} {ref_src.name} has {tuple(ref.shape)}"
            )


def _put(w: ShardWriter, name: str, spec: TensorSpec, part: torch.Tensor, first: bool, mapped: bool) -> None:
    """Write one chunk of ``produce_chunks``: a whole tensor in one ``write``, a streamed one in ``append``s. A
    ``mapped`` chunk views a memory-mapped input (a copied tensor): its pages are given back once written."""
    if first and part.numel() == math.prod(spec.shape):
        w.write(name, part.reshape(spec.shape))
    else:
        if first:
            w.begin(name)
        w.append(part)
    if mapped:
        release(part.reshape(-1))


def _math_threads() -> int:
    """Torch threads for the merge math in ``build``: the cores left after ``IO_CORES`` (at least one, at most the
    current count). Element-wise math is chunk-sized work: spread over threads that must wait for the cores the
    reader, the writer and the kernel's I/O are using, it runs up to 10x slower than on one thread."""
    return max(1, min(torch.get_num_threads(), len(usable_cores()) - IO_CORES))


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
    out_dtype: str | None = None,
) -> Path:
    """Build a VLRM (``output: vlrm``) or merged LVLM (``output: lvlm``) directory from a recipe.

    ``dtype`` overrides the recipe's dtype of merged tensors; ``out_dtype`` casts copied tensors too. ``out_dir``
    may not be, contain or lie inside an input model folder or the recipe file (not even with ``force``).
    """
    from .output import finalize_output  # late import: output.py imports transformers model classes

    recipe_file = Path(recipe) if isinstance(recipe, str | Path) else None
    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe if not isinstance(recipe, str) else Path(recipe))
    check_not_overlapping(out_dir, [*recipe.input_paths(), ("recipe", recipe_file)])
    try:
        plan = MergePlan(recipe, dtype=dtype, seed=seed, allow_pickle=allow_pickle, out_dtype=out_dtype)
    except CheckpointError as e:
        raise MergeError(str(e)) from e
    executor = MergeExecutor(plan)
    shards = plan_shards(plan.specs, max_shard_size)
    total = sum(s.nbytes for s in plan.specs.values())
    with atomic_output_dir(out_dir, force=force) as tmp, pinned_threads(_math_threads()), DirectReader() as reader:
        executor.reader = reader
        done = 0
        # one writer thread: tensor i is written while tensor i + 1 is merged (both release the GIL), and a reader
        # thread has the kernel read the inputs of the next tensors meanwhile; the bar is closed (its line ended)
        # before any error is printed
        order = [n for names in shards.values() for n in names]
        ahead = executor.prefetcher(order)
        ahead.drop = drop = ahead.nbytes + total > CACHE_SHARE * psutil.virtual_memory().available
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"merge ({recipe.merge_method})",
                  disable=not progress) as bar, ThreadPoolExecutor(max_workers=1) as io, ahead:
            for fname, names in shards.items():
                w = ShardWriter(tmp / fname, names, plan.specs, {"format": "pt"}, drop=drop)
                pending: deque = deque()  # writes in flight, oldest first (the one writer runs them in order)
                for n in names:
                    spec = plan.specs[n]
                    first, numel, made = True, math.prod(spec.shape), 0
                    ahead.at(done)  # ``done`` tensors so far: this is step ``done`` of ``order``
                    views = {t.untyped_storage().data_ptr() for t in executor._mapped_inputs(plan.producers[n])}
                    for t in executor.produce_chunks(n, release_inputs=True):
                        while len(pending) >= WRITES_IN_FLIGHT:
                            pending.popleft().result()
                        mapped = t.untyped_storage().data_ptr() in views  # released before the writer read it
                        pending.append(io.submit(_put, w, n, spec, t, first, mapped))
                        first = False
                        made += t.numel()
                        ahead.at(done, made / max(numel, 1))
                        del t
                    ahead.done(done)
                    done += 1
                    bar.update(plan.specs[n].nbytes)
                    bar.set_postfix(tensors=f"{done}/{len(plan.specs)}")
                while pending:
                    pending.popleft().result()
                w.close()
        write_index(tmp, shards, plan.specs)
        ancestry = executor.ancestor_report()
        for name, r in ancestry.items():
            if r > ANCESTOR_WARN_RATIO:
                warnings.warn(
                    f"base {plan.base.name} does not look like the common ancestor of {name}: "
                    f"‖θ − θ_base‖/‖θ_base‖ ≈ {r:.2f} (fine-tunes are usually < 0.3). Check `base_model`.",
                    stacklevel=2,
                )
        finalize_output(plan, tmp, ancestry)
    return Path(out_dir)
