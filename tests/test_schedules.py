"""Per-layer merge schedules (linear, step, attention vs MLP), layer swaps and reasoning merges (output: lvlm + llm).

Depth is the base model's layer index; on Mllama the interleaved cross-attention layers are never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _helpers import lm_tensors, load_all
from typer.testing import CliRunner

from vlrm_rlhf.cli import app
from vlrm_rlhf.merge import MergeError, MergePlan, RecipeError, build, parse_recipe
from vlrm_rlhf.merge.checkpoint import Checkpoint
from vlrm_rlhf.merge.methods import METHODS
from vlrm_rlhf.merge.schedules import (
    LayerSwap,
    LinearSchedule,
    StepSchedule,
    linear_value,
    per_layer,
    resolved_table,
    schedule_value,
    swap_keeps,
)

ROOT = Path(__file__).resolve().parents[1]
L = 4  # base layers of the zoo trios used here


def reasoning(trio, llm: dict, *, method: str = "task_arithmetic", lvlm: dict | None = None, **extra) -> dict:
    """An output: lvlm recipe with roles lvlm, llm and base (float32)."""
    return {"merge_method": method, "base_model": str(trio["base"]), "output": "lvlm", "dtype": "float32",
            "models": [{"model": str(trio["lvlm"]), "role": "lvlm", "parameters": lvlm or {"weight": 1.0}},
                       {"model": str(trio["llm"]), "role": "llm", "parameters": llm}], **extra}


def llm_weights(plan: MergePlan, canon: str) -> float:
    per, _ = plan.parameters_for(canon)
    return next(p["weight"] for s, p in zip(plan.models, per, strict=True) if s.role == "llm")


# ---- pure math ---------------------------------------------------------------------------------------------------
def test_schedule_values():
    lin = LinearSchedule(schedule="linear", start=0.2, end=1.0)
    assert per_layer(lin, 5) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert per_layer(lin, 1) == [0.2] and linear_value(0.0, 1.0, 3, 4) == 1.0
    step = StepSchedule(schedule="step", values=[0.0, 0.5, 1.0], boundaries=[4, 8])
    assert per_layer(step, 10) == [0.0] * 4 + [0.5] * 4 + [1.0] * 2
    assert schedule_value(step, None, 10) == 0.0  # outside the layers: the layer-0 value (mergekit's convention)
    assert schedule_value(StepSchedule(schedule="step", values=[1.0], outside=0.3), None, 10) == 0.3
    swap = LayerSwap(k=2, embeddings=True)
    assert [swap_keeps(swap, f"layers.{i}.mlp.up_proj.weight") for i in range(4)] == [True, True, False, False]
    assert swap_keeps(swap, "embed_tokens.weight") and not swap_keeps(swap, "lm_head.weight")
    attn = LayerSwap(k=4, final=True, filter="self_attn")
    assert swap_keeps(attn, "layers.3.self_attn.q_proj.weight") and not swap_keeps(attn, "layers.0.mlp.up_proj.weight")
    assert not swap_keeps(attn, "lm_head.weight") and not swap_keeps(None, "layers.0.mlp.up_proj.weight")


# ---- resolution inside the engine ----------------------------------------------------------------------------------
def test_linear_step_and_attn_mlp_resolve_per_layer(zoo):
    trio = zoo("llava", num_layers=L)
    plan = MergePlan(parse_recipe(reasoning(trio, {"weight": {"schedule": "linear", "start": 0.2, "end": 1.0}})))
    assert [llm_weights(plan, f"layers.{i}.mlp.up_proj.weight") for i in range(L)] == pytest.approx([0.2, 0.2 + 0.8 / 3,
                                                                                                    0.2 + 1.6 / 3, 1.0])
    assert llm_weights(plan, "embed_tokens.weight") == 0.2
    plan = MergePlan(parse_recipe(reasoning(trio, {"weight": {"schedule": "step", "values": [0, 0.5, 1],
                                                              "boundaries": [1, 3], "outside": 0.25}})))
    assert [llm_weights(plan, f"layers.{i}.self_attn.o_proj.weight") for i in range(L)] == [0, 0.5, 0.5, 1]
    assert llm_weights(plan, "lm_head.weight") == llm_weights(plan, "norm.weight") == 0.25
    split = {"weight": [{"filter": "self_attn", "value": {"schedule": "linear", "start": 0.0, "end": 0.9}},
                        {"filter": "mlp", "value": {"schedule": "step", "values": [0.0, 1.0], "boundaries": [2]}},
                        {"value": 0.5}]}
    plan = MergePlan(parse_recipe(reasoning(trio, split)))
    for i in range(L):
        assert llm_weights(plan, f"layers.{i}.self_attn.k_proj.weight") == pytest.approx(0.3 * i)
        assert llm_weights(plan, f"layers.{i}.mlp.down_proj.weight") == (1.0 if i >= 2 else 0.0)
        assert llm_weights(plan, f"layers.{i}.input_layernorm.weight") == 0.5
    table = resolved_table(plan)
    assert [r["layer"] for r in table] == [0, 1, 2, 3, "outside"]
    assert table[3]["llm.weight[attn]"] == pytest.approx(0.9) and table[1]["llm.weight[mlp]"] == 0.0
    assert table[3]["llm.weight[other]"] == 0.5 and table[0]["lvlm.weight"] == 1.0 and table[0]["source"] == "merge"


def test_attn_mlp_schedule_reaches_the_tensors(zoo, tmp_path):
    """End to end: each merged tensor is θ_base + τ_LVLM + w(layer, module) τ_LLM."""
    trio = zoo("llava", num_layers=L)
    split = {"weight": [{"filter": "self_attn", "value": {"schedule": "linear", "start": 0.0, "end": 0.9}},
                        {"filter": "mlp", "value": {"schedule": "step", "values": [0.0, 1.0], "boundaries": [2]}},
                        {"value": 0.5}]}
    out = build(reasoning(trio, split), tmp_path / "o", progress=False)
    got, b, lv, llm = (lm_tensors(d, r) for d, r in ((out, "lvlm"), (trio["base"], "base"), (trio["lvlm"], "lvlm"),
                                                      (trio["llm"], "llm")))
    for i in range(L):
        for key, w in ((f"layers.{i}.self_attn.v_proj.weight", 0.3 * i), (f"layers.{i}.mlp.gate_proj.weight", float(i >= 2)),
                       (f"layers.{i}.post_attention_layernorm.weight", 0.5)):
            want = b[key] + (lv[key] - b[key]) + w * (llm[key] - b[key])
            torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6)


def test_linear_schedule_equals_mergekit_gradient(zoo, tmp_path):
    trio = zoo("llava", num_layers=L)
    a = build(reasoning(trio, {"weight": {"schedule": "linear", "start": 0.2, "end": 1.0}}), tmp_path / "a", progress=False)
    b = build(reasoning(trio, {"weight": [0.2, 1.0]}), tmp_path / "b", progress=False)
    ta, tb = load_all(a), load_all(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_mllama_schedule_uses_base_layers_and_never_touches_cross_layers(zoo, tmp_path):
    trio = zoo("mllama", num_layers=L)
    cfg = Checkpoint(trio["lvlm"], "lvlm").config.get_text_config()
    cross = cfg.cross_attention_layers
    assert cross and cfg.num_hidden_layers == L + len(cross)
    step = {"weight": {"schedule": "step", "values": [0.0, 0.5, 1.0], "boundaries": [1, 3]}}
    r = reasoning(trio, step, layer_swap={"k": 1})
    plan = MergePlan(parse_recipe(r))
    assert plan.n_layers == L
    out = build(r, tmp_path / "o", progress=False)
    got, lv_raw = load_all(out), load_all(trio["lvlm"])
    ck = Checkpoint(trio["lvlm"], "lvlm")
    cross_keys = [k for k in ck.other if any(f"layers.{j}." in k for j in cross)]
    assert cross_keys and all(torch.equal(got[k], lv_raw[ck.ckpt_key[k]]) for k in cross_keys)
    b, lv, llm = (lm_tensors(d, role) for d, role in ((trio["base"], "base"), (trio["lvlm"], "lvlm"), (trio["llm"], "llm")))
    merged = lm_tensors(out, "lvlm")  # canonical keys: base-layer numbering
    assert torch.equal(merged["layers.0.mlp.up_proj.weight"], lv["layers.0.mlp.up_proj.weight"])  # swapped, bit-exact
    for i, w in ((1, 0.5), (2, 0.5), (3, 1.0)):
        key = f"layers.{i}.mlp.up_proj.weight"
        torch.testing.assert_close(merged[key], b[key] + (lv[key] - b[key]) + w * (llm[key] - b[key]), rtol=0, atol=1e-6)


# ---- layer swap ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_swap_all_layers_returns_the_lvlm_and_zero_the_plain_merge(zoo, tmp_path, family):
    trio = zoo(family)
    plain = reasoning(trio, {"weight": 0.7}, method="ties", lvlm={"weight": 0.6, "density": 0.5})
    plain["models"][1]["parameters"]["density"] = 0.5
    n = MergePlan(parse_recipe(plain)).n_layers
    full = build({**plain, "layer_swap": {"k": n, "embeddings": True, "final": True}}, tmp_path / "full", progress=False)
    zero = build({**plain, "layer_swap": {"k": 0}}, tmp_path / "zero", progress=False)
    ref = build(plain, tmp_path / "plain", progress=False)
    f, z, p, lv = load_all(full), load_all(zero), load_all(ref), load_all(trio["lvlm"])
    assert f.keys() == lv.keys() and all(torch.equal(f[k], lv[k]) for k in lv)  # the whole LVLM, bit for bit
    assert z.keys() == p.keys() and all(torch.equal(z[k], p[k]) for k in p)
    assert any(not torch.equal(p[k], lv[k]) for k in p)


def test_swap_filter_embeddings_and_table(zoo, tmp_path):
    trio = zoo("llava", num_layers=L)
    r = reasoning(trio, {"weight": 1.0}, layer_swap={"k": 2, "filter": "mlp"})
    got, lv = lm_tensors(build(r, tmp_path / "o", progress=False), "lvlm"), lm_tensors(trio["lvlm"], "lvlm")
    assert torch.equal(got["layers.1.mlp.down_proj.weight"], lv["layers.1.mlp.down_proj.weight"])
    assert not torch.equal(got["layers.1.self_attn.q_proj.weight"], lv["layers.1.self_attn.q_proj.weight"])
    assert not torch.equal(got["layers.2.mlp.down_proj.weight"], lv["layers.2.mlp.down_proj.weight"])
    assert not torch.equal(got["embed_tokens.weight"], lv["embed_tokens.weight"])
    rows = resolved_table(MergePlan(parse_recipe(r)))
    assert [x["source"] for x in rows] == ["lvlm/merge", "lvlm/merge", "merge", "merge", "merge"]


# ---- every method: output lvlm with roles lvlm + llm + base ---------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_an_llm_into_the_lvlm(zoo, tmp_path, method):
    from transformers import AutoModelForImageTextToText

    trio = zoo("llava")
    sparse = {"density": 0.5} if method not in ("linear", "slerp", "task_arithmetic") else {}
    ramp = {"weight": {"schedule": "linear", "start": 0.3, "end": 0.9}, **sparse}
    r = reasoning(trio, ramp, method=method, lvlm={"weight": 0.7, **sparse}, seed=0)
    if method == "linear":  # no base: mergekit makes base_model one more weighted input; give it a role instead
        del r["base_model"]
        r["models"].append({"model": str(trio["base"]), "role": "base", "parameters": {"weight": 0.2}})
    if method == "slerp":  # two models: the LVLM is the base, t is scheduled
        r["base_model"] = str(trio["lvlm"])
        r["models"][0]["parameters"] = r["models"][1]["parameters"] = {}  # slerp takes no per-model parameters
        r["parameters"] = {"t": {"schedule": "step", "values": [0.3, 0.6], "boundaries": [1]}}
    out = build(r, tmp_path / "o", progress=False)
    model = AutoModelForImageTextToText.from_pretrained(out)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    got, lv = lm_tensors(out, "lvlm"), lm_tensors(trio["lvlm"], "lvlm")
    assert not torch.equal(got["layers.1.mlp.up_proj.weight"], lv["layers.1.mlp.up_proj.weight"])


# ---- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight, match", [
    ({"schedule": "cosine"}, r"models\[1\]\.parameters\.weight: unknown schedule kind 'cosine'; known kinds: linear, step"),
    ({"schedule": "swap", "k": 4}, r"models\[1\]\.parameters\.weight: `schedule: swap` .*top-level key `layer_swap"),
    ({"schedule": "linear", "start": 0.2}, r"linear schedule key 'end': required key is missing"),
    ({"schedule": "linear", "start": 0, "end": 1, "stop": 2}, r"unknown key 'stop' in a linear schedule"),
    ({"schedule": "step", "values": [0, 1], "boundaries": [1, 2]}, r"one more value than boundaries"),
    ({"schedule": "step", "values": [0, 1, 2], "boundaries": [3, 1]}, r"strictly increasing"),
    ([{"filter": "mlp", "value": {"schedule": "step", "values": [0, 1]}}], r"weight\[0\]\.value: a step schedule"),
])
def test_invalid_schedules_name_the_key(weight, match):
    r = {"merge_method": "task_arithmetic", "base_model": "b", "output": "lvlm",
         "models": [{"model": "a", "role": "lvlm"}, {"model": "c", "role": "llm", "parameters": {"weight": weight}}]}
    with pytest.raises(RecipeError, match=match):
        parse_recipe(r)


def test_out_of_range_schedules_name_the_key(zoo, tmp_path):
    trio = zoo("llava")  # 2 layers
    with pytest.raises(RecipeError, match=r"layer_swap\.k: 3 is out of range: the base has 2 layers \(use 0\.\.2\)"):
        build(reasoning(trio, {"weight": 1.0}, layer_swap={"k": 3}), tmp_path / "a", progress=False)
    step = {"weight": {"schedule": "step", "values": [0, 1], "boundaries": [4]}}
    with pytest.raises(RecipeError, match=r"models\[1\]\.parameters\.weight: step boundary 4 is out of range.*1\.\.1"):
        build(reasoning(trio, step), tmp_path / "b", progress=False)
    with pytest.raises(RecipeError, match=r"layer_swap\.k: Input should be greater than or equal to 0"):
        parse_recipe(reasoning(trio, {"weight": 1.0}, layer_swap={"k": -1}))
    no_rest = {"weight": [{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": 1.0}]}
    with pytest.raises(MergeError, match=r"no `filter:` entry of parameter 'weight' matches tensor .*catch-all"):
        build(reasoning(trio, no_rest), tmp_path / "c", progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")


# ---- shipped recipes and the CLI ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["reasoning_swap", "reasoning_linear", "reasoning_step", "reasoning_attn_mlp",
                                  "lvlm_reasoning_task_arithmetic"])
def test_shipped_reasoning_recipes_build(zoo, tmp_path, name):
    """Each shipped reasoning recipe, its relative paths pointed at a zoo trio, merges and prints its schedule."""
    trio = zoo("llava", num_layers=L)
    for role, sub in (("base", "runs/reasoning/base"), ("lvlm", "runs/reasoning/lvlm"), ("llm", "runs/reasoning/llm"),
                      ("base", "recipes/merge/base"), ("lvlm", "recipes/merge/lvlm"), ("llm", "recipes/merge/math_llm")):
        (tmp_path / sub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / sub).symlink_to(trio[role])
    recipe = tmp_path / "recipes" / "merge" / f"{name}.yaml"
    shutil.copy(ROOT / "recipes" / "merge" / f"{name}.yaml", recipe)
    assert (build(recipe, tmp_path / "out", progress=False) / "model.safetensors").is_file()
    res = CliRunner().invoke(app, ["analyze", "schedule", str(recipe)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:2] == ["layer", "source"] and len(lines) == 1 + L + 1 + 1


def test_cli_schedule_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: task_arithmetic\nbase_model: b\noutput: lvlm\nmodels:\n  - {model: a, role: lvlm}\n"
                   "  - {model: c, role: llm, parameters: {weight: {schedule: ramp}}}\n")
    res = CliRunner().invoke(app, ["analyze", "schedule", str(bad)])
    assert res.exit_code == 2 and "unknown schedule kind 'ramp'" in res.output
