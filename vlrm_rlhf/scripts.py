"""Support for the training recipes (``launch/*.py``), like ``trl/scripts/utils.py``: script arguments and their
parsing, reward loading and pre-flight probing, the common set-up of an online-RL run and its end.

The prompt datasets themselves are loaded and validated by ``vlrm_rlhf.prompt_data``.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trl import ScriptArguments

from .errors import VLRMError
from .prompt_data import DataError, load_prompt_dataset
from .reward.inputs import make_sample

__all__ = ["RewardLengthError", "RewardScriptArguments", "check_reward_model", "checked_reward", "explain_batch_error",
           "load_reward_funcs", "parse", "reward_load_kwargs", "policy_needs_images", "prepare_rl", "probe_rewards", "train_and_save"]


class RewardLengthError(VLRMError, ValueError):
    """A reward function returned a number of rewards other than one per completion."""


@dataclass
class RewardScriptArguments(ScriptArguments):
    """TRL's script arguments (``dataset_name``, ``dataset_train_split``, ...) plus the reward's.

    ``dataset_name`` is a local JSON/JSONL/parquet file or ``save_to_disk`` directory (see ``vlrm_rlhf.prompt_data``).
    """

    reward_model_path: str | None = field(default=None, metadata={"help": "VLRM directory (vlrm-rlhf merge output)."})
    reward_modes: list[str] = field(default_factory=lambda: ["vlrm"], metadata={
        "help": "VLRM scorer modes, one reward function each: vlrm, no_image (weight them with reward_weights)."})
    reward_funcs: list[str] = field(default_factory=list, metadata={
        "help": "Extra reward functions as dotted import paths (my_module.my_reward), GRPO protocol."})
    reward_normalize: str | None = field(default=None, metadata={
        "help": "Normalise VLRM rewards: 'batch' or 'running' (default: raw)."})
    reward_device: str | None = field(default=None, metadata={
        "help": "Device of the VLRM (cpu, cuda, cuda:1; 'auto' spreads it over the GPUs). Default: follows the "
                "trainer's accelerator."})
    reward_dtype: str | None = field(default=None, metadata={
        "help": "Dtype the VLRM's weights load in (bfloat16, float16, float32, auto)."})
    reward_attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel of the VLRM: sdpa, flash_attention_2, eager."})

    def reward_load_kwargs(self) -> dict[str, Any]:
        """The scorer's loading options from the reward_* arguments (``reward_load_kwargs``)."""
        return reward_load_kwargs(self)


def reward_load_kwargs(args: Any) -> dict[str, Any]:
    """``VLRewardScorer.from_pretrained`` loading options from script arguments with ``reward_device``,
    ``reward_dtype`` and ``reward_attn_implementation`` (``device="auto"`` becomes ``device_map="auto"``)."""
    kw = {"device": getattr(args, "reward_device", None), "dtype": getattr(args, "reward_dtype", None),
          "attn_implementation": getattr(args, "reward_attn_implementation", None)}
    if kw["device"] == "auto":
        kw["device_map"] = kw.pop("device")
    return {k: v for k, v in kw.items() if v is not None}


def policy_needs_images(model_name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the policy checkpoint is a vision-language model (its config has a separate text config)."""
    from transformers import AutoConfig

    from .models.loading import pretrained

    cfg = pretrained(AutoConfig, model_name_or_path, trust_remote_code=trust_remote_code)
    return cfg.get_text_config() is not cfg


# ---- rewards ------------------------------------------------------------------------------------------
def checked_reward(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a GRPO/RLOO reward function so that a wrong number of rewards is a clear error naming it."""
    from trl.trainer.utils import get_callable_name

    name = get_callable_name(func)

    @functools.wraps(func if callable(func) and hasattr(func, "__name__") else checked_reward)
    def wrapper(*, prompts: Sequence[Any], completions: Sequence[Any], **kw: Any) -> list[float | None]:
        out = func(prompts=prompts, completions=completions, **kw)
        n = len(out) if isinstance(out, Sequence) else None
        if n != len(completions):
            got = f"{n} rewards" if n is not None else f"a {type(out).__name__}"
            raise RewardLengthError(f"reward function {name!r} returned {got} for {len(completions)} completions; "
                                    "it must return one float (or None) per completion")
        return list(out)

    wrapper.__name__ = name
    wrapper.__wrapped__ = func  # type: ignore[attr-defined]
    return wrapper


def probe_rewards(funcs: Sequence[Callable[..., Any]], dataset: Any, rows: int = 2) -> None:
    """Call each reward function that is not a VLRM once, before training, on the first ``rows`` prompts with a
    dummy completion: a wrong number of rewards raises ``RewardLengthError`` now instead of after the first
    generation. Other failures of the probe are ignored (the function may need real completions)."""
    from .reward.trl import VLRMReward

    batch = dataset.select(range(min(rows, len(dataset))))
    columns = {c: list(batch[c]) for c in batch.column_names if c != "prompt"}
    completions = [[{"role": "assistant", "content": "ok"}] for _ in range(len(batch))]
    for f in funcs:
        if isinstance(getattr(f, "__wrapped__", f), VLRMReward):  # VLRMs are checked by check_reward_model
            continue
        try:
            f(prompts=list(batch["prompt"]), completions=completions, completion_ids=[[0]] * len(batch),
              trainer_state=None, log_extra=None, log_metric=None, **columns)
        except RewardLengthError:
            raise
        except Exception:  # noqa: BLE001, S110  (see the docstring)
            pass


def load_reward_funcs(reward_model_path: str | None, modes: Sequence[str] = ("vlrm",),
                      extra: Sequence[str] = (), **kw: Any) -> list[Callable[..., Any]]:
    """The VLRM reward functions (one per mode, see ``vlrm_rlhf.reward_funcs``) plus ``extra`` dotted import
    paths of reward functions (``my_module.my_reward``, imported relative to the working directory), each
    wrapped by ``checked_reward``."""
    import importlib

    from .reward.factory import reward_funcs

    funcs: list[Callable[..., Any]] = list(reward_funcs(reward_model_path, modes=tuple(modes), **kw)) \
        if reward_model_path else []
    for dotted in extra:
        module, _, attr = dotted.rpartition(".")
        if not module:
            raise DataError(f"reward function {dotted!r}: give a dotted import path like my_module.my_reward")
        sys.path.insert(0, os.getcwd())
        funcs.append(getattr(importlib.import_module(module), attr))
    if not funcs:
        raise DataError("no reward: give --reward_model_path (a VLRM directory) and/or --reward_funcs")
    return [checked_reward(f) for f in funcs]


def check_reward_model(scorer: Any, dataset: Any, path: str = "the VLRM", rows: int = 1) -> None:
    """Render and encode the first ``rows`` prompts (with a dummy answer) with ``scorer`` before training.

    A VLRM whose processor cannot render the policy's conversations (no chat template, a template that drops
    image blocks, a processor that rejects them, ...) fails here with a ``DataError`` naming the VLRM and the
    row, not at the first reward call after generation. The reward forward runs too, unless the model's
    parameters are ZeRO-3 partitioned (``zero3_init_flag``), where a lone forward is impossible.
    """
    cfg = scorer.model.config
    image_token = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    partitioned = any(hasattr(p, "ds_id") for p in scorer.model.parameters())
    for i in range(min(rows, len(dataset))):
        row = dataset[i]
        imgs = row.get("images") or ([row["image"]] if row.get("image") is not None else [])
        try:
            sample = make_sample(row["prompt"], [{"role": "assistant", "content": "ok"}], imgs or None, i)
            plan = scorer.plan([sample])
            ids = scorer.encode(plan.texts, [plan.samples[0].images])["input_ids"]
            if plan.samples[0].images and image_token is not None and not (ids == image_token).any():
                raise ValueError(f"the rendered text has no image token (id {image_token}): {plan.texts[0]!r:.200}")
            reward = math.nan if partitioned else float(scorer.forward(plan, [0])[0])
        except Exception as e:  # noqa: BLE001  (any failure here means the VLRM cannot score this data)
            raise DataError(f"the reward model {path} cannot score the policy's conversations (dataset row {i}): "
                            f"{type(e).__name__}: {e}") from e
        if not partitioned and not math.isfinite(reward):
            raise DataError(f"the reward model {path} gives a non-finite reward ({reward}) on dataset row {i}")


# ---- configuration ------------------------------------------------------------------------------------
def explain_batch_error(error: ValueError) -> ValueError:
    """TRL's batch-divisibility ``ValueError`` with the arithmetic spelled out (processes included).

    TRL's GRPO/RLOO configs require ``generation_batch_size = per_device_train_batch_size x num_processes x
    steps_per_generation`` to be a multiple of ``num_generations``; under ``accelerate launch`` the process
    count comes from the launcher, so the same YAML can pass on 1 process and fail on 2.
    """
    msg = str(error)
    if "divisible" not in msg:
        return error
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DataError(
        f"{msg} With num_processes={world}: generation_batch_size = per_device_train_batch_size x "
        f"num_processes ({world}) x steps_per_generation (default: gradient_accumulation_steps) must be a "
        "multiple of num_generations. Change per_device_train_batch_size, num_generations, "
        "steps_per_generation or the number of processes.")


def parse(parser: Any) -> tuple[Any, ...]:
    """``parser.parse_args_and_config()`` with batch-size errors explained (see ``explain_batch_error``)."""
    try:
        return parser.parse_args_and_config()
    except ValueError as e:
        err = explain_batch_error(e)
        if err is e:
            raise
        raise err from None


def prepare_rl(script_args: RewardScriptArguments, model_args: Any) -> tuple[str, Any, list[Callable[..., Any]]]:
    """What every online-RL recipe needs before its trainer: the policy path, the checked prompt dataset and
    the (length-checked) reward functions, having failed early on inputs the run could not use."""
    policy = model_args.model_name_or_path
    if not policy:
        raise DataError("--model_name_or_path (the policy LVLM) is required")
    if not script_args.dataset_name:
        raise DataError("--dataset_name (a prompt dataset file or directory) is required")
    dataset = load_prompt_dataset(script_args.dataset_name, script_args.dataset_train_split,
                                  require_images=policy_needs_images(
                                      policy, getattr(model_args, "trust_remote_code", False)))
    rewards = load_reward_funcs(script_args.reward_model_path, script_args.reward_modes,
                                script_args.reward_funcs, normalize=script_args.reward_normalize,
                                **script_args.reward_load_kwargs())
    # fail now, not after the first generation: a VLRM that cannot render these conversations, a reward
    # function that returns the wrong number of rewards
    if script_args.reward_model_path:
        check_reward_model(rewards[0].__wrapped__.scorer, dataset, script_args.reward_model_path)
    probe_rewards(rewards, dataset)
    return policy, dataset, rewards


def train_and_save(trainer: Any, args: Any) -> None:
    """The end of every recipe: train (resuming if asked), save the model and ``trainer_state.json`` (the logged
    metrics), then ``Trainer.end()``: finish trackers and destroy the process group, for a clean DeepSpeed exit."""
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.save_state()
    trainer.accelerator.print(f"saved to {args.output_dir}")
    trainer.end()
