"""Best-of-n rejection-sampling fine-tuning of a vision-language policy with a merged VLRM.

For ``num_rounds`` rounds: sample ``num_samples`` answers per prompt with the current policy, keep the VLRM's
best (``vlrm_rlhf.bon.best_of_n``), fine-tune the policy on (prompt, image, best answer) with TRL's
``SFTTrainer``, repeat. The mean best reward of each round is logged (``bon/mean_best_reward`` through
``report_to``) and written to ``<output_dir>/bon_rounds.jsonl``.

    python launch/bon_sft.py --config recipes/train/bon_sft.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml launch/bon_sft.py --config recipes/train/bon_sft.yaml

``max_steps`` / ``num_train_epochs`` apply to each round's fine-tuning. Round ``k`` checkpoints into
``<output_dir>/round-k/`` and ends by saving its selected data (``bon_data/``) and policy there;
``--resume_from_checkpoint true`` continues after the last finished round (from the newest complete checkpoint
of the round in progress, if any). Under DDP every rank samples every
prompt with the same seed (identical data on all ranks; the sampling is not sharded). DeepSpeed ZeRO-3 is not
supported here (sampling needs the full policy on each rank); use DDP or ZeRO-2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from vlrm_rlhf import prompt_data, scripts
from vlrm_rlhf.checkpoints import CheckpointError, last_complete_checkpoint
from vlrm_rlhf.files import atomic_output_dir, read_jsonl, write_jsonl_atomic
from vlrm_rlhf.models.loading import pretrained

ROUNDS_FILE = "bon_rounds.jsonl"  # one record per finished round: the resume point


@dataclass
class BonScriptArguments(ScriptArguments, scripts.OutputArguments):
    """TRL's script arguments plus the reward model and the sampling schedule."""

    reward_model_path: str | None = field(default=None, metadata={"help": "VLRM directory (vlrm-rlhf merge output)."})
    reward_mode: str = field(default="vlrm", metadata={"help": "Scorer mode: vlrm or no_image."})
    reward_device: str | None = field(default=None, metadata={
        "help": "Device of the VLRM (cpu, cuda; 'auto' spreads it over the GPUs)."})
    reward_dtype: str | None = field(default=None, metadata={"help": "Dtype the VLRM loads in (bfloat16, ...)."})
    reward_attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel of the VLRM: sdpa, flash_attention_2, eager."})
    num_rounds: int = field(default=2, metadata={"help": "Rounds of sample -> select -> fine-tune."})
    num_samples: int = field(default=8, metadata={"help": "Answers sampled per prompt (the n of best-of-n)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest sampled answer, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})


def select(policy: Any, processor: Any, scorer: Any, dataset: Any, args: BonScriptArguments, seed: int) -> tuple[Any, dict]:
    """Best-of-n answers for every prompt: an SFT dataset (prompt, completion, images) and round statistics."""
    from datasets import Dataset

    from vlrm_rlhf.bon import best_of_n

    images = [row.get("images") or [row["image"]] for row in dataset]
    policy.eval()
    results = best_of_n(policy, processor, scorer, dataset["prompt"], images, n=args.num_samples, seed=seed,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    keep = [i for i, r in enumerate(results) if math.isfinite(r.scores[r.best_index])]  # all-empty samples: skip
    if not keep:
        raise prompt_data.DataError("every sampled answer was empty: nothing to fine-tune on (raise max_new_tokens?)")
    best = [results[i].scores[results[i].best_index] for i in keep]
    finite = [s for r in results for s in r.scores if math.isfinite(s)]
    rows = {"prompt": [dataset[i]["prompt"] for i in keep],
            "completion": [[{"role": "assistant", "content": [{"type": "text", "text": results[i].best}]}] for i in keep],
            "images": [images[i] for i in keep]}
    stats = {"bon/mean_best_reward": sum(best) / len(best), "bon/mean_reward": sum(finite) / len(finite),
             "bon/kept": len(keep)}
    return Dataset.from_dict(rows), stats


def resume_point(out: Path, num_rounds: int, optimizer: bool) -> tuple[list[dict], str | None]:
    """For ``--resume_from_checkpoint true``: the finished rounds' records and the newest complete checkpoint of
    the round in progress (``None``: start that round afresh). ``CheckpointError`` when there is nothing to resume."""
    history = [row for _, row in read_jsonl(out / ROUNDS_FILE)] if (out / ROUNDS_FILE).is_file() else []
    if [r.get("round") for r in history] != list(range(len(history))):
        raise CheckpointError(f"{out / ROUNDS_FILE}: rounds {[r.get('round') for r in history]} are not 0, 1, ...")
    ckpt = last_complete_checkpoint(out / f"round-{len(history)}", optimizer=optimizer) \
        if len(history) < num_rounds else None
    if not history and ckpt is None:
        raise CheckpointError(f"--resume_from_checkpoint true: {out} holds no finished round and no complete "
                              "checkpoint of round 0; drop --resume_from_checkpoint to start a new run")
    return history, None if ckpt is None else str(ckpt)


def load_round_policy(folder: Path, base: str, dtype: Any, trust_remote_code: bool = False) -> Any:
    """The policy a finished round saved in ``folder``: a full model, or ``base`` plus its trainable adapters."""
    from transformers import AutoModelForImageTextToText

    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base_model = pretrained(AutoModelForImageTextToText, base, dtype=dtype, trust_remote_code=trust_remote_code)
        return PeftModel.from_pretrained(base_model, folder, is_trainable=True)  # adapter weights only: no code
    return pretrained(AutoModelForImageTextToText, folder, dtype=dtype, trust_remote_code=trust_remote_code)


def main(script_args: BonScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    """Rounds of best-of-n selection and SFT; saves the final policy in ``output_dir``."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoProcessor

    from vlrm_rlhf.reward.remote import RemoteReward, is_url
    from vlrm_rlhf.reward.scorer import VLRewardScorer

    if not (model_args.model_name_or_path and script_args.reward_model_path and script_args.dataset_name):
        raise prompt_data.DataError("--model_name_or_path, --reward_model_path and --dataset_name are required")
    out = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume not in (None, True):
        raise CheckpointError(f"--resume_from_checkpoint {resume}: bon_sft resumes by round; pass "
                              "--resume_from_checkpoint true")
    history, ckpt = resume_point(out, script_args.num_rounds, not training_args.save_only_model) if resume \
        else ([], None)
    dataset = prompt_data.load_prompt_dataset(script_args.dataset_name, script_args.dataset_train_split,
                                              require_images=scripts.policy_needs_images(
                                                  model_args.model_name_or_path, getattr(model_args, "trust_remote_code", False)))
    if is_url(script_args.reward_model_path):  # served (vlrm-rlhf serve): the server holds the model and its mode
        scorer: Any = RemoteReward(script_args.reward_model_path)
    else:
        with scripts.loading(f"the reward model --reward_model_path {script_args.reward_model_path}"):
            scorer = VLRewardScorer.from_pretrained(script_args.reward_model_path, mode=script_args.reward_mode,
                                                    **scripts.reward_load_kwargs(script_args))
        scripts.check_reward_model(scorer, dataset, script_args.reward_model_path)
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
    trust = getattr(model_args, "trust_remote_code", False)  # TRL 1.16's ModelConfig has no such flag: False
    start = len(history)
    with scripts.loading(f"the policy --model_name_or_path {model_args.model_name_or_path}"):
        policy: Any = load_round_policy(out / f"round-{start - 1}" if start else Path(model_args.model_name_or_path),
                                        model_args.model_name_or_path, dtype, trust)
        processor = pretrained(AutoProcessor, model_args.model_name_or_path, trust_remote_code=trust)
    peft_config = get_peft_config(model_args)
    trainer = None
    for k in range(start, script_args.num_rounds):
        rdir = out / f"round-{k}"
        training_args.output_dir = str(rdir)
        if resume and (rdir / "bon_data" / "stats.json").is_file():  # the round in progress: its own selection
            sft_data = load_from_disk(str(rdir / "bon_data"))
            stats = json.loads((rdir / "bon_data" / "stats.json").read_text())
        else:
            if not isinstance(scorer, RemoteReward):  # a served reward scores on its own machines
                scorer.model.to(policy.device)
                scorer.device = policy.device
            sft_data, stats = select(policy, processor, scorer, dataset, script_args, seed=training_args.seed + k)
            if training_args.should_save:
                with atomic_output_dir(rdir / "bon_data", force=True) as tmp:
                    sft_data.save_to_disk(str(tmp))
                    (tmp / "stats.json").write_text(json.dumps(stats))
        trainer = SFTTrainer(model=policy, args=training_args, train_dataset=sft_data, processing_class=processor,
                             peft_config=peft_config if k == 0 else None)  # later rounds: the adapters exist
        result = trainer.train(resume_from_checkpoint=ckpt if k == start else None)
        policy = trainer.model
        trainer.save_model(str(rdir))  # the round's policy: where a resumed run starts the next round
        trainer.log({**stats, "bon/round": k})
        history.append({"round": k, **stats, "train_loss": result.training_loss})
        if trainer.accelerator.is_main_process:
            write_jsonl_atomic(history, out / ROUNDS_FILE, force=True)
        trainer.accelerator.print(f"round {k}: mean best reward {stats['bon/mean_best_reward']:.4f} "
                                  f"(mean of all samples {stats['bon/mean_reward']:.4f})")
    training_args.output_dir = str(out)
    if trainer is None:  # every round had finished before: save the last round's policy
        if training_args.should_save:
            policy.save_pretrained(out)
            processor.save_pretrained(out)
        return
    trainer.save_model(str(out))
    trainer.end()


if __name__ == "__main__":
    parser = TrlParser((BonScriptArguments, SFTConfig, ModelConfig))
    scripts.run_recipe(main, parser, resolve=False)
