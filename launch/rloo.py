"""RLOO for a vision-language policy, rewarded by a merged VLRM (TRL's RLOOTrainer + ``VLRMReward``).

Single process::

    python launch/rloo.py --config recipes/train/rloo.yaml

Many GPUs / nodes (DDP or DeepSpeed ZeRO-2/3)::

    accelerate launch --config_file recipes/accelerate/zero3.yaml launch/rloo.py --config recipes/train/rloo.yaml

Every argument of ``RewardScriptArguments`` (dataset, reward), ``trl.RLOOConfig`` (all TRL/transformers
training arguments, ``report_to`` included) and ``trl.ModelConfig`` (policy, LoRA: ``--use_peft --lora_r``)
can be given on the command line or in the ``--config`` YAML; the command line wins.
"""

from __future__ import annotations

from trl import ModelConfig, RLOOConfig, RLOOTrainer, TrlParser, get_peft_config

from vlrm_rlhf import scripts


def main(script_args: scripts.RewardScriptArguments, training_args: RLOOConfig, model_args: ModelConfig) -> None:
    """Load data and rewards, check them, train, save."""
    policy, dataset, rewards = scripts.prepare_rl(script_args, model_args)
    training_args.model_init_kwargs = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation,
                                       **(training_args.model_init_kwargs or {})}
    trainer = RLOOTrainer(
        model=policy,  # a path: with beta != 0 TRL rebuilds the reference model from it
        reward_funcs=rewards,
        args=training_args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
    )
    scripts.train_and_save(trainer, training_args)


if __name__ == "__main__":
    parser = TrlParser((scripts.RewardScriptArguments, RLOOConfig, ModelConfig))
    scripts.run_recipe(main, parser)
