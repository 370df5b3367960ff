"""PPO for a vision-language policy, rewarded by a merged VLRM (``VLPPOTrainer``; the value model defaults to the VLRM).

Single process::

    python launch/ppo.py --config recipes/train/ppo.yaml

Many GPUs / nodes (DDP or DeepSpeed ZeRO-2/3)::

    accelerate launch --config_file recipes/accelerate/zero3.yaml launch/ppo.py --config recipes/train/ppo.yaml

Every argument of ``RewardScriptArguments`` (dataset, reward), ``VLPPOConfig`` (TRL 1.12 PPO knobs plus all
transformers training arguments, ``report_to`` included) and ``trl.ModelConfig`` (policy, LoRA: ``--use_peft
--lora_r``) can be given on the command line or in the ``--config`` YAML; the command line wins.
"""

from __future__ import annotations

from trl import ModelConfig, TrlParser, get_peft_config

from vlrm_rlhf import scripts
from vlrm_rlhf.reward.remote import is_url
from vlrm_rlhf.trainers import VLPPOConfig, VLPPOTrainer


def main(script_args: scripts.RewardScriptArguments, training_args: VLPPOConfig, model_args: ModelConfig) -> None:
    """Load data and rewards, check them, train, save."""
    policy, dataset, rewards = scripts.prepare_rl(script_args, model_args)
    if training_args.value_model_path is None and script_args.reward_model_path:
        if is_url(script_args.reward_model_path):
            raise scripts.DataError(f"--reward_model_path {script_args.reward_model_path} is a served reward: give "
                                    "--value_model_path (a local VLRM or RM directory to start the value model from)")
        training_args.value_model_path = script_args.reward_model_path  # the VLRM, with a fresh-read score head
    trainer = VLPPOTrainer(
        model=policy,  # a path: loaded as AutoModelForImageTextToText (or a causal LM)
        reward_funcs=rewards,
        args=training_args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
    )
    scripts.train_and_save(trainer, training_args)


if __name__ == "__main__":
    parser = TrlParser((scripts.RewardScriptArguments, VLPPOConfig, ModelConfig))
    scripts.run_recipe(main, parser)
