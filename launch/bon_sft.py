"""Best-of-n rejection-sampling fine-tuning of a vision-language policy with a merged VLRM.

For ``num_rounds`` rounds: sample ``num_samples`` answers per prompt with the current policy, keep the VLRM's
best (``vlrm_rlhf.bon.best_of_n``), fine-tune the policy on (prompt, image, best answer) with TRL's
``SFTTrainer``, repeat. The mean best reward of each round is logged (``bon/mean_best_reward`` through
``report_to``) and written to ``<output_dir>/bon_rounds.jsonl``.

    python launch/bon_sft.py --config recipes/train/bon_sft.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml launch/bon_sft.py --config recipes/train/bon_sft.yaml

``max_steps`` / ``num_train_epochs`` apply to each round's fine-tuning. Under DDP every rank samples every
prompt with the same seed (identical data on all ranks; the sampling is not sharded). DeepSpeed ZeRO-3 is not
supported here (sampling needs the full policy on each rank); use DDP or ZeRO-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from vlrm_rlhf import prompt_data, scripts
from vlrm_rlhf.files import write_jsonl_atomic
from vlrm_rlhf.models.loading import pretrained


@dataclass
class BonScriptArguments(ScriptArguments):
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


def main(script_args: BonScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    """Rounds of best-of-n selection and SFT; saves the final policy in ``output_dir``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlrm_rlhf.reward.scorer import VLRewardScorer

    if not (model_args.model_name_or_path and script_args.reward_model_path and script_args.dataset_name):
        raise prompt_data.DataError("--model_name_or_path, --reward_model_path and --dataset_name are required")
    dataset = prompt_data.load_prompt_dataset(script_args.dataset_name, script_args.dataset_train_split,
                                              require_images=scripts.policy_needs_images(
                                                  model_args.model_name_or_path, model_args.trust_remote_code))
    scorer = VLRewardScorer.from_pretrained(script_args.reward_model_path, mode=script_args.reward_mode,
                                            **scripts.reward_load_kwargs(script_args))
    scripts.check_reward_model(scorer, dataset, script_args.reward_model_path)
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
    trust = model_args.trust_remote_code  # the user's own flag; False by default: never a prompt
    policy: Any = pretrained(AutoModelForImageTextToText, model_args.model_name_or_path, dtype=dtype,
                             trust_remote_code=trust)
    processor = pretrained(AutoProcessor, model_args.model_name_or_path, trust_remote_code=trust)
    peft_config = get_peft_config(model_args)
    out = Path(training_args.output_dir)
    history = []
    for k in range(script_args.num_rounds):
        scorer.model.to(policy.device)
        scorer.device = policy.device
        sft_data, stats = select(policy, processor, scorer, dataset, script_args, seed=training_args.seed + k)
        trainer = SFTTrainer(model=policy, args=training_args, train_dataset=sft_data, processing_class=processor,
                             peft_config=peft_config if k == 0 else None)  # later rounds: the adapters exist
        result = trainer.train()
        policy = trainer.model
        trainer.log({**stats, "bon/round": k})
        history.append({"round": k, **stats, "train_loss": result.training_loss})
        trainer.accelerator.print(f"round {k}: mean best reward {stats['bon/mean_best_reward']:.4f} "
                                  f"(mean of all samples {stats['bon/mean_reward']:.4f})")
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        write_jsonl_atomic(history, out / "bon_rounds.jsonl", force=True)
    trainer.end()


if __name__ == "__main__":
    parser = TrlParser((BonScriptArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
