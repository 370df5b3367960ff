"""A merge's dry run: the ``MergePlan`` a recipe would run, reported before hours of work, without writing anything.

``dry_run`` builds the plan (configs, tokenizers and safetensors headers only: no tensor data is read), so every
check the plan makes fails here as it would in ``build``, and collects the warnings the plan gives. ``DryRun.text``
prints the inputs (family, layout, dtypes, size), where each output tensor comes from (grouped by module and
layer range), the vocabulary changes, those warnings, the output size, a peak-memory estimate and the disk needed.
"""

from __future__ import annotations

import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import check_not_overlapping, check_output_dir
from .checkpoint import CheckpointError
from .engine import MergeError, MergePlan, Source
from .recipe import Recipe, parse_recipe
from .writer import TensorSpec, plan_shards

__all__ = ["DryRun", "TensorGroup", "dry_run", "predict_peak_bytes"]

PROCESS_BYTES = 600 * 2**20  # Python + torch + transformers, measured on CPU: added to the tensor estimate


@dataclass
class TensorGroup:
    """Output tensors made the same way under one module prefix (layer indices collapsed into a range)."""

    how: str  # e.g. "copied from lvlm", "task_arithmetic of base, lvlm, rm"
    prefix: str  # e.g. "model.language_model.layers.*"
    count: int = 0
    nbytes: int = 0
    layers: set[int] = field(default_factory=set)
    dtypes: set[str] = field(default_factory=set)  # "float16" or "float16 → bfloat16"

    def line(self) -> str:
        where = self.prefix
        if self.layers:
            lo, hi, n = min(self.layers), max(self.layers), len(self.layers)
            if n == hi - lo + 1:
                rng = f"{lo}" if lo == hi else f"{lo}-{hi}"
            else:
                rng = ",".join(map(str, sorted(self.layers))) if n <= 8 else f"{n} of {lo}-{hi}"
            where = where.replace("*", f"[{rng}]", 1)
        return f"  {where:58s} {self.count:6d} tensors {_gb(self.nbytes):>10s}  {self.how}  ({', '.join(sorted(self.dtypes))})"


@dataclass
class DryRun:
    """What ``build`` would do for a recipe: the plan, its warnings and the resources it needs."""

    plan: MergePlan
    out_dir: Path
    warnings: list[str]
    groups: list[TensorGroup]
    out_bytes: int
    n_shards: int
    peak_bytes: int
    mapped_bytes: int  # input bytes the merge maps (file-backed, reclaimable)
    disk_needed: int
    disk_free: int | None

    def text(self) -> str:
        """The human-readable report that ``vlrm-rlhf merge --dry-run`` prints."""
        p, r = self.plan, self.plan.recipe
        lines = [f"dry run: {r.merge_method} -> output {r.output} in {self.out_dir} (nothing read but configs, "
                 "tokenizers and safetensors headers; nothing written)", "", "inputs:"]
        for s in p.sources:
            lines.append("  " + _describe(s, s is p.base))
        lines += ["", f"output tensors ({len(p.specs)}), grouped:"]
        lines += [g.line() for g in self.groups]
        lines += ["", "vocabulary:", *("  " + v for v in _vocab_lines(p))]
        lines += ["", f"dtypes: merged tensors {_dt(p.out_dtype)} (computed in {_dt(p.compute_dtype)}); "
                  + _cast_line(p)]
        lines += ["", f"warnings ({len(self.warnings)}):" if self.warnings else "warnings: none"]
        lines += [f"  - {w}" for w in self.warnings]
        lines += ["  (not predictable from headers: NaN/Inf in inputs, and whether the base is the inputs' "
                  "common ancestor; the merge checks both)", ""]
        lines.append(f"output size: {_gb(self.out_bytes)} in {self.n_shards} shard(s)")
        lines.append(f"peak memory (estimate): {_gb(self.peak_bytes)} anonymous (the costliest tensor's working set, "
                     f"large tensors merged in chunks, plus ~{_gb(PROCESS_BYTES)} for the process); the "
                     f"{_gb(self.mapped_bytes)} of inputs are read as the merge moves on and their pages given back "
                     f"behind it (file-backed, reclaimable)")
        free = f", {_gb(self.disk_free)} free" if self.disk_free is not None else ""
        lines.append(f"disk needed: {_gb(self.disk_needed)} at {self.out_dir.parent}{free}")
        return "\n".join(lines)


def dry_run(recipe: Recipe | str | Path | dict, out_dir: str | Path, *, force: bool = False,
            dtype: str | None = None, out_dtype: str | None = None, seed: int | None = None,
            allow_pickle: bool = False, max_shard_size: int | str = "2GB") -> DryRun:
    """Plan ``build(recipe, out_dir, ...)`` without reading tensor data or writing anything; raise what it would."""
    recipe_file = Path(recipe) if isinstance(recipe, str | Path) else None
    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe if not isinstance(recipe, str) else Path(recipe))
    out = Path(out_dir).resolve()
    check_not_overlapping(out, [*recipe.input_paths(), ("recipe", recipe_file)])  # the checks build() makes
    check_output_dir(out, force)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            plan = MergePlan(recipe, dtype=dtype, seed=seed, allow_pickle=allow_pickle, out_dtype=out_dtype)
        except CheckpointError as e:
            raise MergeError(str(e)) from e
    msgs = list(dict.fromkeys(str(w.message) for w in caught if _from_merge(w)))
    out_bytes = sum(s.nbytes for s in plan.specs.values())
    n_shards = len(plan_shards(plan.specs, max_shard_size))
    lv_dir = Path(plan.lvlm.name)
    small = sum(f.stat().st_size for f in lv_dir.iterdir()
                if f.is_file() and not f.name.endswith((".safetensors", ".bin")))
    needed = out_bytes + small + n_shards * 2**20  # headers and index: well under 1 MB a shard
    free = _free(out)
    if free is not None and free < needed:
        msgs.append(f"not enough free disk at {out.parent}: the merge writes {_gb(needed)}, {_gb(free)} are free")
    mapped = sum(_input_bytes(s) for s in plan.sources)
    return DryRun(plan, out, msgs, _groups(plan), out_bytes, n_shards, predict_peak_bytes(plan), mapped, needed, free)


def _from_merge(w: warnings.WarningMessage) -> bool:
    """Warnings the merge gives (user warnings), not deprecation noise of the libraries it calls."""
    return issubclass(w.category, UserWarning) and not issubclass(w.category, DeprecationWarning)


# ---- resources ---------------------------------------------------------------------------------------------------
def predict_peak_bytes(plan: MergePlan) -> int:
    """Estimated peak anonymous memory of ``build``: the costliest output tensor's working set, the writer's queue,
    the direct reader's windows and the process itself.

    Inputs are memory-mapped or read window by window, so they count as file-backed or as the reader's buffers. An
    output above ``STREAM_MIN`` elements is merged chunk by chunk (``executor.streams``): per chunk of m elements,
    buffers for the base, each model and the result in the compute dtype ((k + 2)·m·c), and for pruning methods a
    bit mask per model (k·n/8) and the top-k sample. A smaller tensor is merged whole: its result in the compute
    dtype and its cast (n·(c + o)), a mask or magnitudes per model (k·n·c) when pruning, and for a vocabulary tensor
    gathered by token row each input's rows and a zeroed output (k·n·c + n·c). A copied tensor holds its cast (n·o)
    when the dtype changes.
    """
    from .executor import STREAM_MIN, WRITES_IN_FLIGHT, streams
    from .methods import SPARSIFYING
    from .reader import WINDOW_BYTES
    from .sparsify import _SAMPLE, chunk_size

    c = torch.empty((), dtype=plan.compute_dtype).element_size()
    k = len(plan.sources)
    pruning = plan.method.name in SPARSIFYING
    worst = queued = 0
    for name, p in plan.producers.items():
        spec = plan.specs[name]
        n, o = _numel(spec), spec.nbytes
        el = o // max(n, 1)
        if p.kind == "copy":
            cost = o if plan.source(p.source).ckpt.dtype(p.key) != spec.dtype else 0
        elif streams(plan, name):
            m = min(n, chunk_size())
            cost = (k + 2) * m * c + (k * (n // 8 + min(n, _SAMPLE) * c) if pruning else 0)
            if p.kind == "vocab":  # the copied rows after the merged prefix are built whole
                cost += (spec.shape[0] - len(p.rows.merge_out)) * (n // spec.shape[0]) * c
        else:
            cost = n * c + o + (k * n * c if pruning else 0)
            if p.kind == "vocab" and not p.rows.contiguous():
                cost += k * n * c + n * c
        worst = max(worst, cost)
        queued = max(queued, min(n, STREAM_MIN) * el)
    reader = 2 * k * WINDOW_BYTES if plan.method.elementwise else 0
    return worst + WRITES_IN_FLIGHT * queued + reader + PROCESS_BYTES


def _numel(spec: TensorSpec) -> int:
    n = 1
    for d in spec.shape:
        n *= d
    return n


def _input_bytes(s: Source) -> int:
    ck = s.ckpt
    return sum(_numel(TensorSpec(ck.shape(k), ck.dtype(k))) * torch.empty((), dtype=ck.dtype(k)).element_size()
               for k in ck.ckpt_key)


def _free(out: Path) -> int | None:
    p = out.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


# ---- report pieces ---------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^(.*?)\.(\d+)\.")


def _groups(plan: MergePlan) -> list[TensorGroup]:
    """Output tensors grouped by how they are made and the module they belong to."""
    groups: dict[tuple[str, str], TensorGroup] = {}
    method = plan.recipe.merge_method
    for name, p in plan.producers.items():
        spec = plan.specs[name]
        if p.kind == "copy":
            src = plan.source(p.source)
            how = f"copied from {src.role}"
            a, b = _dt(src.ckpt.dtype(p.key)), _dt(spec.dtype)
        elif p.kind == "head":
            w_v, w_r = plan.recipe.mix_weights()
            how = f"score head mix ({w_v:g} · vlrm + {w_r:g} · rm)"
            a = b = _dt(spec.dtype)
        else:
            roles = [s.role if s is not plan.base else "base" for s in plan.sources
                     if s.ckpt.text_key(p.key) is not None or plan.base is not None]
            how = f"{method} of {', '.join(roles)}" + (" by token row" if p.kind == "vocab" else "")
            a, b = "/".join(sorted({_dt(s.ckpt.dtype(k)) for s in plan.sources
                                    if (k := s.ckpt.text_key(p.key)) is not None})), _dt(spec.dtype)
        m = _LAYER.match(name)
        # a layer stack collapses into one range; otherwise the module (copies: its top two levels)
        prefix = f"{m[1]}.*" if m else ".".join(name.split(".")[:-1][: 2 if p.kind == "copy" else 3]) or name
        g = groups.setdefault((how, prefix), TensorGroup(how, prefix))
        g.count += 1
        g.nbytes += spec.nbytes
        if m:
            g.layers.add(int(m[2]))
        g.dtypes.add(a if a == b else f"{a} → {b}")
    return list(groups.values())


def _describe(s: Source, is_base: bool) -> str:
    ck = s.ckpt
    kind = f"{ck.family.display} ({ck.config.model_type})" if ck.family else ck.config.model_type
    hub = any(k != v for k, v in ck.ckpt_key.items())
    pickled = any(r.file.suffix == ".bin" for r in ck.refs.values())
    layout = "pickle" if pickled else ("hub layout (keys renamed on load)" if hub else
                                                      "transformers layout")
    shards = len({r.file for r in ck.refs.values()})
    dtypes = "/".join(sorted({_dt(ck.dtype(k)) for k in ck.ckpt_key}))
    extra = [x for x in ("tied embeddings" if ck.tied else "",
                         f"{len(ck.ignored)} stale buffer(s) ignored" if getattr(ck, "ignored", None) else "") if x]
    role = "base" if is_base else s.role
    return (f"{role:5s} {s.name}: {kind}, {ck.class_name}, {layout}, {len(ck.ckpt_key)} tensors in {shards} "
            f"file(s), {dtypes}, {_gb(_input_bytes(s))}" + (f", {', '.join(extra)}" if extra else ""))


def _vocab_lines(p: MergePlan) -> list[str]:
    v, lv = p.out_vocab, p.lvlm.ckpt
    out = []
    if v.by_index:
        out.append("rows matched by index (some input ships no tokenizer)")
    else:
        sizes = ", ".join(f"{s.role if s is not p.base else 'base'} {len(p.vocabs[s.name].ids or {})}"
                          for s in p.sources)
        out.append(f"tokenizer sizes: {sizes}; output {len(v.ids)}")
        if v.appended:
            first = ", ".join(f"{t!r} (from {_role_of(p, d)})" for t, d in v.appended[:5])
            out.append(f"appended to the LVLM's vocabulary: {len(v.appended)} token(s): {first}"
                       + (" ..." if len(v.appended) > 5 else ""))
        else:
            out.append("no tokens appended to the LVLM's vocabulary")
    for name, pr in p.producers.items():
        if pr.kind == "vocab":
            before = lv.shape(name)[0]
            out.append(f"{name}: {before} -> {p.specs[name].shape[0]} rows ({len(pr.rows.merge_out)} merged, "
                       f"{sum(len(o) for _, o, _ in pr.rows.copies)} copied)")
    size = lv.config.get_text_config().vocab_size
    out.append(f"text_config.vocab_size: {size}" + (f" -> {p.vocab_size}" if p.vocab_size != size else " (unchanged)"))
    if p.recipe.output == "vlrm":
        out.append(f"pad token: {p.pad_token!r} id {p.pad_id}" if p.pad_id is not None else "pad token: none")
    return out


def _role_of(p: MergePlan, name: str) -> str:
    """The role of the input named ``name``."""
    return p.source(name).role


def _cast_line(p: MergePlan) -> str:
    done = p.casts()
    if not done:
        return "copied tensors keep their source dtype"
    return "out_dtype casts " + ", ".join(f"{n} copied tensor(s) {a} → {b}" for (a, b), n in sorted(done.items()))


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _gb(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n} B"
