"""Pure tensor merge methods with mergekit 0.1.5 semantics, behind a name registry.

Everything here maps tensors to a tensor: no I/O. Inputs may be lazily memory-mapped and are never
modified. Work is done in chunks of ``_CHUNK`` elements so peak memory stays near one output tensor,
and TIES/breadcrumbs top-k uses a sampled threshold band plus an exact ``kthvalue`` instead of a sort.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

REQUIRED: Any = object()  # sentinel default for required parameters
_CHUNK = 1 << 20  # elements per work chunk (tests shrink it to exercise the multi-chunk paths)
_SAMPLE = 1 << 18  # sample size used to bracket a top-k threshold
_MARGIN = (5.0, 8)  # bracket half-width: sample-quantile sigmas + slack positions ((0, 0) forces retries)
_EPS = 1e-7  # mergekit's guard in the L1 rescale


@dataclass(frozen=True)
class MergeMethod:
    """A named merge kernel plus the parameter schema merge_tensor validates against."""

    name: str
    fn: Callable[..., Tensor]
    requires_base: bool
    shared_params: Mapping[str, Any]
    input_params: Mapping[str, Any]
    stochastic: bool
    min_inputs: int = 1
    max_inputs: int | None = None


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to METHODS under its name; a different method under a taken name is an error."""
    if METHODS.get(method.name, method) is not method:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name, listing the available ones when it is unknown."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; available: {', '.join(sorted(METHODS))}") from None


# ----------------------------------------------------------------------------------------- validation
def _real(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "weight": (_real, "a finite number"),
    "density": (lambda v: _real(v) and 0 < v <= 1, "in (0, 1]"),
    "gamma": (lambda v: _real(v) and 0 <= v < 1, "in [0, 1)"),
    "epsilon": (lambda v: _real(v) and 0 <= v < 1, "in [0, 1)"),
    "lambda": (_real, "a finite number"),
    "t": (_real, "a finite number"),
    "normalize": (lambda v: isinstance(v, bool), "true or false"),
    "int8_mask": (lambda v: isinstance(v, bool), "true or false"),
    "rescale": (lambda v: isinstance(v, bool) or v in ("l1", "density"), "true, false, 'l1' or 'density'"),
}


def _fill(method: MergeMethod, spec: Mapping[str, Any], given: Mapping[str, Any], where: str) -> dict:
    """Check keys and values of one parameter mapping against `spec` and fill in the defaults."""
    for key in given:
        if key not in spec:
            known = ", ".join(sorted(spec)) or "none"
            raise ValueError(f"{method.name}: unknown parameter {key!r} for {where} (known: {known})")
    out = {}
    for key, default in spec.items():
        value = given.get(key, default)
        if value is REQUIRED:
            raise ValueError(f"{method.name}: missing required parameter {key!r} for {where}")
        check, desc = _CHECKS[key]
        if not check(value):
            raise ValueError(f"{method.name}: parameter {key!r} must be {desc}, got {value!r} for {where}")
        out[key] = value
    d, eps = out.get("density", 1), out.get("epsilon", 0)
    if d < 1 and not (d - eps > 0 and d + eps < 1):
        raise ValueError(f"{method.name}: parameter 'epsilon' must keep density ± epsilon inside (0, 1), "
                         f"got epsilon={out['epsilon']} with density={out['density']} for {where}")
    return out


def merge_tensor(method: str | MergeMethod, base: Tensor | None, tensors: Sequence[Tensor],
                 params: Sequence[Mapping[str, Any]], shared: Mapping[str, Any],
                 generator: torch.Generator | None = None) -> Tensor:
    """Validate inputs and parameters, then merge `tensors` (and `base`) with the named method.

    Computes in float32 (float64 when any input is float64) and returns that dtype.
    """
    m = get_method(method) if isinstance(method, str) else method
    if len(params) != len(tensors):
        raise ValueError(f"{m.name}: got {len(tensors)} tensors but {len(params)} parameter mappings")
    if len(tensors) < m.min_inputs or (m.max_inputs is not None and len(tensors) > m.max_inputs):
        most = "" if m.max_inputs is None else f" and at most {m.max_inputs}"
        raise ValueError(f"{m.name}: needs at least {m.min_inputs}{most} non-base models, got {len(tensors)}")
    if m.requires_base and base is None:
        raise ValueError(f"{m.name}: a base model tensor is required")
    filled_shared = _fill(m, m.shared_params, shared, "shared parameters")
    filled = [_fill(m, m.input_params, p, f"model {i}") for i, p in enumerate(params)]
    inputs = ([] if base is None else [("base", base)]) + [(f"model {i}", t) for i, t in enumerate(tensors)]
    ref_name, ref = inputs[0]
    for name, t in inputs:
        if not t.is_floating_point():
            raise ValueError(f"{m.name}: {name} has non-floating dtype {t.dtype}")
        if t.shape != ref.shape:
            raise ValueError(f"{m.name}: shape mismatch: {name} has shape {tuple(t.shape)} "
                             f"but {ref_name} has shape {tuple(ref.shape)}")
    if m.stochastic and generator is None:
        raise ValueError(f"{m.name} is stochastic: pass a torch.Generator (set a seed) to merge_tensor")
    dtype = torch.float64 if any(t.dtype == torch.float64 for _, t in inputs) else torch.float32
    if ref.numel() == 0:
        return torch.empty(ref.shape, dtype=dtype)
    return m.fn(base, list(tensors), filled, filled_shared, generator, dtype).reshape(ref.shape)


# ------------------------------------------------------------------------------------- chunked helpers
def _spans(n: int) -> range:
    return range(0, n, _CHUNK)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)  # a view for contiguous (e.g. memory-mapped) tensors


def _delta(m: Tensor, b: Tensor | None, s: int, e: int, dtype: torch.dtype) -> Tensor:
    """A fresh chunk m[s:e] - b[s:e] in `dtype` (a copy of m[s:e] when there is no base)."""
    return m[s:e].to(dtype, copy=True) if b is None else torch.sub(m[s:e].to(dtype), b[s:e].to(dtype))


class _TopK:
    """Exact top-k of |x|: |x| >= tau, minus the first `excess` elements (index order) equal to tau
    when more tie at tau than k allows; `drop` holds their indices when known, `l1` the kept L1 norm."""

    def __init__(self, tau: float, dtype: torch.dtype, excess=0, l1=0.0, drop: Tensor | None = None):
        self.tau, self.excess, self.l1, self.drop = tau, excess, l1, drop
        self.exact = excess > 0 and tau != 0  # merging may keep extra zeros: they contribute nothing
        down = torch.tensor([tau, -math.inf], dtype=dtype)
        self.lam = torch.nextafter(down[0], down[1]).item()  # in `dtype`: |x| > lam <=> |x| >= tau

    def mask(self, a: Tensor) -> Tensor:
        """Bool keep-mask for the next chunk of |x| (chunks must come in order, once)."""
        keep = a >= self.tau
        if self.excess > 0:
            eq = (a == self.tau).nonzero().squeeze(1)[: self.excess]
            keep[eq] = False
            self.excess -= eq.numel()
        return keep

    def part(self, s: int, e: int, d: Tensor) -> Tensor:
        """The chunk d = x[s:e] with unselected entries zeroed (a new tensor; chunks in order, once)."""
        if self.exact and self.drop is None:
            return d * self.mask(d.abs())
        out = F.hardshrink(d, self.lam)
        if self.exact and self.drop is not None:
            i0, i1 = torch.searchsorted(self.drop, torch.tensor([s, e], dtype=self.drop.dtype)).tolist()
            out[self.drop[i0:i1].long() - s] = 0
        return out


def _topk(m: Tensor, b: Tensor | None, ks: Sequence[int], dtype: torch.dtype, want_l1: bool
          ) -> tuple[list[_TopK], float]:
    """Select the k largest |m - b| for each k without sorting: bracket the threshold with order statistics
    of a random sample, collect the (small) band between the brackets in one pass, kthvalue inside it.
    Also returns |m - b|_1 when `want_l1` (else 0)."""
    n = m.numel()
    itype = torch.int32 if n < 2**31 else torch.int64
    jobs: dict[int, tuple[float, float]] = {}
    if n > _CHUNK:  # sample with a private generator: deterministic, and the caller's RNG is untouched
        idx = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(n))
        smp = _delta(m[idx], None if b is None else b[idx], 0, _SAMPLE, dtype).abs_()  # unsorted: kthvalue picks
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
    while jobs or first:
        above, l1_above = dict.fromkeys(jobs, 0), dict.fromkeys(jobs, 0.0)
        vals, idxs, count = {j: [] for j in jobs}, {j: [] for j in jobs}, dict.fromkeys(jobs, 0)
        for s in _spans(n):
            a = _delta(m, b, s, s + _CHUNK, dtype).abs_()
            total += float(a.sum()) if first else 0.0
            for j, (lo, hi) in jobs.items():
                gt = a > hi
                above[j] += int(torch.count_nonzero(gt))
                l1_above[j] += float(F.hardshrink(a, hi).sum()) if want_l1 else 0.0
                band = (a >= lo).logical_and_(gt.logical_not_())
                if lo == hi:  # every band value equals lo: counting is enough
                    count[j] += int(torch.count_nonzero(band))
                else:
                    at = band.nonzero().squeeze(1)
                    vals[j].append(a[at])
                    idxs[j].append(at.add_(s).to(itype))
        first = False
        for j, (lo, hi) in list(jobs.items()):
            band = torch.cat(vals.pop(j)) if lo != hi else torch.full((count[j],), lo, dtype=dtype)
            r = ks[j] - above[j]  # how many to take from the band
            if r <= 0:  # the sample misplaced the bracket (rare): retry on the side that holds tau
                jobs[j] = (hi, math.inf)
            elif r > band.numel():
                jobs[j] = (-math.inf, lo)
            else:
                tau = torch.kthvalue(band, band.numel() - r + 1).values
                gt, eq = band > tau, band == tau
                ties = r - int(torch.count_nonzero(gt))  # elements equal to tau that belong to the top k
                excess = int(torch.count_nonzero(eq)) - ties
                drop = torch.cat(idxs[j])[eq][:excess] if lo != hi and tau != 0 else None
                l1 = l1_above[j] + float(band[gt].sum()) + ties * tau.item() if want_l1 else 0.0
                out[j] = _TopK(tau.item(), dtype, excess, l1, drop)
                del jobs[j]
    sels = [o if o is not None else _TopK(math.inf, dtype) if k <= 0 else _TopK(-1.0, dtype, 0, total)
            for o, k in zip(out, ks, strict=True)]
    return sels, total


def topk_magnitude_mask(x: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest |x| (ties broken by index); what TIES keeps for k = max(1, density*n)."""
    flat = _flat(x)
    (sel,), _ = _topk(flat, None, [k], torch.float64 if x.dtype == torch.float64 else torch.float32, False)
    return torch.cat([sel.mask(flat[s : s + _CHUNK].abs()) for s in _spans(flat.numel())]).reshape(x.shape)


# --------------------------------------------------------------------------------------- sparsifiers
# Each returns (apply, kept_l1, total_l1): apply(s, e, delta chunk) -> pruned chunk, called once per
# chunk in order; the L1 norms of the kept part and of the whole delta (only computed when `want_l1`)
# feed rescale "l1".
Apply = Callable[[int, int, Tensor], Tensor]
Sparsified = tuple[Apply, float, float]


def _magnitude(m, b, p, dtype, gen, shape, want_l1) -> Sparsified:
    """TIES pruning: keep the max(1, int(density * n)) largest-magnitude entries."""
    (sel,), total = _topk(m, b, [max(1, int(p["density"] * m.numel()))], dtype, want_l1)
    return sel.part, sel.l1, total


def _outliers(m, b, p, dtype, gen, shape, want_l1) -> Sparsified:
    """Breadcrumbs pruning: ascending-magnitude ranks [n_bot, n_bot + int(density*n)) survive,
    n_bot = max(0, n - int(density*n) - int(gamma*n)); i.e. the top int(gamma*n) are dropped too."""
    n = m.numel()
    keep_n, top_n = int(p["density"] * n), int(p["gamma"] * n)
    drop_top = n - max(0, n - keep_n - top_n) - keep_n
    (upto, over), total = _topk(m, b, [keep_n + drop_top, drop_top], dtype, want_l1)

    def apply(s: int, e: int, d: Tensor) -> Tensor:  # top (keep_n + drop_top) minus top drop_top: exact
        return upto.part(s, e, d).sub_(over.part(s, e, d))

    return apply, upto.l1 - over.l1, total


def _bernoulli(m, b, p, dtype, gen, shape, want_l1) -> Sparsified:
    """DARE pruning: keep each entry independently with probability density (mask from `gen`)."""
    n, d = m.numel(), p["density"]
    mask = torch.empty(n, dtype=torch.bool)
    for s in _spans(n):
        torch.lt(torch.rand(min(_CHUNK, n - s), generator=gen, dtype=dtype), d, out=mask[s : s + _CHUNK])
    return _masked_keep(m, b, mask, dtype, want_l1)


def _magprune(m, b, p, dtype, gen, shape, want_l1) -> Sparsified:
    """DELLA pruning: keep probability rises linearly, density-eps to density+eps, with the magnitude
    rank along dim 1 (1-D tensors: one row), like mergekit; a single column gets probability density."""
    d, eps = p["density"], p["epsilon"]
    x = torch.sub(m.to(dtype), b.to(dtype)).reshape(shape)
    moved = x.reshape(1, -1) if x.dim() < 2 else x.movedim(1, -1)  # rank along the last axis
    cols = moved.shape[-1]
    rows = moved.abs().reshape(-1, cols)
    ranks = torch.arange(cols, dtype=dtype).div_(cols - 1) if cols > 1 else torch.full((1,), 0.5, dtype=dtype)
    mask = torch.empty(rows.shape, dtype=torch.bool)
    step = max(1, _CHUNK // cols)
    for r in range(0, rows.shape[0], step):
        blk = rows[r : r + step]
        prob = torch.empty_like(blk).scatter_(1, blk.argsort(dim=1), ranks.expand_as(blk))
        mask[r : r + step] = torch.bernoulli(prob.mul_(2 * eps).add_(d - eps), generator=gen).bool()
    mask = mask.reshape(moved.shape) if x.dim() < 2 else mask.reshape(moved.shape).movedim(-1, 1)
    return _masked_keep(_flat(x), None, mask.reshape(-1), dtype, want_l1)


def _masked_keep(m, b, mask: Tensor, dtype, want_l1: bool) -> Sparsified:
    kept = total = 0.0
    for s in _spans(m.numel()) if want_l1 else ():
        a = _delta(m, b, s, s + _CHUNK, dtype).abs_()
        total += float(a.sum())
        kept += float(torch.dot(a, mask[s : s + _CHUNK].to(dtype)))
    return (lambda s, e, d: d.mul_(mask[s:e])), kept, total


# ----------------------------------------------------------------------------------- method kernels
def _gta(base, tensors, params, shared, gen, dtype, sparsify=None, consensus=False) -> Tensor:
    """Generalized task arithmetic: base + lambda * merge(weight_i * sparsify(model_i - base)).

    With `consensus` (TIES), signs are elected by the sum of weighted deltas and only agreeing entries
    are summed; `normalize` divides by the sum of the (agreeing) weights, as mergekit does.
    """
    b, ms = _flat(base), [_flat(t) for t in tensors]
    weights = [float(p["weight"]) for p in params]
    applies, factors = [], []
    for m, p, w in zip(ms, params, weights, strict=True):
        apply, scale = None, 1.0
        if sparsify is not None and p["density"] < 1:
            want_l1 = shared["rescale"] in (True, "l1")
            apply, kept, total = sparsify(m, b, p, dtype, gen, base.shape, want_l1)
            if shared["rescale"] == "density":
                scale = 1.0 / p["density"]
            elif want_l1 and total >= _EPS and kept >= _EPS:  # mergekit's |d|_1 / |keep * d|_1
                scale = total / kept
        applies.append(apply)
        factors.append(w * scale)
    div = sum(weights)
    div = 1.0 if abs(div) < 1e-8 else div
    out = torch.empty(b.numel(), dtype=dtype)
    for s in _spans(b.numel()):
        bc = b[s : s + _CHUNK].to(dtype)
        ds = []
        for m, apply, f in zip(ms, applies, factors, strict=True):
            d = torch.sub(m[s : s + _CHUNK].to(dtype), bc)
            ds.append((d if apply is None else apply(s, s + d.numel(), d)).mul_(f))
        acc = ds[0].clone()
        for d in ds[1:]:
            acc.add_(d)
        if consensus:  # elect the sign of the summed weighted deltas (mergekit: sum >= 0 is positive)
            sgn = torch.ones_like(acc).copysign_(acc)  # acc is -0.0 only where every delta is 0
            wsum = torch.zeros_like(acc) if shared["normalize"] else None
            acc.zero_()
            for d, w in zip(ds, weights, strict=True):
                acc.add_(d.mul_(sgn).clamp_min_(0))  # |d| where d agrees with the elected sign, else 0
                if wsum is not None:
                    wsum.add_(d.sign_(), alpha=w)  # sum of the agreeing weights
            acc.mul_(sgn)
            if wsum is not None:
                acc.div_(wsum.add_(wsum == 0))  # mergekit: a zero divisor becomes 1
        elif shared["normalize"]:
            acc.div_(div)
        if shared["lambda"] != 1:
            acc.mul_(shared["lambda"])
        torch.add(bc, acc, out=out[s : s + _CHUNK])
    return out


def _linear(base, tensors, params, shared, gen, dtype) -> Tensor:
    """Weighted average of `tensors` only (a base, if given, is not an input)."""
    weights = [float(p["weight"]) for p in params]
    out = torch.zeros(tensors[0].shape, dtype=dtype)
    for t, w in zip(tensors, weights, strict=True):
        out.add_(t, alpha=w)
    if shared["normalize"]:
        if sum(weights) == 0:
            raise ValueError("linear: weights sum to 0, cannot normalize; set normalize: false")
        out.div_(sum(weights))
    return out


def _slerp(base, tensors, params, shared, gen, dtype) -> Tensor:
    """Spherical interpolation from base (t=0) to the model (t=1), whole tensor as one vector;
    linear interpolation when |cos| > 0.9995 (as mergekit 0.1.5)."""
    a, b, t = _flat(base), _flat(tensors[0]), float(shared["t"])
    n = a.numel()
    sq_a = sq_b = dot = 0.0
    for s in _spans(n):
        x, y = a[s : s + _CHUNK].double(), b[s : s + _CHUNK].double()
        sq_a, sq_b, dot = sq_a + float(x @ x), sq_b + float(y @ y), dot + float(x @ y)
    na, nb = math.sqrt(sq_a), math.sqrt(sq_b)
    cos = max(-1.0, min(1.0, dot / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0))))
    if abs(cos) > 0.9995:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(cos)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    out = torch.empty(n, dtype=dtype)
    for s in _spans(n):
        o = out[s : s + _CHUNK]
        torch.mul(a[s : s + _CHUNK].to(dtype), ca, out=o).add_(b[s : s + _CHUNK].to(dtype), alpha=cb)
    return out


def _gta_method(name: str, sparsify: Callable[..., Sparsified] | None, consensus: bool, normalize: bool,
                rescale: bool, stochastic: bool, extra: Mapping[str, Any] | None = None) -> MergeMethod:
    """Register one task-arithmetic-family method with mergekit's name and defaults."""

    def fn(base, tensors, params, shared, gen, dtype) -> Tensor:
        return _gta(base, tensors, params, shared, gen, dtype, sparsify, consensus)

    fn.__doc__ = f"mergekit's {name!r}: task arithmetic with {getattr(sparsify, '__name__', 'no')} pruning."
    shared = {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}
    per_model = {"weight": REQUIRED, "density": 1.0, **(extra or {})}
    return register(MergeMethod(name, fn, True, shared, per_model, stochastic))


register(MergeMethod("linear", _linear, False, {"normalize": True}, {"weight": REQUIRED}, False))
register(MergeMethod("slerp", _slerp, True, {"t": REQUIRED}, {}, False, 1, 1))
_gta_method("task_arithmetic", None, False, False, False, False)
_gta_method("ties", _magnitude, True, True, False, False)
_gta_method("dare_ties", _bernoulli, True, False, True, True)
_gta_method("dare_linear", _bernoulli, False, False, True, True)
_gta_method("breadcrumbs", _outliers, False, False, False, False, {"gamma": 0.01})
_gta_method("breadcrumbs_ties", _outliers, True, False, False, False, {"gamma": 0.01})
_gta_method("della", _magprune, True, True, True, True, {"epsilon": 0.15})
_gta_method("della_linear", _magprune, False, False, True, True, {"epsilon": 0.15})
TASK_ARITHMETIC_FAMILY = frozenset(n for n in METHODS if n not in ("linear", "slerp"))
SPARSIFYING = TASK_ARITHMETIC_FAMILY - {"task_arithmetic"}
CONSENSUS = frozenset({"ties", "dare_ties", "breadcrumbs_ties", "della"})


def inert_parameter_warnings(method: str, shared: Mapping, params: Sequence[Mapping]) -> list[str]:
    """Human-readable warnings, each naming a fix, for settings that make some parameter inert.

    Per-model keys found in `shared` (mergekit's top-level parameters) act as per-model defaults."""
    spec = get_method(method)
    sh = {**spec.shared_params, **shared}
    raw = [{**{k: v for k, v in shared.items() if k in spec.input_params}, **p} for p in params]
    ps = [{**spec.input_params, **p} for p in raw]
    weights = [p.get("weight") for p in ps]
    dense = [i for i, p in enumerate(ps) if p.get("density") == 1]
    family, out = method in TASK_ARITHMETIC_FAMILY, []
    if family and sh.get("normalize") is True and len(ps) > 1 and len(set(map(str, weights))) == 1:
        out.append(f"{method}: normalize=true divides by the sum of the (here equal) weights, so they cancel "
                   "entirely and a sweep over λ = weight yields identical models: set normalize: false, "
                   "or sweep `lambda` instead")
    if family and sh.get("normalize") is True:
        if method not in CONSENSUS and all(map(_real, weights)) and abs(sum(weights)) < 1e-8:
            out.append(f"{method}: the weights sum to ~0, so normalize is silently skipped (mergekit's "
                       "guard): set normalize: false to say so")
    if method == "linear" and len(ps) == 1 and sh.get("normalize") is True:
        out.append("linear: with a single model and normalize=true the weight cancels and the output "
                   "equals the model: add models or set normalize: false")
    if method in SPARSIFYING and dense:
        out.append(f"{method}: density=1 for model(s) {dense} makes sparsification a no-op for them: "
                   "set density < 1 (e.g. 0.5) or use task_arithmetic")
    if method == "task_arithmetic" and len(dense) < len(ps):
        out.append("task_arithmetic: density is ignored (no sparsification): use ties/dare_linear or drop it")
    for key in ("gamma", "epsilon"):
        wasted = [i for i, (p, r) in enumerate(zip(ps, raw, strict=True)) if key in r and p.get("density") == 1]
        if key in spec.input_params and wasted:
            out.append(f"{method}: {key} is ignored for model(s) {wasted} because density=1 disables "
                       f"pruning: set density < 1 or drop {key}")
    if family and "rescale" in shared and sh["rescale"] and len(dense) == len(ps):
        out.append(f"{method}: rescale has no effect without pruning: set density < 1 or drop rescale")
    if sh.get("int8_mask"):
        out.append(f"{method}: int8_mask only changes mergekit's mask dtype, never the result: drop it")
    return out
