"""Sparsifiers of the task-arithmetic family: which entries of a task vector survive before merging.

mergekit 0.1.5's four pruning rules, kept apart from the merge kernels as mergekit keeps its ``sparsify.py``:
top-k by magnitude (TIES), magnitude outliers (breadcrumbs), Bernoulli (DARE) and DELLA's rank-dependent
Bernoulli (magprune). Also the chunking every kernel shares: work is done in chunks of ``_CHUNK`` elements so
peak memory stays near one output tensor, and top-k uses a sampled threshold band plus an exact ``kthvalue``
instead of a sort. Pure tensor code, no I/O; inputs are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .pages import release_mapped

__all__ = ["BERNOULLI", "MAGNITUDE", "MAGPRUNE", "OUTLIERS", "Apply", "PackedMask", "Sparsified", "Sparsifier", "chunk_size", "chunks",
           "flat",
           "topk_magnitude_mask"]

_CHUNK = 1 << 20  # elements per work chunk (tests shrink it to exercise the multi-chunk paths)
_SAMPLE = 1 << 18  # sample size used to bracket a top-k threshold
_MARGIN = (5.0, 8)  # bracket half-width: sample-quantile sigmas + slack positions ((0, 0) forces retries)


# ------------------------------------------------------------------------------------------- chunking
def _spans(n: int) -> range:
    """Start offsets of the work chunks of a flat tensor of ``n`` elements."""
    return range(0, n, _CHUNK)


def chunk_size() -> int:
    """Elements per work chunk (read per call, so tests can shrink it)."""
    return _CHUNK


def chunks(n: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each work chunk of a flat tensor of ``n`` elements (the chunk size read per call)."""
    size = _CHUNK
    for s in range(0, n, size):
        yield s, min(s + size, n)


def flat(t: Tensor) -> Tensor:
    """``t`` as one dimension: a view for contiguous (e.g. memory-mapped) tensors."""
    return t.reshape(-1)


def _release(m: Tensor, b: Tensor | None, s: int = 0, e: int | None = None) -> None:
    """Give back the pages of the file-mapped inputs a whole-tensor pass has read (``pages.mapped_inputs``)."""
    release_mapped(m, s, e)
    if b is not None:
        release_mapped(b, s, e)


def _delta(m: Tensor, b: Tensor | None, s: int, e: int, dtype: torch.dtype, out: Tensor | None = None,
           scratch: Tensor | None = None) -> Tensor:
    """The chunk m[s:e] - b[s:e] in `dtype` (a copy of m[s:e] when there is no base): a fresh tensor, or computed
    in the buffers ``out`` and ``scratch`` (as long as the chunk) when given; the same values either way."""
    if out is None:
        return m[s:e].to(dtype, copy=True) if b is None else torch.sub(m[s:e].to(dtype), b[s:e].to(dtype))
    e = min(e, m.numel())
    d = out[: e - s].copy_(m[s:e])
    return d if b is None else d.sub_(scratch[: e - s].copy_(b[s:e]))


class _TopK:
    """Exact top-k of |x|: |x| >= tau, minus the first `excess` elements (index order) equal to tau when more
    tie at tau than k allows; `l1` is the kept L1 norm. Chunks must be asked for in order, once each: the excess
    ties are dropped from the first chunks that hold them, so no index list is kept."""

    def __init__(self, tau: float, dtype: torch.dtype, excess=0, l1=0.0):
        self.tau, self.excess, self.l1 = tau, excess, l1
        down = torch.tensor([tau, -math.inf], dtype=dtype)
        self.lam = torch.nextafter(down[0], down[1]).item()  # in `dtype`: |x| > lam <=> |x| >= tau

    def _drop_excess(self, keep: Tensor, a: Tensor) -> None:
        """Unselect (in place) the first of the remaining excess ties at tau in this chunk."""
        if self.excess > 0:
            eq = (a == self.tau).nonzero().squeeze(1)[: self.excess]
            keep[eq] = 0
            self.excess -= eq.numel()

    def mask(self, a: Tensor) -> Tensor:
        """Bool keep-mask for the next chunk of |x|."""
        keep = a >= self.tau
        self._drop_excess(keep, a)
        return keep

    def part(self, s: int, e: int, d: Tensor) -> Tensor:
        """The chunk d = x[s:e] with unselected entries zeroed (a new tensor)."""
        out = F.hardshrink(d, self.lam)
        if self.excess > 0 and self.tau != 0:  # extra kept zeros contribute nothing
            self._drop_excess(out, out.abs())
        return out


def _topk(m: Tensor, b: Tensor | None, ks: Sequence[int], dtype: torch.dtype, want_l1: bool
          ) -> tuple[list[_TopK], float]:
    """Select the k largest |m - b| for each k without sorting: bracket the threshold with order statistics
    of a random sample, count the distinct values of the band between the brackets in one pass, and walk those
    counts down to the k-th value. Counting distinct values keeps memory small even when a band is dense with
    ties (deltas of bf16 weights take few distinct values). Also returns |m - b|_1 when `want_l1` (else 0)."""
    n = m.numel()
    jobs: dict[int, tuple[float, float]] = {}
    if n > _CHUNK:  # sample with a private generator: deterministic, and the caller's RNG is untouched
        idx = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(n))
        smp = _delta(m[idx], None if b is None else b[idx], 0, _SAMPLE, dtype).abs_()  # unsorted: kthvalue picks
        _release(m, b)
    for j, k in enumerate(ks):
        if 0 < k < n and n > _CHUNK:
            q, p = k / n, (n - k) / n * _SAMPLE
            margin = _MARGIN[0] * math.sqrt(_SAMPLE * q * (1 - q)) + _MARGIN[1]
            lo, hi = math.floor(p - margin), math.ceil(p + margin)
            jobs[j] = (torch.kthvalue(smp, lo + 1).values.item() if lo >= 0 else -math.inf,
                       torch.kthvalue(smp, hi + 1).values.item() if hi < _SAMPLE else math.inf)
        elif 0 < k < n:
            jobs[j] = (-math.inf, math.inf)
    out: list[_TopK | None] = [None] * len(ks)
    total, first = 0.0, want_l1
    abuf = torch.empty(min(n, _CHUNK), dtype=dtype)  # |m - b| of a chunk, computed in place (as ``_delta``)
    bbuf = torch.empty(min(n, _CHUNK), dtype=dtype) if b is not None else None
    while jobs or first:
        above, l1_above = dict.fromkeys(jobs, 0), dict.fromkeys(jobs, 0.0)
        seen: dict[int, list[tuple[Tensor, Tensor]]] = {j: [] for j in jobs}  # (distinct values, counts)
        for s in _spans(n):
            a = _delta(m, b, s, s + _CHUNK, dtype, abuf, bbuf).abs_()
            _release(m, b, s, s + _CHUNK)
            total += float(a.sum()) if first else 0.0
            for j, (lo, hi) in jobs.items():
                gt = a > hi
                above[j] += int(torch.count_nonzero(gt))
                l1_above[j] += float(F.hardshrink(a, hi).sum()) if want_l1 else 0.0
                seen[j].append(torch.unique(a[(a >= lo).logical_and_(gt.logical_not_())], return_counts=True))
        first = False
        for j, (lo, hi) in list(jobs.items()):
            vals, counts = _merge_counts(seen.pop(j))  # descending values
            r = ks[j] - above[j]  # how many to take from the band
            if r <= 0:  # the sample misplaced the bracket (rare): retry on the side that holds tau
                jobs[j] = (hi, math.inf)
            elif r > int(counts.sum()):
                jobs[j] = (-math.inf, lo)
            else:
                cum = counts.cumsum(0)
                i = int(torch.searchsorted(cum, r))  # the first distinct value whose cumulative count reaches r
                tau, n_gt = vals[i].item(), (int(cum[i - 1]) if i else 0)
                ties = r - n_gt  # elements equal to tau that belong to the top k
                l1 = (l1_above[j] + float((vals[:i].double() * counts[:i]).sum()) + ties * tau) if want_l1 else 0.0
                out[j] = _TopK(tau, dtype, int(counts[i]) - ties, l1)
                del jobs[j]
    sels = [o if o is not None else _TopK(math.inf, dtype) if k <= 0 else _TopK(-1.0, dtype, 0, total)
            for o, k in zip(out, ks, strict=True)]
    return sels, total


def _merge_counts(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Distinct values (descending) and their total counts, from per-chunk ``torch.unique`` results."""
    if not parts:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    v, inv = torch.unique(torch.cat([p[0] for p in parts]), return_inverse=True)
    c = torch.zeros(v.numel(), dtype=torch.long).index_add_(0, inv, torch.cat([p[1] for p in parts]))
    return v.flip(0), c.flip(0)


def topk_magnitude_mask(x: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest |x| (ties broken by index); what TIES keeps for k = max(1, density*n)."""
    v = flat(x)
    (sel,), _ = _topk(v, None, [k], torch.float64 if x.dtype == torch.float64 else torch.float32, False)
    return torch.cat([sel.mask(v[s : s + _CHUNK].abs()) for s in _spans(v.numel())]).reshape(x.shape)


# --------------------------------------------------------------------------------------- sparsifiers
# Each takes the flat model and base tensors (m, b), the model's filled parameters p, the compute dtype, the
# generator, the tensor's original shape and want_l1, and returns (apply, kept_l1, total_l1):
# apply(s, e, delta chunk) -> pruned chunk, called once per chunk in order; the L1 norms of the kept part and
# of the whole delta (only computed when `want_l1`) feed rescale "l1".
Apply = Callable[[int, int, Tensor], Tensor]
Sparsified = tuple[Apply, float, float]


def magnitude(m: Tensor, b: Tensor, p: Mapping[str, Any], dtype: torch.dtype, gen: torch.Generator | None,
              shape: torch.Size, want_l1: bool) -> Sparsified:
    """TIES pruning: keep the max(1, int(density * n)) largest-magnitude entries."""
    (sel,), total = _topk(m, b, [max(1, int(p["density"] * m.numel()))], dtype, want_l1)
    return sel.part, sel.l1, total


def outliers(m: Tensor, b: Tensor, p: Mapping[str, Any], dtype: torch.dtype, gen: torch.Generator | None,
             shape: torch.Size, want_l1: bool) -> Sparsified:
    """Breadcrumbs pruning: ascending-magnitude ranks [n_bot, n_bot + int(density*n)) survive,
    n_bot = max(0, n - int(density*n) - int(gamma*n)); i.e. the top int(gamma*n) are dropped too."""
    n = m.numel()
    keep_n, top_n = int(p["density"] * n), int(p["gamma"] * n)
    drop_top = n - max(0, n - keep_n - top_n) - keep_n
    (upto, over), total = _topk(m, b, [keep_n + drop_top, drop_top], dtype, want_l1)

    def apply(s: int, e: int, d: Tensor) -> Tensor:  # top (keep_n + drop_top) minus top drop_top: exact
        return upto.part(s, e, d).sub_(over.part(s, e, d))

    return apply, upto.l1 - over.l1, total


def bernoulli(m: Tensor, b: Tensor, p: Mapping[str, Any], dtype: torch.dtype, gen: torch.Generator | None,
              shape: torch.Size, want_l1: bool) -> Sparsified:
    """DARE pruning: keep each entry independently with probability density (mask from `gen`)."""
    n, d = m.numel(), p["density"]
    mask = PackedMask(n)
    for s in _spans(n):
        mask.append(torch.rand(min(_CHUNK, n - s), generator=gen, dtype=dtype) < d)
    return _masked_keep(m, b, mask, dtype, want_l1)


def magprune(m: Tensor, b: Tensor, p: Mapping[str, Any], dtype: torch.dtype, gen: torch.Generator | None,
             shape: torch.Size, want_l1: bool) -> Sparsified:
    """DELLA pruning: keep probability rises linearly, density-eps to density+eps, with the magnitude
    rank along dim 1 (1-D tensors: one row), like mergekit; a single column gets probability density.
    Rows of a 1-D or 2-D tensor are contiguous, so their deltas are computed a block of rows at a time."""
    d, eps = p["density"], p["epsilon"]
    if len(shape) <= 2:
        cols = shape[-1] if len(shape) == 2 else m.numel()
        n_rows = m.numel() // max(cols, 1)
        mask = PackedMask(m.numel())
        step = max(1, _CHUNK // max(cols, 1))
        for r in range(0, n_rows, step):
            s, e = r * cols, min(r + step, n_rows) * cols
            blk = _delta(m, b, s, e, dtype).abs_().reshape(-1, cols)
            _release(m, b, s, e)
            mask.append(_magprune_rows(blk, d, eps, gen).reshape(-1))
        return _masked_keep(m, b, mask, dtype, want_l1)
    x = torch.sub(m.to(dtype), b.to(dtype)).reshape(shape)  # small (conv kernels): rank along a strided axis
    moved = x.movedim(1, -1)
    rows = moved.abs().reshape(-1, moved.shape[-1])
    step = max(1, _CHUNK // rows.shape[1])
    mask = torch.cat([_magprune_rows(rows[r : r + step], d, eps, gen) for r in range(0, rows.shape[0], step)])
    packed = PackedMask(x.numel())
    packed.append(mask.reshape(moved.shape).movedim(-1, 1).reshape(-1))
    return _masked_keep(flat(x), None, packed, dtype, want_l1)


def _magprune_rows(blk: Tensor, d: float, eps: float, gen: torch.Generator | None) -> Tensor:
    """DELLA's keep-mask of a block of rows of |delta|: Bernoulli with probability linear in the in-row rank."""
    cols = blk.shape[1]
    ranks = torch.arange(cols, dtype=blk.dtype).div_(cols - 1) if cols > 1 else torch.full((1,), 0.5, dtype=blk.dtype)
    prob = torch.empty_like(blk).scatter_(1, blk.argsort(dim=1), ranks.expand_as(blk))
    return torch.bernoulli(prob.mul_(2 * eps).add_(d - eps), generator=gen).bool()


class PackedMask:
    """A bool mask of ``n`` entries stored as bits (n/8 bytes), written in order and read by ranges: a random
    mask per model (DARE, DELLA) must live until the merge has consumed every chunk of the tensor, and as bools
    it would cost a byte per element (311 MB per model for a 3B vocabulary's embedding)."""

    def __init__(self, n: int):
        self.n, self.filled = n, 0
        self.bits = np.zeros((n + 7) // 8, dtype=np.uint8)
        self._tail = np.zeros(0, dtype=bool)  # the last < 8 appended entries, not yet a whole byte

    def append(self, chunk: Tensor) -> None:
        """Add the next entries (a 1-D bool tensor)."""
        v = chunk.numpy() if not len(self._tail) else np.concatenate([self._tail, chunk.numpy()])
        start = self.filled - len(self._tail)  # a multiple of 8
        whole = len(v) // 8 * 8
        self.bits[start // 8 : (start + whole) // 8] = np.packbits(v[:whole], bitorder="little")
        self._tail = v[whole:].copy()
        self.filled = start + len(v)
        if self.filled == self.n and len(self._tail):
            self.bits[-1] = np.packbits(self._tail, bitorder="little")[0]
        if self.filled > self.n:
            raise ValueError(f"PackedMask: {self.filled} entries appended to a mask of {self.n}")

    def __getitem__(self, sl: slice) -> Tensor:
        """Entries ``[start, stop)`` as a bool tensor."""
        s, e, _ = sl.indices(self.n)
        if self.filled < self.n:
            raise ValueError(f"PackedMask: read before all {self.n} entries were appended ({self.filled})")
        v = np.unpackbits(self.bits[s // 8 : (e + 7) // 8], bitorder="little")[s % 8 : s % 8 + max(e - s, 0)]
        return torch.from_numpy(v.view(bool))


def _masked_keep(m: Tensor, b: Tensor | None, mask: PackedMask, dtype: torch.dtype, want_l1: bool) -> Sparsified:
    """Keep the entries of ``m - b`` where ``mask`` is true; L1 norms of kept and whole when asked."""
    kept = total = 0.0
    for s in _spans(m.numel()) if want_l1 else ():
        a = _delta(m, b, s, s + _CHUNK, dtype).abs_()
        _release(m, b, s, s + _CHUNK)
        total += float(a.sum())
        kept += float(torch.dot(a, mask[s : s + _CHUNK].to(dtype)))
    return (lambda s, e, d: d.mul_(mask[s:e])), kept, total


@dataclass(frozen=True)
class Sparsifier:
    """A pruning rule as the registry sees it: mergekit's name, the function, whether it draws random numbers
    (then the merge needs a seeded generator) and the per-model parameters it adds, with their defaults."""

    name: str
    fn: Callable[..., Sparsified]
    stochastic: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)


MAGNITUDE = Sparsifier("magnitude", magnitude)
OUTLIERS = Sparsifier("magnitude_outliers", outliers, params={"gamma": 0.01})
BERNOULLI = Sparsifier("random", bernoulli, stochastic=True)
MAGPRUNE = Sparsifier("della_magprune", magprune, stochastic=True, params={"epsilon": 0.15})
