"""Every reward kind behind ``VLRewardScorer`` through every entry point: the TRL reward, best-of-n reranking,
preference evaluation and a PPO update. Kinds: a TRL value-head VLRM, transformers' native Gemma3 sequence
classifier, a remote-code ``get_score`` model, and a merged VLRM (the reference)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import recipe, write_remote_rm
from datasets import Dataset

from vlrm_rlhf.reward.scorer import VLRewardScorer
from vlrm_rlhf.reward.trl import VLRMReward
from vlrm_rlhf.testing.zoo import demo_image, write_value_head

KINDS = ["value_head", "native_gemma3", "remote_code", "merged"]
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the car ?"}]}]
RESPONSES = ["the car is red .", "blue", "it is a big green car with a dog .", "no"]

def _native_gemma3(trio: dict[str, Path], out: Path) -> Path:
    import transformers

    native = transformers.Gemma3ForSequenceClassification.from_pretrained(trio["lvlm"], num_labels=1,
                                                                            trust_remote_code=False)
    torch.manual_seed(0)
    with torch.no_grad():
        native.score.weight.normal_()
    shutil.copytree(trio["lvlm"], out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    native.save_pretrained(out)
    return out


def _remote(out: Path) -> Path:
    return write_remote_rm(out, "tiny_get_score_rm_kinds")


@pytest.fixture(scope="module")
def dirs(zoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The LLaVA trio (the PPO policy) and one checkpoint directory per reward kind."""
    from vlrm_rlhf.merge import build

    trio = zoo("llava")
    tmp = tmp_path_factory.mktemp("kinds")
    build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), tmp / "merged", progress=False)
    return {**trio, "merged": tmp / "merged",
            "value_head": write_value_head(trio["lvlm"], tmp / "vh", storage="shards"),
            "native_gemma3": _native_gemma3(zoo("gemma3"), tmp / "g3rm"),
            "remote_code": _remote(tmp / "remote_rm")}


@pytest.fixture(scope="module")
def scorers(dirs) -> dict[str, VLRewardScorer]:
    return {k: VLRewardScorer.from_pretrained(dirs[k], trust_remote_code=(k == "remote_code")) for k in KINDS}


@pytest.fixture(scope="module")
def image(dirs):
    return demo_image(dirs["lvlm"], 0)


def _score(sc: VLRewardScorer, responses: list[str], image) -> list[float]:
    return sc.score(prompts=[PROMPT] * len(responses), responses=responses, images=[[image]] * len(responses))


def test_kinds_score_differently(scorers, image):
    """The reference numbers really come from each kind's own model (a non-constant, kind-specific score)."""
    got = {k: _score(sc, RESPONSES, image) for k, sc in scorers.items()}
    for k, v in got.items():
        assert all(math.isfinite(x) for x in v) and len({round(x, 5) for x in v}) > 1, k
    assert got["remote_code"] == [0.5 * (len(r) + 100) for r in RESPONSES]  # get_score was called, with the image
    assert len({tuple(round(x, 4) for x in v) for v in got.values()}) == len(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_trl_reward_equals_scorer(kind, scorers, image):
    sc = scorers[kind]
    f = VLRMReward(sc)
    completions = RESPONSES[:3]
    got = f(prompts=[PROMPT] * 3, completions=completions, image=[image] * 3)  # GRPO: placeholders + image column
    assert len(got) == 3 and all(isinstance(x, float) and math.isfinite(x) for x in got)
    assert got == pytest.approx(_score(sc, completions, image), abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_best_of_n_rerank_picks_argmax(kind, scorers, image):
    from vlrm_rlhf.bon import rerank_records

    sc = scorers[kind]
    want = _score(sc, RESPONSES, image)
    best = max(range(len(want)), key=want.__getitem__)
    rows = [{"id": "r0", "responses": RESPONSES, "correctness": [float(i == best) for i in range(len(RESPONSES))]}]
    out, metrics = rerank_records(rows, lambda rec, resp: sc.score_candidates(PROMPT, resp, [image]))
    assert out[0]["scores"] == pytest.approx(want, abs=1e-5)
    assert metrics["rm_accuracy"] == 100.0 and metrics["tie_rate"] == 0.0  # the reranker kept the argmax


@pytest.mark.parametrize("kind", KINDS)
def test_preference_eval_agrees_with_scores(kind, scorers, image):
    from vlrm_rlhf.eval.prefs import evaluate_prefs
    from vlrm_rlhf.eval.records import PrefRecord

    sc = scorers[kind]
    pairs = [(("the car is red .", "no"), 0), (("blue", "it is a big green car with a dog ."), 0),
             (("no", "the car is red ."), 1)]
    recs = [PrefRecord(id=str(i), query="what color is the car ?", responses=r, preferred=p, category="general",
                       images=[image]) for i, (r, p) in enumerate(pairs)]
    result = evaluate_prefs(sc, recs, progress=False)
    hits = []
    for (resp, pref) in pairs:
        a, b = _score(sc, list(resp), image)
        chosen, rejected = (a, b) if pref == 0 else (b, a)
        hits.append(1.0 if chosen > rejected else 0.0 if chosen < rejected else 0.5)
    acc = result.metrics["overall"]
    assert 0.0 <= acc <= 1.0
    assert acc == pytest.approx(sum(hits) / len(hits))


@pytest.mark.parametrize("kind", KINDS)
def test_one_ppo_update(kind, dirs, scorers, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoModelForSequenceClassification, AutoProcessor

    from vlrm_rlhf.trainers import VLPPOConfig, VLPPOTrainer

    torch.set_num_threads(1)
    rows = [{"prompt": PROMPT, "image": demo_image(dirs["lvlm"], i)} for i in range(2)]
    kw: dict[str, Any] = {}
    if kind in ("remote_code", "native_gemma3"):
        # The value model runs on the policy's (LLaVA) tokens and needs hidden states: a remote get_score model has
        # neither, and the Gemma3 classifier has another tokenizer; so the merged VLRM is the value model here.
        kw["value_model"] = AutoModelForSequenceClassification.from_pretrained(dirs["merged"], num_labels=1)
    args = VLPPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                       num_mini_batches=1, num_ppo_epochs=1, total_episodes=2, response_length=4,
                       stop_token="eos", temperature=0.9, learning_rate=1e-3, local_rollout_forward_batch_size=2,
                       use_cpu=True, logging_steps=1, report_to="none", save_strategy="no", seed=1,
                       disable_tqdm=True)
    seen: list[float] = []

    class Spy(VLRMReward):
        """Records the rewards it hands PPO, to compare with the logged score."""

        def __call__(self, *a: Any, **k: Any) -> list[float]:
            out = super().__call__(*a, **k)
            seen.extend(out)
            return out

    trainer = VLPPOTrainer(model=AutoModelForImageTextToText.from_pretrained(dirs["lvlm"]),
                           reward_funcs=Spy(scorers[kind]), args=args, train_dataset=Dataset.from_list(rows),
                           processing_class=AutoProcessor.from_pretrained(dirs["lvlm"]), **kw)
    if kind == "value_head":  # the default value model starts from the value-head VLRM, head included
        assert torch.equal(trainer.value_model.score.weight, scorers[kind].model.score.weight)
    trainer.train()
    logs = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    assert len(logs) == 1 and math.isfinite(logs[0])
    assert len(seen) == 2 and logs[0] == pytest.approx(sum(seen) / 2, abs=1e-4)  # PPO scored with this kind
