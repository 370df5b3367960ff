"""Fast property tests for vlrm_rlhf.merge.methods (no mergekit needed; tiny tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from vlrm_rlhf.merge import sparsify
from vlrm_rlhf.merge.methods import (
    METHODS,
    REQUIRED,
    MergeMethod,
    get_method,
    inert_parameter_warnings,
    merge_tensor,
    register,
)
from vlrm_rlhf.merge.sparsify import topk_magnitude_mask

T = torch.tensor


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the multi-chunk and sampled-threshold code paths on small tensors."""
    monkeypatch.setattr(sparsify, "_CHUNK", 257)
    monkeypatch.setattr(sparsify, "_SAMPLE", 300)


# ------------------------------------------------------------------------------------------ registry
def test_registry_has_mergekit_names_and_defaults():
    expected = {  # name: (normalize, rescale, stochastic, extra per-model params)
        "task_arithmetic": (False, False, False, set()), "ties": (True, False, False, set()),
        "dare_ties": (False, True, True, set()), "dare_linear": (False, True, True, set()),
        "breadcrumbs": (False, False, False, {"gamma"}), "breadcrumbs_ties": (False, False, False, {"gamma"}),
        "della": (True, True, True, {"epsilon"}), "della_linear": (False, True, True, {"epsilon"}),
    }
    for name, (normalize, rescale, stochastic, extra) in expected.items():
        m = get_method(name)
        assert m.requires_base and m.stochastic == stochastic
        assert dict(m.shared_params) == {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}
        assert set(m.input_params) == {"weight", "density"} | extra
        assert m.input_params["weight"] is REQUIRED and m.input_params["density"] == 1.0
    assert get_method("breadcrumbs").input_params["gamma"] == 0.01
    assert get_method("della").input_params["epsilon"] == 0.15
    assert get_method("linear").shared_params == {"normalize": True} and not get_method("linear").requires_base
    slerp = get_method("slerp")
    assert slerp.shared_params == {"t": REQUIRED} and (slerp.min_inputs, slerp.max_inputs) == (1, 1)


def test_unknown_method_lists_available():
    with pytest.raises(ValueError, match="unknown merge method 'tie'.*breadcrumbs.*ties"):
        get_method("tie")


def test_register_rejects_a_different_method_under_a_taken_name():
    other = MergeMethod("ties", lambda *a: None, True, {}, {}, False)
    with pytest.raises(ValueError, match="already registered"):
        register(other)
    assert register(METHODS["ties"]) is METHODS["ties"]  # re-registering the same object is harmless


# ---------------------------------------------------------------------------------------- linear/TA
def test_linear_single_model_weight_one_is_exact():
    x = rand(5, 7)
    for normalize in (True, False):
        assert torch.equal(merge_tensor("linear", None, [x], [{"weight": 1.0}], {"normalize": normalize}), x)


def test_linear_is_weighted_mean_and_ignores_base():
    a, b, base = rand(4, 3, seed=1), rand(4, 3, seed=2), rand(4, 3, seed=3) * 100
    out = merge_tensor("linear", base, [a, b], [{"weight": 3}, {"weight": 1}], {})
    torch.testing.assert_close(out, (3 * a + b) / 4, rtol=1e-6, atol=1e-7)
    raw = merge_tensor("linear", base, [a, b], [{"weight": 3}, {"weight": 1}], {"normalize": False})
    torch.testing.assert_close(raw, 3 * a + b, rtol=1e-6, atol=1e-7)


def test_linear_normalize_with_zero_weight_sum_raises():
    with pytest.raises(ValueError, match="sum to 0"):
        merge_tensor("linear", None, [rand(3), rand(3, seed=1)], [{"weight": 1}, {"weight": -1}], {})


def test_task_arithmetic_weight_zero_returns_base_exactly():
    base, m = rand(6, 5), rand(6, 5, seed=1)
    assert torch.equal(merge_tensor("task_arithmetic", base, [m], [{"weight": 0.0}], {}), base)


def test_task_arithmetic_formula_lambda_and_normalize():
    base, a, b = rand(10), rand(10, seed=1), rand(10, seed=2)
    p = [{"weight": 0.6}, {"weight": 0.2}]
    mixed = 0.6 * (a - base) + 0.2 * (b - base)
    out = merge_tensor("task_arithmetic", base, [a, b], p, {"lambda": 1.5})
    torch.testing.assert_close(out, base + 1.5 * mixed, rtol=1e-6, atol=1e-6)
    out = merge_tensor("task_arithmetic", base, [a, b], p, {"normalize": True})
    torch.testing.assert_close(out, base + mixed / 0.8, rtol=1e-6, atol=1e-6)


def test_ties_density_one_single_model_equals_task_arithmetic():
    base, m = rand(8, 8), rand(8, 8, seed=1)
    for normalize in (False, True):
        shared = {"normalize": normalize}
        ties = merge_tensor("ties", base, [m], [{"weight": 0.7, "density": 1.0}], shared)
        ta = merge_tensor("task_arithmetic", base, [m], [{"weight": 0.7}], shared)
        torch.testing.assert_close(ties, ta, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- TIES
def test_ties_sign_election_sums_weighted_deltas():
    # Element 0: counting signs (+,+,-) or summing raw deltas (1+1-1.5 > 0) says "+", the weighted sum
    # (1+1-3 < 0) says "-". Element 1: raw sum 1-1 = 0 ("+"), weighted sum 1-3 < 0 ("-").
    base = torch.zeros(2)
    models = [T([1.0, 1.0]), T([1.0, 0.0]), T([-1.5, -1.0])]
    params = [{"weight": 1.0}, {"weight": 1.0}, {"weight": 2.0}]
    out = merge_tensor("ties", base, models, params, {"normalize": False})
    assert torch.equal(out, T([-3.0, -2.0]))
    out = merge_tensor("ties", base, models, params, {})  # normalize: by the agreeing weight only (2)
    assert torch.equal(out, T([-1.5, -1.0]))


def test_ties_normalize_divides_by_sum_of_agreeing_weights():
    base = torch.zeros(3)
    models = [T([2.0, 2.0, 0.0]), T([4.0, 0.0, 0.0]), T([-1.0, 0.0, 0.0])]
    params = [{"weight": 0.5}, {"weight": 0.25}, {"weight": 1.0}]
    # element 0: weighted [1, 1, -1] -> "+", agreeing weights 0.5 + 0.25; element 1: only model 0 is
    # nonzero (a zero delta never agrees); element 2: no agreeing weight -> divisor 1.
    out = merge_tensor("ties", base, models, params, {})
    torch.testing.assert_close(out, T([2.0 / 0.75, 1.0 / 0.5, 0.0]), rtol=0, atol=0)
    out = merge_tensor("ties", base, models, params, {"normalize": False, "lambda": 2.0})
    assert torch.equal(out, T([4.0, 2.0, 0.0]))


def test_ties_keeps_top_k_magnitudes():
    base = torch.zeros(6)
    m = T([0.1, -5.0, 0.3, 4.0, -0.2, 1.0])
    out = merge_tensor("ties", base, [m], [{"weight": 1.0, "density": 0.5}], {"normalize": False})
    assert torch.equal(out, T([0.0, -5.0, 0.0, 4.0, 0.0, 1.0]))


def test_rescale_l1_vs_density_on_handmade_case():
    base, m = torch.zeros(4), T([4.0, -3.0, 2.0, 1.0])  # density 0.5 keeps 4 and -3
    p = [{"weight": 1.0, "density": 0.5}]
    run = lambda rescale: merge_tensor("ties", base, [m], p, {"normalize": False, "rescale": rescale})  # noqa: E731
    assert torch.equal(run(False), T([4.0, -3.0, 0.0, 0.0]))
    torch.testing.assert_close(run(True), T([4.0, -3.0, 0.0, 0.0]) * 10 / 7, rtol=1e-6, atol=0)  # |d|1/|kept|1
    assert torch.equal(run("l1"), run(True))
    assert torch.equal(run("density"), T([8.0, -6.0, 0.0, 0.0]))  # original DARE: 1/density


def test_rescale_is_skipped_below_mergekit_eps():
    base, m = torch.zeros(4), T([4e-8, -3e-8, 2e-8, 1e-8])  # |d|_1 = 1e-7 > eps but kept part < eps
    out = merge_tensor("ties", base, [m], [{"weight": 1.0, "density": 0.5}], {"normalize": False, "rescale": True})
    assert torch.equal(out, T([4e-8, -3e-8, 0.0, 0.0]))


@pytest.mark.parametrize("chunks", ["default", "small"])
def test_topk_mask_equals_argsort_topk(chunks, request):
    if chunks == "small":
        request.getfixturevalue("small_chunks")
    for n, seed in ((1, 0), (2, 1), (97, 2), (1000, 3), (5000, 4)):
        x = rand(n, seed=seed)
        order = torch.argsort(x.abs(), descending=True)
        for k in sorted({0, 1, 2, n // 3, n // 2, n - 1, n}):
            ref = torch.zeros(n, dtype=torch.bool)
            ref[order[:k]] = True
            assert torch.equal(topk_magnitude_mask(x, k), ref), (n, k)


def test_ties_density_extremes_keep_one_and_all(small_chunks):
    base, m = torch.zeros(3000), rand(3000, seed=5)
    tiny = merge_tensor("ties", base, [m], [{"weight": 1.0, "density": 1e-9}], {"normalize": False})
    assert torch.count_nonzero(tiny) == 1 and tiny.abs().argmax() == m.abs().argmax()  # k = max(1, ...)
    full = merge_tensor("ties", base, [m], [{"weight": 1.0, "density": 1.0}], {"normalize": False})
    assert torch.equal(full, m)


def test_topk_exact_with_heavy_ties_and_forced_retries(monkeypatch, small_chunks):
    monkeypatch.setattr(sparsify, "_MARGIN", (0.0, 0))  # zero-width bracket: the sample almost always misses
    passes = []
    real_delta = sparsify._delta
    monkeypatch.setattr(sparsify, "_delta", lambda *a: passes.append(a[2]) or real_delta(*a))
    x = torch.round(rand(4000, seed=6) * 4) / 4  # few distinct magnitudes, zeros included
    for k in (1, 700, 2000, 3999):
        m = topk_magnitude_mask(x, k)
        tau = x.abs().kthvalue(4000 - k + 1).values
        assert int(m.sum()) == k and bool((x.abs()[m] >= tau).all()) and bool((x.abs()[~m] <= tau).all())
    assert passes.count(0) > 4 + 4  # sample + first pass per k, and at least one retry pass


def test_multi_chunk_results_equal_single_chunk(monkeypatch):
    base, a, b = rand(3001, seed=1), rand(3001, seed=2), rand(3001, seed=3)
    cases = [
        ("ties", [{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6}], {"rescale": True}),
        ("breadcrumbs_ties", [{"weight": 0.7, "density": 0.5, "gamma": 0.1}, {"weight": 0.5, "density": 0.6}], {}),
        ("task_arithmetic", [{"weight": 0.7}, {"weight": 0.5}], {"lambda": 0.5}),
    ]
    whole = [merge_tensor(m, base, [a, b], p, s) for m, p, s in cases]
    whole.append(merge_tensor("slerp", base, [a], [{}], {"t": 0.3}))
    monkeypatch.setattr(sparsify, "_CHUNK", 100)
    monkeypatch.setattr(sparsify, "_SAMPLE", 256)
    chunked = [merge_tensor(m, base, [a, b], p, s) for m, p, s in cases]
    chunked.append(merge_tensor("slerp", base, [a], [{}], {"t": 0.3}))
    for x, y in zip(whole, chunked, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_breadcrumbs_drops_outliers_and_smallest():
    base, m = torch.zeros(10), torch.arange(1.0, 11.0)
    # keep int(0.6*10) = 6, drop the int(0.1*10) = 1 largest, so ascending ranks [3, 9) survive: 4..9
    out = merge_tensor("breadcrumbs", base, [m], [{"weight": 1.0, "density": 0.6, "gamma": 0.1}], {})
    assert torch.equal(out, torch.where((m >= 4) & (m <= 9), m, 0.0))
    # density + gamma > 1: mergekit shrinks the outlier cut, keeping the smallest int(density*n)
    out = merge_tensor("breadcrumbs", base, [m], [{"weight": 1.0, "density": 0.95, "gamma": 0.1}], {})
    assert torch.equal(out, torch.where(m <= 9, m, 0.0))


# --------------------------------------------------------------------------------------------- SLERP
def test_slerp_endpoints_orthogonal_and_parallel():
    base, other = rand(4, 6, seed=1), rand(4, 6, seed=2)
    torch.testing.assert_close(merge_tensor("slerp", base, [other], [{}], {"t": 0.0}), base, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merge_tensor("slerp", base, [other], [{}], {"t": 1.0}), other, rtol=1e-6, atol=1e-6)
    half = merge_tensor("slerp", T([1.0, 0.0]), [T([0.0, 1.0])], [{}], {"t": 0.5})
    torch.testing.assert_close(half, T([math.sqrt(0.5), math.sqrt(0.5)]), rtol=1e-6, atol=0)
    for far in (2.5 * base, -3.0 * base):  # parallel and antiparallel: plain linear interpolation
        out = merge_tensor("slerp", base, [far], [{}], {"t": 0.3})
        torch.testing.assert_close(out, 0.7 * base + 0.3 * far, rtol=1e-6, atol=1e-6)


def test_slerp_treats_the_whole_tensor_as_one_vector():
    base, other = T([[1.0, 0.0], [1.0, 0.0]]), T([[2.0, 0.0], [0.0, 1.0]])  # row 0 parallel, row 1 not
    theta = math.acos(2 / (math.sqrt(2) * math.sqrt(5)))
    t = 0.4
    expected = (math.sin((1 - t) * theta) * base + math.sin(t * theta) * other) / math.sin(theta)
    torch.testing.assert_close(merge_tensor("slerp", base, [other], [{}], {"t": t}), expected, rtol=1e-6, atol=1e-7)


def test_slerp_needs_base_and_exactly_one_model():
    with pytest.raises(ValueError, match="base"):
        merge_tensor("slerp", None, [rand(3)], [{}], {"t": 0.5})
    with pytest.raises(ValueError, match="at most 1"):
        merge_tensor("slerp", rand(3), [rand(3), rand(3)], [{}, {}], {"t": 0.5})
    with pytest.raises(ValueError, match="slerp: missing required parameter 't'"):
        merge_tensor("slerp", rand(3), [rand(3)], [{}], {})


# ---------------------------------------------------------------------------------------- stochastic
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_stochastic_methods_are_seeded_by_the_generator_only(name):
    base, a, b = rand(50, 40, seed=1), rand(50, 40, seed=2), rand(50, 40, seed=3)
    p = [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3}]
    global_state = torch.get_rng_state()
    one = merge_tensor(name, base, [a, b], p, {}, generator=gen(11))
    two = merge_tensor(name, base, [a, b], p, {}, generator=gen(11))
    other = merge_tensor(name, base, [a, b], p, {}, generator=gen(12))
    assert torch.equal(one, two) and not torch.equal(one, other)
    assert torch.equal(torch.get_rng_state(), global_state)
    with pytest.raises(ValueError, match="seed"):
        merge_tensor(name, base, [a, b], p, {})


def test_dare_keeps_density_fraction_and_rescales():
    base, m = torch.zeros(20000), rand(20000, seed=4)
    p = [{"weight": 1.0, "density": 0.3}]
    l1 = merge_tensor("dare_linear", base, [m], p, {}, generator=gen(0))
    kept = l1 != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(l1.abs().sum(), m.abs().sum(), rtol=1e-5, atol=0)  # L1 norm restored
    dens = merge_tensor("dare_linear", base, [m], p, {"rescale": "density"}, generator=gen(0))
    torch.testing.assert_close(dens, torch.where(kept, m / 0.3, 0.0), rtol=1e-6, atol=0)  # same mask
    plain = merge_tensor("dare_linear", base, [m], p, {"rescale": False}, generator=gen(0))
    assert torch.equal(plain, torch.where(kept, m, 0.0))


def test_della_keep_probability_grows_with_magnitude():
    base, m = torch.zeros(20, 200, 20), rand(20, 200, 20, seed=9)  # mergekit ranks along dim 1
    out = merge_tensor("della_linear", base, [m], [{"weight": 1.0, "density": 0.5, "epsilon": 0.4}],
                       {"rescale": False}, generator=gen(3))
    rank = m.abs().argsort(dim=1).argsort(dim=1)
    kept = out != 0
    low, high = kept[rank < 40].float().mean().item(), kept[rank >= 160].float().mean().item()
    # p = 0.1 + 0.8 * rank / 199: mean rank 19.5 -> 0.178, mean rank 179.5 -> 0.822
    assert abs(low - 0.178) < 0.02 and abs(high - 0.822) < 0.02 and abs(kept.float().mean().item() - 0.5) < 0.02


# ---------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("method", "params", "shared", "match"),
    [
        ("ties", [{"weight": 1.0, "density": 1.5}], {}, r"ties: parameter 'density' must be in \(0, 1\], got 1.5 for model 0"),
        ("ties", [{"weight": 1.0, "density": 0}], {}, r"'density'.*got 0 for model 0"),
        ("ties", [{"density": 0.5}], {}, r"ties: missing required parameter 'weight' for model 0"),
        ("ties", [{"weight": 1.0, "dens": 0.5}], {}, r"ties: unknown parameter 'dens' for model 0"),
        ("ties", [{"weight": 1.0}], {"normalise": True}, r"unknown parameter 'normalise' for shared"),
        ("ties", [{"weight": 1.0}], {"normalize": "yes"}, r"'normalize' must be true or false"),
        ("ties", [{"weight": 1.0}], {"rescale": "l2"}, r"'rescale' must be .*'density'"),
        ("ties", [{"weight": float("nan")}], {}, r"'weight' must be a finite number"),
        ("ties", [{"weight": True}], {}, r"'weight'"),
        ("task_arithmetic", [{"weight": 1.0, "gamma": 0.1}], {}, r"unknown parameter 'gamma'"),
        ("della", [{"weight": 1.0, "density": 0.1, "epsilon": 0.15}], {}, r"della: parameter 'epsilon'.*density=0.1"),
        ("breadcrumbs", [{"weight": 1.0, "density": 0.5, "gamma": 1.0}], {}, r"'gamma' must be in \[0, 1\)"),
        ("linear", [{"weight": 1.0, "density": 0.5}], {}, r"linear: unknown parameter 'density'"),
        ("slerp", [{}], {"t": "0.5"}, r"slerp: parameter 't' must be a finite number"),
    ],
)
def test_bad_parameters_name_the_key_and_method(method, params, shared, match):
    with pytest.raises(ValueError, match=match):
        merge_tensor(method, rand(4), [rand(4, seed=1)], params, shared, generator=gen())


def test_structural_errors():
    with pytest.raises(ValueError, match=r"model 0 has shape \(4, 3\) but base has shape \(3, 4\)"):
        merge_tensor("task_arithmetic", rand(3, 4), [rand(4, 3)], [{"weight": 1.0}], {})
    with pytest.raises(ValueError, match=r"model 1 has shape \(5,\).*model 0 has shape \(4,\)"):
        merge_tensor("linear", None, [rand(4), rand(5)], [{"weight": 1.0}, {"weight": 1.0}], {})
    with pytest.raises(ValueError, match="2 tensors but 1 parameter"):
        merge_tensor("linear", None, [rand(4), rand(4)], [{"weight": 1.0}], {})
    with pytest.raises(ValueError, match="base model tensor is required"):
        merge_tensor("ties", None, [rand(4)], [{"weight": 1.0}], {})
    with pytest.raises(ValueError, match="at least 1"):
        merge_tensor("task_arithmetic", rand(4), [], [], {})
    with pytest.raises(ValueError, match="non-floating"):
        merge_tensor("linear", None, [torch.arange(4)], [{"weight": 1.0}], {})


ALL_CASES = [
    ("linear", [{"weight": 0.3}, {"weight": 0.9}], {}),
    ("task_arithmetic", [{"weight": 0.3}, {"weight": 0.9}], {"lambda": 0.5}),
    ("ties", [{"weight": 0.3, "density": 0.5}, {"weight": 0.9, "density": 0.4}], {"rescale": True}),
    ("dare_ties", [{"weight": 0.3, "density": 0.5}, {"weight": 0.9, "density": 0.4}], {}),
    ("dare_linear", [{"weight": 0.3, "density": 0.5}, {"weight": 0.9, "density": 0.4}], {}),
    ("breadcrumbs", [{"weight": 0.3, "density": 0.5}, {"weight": 0.9, "density": 0.4}], {}),
    ("breadcrumbs_ties", [{"weight": 0.3, "density": 0.5}, {"weight": 0.9, "density": 0.4}], {}),
    ("della", [{"weight": 0.3, "density": 0.5}, {"weight": 0.9, "density": 0.4}], {}),
    ("della_linear", [{"weight": 0.3, "density": 0.5}, {"weight": 0.9, "density": 0.4}], {}),
    ("slerp", [{}], {"t": 0.3}),
]


@pytest.mark.parametrize(("name", "params", "shared"), ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_inputs_not_mutated_and_dtypes(name, params, shared, small_chunks):
    base, a, b = rand(30, 20, seed=1), rand(30, 20, seed=2), rand(30, 20, seed=3)
    models = [a, b][: len(params)]
    copies = [t.clone() for t in (base, *models)]
    out = merge_tensor(name, base, models, params, shared, generator=gen())
    assert out.shape == base.shape and out.dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip((base, *models), copies, strict=True))
    out64 = merge_tensor(name, base.double(), [m.double() for m in models], params, shared, generator=gen())
    assert out64.dtype == torch.float64
    half = merge_tensor(name, base.bfloat16(), [m.bfloat16() for m in models], params, shared, generator=gen())
    assert half.dtype == torch.float32  # low-precision inputs are merged in float32
    if not get_method(name).stochastic:
        up = merge_tensor(name, base.bfloat16().float(), [m.bfloat16().float() for m in models], params, shared)
        torch.testing.assert_close(half, up, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ inert warnings
def test_inert_warnings_normalize_density_gamma_linear():
    w = inert_parameter_warnings("ties", {}, [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}])
    assert len(w) == 1 and "normalize: false" in w[0] and "`lambda`" in w[0] and "cancel" in w[0]
    w = inert_parameter_warnings("ties", {"normalize": False}, [{"weight": 1.0}, {"weight": 0.5, "density": 0.3}])
    assert len(w) == 1 and "density=1 for model(s) [0]" in w[0] and "no-op" in w[0]
    w = inert_parameter_warnings("breadcrumbs", {}, [{"weight": 1.0, "gamma": 0.05}])
    assert any("gamma is ignored for model(s) [0]" in x and "density < 1" in x for x in w)
    w = inert_parameter_warnings("linear", {}, [{"weight": 0.5}])
    assert len(w) == 1 and "single model" in w[0] and "normalize: false" in w[0]
    w = inert_parameter_warnings("task_arithmetic", {"rescale": True}, [{"weight": 1.0}, {"weight": 1.0}])
    assert len(w) == 1 and "rescale has no effect" in w[0]
    w = inert_parameter_warnings("task_arithmetic", {"normalize": True}, [{"weight": 1.0}, {"weight": -1.0}])
    assert any("sum to ~0" in x for x in w)


def test_no_inert_warnings_for_effective_settings():
    assert inert_parameter_warnings("task_arithmetic", {}, [{"weight": 0.7}, {"weight": 0.3}]) == []
    assert inert_parameter_warnings("dare_ties", {}, [{"weight": 0.7, "density": 0.5}]) == []
    assert inert_parameter_warnings("linear", {}, [{"weight": 0.7}, {"weight": 0.3}]) == []
    assert inert_parameter_warnings("slerp", {"t": 0.5}, [{}]) == []


def test_float64_threshold_is_exact_in_float64():
    # 0.7 - 1e-12 rounds to the same float32 as 0.7: a float32 threshold would keep both
    base, m = torch.zeros(3, dtype=torch.float64), T([0.7, 0.7 - 1e-12, 0.1], dtype=torch.float64)
    out = merge_tensor("ties", base, [m], [{"weight": 1.0, "density": 0.34}], {})
    assert torch.equal(out, T([0.7, 0.0, 0.0], dtype=torch.float64))


def test_inert_warnings_read_top_level_per_model_defaults():
    w = inert_parameter_warnings("ties", {"density": 0.5, "normalize": False}, [{"weight": 1.0}, {"weight": 0.5}])
    assert w == []
    w = inert_parameter_warnings("breadcrumbs", {"gamma": 0.05}, [{"weight": 1.0}])
    assert any("gamma is ignored" in x for x in w)


# ------------------------------------------------------------------------------------------ packed masks
def test_packed_mask_round_trips_uneven_appends_and_unaligned_reads():
    n = 1001
    ref = torch.rand(n, generator=gen(5)) < 0.4
    mask = sparsify.PackedMask(n)
    assert mask.bits.nbytes == (n + 7) // 8  # a bit per entry, not a byte
    with pytest.raises(ValueError, match="before all 1001"):
        mask.append(ref[:3]), mask[0:3]
    for s, e in [(3, 253), (253, 261), (261, 1000), (1000, 1001)]:
        mask.append(ref[s:e])
    for s, e in [(0, 1001), (0, 1), (7, 9), (8, 16), (13, 700), (999, 1001), (500, 500)]:
        assert torch.equal(mask[s:e], ref[s:e]), (s, e)
    with pytest.raises(ValueError, match="1002 entries"):
        mask.append(ref[:1])


@pytest.mark.parametrize("name", ["bernoulli", "magprune"])
@pytest.mark.parametrize("shape", [(37, 53), (3000,), (4, 3, 5, 5), (1, 1)])
def test_random_masks_equal_a_whole_tensor_draw(name, shape, small_chunks):
    """DARE's and DELLA's chunked, bit-packed masks keep exactly the entries a whole-tensor draw keeps."""
    m, b = rand(*shape, seed=1, dtype=torch.bfloat16), rand(*shape, seed=2, dtype=torch.bfloat16)
    d, eps = 0.4, 0.1
    x = m.float() - b.float()
    g = gen(3)
    if name == "bernoulli":
        ref = torch.cat([torch.rand(min(257, x.numel() - s), generator=g) < d for s in range(0, x.numel(), 257)])
    else:  # in-row magnitude ranks along dim 1, rows of at most 257 // cols per draw (as the chunked code)
        moved = x.reshape(1, -1) if x.dim() < 2 else x.movedim(1, -1)
        rows = moved.abs().reshape(-1, moved.shape[-1])
        step, parts = max(1, 257 // rows.shape[1]), []
        for r in range(0, rows.shape[0], step):
            blk = rows[r : r + step]
            c = blk.shape[1]
            ranks = torch.arange(c, dtype=torch.float32) / (c - 1) if c > 1 else torch.full((1,), 0.5)
            prob = torch.empty_like(blk).scatter_(1, blk.argsort(dim=1), ranks.expand_as(blk))
            parts.append(torch.bernoulli(prob * (2 * eps) + (d - eps), generator=g).bool())
        ref = torch.cat(parts).reshape(moved.shape)
        ref = (ref if x.dim() < 2 else ref.movedim(-1, 1)).reshape(-1)
    apply, kept, total = getattr(sparsify, name)(m.reshape(-1), b.reshape(-1), {"density": d, "epsilon": eps},
                                                 torch.float32, gen(3), torch.Size(shape), True)
    flat_x = x.reshape(-1)
    out = torch.cat([apply(s, e, flat_x[s:e].clone()) for s, e in [(0, 5), (5, 300), (300, flat_x.numel())]
                     if s < flat_x.numel()])
    assert torch.equal(out, flat_x * ref)
    assert math.isclose(total, float(flat_x.abs().sum()), rel_tol=1e-5)
    assert math.isclose(kept, float((flat_x.abs() * ref).sum()), rel_tol=1e-5)
