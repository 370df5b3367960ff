"""``VLPPOConfig``: the training arguments of :class:`~vlrm_rlhf.trainers.ppo.VLPPOTrainer`.

A ``transformers.TrainingArguments`` dataclass in TRL's style (one field per knob, help text in the metadata, so
``TrlParser``/``HfArgumentParser`` turn it into CLI flags and YAML keys). The PPO fields and their defaults are
those of TRL 1.12's ``PPOConfig`` (removed from TRL in 1.13), so a TRL 1.12 PPO config ports unchanged; the
derived batch sizes (``batch_size``, ``local_mini_batch_size``, ...) are filled in by the trainer, as in TRL.
Added here: ``reward_weights`` (several GRPO-protocol rewards, weighted) and ``value_model_path``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from ..errors import VLRMError

__all__ = ["PPOConfigError", "VLPPOConfig"]


class PPOConfigError(VLRMError, ValueError):
    """A PPO setting that is out of range, inconsistent with another, or not supported; the message names it."""


@dataclass
class VLPPOConfig(TrainingArguments):
    """PPO hyper-parameters (TRL 1.12 semantics) on top of ``TrainingArguments``.

    One PPO *update* samples ``batch_size = per_device_train_batch_size * gradient_accumulation_steps *
    world_size`` prompts, then runs ``num_ppo_epochs`` passes of ``num_mini_batches`` optimizer steps over them.
    ``total_episodes`` (default: ``num_train_epochs * len(train_dataset)``) sets the number of updates.
    """

    # TrainingArguments overrides (TRL's defaults)
    learning_rate: float = field(default=3e-6, metadata={"help": "Initial learning rate for AdamW."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X PPO updates."})
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "Clip the gradient norm at each optimizer step (0: off, TRL 1.12 PPO's behaviour); DeepSpeed clips "
                "through its gradient_clipping, filled from this value."})
    bf16: bool | None = field(default=False, metadata={"help": "Use bf16 mixed precision."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every dataset column (rewards use them)."})
    # PPO (TRL 1.12 PPOConfig fields and defaults)
    dataset_num_proc: int | None = field(default=None, metadata={
        "help": "Kept for TRL 1.12 configs; must stay unset: prompts are processed per rollout batch, not by a "
                "dataset map."})
    num_mini_batches: int = field(default=1, metadata={"help": "Number of minibatches to split a batch into."})
    total_episodes: int | None = field(default=None, metadata={"help": "Total number of episodes (prompts)."})
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Per-rank batch size of rollout generation and no-grad forwards."})
    num_sample_generations: int = field(default=10, metadata={
        "help": "How many times to log greedy completions of the first per_device_eval_batch_size eval prompts "
                "with their scores (after update 1, then every num_total_batches // this updates; appended to "
                "<output_dir>/sample_generations.jsonl). 0: never; needs an eval_dataset."})
    response_length: int = field(default=53, metadata={"help": "Maximum number of generated tokens."})
    stop_token: Literal["eos"] | None = field(
        default=None, metadata={"help": "'eos' truncates responses at the tokenizer's eos token (one of stop_token*)."})
    stop_token_id: int | None = field(default=None, metadata={"help": "Truncate responses at this token id."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (also scales logprobs)."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of responses without an eos token."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "PPO epochs over each rollout batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient (KL-in-reward)."})
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1", metadata={"help": "KL estimator: 'k1' (log-ratio) or 'k3' (lower variance); joschu.net/blog/kl-approx."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value prediction clip range."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    ds3_gather_for_generation: bool = field(
        default=True, metadata={"help": "ZeRO-3: gather the policy's weights for generation (faster, more memory)."})
    model_adapter_name: str | None = field(default=None, metadata={"help": "PEFT: the trained adapter's name."})
    ref_adapter_name: str | None = field(
        default=None, metadata={"help": "PEFT: an adapter used as reference (default: adapters disabled)."})
    # Added for vision-language PPO
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function (default: all 1.0)."})
    value_model_path: str | None = field(
        default=None, metadata={"help": "Value model checkpoint (default: the VLRM; scalar head per token)."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Error out on prompts longer than this many tokens (None: no limit)."})
    # Derived by the trainer (TRL 1.12 names); not meant to be set by users
    # (``world_size``, TRL 1.12's derived process count, is TrainingArguments' own property here: a dataclass
    # field of that name would shadow it with None, and DeepSpeed's "auto" batch sizes read it.)
    num_total_batches: int | None = field(default=None, metadata={"help": "Derived: number of PPO updates."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "Derived: global micro-batch size."})
    local_batch_size: int | None = field(default=None, metadata={"help": "Derived: per-rank rollout batch size."})
    batch_size: int | None = field(default=None, metadata={"help": "Derived: global rollout batch size."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "Derived: per-rank minibatch size."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Derived: global minibatch size."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset_num_proc is not None:
            raise PPOConfigError(
                f"dataset_num_proc={self.dataset_num_proc}: VLPPOTrainer maps no dataset (each rollout batch's "
                "prompts and images are processed when sampled), so there is nothing to parallelise: leave it unset")
        if self.num_sample_generations < 0:
            raise PPOConfigError(f"num_sample_generations must be >= 0, got {self.num_sample_generations}")
        if self.kl_estimator not in ("k1", "k3"):
            raise PPOConfigError(f"kl_estimator must be 'k1' or 'k3', not {self.kl_estimator!r}")
        if self.stop_token is not None and self.stop_token_id is not None:
            raise PPOConfigError("set at most one of stop_token and stop_token_id")
        if self.stop_token not in (None, "eos"):
            raise PPOConfigError(f"stop_token must be 'eos' or None, not {self.stop_token!r}")
        if self.temperature <= 0:
            raise PPOConfigError(f"temperature must be > 0 (PPO samples), got {self.temperature}")
