"""device / device_map / dtype / attn_implementation reach ``from_pretrained`` from the scorer, reward_funcs, the
CLI and the launch-script arguments; a VLRM loads straight into its target dtype."""

from __future__ import annotations

import pytest
import torch
import transformers
from _helpers import recipe
from typer.testing import CliRunner

from vlrm_rlhf.merge import build
from vlrm_rlhf.reward.scorer import ScorerError, VLRewardScorer, resolve_dtype

PROMPT = [{"role": "user", "content": [{"type": "text", "text": "what color is the car ?"}]}]


@pytest.fixture(scope="module")
def vlrm_dir(zoo, tmp_path_factory):
    trio = zoo("llava")
    out = tmp_path_factory.mktemp("vlrm_load") / "vlrm"
    return build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), out, progress=False)


@pytest.fixture
def calls(monkeypatch):
    """Record the keyword arguments of every AutoModelForSequenceClassification.from_pretrained call."""
    seen: list[dict] = []
    real = transformers.AutoModelForSequenceClassification.from_pretrained.__func__

    def spy(cls, path, *a, **kw):
        seen.append(kw)
        return real(cls, path, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", classmethod(spy))
    return seen


def test_bf16_loads_as_bf16_without_an_fp32_copy(vlrm_dir, calls):
    sc = VLRewardScorer.from_pretrained(vlrm_dir, dtype="bfloat16")
    assert calls[-1]["dtype"] is torch.bfloat16, "the dtype goes to from_pretrained (no fp32 load, then a cast)"
    assert {p.dtype for p in sc.model.parameters()} == {torch.bfloat16}
    r = sc.score(prompts=[PROMPT], responses=["red"])
    assert len(r) == 1 and torch.isfinite(torch.tensor(r)).all()


def test_device_map_and_attn_implementation_reach_from_pretrained(vlrm_dir, calls):
    sc = VLRewardScorer.from_pretrained(vlrm_dir, device_map="auto", attn_implementation="eager")
    assert calls[-1]["device_map"] == "auto" and calls[-1]["attn_implementation"] == "eager"
    assert sc.device.type == "cpu" and sc.model.config._attn_implementation == "eager"
    VLRewardScorer.from_pretrained(vlrm_dir, device="cpu", dtype=torch.float32)
    assert calls[-1]["device_map"] == "cpu" and calls[-1]["dtype"] is torch.float32
    with pytest.raises(ScorerError, match="not both"):
        VLRewardScorer.from_pretrained(vlrm_dir, device="cpu", device_map="auto")


def test_reward_funcs_pass_loading_options(vlrm_dir, calls):
    from vlrm_rlhf import reward_funcs

    (r,) = reward_funcs(vlrm_dir, dtype="bfloat16", device_map="auto", attn_implementation="sdpa")
    assert calls[-1]["dtype"] is torch.bfloat16 and calls[-1]["device_map"] == "auto"
    assert calls[-1]["attn_implementation"] == "sdpa"
    assert next(r.scorer.model.parameters()).dtype is torch.bfloat16 and r._device_pinned


def test_cli_and_script_arguments_pass_loading_options(vlrm_dir, calls, tmp_path, monkeypatch):
    import json
    import sys

    from vlrm_rlhf.cli import app
    from vlrm_rlhf.scripts import RewardScriptArguments

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "what color is the car ?", "response": "red"}) + "\n")
    res = CliRunner().invoke(app, ["score", "-i", str(rows), "-m", str(vlrm_dir), "-o", str(tmp_path / "o.jsonl"),
                                   "--mode", "no_image", "--device", "auto", "--dtype", "bfloat16",
                                   "--attn-implementation", "eager"])
    assert res.exit_code == 0, res.output
    assert calls[-1]["device_map"] == "auto" and calls[-1]["dtype"] is torch.bfloat16
    assert calls[-1]["attn_implementation"] == "eager"
    for cmd in (["rerank"], ["eval", "prefs"], ["eval", "bon"]):
        out = CliRunner().invoke(app, [*cmd, "--help"]).output
        assert "--device" in out and "--dtype" in out and "--attn-implementation" in out, cmd
    args = RewardScriptArguments(reward_device="auto", reward_dtype="bfloat16", reward_attn_implementation="sdpa")
    assert args.reward_load_kwargs() == {"device_map": "auto", "dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert RewardScriptArguments().reward_load_kwargs() == {}
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bon_sft", Path(__file__).parents[1] / "launch" / "bon_sft.py")
    bon_sft = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bon_sft", bon_sft)  # dataclasses look their module up there
    spec.loader.exec_module(bon_sft)
    bargs = bon_sft.BonScriptArguments(reward_device="cuda:1", reward_dtype="float16")
    from vlrm_rlhf.scripts import reward_load_kwargs

    assert reward_load_kwargs(bargs) == {"device": "cuda:1", "dtype": "float16"}


def test_bad_dtype_names_the_choices():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("auto") == "auto" and resolve_dtype(None) is None
    with pytest.raises(ScorerError, match="unknown dtype 'float8'.*bfloat16"):
        resolve_dtype("float8")
