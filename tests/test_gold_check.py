"""``GoldCheckCallback`` in a tiny PPO run (``VLPPOTrainer``) and a tiny GRPO run (TRL ``GRPOTrainer``) on the zoo's
LLaVA policy: finite gold / proxy / KL metrics at the start, every k steps and the end; KL is exactly 0 before
the first update (the reference is the starting policy) and the gold function sees every answer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _helpers import recipe
from datasets import Dataset
from transformers import AutoProcessor

from vlrm_rlhf.reward.trl import VLRMReward
from vlrm_rlhf.testing.zoo import demo_image
from vlrm_rlhf.trainers import VLPPOConfig, VLPPOTrainer
from vlrm_rlhf.trainers.gold_check import GoldCheckCallback, GoldPrompt, sequence_kl

PROMPTS = ["what color is the cat ?", "describe the image please", "is the dog big ?", "which car is red ?"]


@pytest.fixture(scope="module")
def dirs(zoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from vlrm_rlhf.merge import build

    trio = zoo("llava")
    out = tmp_path_factory.mktemp("gold") / "tiny-vlrm"
    build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), out, progress=False)
    return {**trio, "vlrm": out}


def conv(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def rows(dirs: dict[str, Path]) -> list[dict]:
    return [{"prompt": conv(p), "image": demo_image(dirs["lvlm"], i)} for i, p in enumerate(PROMPTS)]


def callback(dirs: dict[str, Path], seen: list[str], reward) -> GoldCheckCallback:
    held = [GoldPrompt(conv(p), [demo_image(dirs["lvlm"], 10 + i)], item=len(p)) for i, p in enumerate(PROMPTS)]

    def gold(item: int, text: str) -> dict[str, float]:
        seen.append(text)
        return {"correct": float(len(text) < item), "style": float(text.startswith("a")), "both": 0.0}

    return GoldCheckCallback(held, AutoProcessor.from_pretrained(dirs["lvlm"]), gold, reward=reward, every=2,
                             samples=2, max_new_tokens=4)


def check(cb: GoldCheckCallback, steps: list[int], log_history: list[dict], seen: list[str]) -> None:
    assert [int(h["step"]) for h in cb.history] == steps
    for h in cb.history:
        for k in ("gold/correct", "gold/style", "gold/both", "gold_sampled/correct", "gold/kl", "gold/proxy_reward",
                  "gold/proxy_reward_greedy"):
            assert math.isfinite(h[k]), (k, h)
        assert 0 <= h["gold/correct"] <= 1
    assert cb.history[0]["gold/kl"] == 0.0  # policy == reference before any update
    assert any(h["gold/kl"] != 0.0 for h in cb.history[1:])
    assert [h for h in log_history if "gold/kl" in h] == cb.history
    assert len(seen) == len(steps) * len(PROMPTS) * 3  # greedy + 2 samples per prompt, every check


def test_sequence_kl():
    lp, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -1.0, -9.0]])
    assert sequence_kl(lp, ref, torch.tensor([[1.0, 1.0, 0.0]])).tolist() == [0.5 - 1.0]


def test_ppo(dirs, tmp_path):
    seen: list[str] = []
    cb = callback(dirs, seen, VLRMReward(dirs["vlrm"]))
    args = VLPPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                       num_mini_batches=1, num_ppo_epochs=1, total_episodes=2 * 3, response_length=4,
                       stop_token="eos", temperature=1.0, learning_rate=5e-3, local_rollout_forward_batch_size=2,
                       use_cpu=True, logging_steps=1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True)
    trainer = VLPPOTrainer(model=str(dirs["lvlm"]), reward_funcs=str(dirs["vlrm"]), args=args,
                           train_dataset=Dataset.from_list(rows(dirs)), callbacks=[cb])
    trainer.train()
    check(cb, [0, 2, 3], trainer.state.log_history, seen)


def test_grpo(dirs, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    seen: list[str] = []
    reward = VLRMReward(dirs["vlrm"])
    cb = callback(dirs, seen, reward)
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_completion_length=4,
                      num_generations=2, per_device_train_batch_size=2, max_steps=3, logging_steps=1,
                      save_strategy="no", beta=0.05, bf16=False, seed=0, learning_rate=5e-3, disable_tqdm=True)
    trainer = GRPOTrainer(model=str(dirs["lvlm"]), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list(rows(dirs)), callbacks=[cb])
    trainer.train()
    check(cb, [0, 2, 3], trainer.state.log_history, seen)
