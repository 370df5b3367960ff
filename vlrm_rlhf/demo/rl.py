"""The demo's generation-time stages: best-of-n reranking of the LVLM's answers, and a short PPO run with
the merged reward. Answer quality is graded by the world's rules (1: right answer in the preferred style,
0.5: right answer in the other style, 0: wrong), never by the reward model itself.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from ..models.loading import pretrained
from ..worlds.gold import grade
from ..worlds.shapes import QA, World, questions
from ..worlds.text import messages


def best_of_n_stage(lvlm_dir: Path, vlrm_dir: Path, items: list[tuple[Any, QA]], n: int, seed: int) -> dict:
    """Sample ``n`` answers per question from the LVLM, rerank with the VLRM; the paper's BoN metrics."""
    from transformers import AutoModelForImageTextToText

    from ..bon import best_of_n, bon_metrics
    from ..models.processing import load_processor
    from ..reward.scorer import VLRewardScorer

    policy = pretrained(AutoModelForImageTextToText, lvlm_dir).eval()
    proc = load_processor(lvlm_dir)
    scorer = VLRewardScorer.from_pretrained(vlrm_dir, mode="vlrm")
    convs = [messages(qa.question, image=True) for _, qa in items]
    res = best_of_n(policy, proc, scorer, convs, [[im] for im, _ in items], n=n, seed=seed, max_new_tokens=10,
                    temperature=1.0, top_k=0)
    correctness = [[grade(qa, c) for c in r.candidates] for r, (_, qa) in zip(res, items, strict=True)]
    out = bon_metrics(correctness, [r.scores for r in res])
    out["examples"] = [{"question": qa.question, "candidates": r.candidates, "pick": r.best_index,
                        "scores": [x if math.isfinite(x) else None for x in r.scores]}  # -inf: empty candidate
                       for r, (_, qa) in list(zip(res, items, strict=True))[:3]]
    return out


@torch.no_grad()
def greedy_quality(model, proc, items: list[tuple[Any, QA]]) -> tuple[float, float]:
    """(mean quality, fraction correct) of the model's greedy answers on ``items``."""
    tok = proc.tokenizer
    texts = [proc.apply_chat_template(messages(qa.question, image=True), tokenize=False, add_generation_prompt=True)
             for _, qa in items]
    q = c = 0.0
    for s in range(0, len(items), 32):
        enc = proc(text=texts[s:s + 32], images=[[im] for im, _ in items[s:s + 32]], return_tensors="pt",
                   padding=True)
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
        for (_, qa), t in zip(items[s:s + 32], tok.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                                   skip_special_tokens=True), strict=True):
            g = grade(qa, t)
            q += g
            c += g > 0
    return q / len(items), c / len(items)


def ppo_stage(world: World, lvlm_dir: Path, vlrm_dir: Path, out: Path, *, updates: int, batch: int, seed: int,
              eval_items: list[tuple[Any, QA]], progress: bool = True) -> dict:
    """PPO (``VLPPOTrainer``) on the LVLM with the merged VLRM as reward and value init; quality before/after."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, TrainerCallback

    from ..models.processing import load_processor
    from ..trainers import VLPPOConfig, VLPPOTrainer

    rng = random.Random(f"ppo:{seed}")
    rows = []
    for _ in range(max(64, batch * 4)):
        i = rng.randrange(len(world.train.scenes))
        qa = rng.choice(questions(world.train.scenes[i]))
        rows.append({"prompt": messages(qa.question, image=True), "image": world.train.image(i)})
    proc = load_processor(lvlm_dir)
    before = greedy_quality(pretrained(AutoModelForImageTextToText, lvlm_dir).eval(), proc, eval_items)
    args = VLPPOConfig(
        output_dir=str(out / "ppo"), per_device_train_batch_size=batch // 2, gradient_accumulation_steps=2,
        num_mini_batches=2, num_ppo_epochs=2, total_episodes=updates * batch, response_length=10, stop_token="eos",
        temperature=1.0, kl_coef=0.1, learning_rate=2e-5, lr_scheduler_type="constant",
        local_rollout_forward_batch_size=batch, value_model_path=str(vlrm_dir), use_cpu=True, logging_steps=1,
        report_to="none", save_strategy="no", seed=seed, disable_tqdm=not progress)
    curve: list[dict[str, float]] = []

    class Record(TrainerCallback):
        """Keep the per-update reward and KL."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "objective/scores" in logs:
                curve.append({"update": state.global_step, "mean_reward": logs["objective/scores"],
                              "kl": logs["objective/kl"]})

    from ..trainers.gold_check import GoldCheckCallback, GoldPrompt
    from ..worlds.gold import gold_dict

    gold = GoldCheckCallback([GoldPrompt(messages(qa.question, image=True), [im], item=qa) for im, qa in eval_items],
                             proc, gold_dict, every=max(1, updates // 8), max_new_tokens=10, seed=seed)
    trainer = VLPPOTrainer(model=str(lvlm_dir), reward_funcs=str(vlrm_dir), args=args,
                           train_dataset=Dataset.from_list(rows), callbacks=[Record(), gold])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    policy = getattr(trainer.model, "policy", trainer.model)
    after = greedy_quality(policy.eval(), proc, eval_items)
    return {"curve": curve, "gold_curve": gold.history, "seconds": round(seconds, 1), "updates": len(curve),
            "quality_before": before[0], "correct_before": before[1],
            "quality_after": after[0], "correct_after": after[1]}
