"""Trained VLRMs behind the one scorer: TRL value-head checkpoints (both storage forms, direct and converted),
transformers' native sequence classifiers, and remote-code ``get_score`` models (only with the explicit flag)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _helpers import write_remote_rm
from typer.testing import CliRunner

from vlrm_rlhf.cli import app
from vlrm_rlhf.models.loading import RemoteCodeError
from vlrm_rlhf.models.value_head import ValueHeadError, find_value_head
from vlrm_rlhf.reward.scorer import VLRewardScorer
from vlrm_rlhf.testing.zoo import demo_image, write_value_head

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the car ?"}]}]
RESPONSES = ["the car is red .", "blue", "it is a big green car with a dog .", "no"]


def _hand_rewards(vh_dir, scorer: VLRewardScorer, image) -> list[float]:
    """Reward by hand: the causal VLM's last hidden state at the last token, times the value head, plus its bias."""
    from transformers import AutoModelForImageTextToText

    causal = AutoModelForImageTextToText.from_pretrained(vh_dir, trust_remote_code=False).eval()
    head = find_value_head(vh_dir)
    out = []
    for r in RESPONSES:
        s = scorer.samples(prompts=[PROMPT], responses=[r], images=[[image]])[0]
        enc = scorer.encode([scorer._render(s, 0)], [s.images])
        with torch.no_grad():
            h = causal(**enc, use_cache=False, output_hidden_states=True).hidden_states[-1][0, -1]
        out.append(float(h @ head.weight[0] + (head.bias[0] if head.bias is not None else 0.0)))
    return out


@pytest.mark.parametrize("family,storage", [("llava", "file"), ("llava", "shards"), ("qwen2_vl", "shards")])
def test_value_head_vlrm_scores_like_a_hand_computation(zoo, tmp_path, family, storage):
    trio = zoo(family)
    vh = write_value_head(trio["lvlm"], tmp_path / "vh", storage=storage)
    assert (vh / "value_head.safetensors").is_file() == (storage == "file")
    sc = VLRewardScorer.from_pretrained(vh)
    assert sc.model.score.bias is not None
    image = demo_image(trio["lvlm"])
    hand = _hand_rewards(vh, sc, image)
    batched = sc.score(prompts=[PROMPT] * len(RESPONSES), responses=RESPONSES, images=[[image]] * len(RESPONSES))
    prefix = sc.score_candidates(PROMPT, RESPONSES, [image])  # best-of-n path: prefix KV reuse, then the head
    assert batched == pytest.approx(hand, abs=1e-4)
    assert prefix == pytest.approx(hand, abs=1e-4)
    assert len(set(round(v, 4) for v in hand)) > 1  # the head sees the responses


def test_converted_equals_direct_and_loads_as_sequence_classifier(zoo, tmp_path):
    from transformers import AutoModelForSequenceClassification

    trio = zoo("llava")
    vh = write_value_head(trio["lvlm"], tmp_path / "vh", storage="shards", bias=-0.7)
    res = CliRunner().invoke(app, ["convert", str(vh), "--out", str(tmp_path / "conv")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForSequenceClassification"] and cfg["score_bias"] is True
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "conv", trust_remote_code=False)
    assert float(model.score.bias) == pytest.approx(-0.7)
    image = demo_image(trio["lvlm"])
    args = dict(prompts=[PROMPT] * 4 + ["a text-only prompt"], responses=[*RESPONSES, "ok"],
                images=[[image]] * 4 + [None])
    direct = VLRewardScorer.from_pretrained(vh).score(**args)
    converted = VLRewardScorer.from_pretrained(tmp_path / "conv").score(**args)
    assert converted == pytest.approx(direct, abs=1e-6)
    # never over the source
    res = CliRunner().invoke(app, ["convert", str(vh), "--out", str(vh / "inside")])
    assert res.exit_code == 2 and "source model" in res.output and not (vh / "inside").exists()


def test_value_head_of_the_wrong_width_is_named(zoo, tmp_path):
    trio = zoo("llava")
    vh = write_value_head(trio["lvlm"], tmp_path / "vh", width=17)
    hidden = json.loads((vh / "config.json").read_text())["text_config"]["hidden_size"]
    with pytest.raises(ValueHeadError, match=rf"value_head.safetensors: value head width 17 does not match the hidden "
                                             rf"size {hidden}"):
        VLRewardScorer.from_pretrained(vh)
    res = CliRunner().invoke(app, ["convert", str(vh), "--out", str(tmp_path / "conv")])
    assert res.exit_code == 2 and "width 17" in res.output and not (tmp_path / "conv").exists()


def test_value_head_vlrm_as_trl_reward_and_ppo_value_model(zoo, tmp_path):
    from vlrm_rlhf.reward.factory import reward_funcs
    from vlrm_rlhf.trainers.ppo_models import default_value_model

    trio = zoo("llava")
    vh = write_value_head(trio["lvlm"], tmp_path / "vh")
    image = demo_image(trio["lvlm"])
    (f,) = reward_funcs(vh)
    prompts = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "car ?"}]}]] * 2
    got = f(prompts=prompts, completions=["red", "blue"])
    want = f.scorer.score(prompts=[[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "car ?"}]}]] * 2,
                          responses=["red", "blue"], images=[[image]] * 2)
    assert got == pytest.approx(want)
    args = type("Args", (), {"value_model_path": None})()
    value = default_value_model(args, [f])  # PPO's value model starts from the value-head VLRM, head included
    assert torch.equal(value.score.weight, f.scorer.model.score.weight)


def test_grpo_trains_with_a_value_head_vlrm_reward(zoo, tmp_path):
    """2 GRPO steps on a tiny LLaVA policy with a value-head VLRM (loaded directly) as the reward."""
    import math

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from vlrm_rlhf.reward.factory import reward_funcs

    trio = zoo("llava")
    vh = write_value_head(trio["lvlm"], tmp_path / "vh")
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
             "image": demo_image(trio["lvlm"], i)} for i, t in enumerate(["what color ?", "is there a dog ?"])]
    args = GRPOConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", max_completion_length=4,
                      num_generations=2, per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                      save_strategy="no", bf16=False, seed=0)
    (reward,) = reward_funcs(vh)
    trainer = GRPOTrainer(model=str(trio["lvlm"]), reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    logs = [h["rewards/vlrm_vh/mean"] for h in trainer.state.log_history if "rewards/vlrm_vh/mean" in h]
    assert trainer.state.global_step == 2 and len(logs) == 2 and all(math.isfinite(v) for v in logs)


def test_value_head_vlrm_in_preference_eval(zoo, tmp_path):
    from vlrm_rlhf.eval.prefs import evaluate_prefs
    from vlrm_rlhf.eval.records import PrefRecord

    trio = zoo("llava")
    vh = write_value_head(trio["lvlm"], tmp_path / "vh")
    sc = VLRewardScorer.from_pretrained(vh)
    image = demo_image(trio["lvlm"])
    rec = PrefRecord(id="0", query="what color is the car ?", responses=("red", "blue"), preferred=0,
                     category="general", images=[image])
    result = evaluate_prefs(sc, [rec], progress=False)
    a, b = sc.score(prompts=[PROMPT] * 2, responses=["red", "blue"], images=[[image]] * 2)
    assert result.metrics["overall"] == (1.0 if a > b else 0.0 if a < b else 0.5)


# ---- transformers' own VLM sequence classifiers -------------------------------------------------------------
def test_native_gemma3_sequence_classifier_scores_unchanged(zoo, tmp_path):
    import transformers

    trio = zoo("gemma3")
    native = transformers.Gemma3ForSequenceClassification.from_pretrained(trio["lvlm"], num_labels=1,
                                                                            trust_remote_code=False)
    torch.manual_seed(0)
    with torch.no_grad():
        native.score.weight.normal_()
    out = tmp_path / "g3rm"
    shutil.copytree(trio["lvlm"], out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    native.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Gemma3ForSequenceClassification"]
    sc = VLRewardScorer.from_pretrained(out)
    image = demo_image(trio["lvlm"])
    got = sc.score(prompts=[PROMPT] * 2, responses=RESPONSES[:2], images=[[image]] * 2)
    native.eval()
    want = []
    for r in RESPONSES[:2]:
        s = sc.samples(prompts=[PROMPT], responses=[r], images=[[image]])[0]
        with torch.no_grad():
            want.append(float(native(**sc.encode([sc._render(s, 0)], [s.images]), use_cache=False).logits[0, 0]))
    assert got == pytest.approx(want, abs=1e-5)


# ---- remote-code reward models ------------------------------------------------------------------------------
@pytest.fixture
def remote_rm(tmp_path):
    return write_remote_rm(tmp_path / "remote_rm", "tiny_get_score_rm")


def test_remote_code_is_refused_by_default_and_runs_with_the_flag(remote_rm, tmp_path):
    from PIL import Image

    with pytest.raises(RemoteCodeError, match=r"trust_remote_code=True \(command line: --trust-remote-code\)"):
        VLRewardScorer.from_pretrained(remote_rm)
    sc = VLRewardScorer.from_pretrained(remote_rm, trust_remote_code=True)
    image = Image.new("RGB", (8, 8))
    assert sc.score(prompts=["q", "q"], responses=["abc", "abcdef"], images=[[image], None]) == [0.5 * 103, 0.5 * 6]
    assert sc.score_candidates("q", ["ab", "abcd"], [image]) == [0.5 * 102, 0.5 * 104]  # best-of-n path
    from vlrm_rlhf.reward.trl import VLRMReward

    f = VLRMReward(sc)  # a GRPO/RLOO reward
    assert f(prompts=["q", "q"], completions=["abc", "x"]) == [1.5, 0.5]

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "q", "response": "abcd"}) + "\n")
    res = CliRunner().invoke(app, ["score", "-i", str(rows), "-m", str(remote_rm), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "--trust-remote-code" in res.output and not (tmp_path / "o.jsonl").exists()
    res = CliRunner().invoke(app, ["score", "-i", str(rows), "-m", str(remote_rm), "-o", str(tmp_path / "o.jsonl"),
                                   "--trust-remote-code"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o.jsonl").read_text())["reward"] == 2.0
