"""``merge.reader.DirectReader``: windows read with O_DIRECT (or plain reads where it is refused) hold exactly the
bytes a memory-mapped tensor sees, at any offset and dtype; element-wise builds through it equal mapped builds."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from _helpers import load_all, recipe
from safetensors import safe_open
from safetensors.torch import save_file

import vlrm_rlhf.merge.executor as executor
from vlrm_rlhf.merge import build
from vlrm_rlhf.merge.reader import DirectReader

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.fixture
def shard(tmp_path):
    """A safetensors file with odd-sized tensors of four dtypes: most data offsets are not page-aligned."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(3001 + 7 * i, generator=g).to(d) for i, d in enumerate(DTYPES)}
    tensors["odd"] = torch.randn(5, generator=g).to(torch.bfloat16)  # shifts what follows it
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    ranges = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
              if k != "__metadata__"}
    return path, tensors, ranges


def _windows(reader, path, tensors, ranges, key):
    t = tensors[key]
    src = (path, *ranges[key], t.dtype)
    got = [(s, e, v[0].clone()) for s, e, v in reader.windows([src, src], t.numel())]
    return t, got


@pytest.mark.parametrize("direct", [True, False])
def test_windows_equal_mapped_tensors(shard, direct):
    path, tensors, ranges = shard
    with DirectReader(window_bytes=5000, direct=direct) as reader, safe_open(str(path), "pt") as f:
        for key in tensors:
            t, got = _windows(reader, path, tensors, ranges, key)
            assert len(got) > 1 or t.numel() < 2500, "a small window forces several windows"
            assert got[0][0] == 0 and got[-1][1] == t.numel()
            assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
            assert torch.equal(torch.cat([v for *_, v in got]), f.get_tensor(key)), key


def test_unaligned_element_offset_reads_plainly(shard):
    """A range whose start is odd inside its page cannot become a bf16 view of a direct read: plain pread."""
    path, tensors, ranges = shard
    s, e = ranges["t2"]  # float32 bytes read as bfloat16 from one byte in
    src = (path, s + 1, e - 1, torch.bfloat16)
    with DirectReader(window_bytes=4096) as reader:
        got = torch.cat([v[0].clone() for *_, v in reader.windows([src], (e - s - 2) // 2)])
    raw = torch.frombuffer(bytearray(path.read_bytes()[s + 1 : e - 1]), dtype=torch.bfloat16)
    assert torch.equal(got.view(torch.int16), raw.view(torch.int16))


def test_refused_direct_io_falls_back(shard, monkeypatch):
    path, tensors, ranges = shard
    real = os.open

    def no_direct(p, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(p, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    with DirectReader(window_bytes=4096) as reader:
        t, got = _windows(reader, path, tensors, ranges, "t0")
    assert torch.equal(torch.cat([v for *_, v in got]), t)


def test_truncated_file_names_it(shard):
    path, tensors, ranges = shard
    s, e = ranges["t3"]
    with open(path, "r+b") as f:
        f.truncate(s + 100)
    with DirectReader() as reader, pytest.raises(OSError, match=str(path.name)):
        list(reader.windows([(path, s, e, torch.float64)], (e - s) // 8))


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_direct_build_equals_mapped_build(method, zoo, tmp_path, monkeypatch):
    """Same bytes and the same ancestry estimate whether inputs are read directly or memory-mapped."""
    trio = zoo("llava")
    kw = {"lvlm": {"weight": 0.6}, "rm": {"weight": 0.5}}
    r = recipe(trio, method, seed=3, dtype="float32", out_dtype="bfloat16", **kw)
    monkeypatch.setattr(executor, "STREAM_MIN", 0)
    reports: list[dict] = []
    real_report = executor.MergeExecutor.ancestor_report
    monkeypatch.setattr(executor.MergeExecutor, "ancestor_report",
                        lambda self: reports.append(real_report(self)) or reports[-1])
    windows: list[int] = []
    real_windows = DirectReader.windows

    def counted(self, sources, numel):
        for w in real_windows(self, sources, numel):
            windows.append(w[1] - w[0])
            yield w

    monkeypatch.setattr(DirectReader, "windows", counted)
    monkeypatch.setattr("vlrm_rlhf.merge.reader.WINDOW_BYTES", 4096)  # several windows per tensor
    direct = load_all(build(r, tmp_path / "direct", progress=False))
    assert windows, "element-wise merges read through the direct reader"
    monkeypatch.setattr(executor.MergeExecutor, "_direct_sources", lambda self, name: None)
    mapped = load_all(build(r, tmp_path / "mapped", progress=False))
    assert direct.keys() == mapped.keys()
    for k, v in mapped.items():
        assert direct[k].dtype == v.dtype and torch.equal(direct[k], v), k
    assert reports[0] == reports[1]
    if method == "task_arithmetic":
        assert reports[0], "the ancestry sample was taken from the windows"
