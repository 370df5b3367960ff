"""The build's I/O pipeline: early writeback, page-cache dropping behind the merge and pinned math threads change
how bytes move, never which bytes are written."""

from __future__ import annotations

import os

import torch
from _helpers import load_all, recipe

import vlrm_rlhf.merge.executor as executor
from vlrm_rlhf.merge import build, pages, writer
from vlrm_rlhf.merge.writer import ShardWriter, TensorSpec


def _advice_calls(monkeypatch) -> list[tuple[int, int, int]]:
    """Record every ``posix_fadvise`` call (fd, offset, length) with DONTNEED, passing all calls through."""
    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            calls.append((fd, offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    return calls


def _write(path, specs, tensors, drop):
    w = ShardWriter(path, list(specs), specs, {"format": "pt"}, drop=drop)
    for n, t in tensors.items():
        w.begin(n)
        for part in t.reshape(-1).split(777):  # odd-sized appends: stretches end mid-tensor
            w.append(part)
    w.close()


def test_writer_writes_back_and_drops_only_written_bytes(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(5000 + 13 * i, generator=g).to(torch.bfloat16) for i in range(4)}
    specs = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in tensors.items()}
    _write(tmp_path / "plain.safetensors", specs, tensors, drop=False)  # WRITEBACK stays far above the file size
    calls = _advice_calls(monkeypatch)
    monkeypatch.setattr(writer, "WRITEBACK", 4096)
    _write(tmp_path / "dropped.safetensors", specs, tensors, drop=True)
    data = (tmp_path / "dropped.safetensors").read_bytes()
    assert data == (tmp_path / "plain.safetensors").read_bytes()
    assert len(calls) > 3, "several written stretches are dropped from the page cache"
    spans = [(o, o + n) for _, o, n in calls]
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "consecutive stretches"
    assert spans[-1][1] < len(data), "the newest stretch stays (it may still be in flight)"


def test_prefetcher_drops_only_consumed_steps(tmp_path, monkeypatch):
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(3 * 65536))
    steps = [[(f, 0, 65536)], [(f, 65536, 131072)], [(f, 131072, 196608)]]
    calls = _advice_calls(monkeypatch)
    with pages.Prefetcher(steps, window=1 << 20, piece=4096, drop=True) as ahead:
        ahead.done(0)
        ahead.done(1)
    assert sorted((o, n) for _, o, n in calls) == [(0, 65536), (65536, 65536)]
    calls.clear()
    with pages.Prefetcher(steps, drop=False) as ahead:
        ahead.done(0)
    assert calls == [], "without drop nothing leaves the page cache"


def test_build_drops_caches_pins_threads_and_writes_the_same_bytes(zoo, tmp_path, monkeypatch):
    trio = zoo("llava")
    r = recipe(trio, "ties", lvlm={"weight": 0.6, "density": 0.5}, rm={"weight": 0.5, "density": 0.5}, seed=3,
               dtype="float32", out_dtype="bfloat16")
    monkeypatch.setattr(executor, "STREAM_MIN", 0)
    plain = load_all(build(r, tmp_path / "plain", progress=False))
    seen: list[int] = []
    real = executor.MergeExecutor.produce_chunks

    def produce_chunks(self, name, **kw):
        seen.append(torch.get_num_threads())
        yield from real(self, name, **kw)

    monkeypatch.setattr(executor.MergeExecutor, "produce_chunks", produce_chunks)
    monkeypatch.setattr(executor, "usable_cores", lambda: [0, 1, 2])  # one core left once I/O has its two
    monkeypatch.setattr(executor, "CACHE_SHARE", 0.0)  # every build counts as larger than memory
    monkeypatch.setattr(writer, "WRITEBACK", 4096)
    calls = _advice_calls(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dropped = load_all(build(r, tmp_path / "dropped", progress=False))
        assert set(seen) == {1} and torch.get_num_threads() == 2, "math on one thread, the count restored after"
    finally:
        torch.set_num_threads(before)
    assert calls, "inputs and output were dropped from the page cache"
    assert plain.keys() == dropped.keys()
    for k, v in plain.items():
        assert dropped[k].dtype == v.dtype and torch.equal(dropped[k], v), k


def test_math_threads_leave_cores_to_io(monkeypatch):
    monkeypatch.setattr(executor, "usable_cores", lambda: [0, 1])
    assert executor._math_threads() == 1
    monkeypatch.setattr(executor, "usable_cores", lambda: list(range(16)))
    assert executor._math_threads() == min(torch.get_num_threads(), 14)
