"""Chunked (streamed) merging equals whole-tensor merging bit for bit, for every registered method."""

from __future__ import annotations

import pytest
import torch
from _helpers import load_all, recipe

import vlrm_rlhf.merge.executor as executor
from vlrm_rlhf.merge import build, pages, sparsify
from vlrm_rlhf.merge.methods import METHODS, SPARSIFYING, merge_tensor, merge_tensor_chunks

_SHARED = {"slerp": {"t": 0.3}, "linear": {"normalize": True}}


def _per_model(name: str, w: float) -> dict:
    """Valid per-model parameters of method ``name`` that make its pruning active."""
    p = {} if name == "slerp" else {"weight": w}
    if name in SPARSIFYING:
        p["density"] = 0.5
    if name in ("breadcrumbs", "breadcrumbs_ties"):
        p["gamma"] = 0.1
    return p


def _rand(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_chunk_stream_equals_whole_tensor(name, monkeypatch):
    monkeypatch.setattr(sparsify, "_CHUNK", 96)
    monkeypatch.setattr(sparsify, "_SAMPLE", 300)
    m = METHODS[name]
    base = _rand((37, 29), 0, torch.bfloat16)
    k = 1 if m.max_inputs == 1 else 2
    tensors = [(base.float() + 0.1 * _rand((37, 29), i + 1)).to(torch.bfloat16 if i else torch.float16)
               for i in range(k)]
    params = [_per_model(name, w) for w in (0.7, 0.4)[:k]]
    shared = _SHARED.get(name, {})

    def gen():
        return torch.Generator().manual_seed(5) if m.stochastic else None

    whole = merge_tensor(m, base, tensors, params, shared, gen())
    parts = list(merge_tensor_chunks(m, base, tensors, params, shared, gen()))
    assert len(parts) > 1, "the tiny chunk size must force several chunks"
    assert [s for s, _, _ in parts] == [0, *[e for _, e, _ in parts[:-1]]] and parts[-1][1] == whole.numel()
    streamed = torch.cat([c for _, _, c in parts]).reshape(whole.shape)
    assert streamed.dtype == whole.dtype and torch.equal(streamed, whole)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_streamed_build_equals_whole_build(name, zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(sparsify, "_CHUNK", 64)
    monkeypatch.setattr(sparsify, "_SAMPLE", 300)
    released = []
    real = pages.release
    monkeypatch.setattr(executor, "release", lambda t, *a: (released.append(t.numel()), real(t, *a)))
    trio = zoo("llava")  # extra LVLM embedding rows: the vocabulary tail path too
    kw = {"lvlm": _per_model(name, 0.6), "rm": _per_model(name, 0.5)}
    if name == "slerp":
        kw = {"lvlm": {}, "rm": None}
    r = recipe(trio, name, params=_SHARED.get(name, {}), seed=3, dtype="float32", out_dtype="bfloat16", **kw)
    if name == "slerp":  # one non-base model
        r["models"] = [{**r["models"][0], "parameters": {}}]
        r["output"] = "lvlm"
    monkeypatch.setattr(executor, "STREAM_MIN", 1 << 40)
    whole = load_all(build(r, tmp_path / "whole", progress=False))
    assert not released or all(n for n in released)
    monkeypatch.setattr(executor, "STREAM_MIN", 0)
    released.clear()
    streamed = load_all(build(r, tmp_path / "streamed", progress=False))
    assert released, "streamed inputs are released behind the cursor"
    assert whole.keys() == streamed.keys()
    for k, v in whole.items():
        assert streamed[k].dtype == v.dtype and torch.equal(streamed[k], v), k


def test_release_keeps_mapped_data_readable(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    t = _rand((3000, 17), 0)
    save_file({"a": t}, str(tmp_path / "a.safetensors"))
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as h:
        m = h.get_tensor("a")
        assert torch.equal(m, t)
        pages.release(m.reshape(-1), 0, 20000)
        pages.release(m.reshape(-1))
        assert torch.equal(m, t), "released pages are read again from the file"


def test_release_mapped_touches_only_the_current_mapped_inputs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pages, "release", lambda t, *a: calls.append(t.data_ptr()))
    anon = torch.ones(10)
    mapped = torch.zeros(10)
    pages.release_mapped(anon)
    with pages.mapped_inputs([mapped]):
        pages.release_mapped(anon)
        pages.release_mapped(mapped.reshape(-1)[2:], 0, 3)
    pages.release_mapped(mapped)
    assert calls == [mapped.data_ptr() + 2 * 4], "only a view of a current mapped input, only inside the block"
