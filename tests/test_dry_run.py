"""``merge --dry-run``: the plan from configs, tokenizers and headers only; nothing read beyond, nothing written."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import recipe
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlrm_rlhf.files import OutputExistsError
from vlrm_rlhf.merge import MergeError, build
from vlrm_rlhf.merge import checkpoint as ckpt_mod
from vlrm_rlhf.merge.dryrun import dry_run


class _HeaderOnlySlice:
    def __init__(self, s):
        self._s = s

    def get_shape(self):
        return self._s.get_shape()

    def get_dtype(self):
        return self._s.get_dtype()

    def __getitem__(self, item):
        raise AssertionError("the dry run read tensor data (a slice)")


class _HeaderOnly:
    """A safe_open stand-in that serves headers and fails on any tensor read."""

    def __init__(self, path, framework="pt", device="cpu"):
        self._h = safe_open(path, framework=framework, device=device)

    def keys(self):
        return self._h.keys()

    def metadata(self):
        return self._h.metadata()

    def get_slice(self, key):
        return _HeaderOnlySlice(self._h.get_slice(key))

    def get_tensor(self, key):
        raise AssertionError(f"the dry run read tensor data ({key})")


@pytest.fixture
def headers_only(monkeypatch):
    monkeypatch.setattr(ckpt_mod, "safe_open", _HeaderOnly)
    monkeypatch.setattr(ckpt_mod.Checkpoint, "get", lambda self, k: pytest.fail(f"tensor read: {k}"))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _with_stale_buffer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(sd, f, metadata={"format": "pt"})
    return dst


def test_dry_run_reads_no_tensor_data_and_writes_nothing(zoo, tmp_path, headers_only):
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    trio = zoo("mllama", "hub", rm_extra_pad_token=True)
    root = Path(trio["lvlm"]).parent
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe(trio, "ties", lvlm={"weight": 0.5, "density": 0.5},
                                       rm={"weight": 1.0, "density": 0.5}, seed=0)))
    before, mine = snapshot(root), snapshot(tmp_path)
    res = CliRunner().invoke(app, ["merge", str(r), "--out", str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert snapshot(root) == before and snapshot(tmp_path) == mine and not (tmp_path / "out").exists()
    text = res.output
    for expected in ("Mllama (Llama 3.2 Vision)", "hub layout", "copied from lvlm", "ties of base, lvlm, rm",
                     "appended to the LVLM's vocabulary: 1 token(s): '<rm_pad>' (from rm)",
                     "text_config.vocab_size: 64 -> 66", "output size", "peak memory", "disk needed"):
        assert expected in text, (expected, text)
    # grouped: far fewer lines than tensors, and the groups account for every output tensor
    report = dry_run(r, tmp_path / "out")
    assert sum(g.count for g in report.groups) == len(report.plan.specs)
    assert len(report.groups) < len(report.plan.specs) / 3
    assert "layers.[0-1]" in text  # a layer range, not one line per layer


def test_dry_run_reports_the_warnings_of_the_real_merge(zoo, tmp_path):
    trio = dict(zoo("llava"))
    trio["rm"] = _with_stale_buffer(trio["rm"], tmp_path / "rm")
    r = recipe(trio, "dare_ties", lvlm={"weight": 0.5, "density": 1.0}, rm={"weight": 0.5, "density": 0.5},
               params={"normalize": True})  # no seed, density 1, equal weights with normalize: three warnings
    report = dry_run(r, tmp_path / "out")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        build(r, tmp_path / "out", progress=False)
    real = list(dict.fromkeys(str(x.message) for x in w if issubclass(x.category, UserWarning)
                              and "common ancestor" not in str(x.message)))
    assert len(real) >= 4, real
    assert report.warnings == real
    for msg in real:
        assert msg in report.text()


def test_dry_run_fails_fast_on_what_headers_reveal(zoo, tmp_path, headers_only):
    trio = dict(zoo("llava"))
    rm = Path(shutil.copytree(trio["rm"], tmp_path / "rm"))
    f = rm / "model.safetensors"
    key = "model.layers.1.mlp.up_proj.weight"
    sd = load_file(f)  # safetensors.torch's own reader, not the patched one
    sd[key] = sd[key][:-1].contiguous()
    save_file(sd, f, metadata={"format": "pt"})
    bad = {**trio, "rm": rm}
    r = recipe(bad, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 0.5})
    with pytest.raises(MergeError, match=r"shape mismatch for layers\.1\.mlp\.up_proj\.weight: rm .* has \(63, 32\), "
                                         r"base .* has \(64, 32\)"):
        dry_run(r, tmp_path / "out")
    sd[key] = torch.zeros(64, 32, dtype=torch.int32)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(MergeError, match="up_proj.weight of rm model .* non-floating dtype torch.int32"):
        dry_run(r, tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        dry_run(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 0.5}), tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_the_header_only_reader_does_catch_a_tensor_read(zoo, tmp_path, headers_only):
    trio = zoo("llava")
    with pytest.raises(BaseException, match="tensor read|read tensor data"):
        build(recipe(trio), tmp_path / "out", progress=False)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_peak_estimate_follows_chunked_merging_and_bounds_the_real_peak(zoo, tmp_path, monkeypatch, method):
    """Chunked merging (outputs above STREAM_MIN) lowers the estimate, below what whole-tensor merging costs."""
    from vlrm_rlhf.merge import executor, sparsify
    from vlrm_rlhf.merge.dryrun import PROCESS_BYTES

    trio = zoo("llava")
    params = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.5}
    r = recipe(trio, method, lvlm=params, rm=params)
    monkeypatch.setattr(executor, "STREAM_MIN", 1 << 40)  # nothing streams: every tensor is merged whole
    whole = dry_run(r, tmp_path / "a").peak_bytes - PROCESS_BYTES
    monkeypatch.setattr(executor, "STREAM_MIN", 256)
    monkeypatch.setattr(sparsify, "_CHUNK", 256)
    chunked = dry_run(r, tmp_path / "b").peak_bytes - PROCESS_BYTES
    assert 0 < chunked < whole
