"""Pure tensor merge methods with mergekit 0.1.5 semantics, behind a name registry.

Everything here maps tensors to a tensor: no I/O. Inputs may be lazily memory-mapped and are never
modified. Work is done in the chunks of :func:`~vlrm_rlhf.merge.sparsify.chunks` so peak memory stays near
one output tensor; the pruning rules of the task-arithmetic family live in :mod:`vlrm_rlhf.merge.sparsify`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from ..errors import VLRMError, did_you_mean
from .sparsify import BERNOULLI, MAGNITUDE, MAGPRUNE, OUTLIERS, Sparsifier, chunk_size, chunks, flat


class UnknownMethodError(VLRMError, ValueError):
    """A merge method name that is not registered; the message lists the known ones."""


REQUIRED: Any = object()  # sentinel default for required parameters
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
    chunks: Callable[..., Iterator[tuple[int, int, Tensor]]] | None = None  # streaming form of fn (+ out_dtype=)
    elementwise: bool = False  # each output element depends on the same element of the inputs only (no whole-
    # tensor statistic, no random draw): any window of the inputs merges to the same window of the output


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to METHODS under its name; a different method under a taken name is an error."""
    if METHODS.get(method.name, method) is not method:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def unknown_method(name: str) -> str:
    """The one-line message for an unknown merge method: a suggestion and the known methods."""
    return f"unknown merge method {name!r}{did_you_mean(name, METHODS)} (known: {', '.join(sorted(METHODS))})"


def get_method(name: str) -> MergeMethod:
    """Look a method up by name, listing the available ones when it is unknown."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(unknown_method(name)) from None


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
                 generator: torch.Generator | None = None, compute_dtype: torch.dtype | None = None) -> Tensor:
    """Validate inputs and parameters, then merge `tensors` (and `base`) with the named method.

    Inputs may mix floating dtypes (fp16, bf16, fp32): each is cast chunk by chunk to the compute dtype, float32
    (float64 when any input is float64 or ``compute_dtype`` is float64), and the result has that dtype.
    """
    m, filled, filled_shared, ref, dtype = _prepare(method, base, tensors, params, shared, generator, compute_dtype)
    if ref.numel() == 0:
        return torch.empty(ref.shape, dtype=dtype)
    return m.fn(base, list(tensors), filled, filled_shared, generator, dtype).reshape(ref.shape)


def merge_tensor_chunks(method: str | MergeMethod, base: Tensor | None, tensors: Sequence[Tensor],
                        params: Sequence[Mapping[str, Any]], shared: Mapping[str, Any],
                        generator: torch.Generator | None = None, compute_dtype: torch.dtype | None = None,
                        out_dtype: torch.dtype | None = None) -> Iterator[tuple[int, int, Tensor]]:
    """``merge_tensor`` as a stream: ``(start, end, values)`` of consecutive flat element ranges, bit-identical
    to the same range of ``merge_tensor``'s result, so a huge output never has to exist whole in memory.

    Whole-tensor statistics (top-k thresholds, SLERP norms) are computed before the first chunk; once a chunk is
    yielded, no input element before its end is read again (callers may release those input pages). With
    ``out_dtype``, chunks come rounded to it, bit-identical to ``values.to(out_dtype)``."""
    m, filled, filled_shared, ref, dtype = _prepare(method, base, tensors, params, shared, generator, compute_dtype)
    if ref.numel() == 0:
        return
    if m.chunks is None:  # no streaming form: one chunk
        out = flat(m.fn(base, list(tensors), filled, filled_shared, generator, dtype))
        yield 0, ref.numel(), out if out_dtype is None else out.to(out_dtype)
        return
    yield from m.chunks(base, list(tensors), filled, filled_shared, generator, dtype, out_dtype=out_dtype)


def _prepare(method, base, tensors, params, shared, generator, compute_dtype):
    """Validate a merge call; return the method, filled parameters, the reference input and the compute dtype."""
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
    return m, filled, filled_shared, ref, work_dtype([t for _, t in inputs], compute_dtype)


def work_dtype(inputs: Sequence[Tensor], compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a merge computes in: float64 when asked for or when any input is float64, else float32."""
    wide = compute_dtype == torch.float64 or any(t.dtype == torch.float64 for t in inputs)
    return torch.float64 if wide else torch.float32


def _collect(parts: Iterator[tuple[int, int, Tensor]], n: int, dtype: torch.dtype) -> Tensor:
    """The whole flat tensor of a chunk stream."""
    out = torch.empty(n, dtype=dtype)
    for s, e, c in parts:
        out[s:e] = c
    return out


# ----------------------------------------------------------------------------------- method kernels
def _gta(base, tensors, params, shared, gen, dtype, sparsifier: Sparsifier | None = None,
         consensus: bool = False, out_dtype: torch.dtype | None = None) -> Iterator[tuple[int, int, Tensor]]:
    """Generalized task arithmetic: base + lambda * merge(weight_i * sparsify(model_i - base)).

    With `consensus` (TIES), signs are elected by the sum of weighted deltas and only agreeing entries
    are summed; `normalize` divides by the sum of the (agreeing) weights, as mergekit does. Chunks are computed
    in reused buffers (inputs converted straight into them, a weight of 1 not multiplied) and rounded to
    `out_dtype` by the final add: the same operations, in the same order, as one fp32 expression per element.
    """
    b, ms = flat(base), [flat(t) for t in tensors]
    weights = [float(p["weight"]) for p in params]
    applies, factors = [], []
    for m, p, w in zip(ms, params, weights, strict=True):
        apply, scale = None, 1.0
        if sparsifier is not None and p["density"] < 1:
            want_l1 = shared["rescale"] in (True, "l1")
            apply, kept, total = sparsifier.fn(m, b, p, dtype, gen, base.shape, want_l1)
            if shared["rescale"] == "density":
                scale = 1.0 / p["density"]
            elif want_l1 and total >= _EPS and kept >= _EPS:  # mergekit's |d|_1 / |keep * d|_1
                scale = total / kept
        applies.append(apply)
        factors.append(w * scale)
    div = sum(weights)
    div = 1.0 if abs(div) < 1e-8 else div
    size = min(b.numel(), chunk_size())
    bbuf, dbufs = torch.empty(size, dtype=dtype), [torch.empty(size, dtype=dtype) for _ in ms]
    abuf = torch.empty(size, dtype=dtype) if consensus else None
    one = torch.ones((), dtype=dtype)
    for s, e in chunks(b.numel()):
        bc = bbuf[: e - s].copy_(b[s:e])
        ds = []
        for m, apply, f, buf in zip(ms, applies, factors, dbufs, strict=True):
            d = buf[: e - s].copy_(m[s:e]).sub_(bc)
            d = d if apply is None else apply(s, e, d)
            ds.append(d if f == 1 else d.mul_(f))  # x * 1 == x for every x
        if consensus:  # elect the sign of the summed weighted deltas (mergekit: sum >= 0 is positive)
            acc = abuf[: e - s].copy_(ds[0]) if len(ds) == 1 else torch.add(ds[0], ds[1], out=abuf[: e - s])
            for d in ds[2:]:
                acc.add_(d)
            sgn = torch.copysign(one, acc)  # acc is -0.0 only where every delta is 0
            wsum = torch.zeros_like(acc) if shared["normalize"] else None
            acc.zero_()
            for d, w in zip(ds, weights, strict=True):
                acc.add_(d.mul_(sgn).clamp_min_(0))  # |d| where d agrees with the elected sign, else 0
                if wsum is not None:
                    wsum.add_(d.sign_(), alpha=w)  # sum of the agreeing weights
            acc.mul_(sgn)
            if wsum is not None:
                acc.div_(wsum.add_(wsum == 0))  # mergekit: a zero divisor becomes 1
        else:
            acc = ds[0]  # a buffer (or the sparsifier's fresh tensor) owned by this chunk
            for d in ds[1:]:
                acc.add_(d)
            if shared["normalize"]:
                acc.div_(div)
        if shared["lambda"] != 1:
            acc.mul_(shared["lambda"])
        yield s, e, torch.add(bc, acc, out=torch.empty(e - s, dtype=out_dtype or dtype))


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


def _linear_chunks(base, tensors, params, shared, gen, dtype, out_dtype=None) -> Iterator[tuple[int, int, Tensor]]:
    """``_linear`` chunk by chunk (same per-element operations in the same order)."""
    weights = [float(p["weight"]) for p in params]
    if shared["normalize"] and sum(weights) == 0:
        raise ValueError("linear: weights sum to 0, cannot normalize; set normalize: false")
    ts = [flat(t) for t in tensors]
    for s, e in chunks(ts[0].numel()):
        out = torch.zeros(e - s, dtype=dtype)
        for t, w in zip(ts, weights, strict=True):
            out.add_(t[s:e], alpha=w)
        if shared["normalize"]:
            out.div_(sum(weights))
        yield s, e, out if out_dtype is None else out.to(out_dtype)


def _slerp_chunks(base, tensors, params, shared, gen, dtype, out_dtype=None) -> Iterator[tuple[int, int, Tensor]]:
    """Spherical interpolation from base (t=0) to the model (t=1), whole tensor as one vector;
    linear interpolation when |cos| > 0.9995 (as mergekit 0.1.5)."""
    a, b, t = flat(base), flat(tensors[0]), float(shared["t"])
    n = a.numel()
    sq_a = sq_b = dot = 0.0
    for s, e in chunks(n):
        x, y = a[s:e].double(), b[s:e].double()
        sq_a, sq_b, dot = sq_a + float(x @ x), sq_b + float(y @ y), dot + float(x @ y)
    na, nb = math.sqrt(sq_a), math.sqrt(sq_b)
    cos = max(-1.0, min(1.0, dot / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0))))
    if abs(cos) > 0.9995:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(cos)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    for s, e in chunks(n):
        out = torch.mul(a[s:e].to(dtype), ca).add_(b[s:e].to(dtype), alpha=cb)
        yield s, e, out if out_dtype is None else out.to(out_dtype)


def _slerp(base, tensors, params, shared, gen, dtype) -> Tensor:
    """Spherical interpolation, the whole tensor at once (``_slerp_chunks`` collected)."""
    return _collect(_slerp_chunks(base, tensors, params, shared, gen, dtype), base.numel(), dtype)


@dataclass(frozen=True)
class TaskArithmeticVariant:
    """One registry row of the task-arithmetic family: mergekit's name, its pruning rule, whether signs are
    elected (TIES consensus), and the defaults of the shared ``normalize`` and ``rescale`` parameters."""

    name: str
    sparsifier: Sparsifier | None = None
    consensus: bool = False
    normalize: bool = False
    rescale: bool = False


def register_task_arithmetic(v: TaskArithmeticVariant) -> MergeMethod:
    """Register one task-arithmetic-family method; stochasticity and extra parameters come from its sparsifier."""

    def parts(base, tensors, params, shared, gen, dtype, out_dtype=None) -> Iterator[tuple[int, int, Tensor]]:
        return _gta(base, tensors, params, shared, gen, dtype, v.sparsifier, v.consensus, out_dtype)

    def fn(base, tensors, params, shared, gen, dtype) -> Tensor:
        return _collect(parts(base, tensors, params, shared, gen, dtype), base.numel(), dtype)

    pruning = v.sparsifier.name if v.sparsifier else "no"
    fn.__doc__ = f"mergekit's {v.name!r}: task arithmetic with {pruning} pruning."
    shared = {"normalize": v.normalize, "rescale": v.rescale, "lambda": 1.0, "int8_mask": False}
    per_model = {"weight": REQUIRED, "density": 1.0, **(v.sparsifier.params if v.sparsifier else {})}
    stochastic = bool(v.sparsifier and v.sparsifier.stochastic)
    return register(MergeMethod(v.name, fn, requires_base=True, shared_params=shared, input_params=per_model,
                                stochastic=stochastic, chunks=parts,
                                elementwise=v.sparsifier is None and not v.consensus))


register(MergeMethod("linear", _linear, requires_base=False, shared_params={"normalize": True},
                     input_params={"weight": REQUIRED}, stochastic=False, chunks=_linear_chunks, elementwise=True))
register(MergeMethod("slerp", _slerp, requires_base=True, shared_params={"t": REQUIRED}, input_params={},
                     stochastic=False, min_inputs=1, max_inputs=1, chunks=_slerp_chunks))
for _row in (
    TaskArithmeticVariant("task_arithmetic"),
    TaskArithmeticVariant("ties", MAGNITUDE, consensus=True, normalize=True),
    TaskArithmeticVariant("dare_ties", BERNOULLI, consensus=True, rescale=True),
    TaskArithmeticVariant("dare_linear", BERNOULLI, rescale=True),
    TaskArithmeticVariant("breadcrumbs", OUTLIERS),
    TaskArithmeticVariant("breadcrumbs_ties", OUTLIERS, consensus=True),
    TaskArithmeticVariant("della", MAGPRUNE, consensus=True, normalize=True, rescale=True),
    TaskArithmeticVariant("della_linear", MAGPRUNE, rescale=True),
):
    register_task_arithmetic(_row)
del _row
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
