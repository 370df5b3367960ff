"""``VLPPOTrainer``: PPO on a tiny LLaVA policy with a VLRM reward, image plumbing, resume, PEFT, TRL 1.12 parity.

* LLaVA + ``VLRMReward``: a few updates, every TRL 1.12 metric present and finite.
* Pixel values: hooks on the policy, the reference and the value model record every forward that carries
  ``pixel_values``; each rollout chunk, reference/value forward and PPO micro-batch must carry exactly its own
  samples' images (checked against the processor's output per prompt). Dropping images fails it.
* Checkpoint/resume through the Trainer: stop after 2 of 3 updates, resume from ``checkpoint-2`` in a fresh
  trainer; update 3 must equal the uninterrupted run's.
* PEFT/LoRA: no reference copy; the reference is the policy with adapters disabled (= the base weights).
* Parity with TRL 1.12's ``trl.experimental.ppo.PPOTrainer`` (slow, subprocesses, see its docstring).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import recipe
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoProcessor,
    AutoTokenizer,
    TrainerCallback,
)

from vlrm_rlhf.checkpoints import CheckpointError
from vlrm_rlhf.errors import VLRMError
from vlrm_rlhf.reward.trl import NonFiniteRewardError, NonFiniteRewardWarning, VLRMReward
from vlrm_rlhf.scripts import checked_reward
from vlrm_rlhf.testing.zoo import demo_image
from vlrm_rlhf.trainers import VLPPOConfig, VLPPOTrainer
from vlrm_rlhf.trainers.ppo import SAMPLES_FILE

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["what color is the cat ?", "describe the image please", "is the dog big ?", "which car is red ?",
           "how big is the tree ?", "the man is here .", "what is this ?", "is it a good photo ?"]
METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
           "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
           "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens", "lr",
           "episode")


def config(tmp: Path, updates: int = 2, **kw: Any) -> VLPPOConfig:
    base = dict(output_dir=str(tmp), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                num_mini_batches=2, num_ppo_epochs=2, total_episodes=4 * updates, response_length=6,
                stop_token="eos", temperature=0.9, learning_rate=1e-3, local_rollout_forward_batch_size=2,
                use_cpu=True, logging_steps=1, report_to="none", save_strategy="no", seed=1, disable_tqdm=True)
    return VLPPOConfig(**(base | kw))


@pytest.fixture(scope="module")
def dirs(zoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The LLaVA trio and a VLRM merged from it."""
    from vlrm_rlhf.merge import build

    trio = zoo("llava")
    out = tmp_path_factory.mktemp("ppo") / "tiny-vlrm"
    build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), out, progress=False)
    return {**trio, "vlrm": out}


def image_rows(dirs: dict[str, Path]) -> list[dict[str, Any]]:
    return [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
             "image": demo_image(dirs["lvlm"], i)} for i, p in enumerate(PROMPTS)]


def text_trainer(dirs: dict[str, Path], args: VLPPOConfig, **kw: Any) -> VLPPOTrainer:
    """Text-only policy (the zoo base LM) with the text RM as reward and value model."""
    tok = AutoTokenizer.from_pretrained(dirs["base"])
    ds = Dataset.from_dict({"prompt": PROMPTS})
    rm = AutoModelForSequenceClassification.from_pretrained(dirs["rm"], num_labels=1)
    return VLPPOTrainer(model=AutoModelForCausalLM.from_pretrained(dirs["base"]), reward_funcs=rm, args=args,
                        train_dataset=ds, processing_class=tok, **kw)


# ---- LLaVA + VLRM ----------------------------------------------------------------------------------------
def test_llava_vlrm_ppo_metrics_and_pixel_values(dirs, tmp_path):
    """A few PPO updates of a LLaVA policy on a VLRM; every forward gets exactly its samples' pixels."""
    proc = AutoProcessor.from_pretrained(dirs["lvlm"])
    rows = image_rows(dirs)
    expected = {p: proc(images=[r["image"]], text=[proc.image_token], return_tensors="pt")["pixel_values"][0]
                for p, r in zip(PROMPTS, rows, strict=True)}
    prompt_ids = {p: proc.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS}
    policy = AutoModelForImageTextToText.from_pretrained(dirs["lvlm"])
    trainer = VLPPOTrainer(model=policy, reward_funcs=VLRMReward(dirs["vlrm"]), args=config(tmp_path),
                           train_dataset=Dataset.from_list(rows), processing_class=proc)
    calls: dict[str, list] = {"generate": [], "policy": [], "ref": [], "value": []}
    generate = trainer.policy.generate

    def spy_generate(**kwargs):  # transformers 5 encodes images inside generate, before the forwards
        calls["generate"].append((kwargs.get("input_ids"), kwargs.get("pixel_values")))
        return generate(**kwargs)

    trainer.policy.generate = spy_generate

    def spy(name: str):
        def hook(module, args, kwargs):
            calls[name].append((kwargs.get("input_ids"), kwargs.get("pixel_values")))
        return hook

    trainer.policy.register_forward_pre_hook(spy("policy"), with_kwargs=True)
    trainer.ref_model.register_forward_pre_hook(spy("ref"), with_kwargs=True)
    backbone = getattr(trainer.value_model, trainer.value_model.base_model_prefix)
    backbone.register_forward_pre_hook(spy("value"), with_kwargs=True)
    trainer.train()

    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    assert len(logs) == 2
    for log in logs:
        for key in METRICS:
            assert key in log and math.isfinite(log[key]), (key, log.get(key))
    assert logs[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # reference == policy before any update

    # per update: 2 rollout chunks (generate, ref, value) + 2 epochs x 2 minibatches x 1 micro-batch (policy, value)
    with_pixels = {k: [c for c in v if c[1] is not None] for k, v in calls.items()}
    assert len(with_pixels["generate"]) == len(calls["generate"]) == 2 * 2
    assert len(with_pixels["ref"]) == len(calls["ref"]) == 2 * 2
    assert len(with_pixels["policy"]) == 2 * 4  # training forwards (generate's own forwards get encoded images)
    assert len(with_pixels["value"]) == len(calls["value"]) == 2 * (2 + 4)
    image_token = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    for name, seen in with_pixels.items():
        for ids, pixels in seen:
            assert pixels.shape[0] == ids.shape[0], f"{name}: {pixels.shape[0]} images for {ids.shape[0]} rows"
            for row, pix in zip(ids.tolist(), pixels, strict=True):
                assert image_token in row
                match = [p for p, t in prompt_ids.items() if _contains(row, t)]
                assert len(match) == 1, (name, row)
                torch.testing.assert_close(pix, expected[match[0]])  # this row's own image, not a neighbour's


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_missing_image_is_a_clear_error(dirs, tmp_path):
    rows = image_rows(dirs)
    rows[3] = {**rows[3], "image": None}
    trainer = VLPPOTrainer(model=AutoModelForImageTextToText.from_pretrained(dirs["lvlm"]),
                           reward_funcs=VLRMReward(dirs["vlrm"]), args=config(tmp_path, 1, total_episodes=8,
                                                                              per_device_train_batch_size=4),
                           train_dataset=Dataset.from_list(rows), processing_class=AutoProcessor.from_pretrained(
                               dirs["lvlm"]))
    with pytest.raises(ValueError, match="image block"):
        trainer.train()


# ---- checkpoint / resume ------------------------------------------------------------------------------------
class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        control.should_training_stop = state.global_step >= self.step


def test_checkpoint_and_resume_match_uninterrupted_run(dirs, tmp_path):
    full = text_trainer(dirs, config(tmp_path / "full", 3))
    full.train()
    ref_logs = [h for h in full.state.log_history if "objective/scores" in h]
    part = text_trainer(dirs, config(tmp_path / "run", 3, save_strategy="steps", save_steps=1),
                        callbacks=[StopAt(2)])
    part.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "value_model" / "model.safetensors").exists()
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "trainer_state.json").exists()
    resumed = text_trainer(dirs, config(tmp_path / "run", 3))
    resumed.train(resume_from_checkpoint=str(ckpt))
    logs = [h for h in resumed.state.log_history if "objective/scores" in h]
    assert [h["episode"] for h in logs] == [4, 8, 12]
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "lr"):
        assert logs[-1][key] == pytest.approx(ref_logs[-1][key], rel=1e-5, abs=1e-7), key


def test_resume_skips_a_half_written_checkpoint(dirs, tmp_path):
    """A kill while saving checkpoint-2 leaves only its config.json: ``resume_from_checkpoint="true"`` (the
    command line's string) resumes from checkpoint-1, runs the 2 missing updates, and matches the full run."""
    run = tmp_path / "run"
    part = text_trainer(dirs, config(run, 3, save_strategy="steps", save_steps=1), callbacks=[StopAt(2)])
    part.train()
    ref = [h for h in part.state.log_history if "objective/scores" in h]
    for f in (run / "checkpoint-2").iterdir():
        if f.name != "config.json":
            f.unlink() if f.is_file() else shutil.rmtree(f)
    resumed = text_trainer(dirs, config(run, 3))
    with pytest.warns(UserWarning, match=r"skipping incomplete checkpoint .*checkpoint-2: no trainer_state\.json"):
        resumed.train(resume_from_checkpoint="true")
    logs = [h for h in resumed.state.log_history if "objective/scores" in h]
    assert resumed.timing["updates"] == 2 and [h["episode"] for h in logs] == [4, 8, 12]
    assert logs[1]["objective/scores"] == pytest.approx(ref[1]["objective/scores"], rel=1e-5, abs=1e-7)
    with pytest.raises(CheckpointError, match=r"checkpoint-2: not a complete checkpoint: no trainer_state\.json"), \
            pytest.warns(UserWarning):
        text_trainer(dirs, config(run, 3)).train(resume_from_checkpoint=str(run / "checkpoint-2"))


def test_non_finite_user_reward_raises_or_is_skipped_with_a_warning(dirs, tmp_path):
    """NaN from a reward callable used to count as 0 silently: now it names the function and the sample, or
    (wrapped with ``non_finite="none"``) warns and counts the sample as skipped."""
    def nan_second(prompts, completions, **kw):
        return [math.nan if i == 1 else 0.5 for i in range(len(completions))]

    def trainer(reward: Any, out: Path) -> VLPPOTrainer:
        return VLPPOTrainer(model=AutoModelForCausalLM.from_pretrained(dirs["base"]), reward_funcs=reward,
                            args=config(out, 1), train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                            processing_class=AutoTokenizer.from_pretrained(dirs["base"]),
                            value_model=AutoModelForSequenceClassification.from_pretrained(dirs["rm"], num_labels=1))

    with pytest.raises(NonFiniteRewardError, match=r"nan_second: non-finite reward nan for sample 1 \(of 4; 1 "
                                                   r"non-finite\); prompt: '.*'; completion: "):
        trainer(nan_second, tmp_path / "raise").train()
    skipping = trainer(checked_reward(nan_second, "none"), tmp_path / "none")
    with pytest.warns(NonFiniteRewardWarning, match=r"nan_second: non-finite reward nan for sample 1 .*skipped"):
        skipping.train()
    assert all(math.isfinite(h["objective/scores"]) for h in skipping.state.log_history if "objective/scores" in h)


# ---- sample generations, refused settings ---------------------------------------------------------------------
def scalar_metrics(trainer: VLPPOTrainer) -> list[dict[str, float]]:
    return [{k: h[k] for k in METRICS} for h in trainer.state.log_history if "objective/scores" in h]


def test_sample_generations_follow_trl_schedule_and_leave_training_unchanged(dirs, tmp_path):
    """num_sample_generations=2 over 4 updates: greedy completions of the first eval prompts after updates 1 and 3,
    appended to sample_generations.jsonl; the training metrics equal a run without them (RNG untouched)."""
    plain = text_trainer(dirs, config(tmp_path / "plain", 4))
    plain.train()
    args = config(tmp_path / "sampled", 4, num_sample_generations=2, per_device_eval_batch_size=3)
    sampled = text_trainer(dirs, args, eval_dataset=Dataset.from_dict({"prompt": PROMPTS[3:]}))
    sampled.train()
    assert scalar_metrics(sampled) == scalar_metrics(plain)
    lines = (tmp_path / "sampled" / SAMPLES_FILE).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["step"], r["episode"]) for r in records] == [(1, 4)] * 3 + [(3, 12)] * 3
    assert [r["prompt"] for r in records] == PROMPTS[3:6] * 2
    assert all(isinstance(r["completion"], str) and math.isfinite(r["score"]) for r in records)

    rng = torch.get_rng_state()
    again = sampled.log_sample_generations()  # the final policy's greedy completions, scored by the RM
    assert torch.equal(torch.get_rng_state(), rng) and sampled.log_sample_generations() == again
    tok, rm = sampled.tokenizer, sampled.reward_funcs[0]
    for r in again:
        ids = tok(r["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = sampled.policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                      do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id) + 1]
        assert tok.decode(out, skip_special_tokens=True) == r["completion"]
        with torch.no_grad():
            score = rm(input_ids=torch.tensor([ids[0].tolist() + out])).logits[0, 0].item()
        assert r["score"] == pytest.approx(score, rel=1e-4, abs=1e-5)


def test_unsupported_settings_are_refused(tmp_path):
    with pytest.raises(VLRMError, match="dataset_num_proc=2.*leave it unset"):
        config(tmp_path, dataset_num_proc=2)
    with pytest.raises(ValueError, match="num_sample_generations must be >= 0"):
        config(tmp_path, num_sample_generations=-1)


# ---- PEFT ------------------------------------------------------------------------------------------------
def test_peft_reference_is_policy_with_adapters_disabled(dirs, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = text_trainer(dirs, config(tmp_path, 2, learning_rate=5e-2), peft_config=lora)
    assert trainer.ref_model is None and trainer.is_peft_model
    trainer.train()
    base = AutoModelForCausalLM.from_pretrained(dirs["base"])
    ids = torch.tensor([[5, 9, 12, 30, 41]])
    with torch.no_grad(), trainer._reference() as ref:
        ref_logits = ref(input_ids=ids).logits
    with torch.no_grad():
        tuned = trainer.policy(input_ids=ids).logits
        torch.testing.assert_close(ref_logits, base(input_ids=ids).logits)
    assert not torch.allclose(tuned, ref_logits), "the adapters did not train (or were disabled for the policy too)"


# ---- parity with TRL 1.12 -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_parity_with_trl_1_12_ppo(dirs):
    """Same seed, data and config as TRL 1.12's PPOTrainer on a text-only tiny policy + text RM.

    Rollouts are sample-identical: ``VLPPOTrainer`` consumes the global torch RNG exactly as TRL 1.12 does
    (one draw for the epoch's shuffle, then sampling in ``generate``), and numpy's RNG for the minibatch
    permutation, so the first updates' metrics must agree to float precision. Each trainer runs in its own
    subprocess (TRL 1.12 from the isolated ``.trl112/`` dir first on sys.path there) via ``benchmarks/ppo_step.py``.
    ``num_mini_batches=1``: with more, TRL 1.12 sized its stats arrays and accumulation by
    ``gradient_accumulation_steps`` instead of micro-batches per minibatch (diluted ``val/ratio``, one
    optimizer step per two minibatches); ``VLPPOTrainer`` fixes that, so the two would differ there by design.
    """
    env = subprocess.run(["bash", str(ROOT / ".ci" / "trl112-env.sh"), sys.executable], capture_output=True,
                         text=True, timeout=300)
    assert env.returncode == 0, env.stderr
    spec = importlib.util.spec_from_file_location("ppo_step", ROOT / "benchmarks" / "ppo_step.py")
    ppo_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ppo_step)
    zoo_dir = dirs["base"].parent
    trl, ours = (ppo_step.run_subprocess(impl, zoo_dir, updates=3) for impl in ("trl112", "vl"))
    assert trl["trl"] == "1.12.0" and len(trl["logs"]) == len(ours["logs"]) == 3
    for theirs, mine in zip(trl["logs"], ours["logs"], strict=True):
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "val/ratio"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (key, mine["episode"])
