"""Merging a text RM into a trained VLRM (role vlrm): the output keeps its head bit-identical, takes the RM's, or
mixes both; value-head and sequence-classifier inputs give the same merge; bad recipes are named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlrm_rlhf.merge import build
from vlrm_rlhf.merge.engine import MergeError
from vlrm_rlhf.merge.recipe import RecipeError, parse_recipe
from vlrm_rlhf.models.value_head import convert_value_head, find_value_head
from vlrm_rlhf.reward.scorer import VLRewardScorer
from vlrm_rlhf.testing.zoo import demo_image, write_value_head

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the car ?"}]}]


def _recipe(trio, vlrm, **extra):
    return {"merge_method": "task_arithmetic", "base_model": str(trio["base"]), "dtype": "float32",
            "parameters": {"normalize": False}, "output": "vlrm",
            "models": [{"model": str(vlrm), "role": "vlrm", "parameters": {"weight": 1.0}},
                       {"model": str(trio["rm"]), "role": "rm", "parameters": {"weight": 0.5}}], **extra}


def _weights(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def vh(zoo, tmp_path_factory):
    trio = zoo("llava")
    return trio, write_value_head(trio["lvlm"], tmp_path_factory.mktemp("vh") / "vh", storage="shards", bias=0.4)


def test_merge_into_a_value_head_vlrm_keeps_its_head_bit_identical(vh, tmp_path):
    trio, src = vh
    out = build(_recipe(trio, src), tmp_path / "out", progress=False)
    w = _weights(out)
    head = find_value_head(src)
    assert torch.equal(w["score.weight"], head.weight) and torch.equal(w["score.bias"], head.bias)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["score_bias"] is True and cfg["architectures"] == ["LlavaForSequenceClassification"]
    # the language model did merge (the RM's task vector went in), the vision tower is the VLRM's
    with safe_open(str(src / "model.safetensors"), framework="pt") as h:
        src_sd = {k: h.get_tensor(k) for k in h.keys()}
    layer = next(k for k in w if "language_model.layers.0.mlp.up_proj" in k)
    vision = next(k for k in w if "vision_tower" in k and k.endswith("weight"))
    assert not torch.equal(w[layer], src_sd[layer]) and torch.equal(w[vision], src_sd[vision])
    assert "v_head.summary.weight" not in w and not (out / "value_head.safetensors").exists()
    sc = VLRewardScorer.from_pretrained(out)
    rewards = sc.score(prompts=[PROMPT] * 2, responses=["red", "blue"], images=[[demo_image(trio["lvlm"])]] * 2)
    assert all(torch.isfinite(torch.tensor(rewards)))


def test_value_head_and_converted_inputs_merge_alike(vh, tmp_path):
    trio, src = vh
    conv = convert_value_head(src, tmp_path / "conv")
    a = _weights(build(_recipe(trio, src), tmp_path / "a", progress=False))
    b = _weights(build(_recipe(trio, conv), tmp_path / "b", progress=False))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_head_mix_and_head_rm(vh, tmp_path):
    trio, src = vh
    head = find_value_head(src)
    rm_w = load_file(trio["rm"] / "model.safetensors")["score.weight"]
    mix = _weights(build(_recipe(trio, src, head="mix", head_weights={"vlrm": 0.25, "rm": 0.75}), tmp_path / "mix",
                         progress=False))
    assert torch.allclose(mix["score.weight"], 0.25 * head.weight + 0.75 * rm_w, atol=1e-7)
    assert torch.allclose(mix["score.bias"], 0.25 * head.bias, atol=1e-7)  # the RM's head has no bias: 0
    out = build(_recipe(trio, src, head="rm"), tmp_path / "rm", progress=False)
    rm = _weights(out)
    assert torch.equal(rm["score.weight"], rm_w) and "score.bias" not in rm
    assert "score_bias" not in json.loads((out / "config.json").read_text())
    assert VLRewardScorer.from_pretrained(out).model.score.bias is None


def test_bad_vlrm_recipes_are_named(vh, tmp_path):
    trio, src = vh
    with pytest.raises(RecipeError, match="need a model with `role: vlrm`"):
        parse_recipe({**_recipe(trio, src), "models": [{"model": str(trio["lvlm"]), "role": "lvlm"},
                                                         {"model": str(trio["rm"]), "role": "rm"}], "head": "keep"})
    with pytest.raises(RecipeError, match="head_weights: only applies to head: mix"):
        parse_recipe(_recipe(trio, src, head_weights={"vlrm": 1.0}))
    with pytest.raises(RecipeError, match="head: mix needs exactly one model with `role: rm`"):
        parse_recipe({**_recipe(trio, src, head="mix"), "models": [{"model": str(src), "role": "vlrm"}]})
    with pytest.raises(RecipeError, match="needs output: vlrm"):
        parse_recipe(_recipe(trio, src, output="lvlm"))
    with pytest.raises(MergeError, match="role vlrm expects a trained VLRM; .* neither a score head"):
        build(_recipe(trio, trio["lvlm"]), tmp_path / "x", progress=False)
    wide = write_value_head(trio["lvlm"], tmp_path / "wide", width=5)
    with pytest.raises(MergeError, match=r"value_head.safetensors: reward head v_head.summary.weight has shape \[1, 5\]"):
        build(_recipe(trio, wide), tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_dry_run_and_in_memory_merge_into_a_vlrm(vh, tmp_path):
    from vlrm_rlhf.merge.dryrun import dry_run
    from vlrm_rlhf.merge.inmemory import InMemoryMerger

    trio, src = vh
    r = _recipe(trio, src, head="mix", head_weights={"vlrm": 0.25, "rm": 0.75})
    text = dry_run(parse_recipe(r), tmp_path / "never").text()
    assert "score head mix (0.25 · vlrm + 0.75 · rm)" in text and not (tmp_path / "never").exists()
    built = _weights(build(r, tmp_path / "built", progress=False))
    mem = InMemoryMerger(parse_recipe(r), progress=False).model.state_dict()
    assert torch.equal(mem["score.weight"], built["score.weight"]) and torch.equal(mem["score.bias"], built["score.bias"])
