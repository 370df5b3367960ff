"""Support for the training recipes (``launch/*.py``), like ``trl/scripts/utils.py``: script arguments and their
parsing, reward loading and pre-flight probing, the common set-up of an online-RL run and its end.

The prompt datasets themselves are loaded and validated by ``vlrm_rlhf.prompt_data``.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from trl import ScriptArguments

from .checkpoints import (
    OutputInUseError,
    clear_checkpoints,
    previous_run,
    resolve_resume,
    resume_requested,
)
from .errors import VLRMError
from .prompt_data import DataError, load_prompt_dataset
from .reward.inputs import make_sample

__all__ = ["OutputArguments", "RewardLengthError", "RewardScriptArguments", "check_reward_model", "checked_reward",
           "explain_batch_error", "load_reward_funcs", "loading", "parse", "policy_needs_images", "prepare_output",
           "prepare_rl", "probe_rewards", "reward_load_kwargs", "run_recipe", "train_and_save"]


class RewardLengthError(VLRMError, ValueError):
    """A reward function returned a number of rewards other than one per completion."""


@dataclass
class OutputArguments:
    """What a recipe does with an ``output_dir`` that holds an earlier run (every recipe's script arguments)."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an output_dir that holds an earlier run: its checkpoints are deleted. Without it "
                "(or --resume_from_checkpoint) such a folder is refused."})


@dataclass
class RewardScriptArguments(ScriptArguments, OutputArguments):
    """TRL's script arguments (``dataset_name``, ``dataset_train_split``, ...) plus the reward's.

    ``dataset_name`` is a local JSON/JSONL/parquet file or ``save_to_disk`` directory (see ``vlrm_rlhf.prompt_data``).
    """

    reward_model_path: str | None = field(default=None, metadata={
        "help": "VLRM directory (vlrm-rlhf merge output), or the URL of a served one (vlrm-rlhf serve)."})
    reward_modes: list[str] = field(default_factory=lambda: ["vlrm"], metadata={
        "help": "VLRM scorer modes, one reward function each: vlrm, no_image (weight them with reward_weights)."})
    reward_funcs: list[str] = field(default_factory=list, metadata={
        "help": "Extra reward functions as dotted import paths (my_module.my_reward), GRPO protocol."})
    reward_normalize: str | None = field(default=None, metadata={
        "help": "Normalise VLRM rewards: 'batch' or 'running' (default: raw)."})
    reward_non_finite: str = field(default="raise", metadata={
        "help": "A NaN/inf reward (VLRM or --reward_funcs): 'raise' an error naming the sample, or 'none': skip "
                "the sample with a warning naming it."})
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


@contextmanager
def loading(what: str) -> Iterator[None]:
    """Turn a failure to load ``what`` (a missing folder, a bad config: ``OSError``/``ValueError``) into a
    ``DataError`` naming it, with the loader's first line."""
    try:
        yield
    except VLRMError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load {what}: {first}") from e


def policy_needs_images(model_name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the policy checkpoint is a vision-language model (its config has a separate text config)."""
    from transformers import AutoConfig

    from .models.loading import pretrained

    with loading(f"the policy --model_name_or_path {model_name_or_path}"):
        cfg = pretrained(AutoConfig, model_name_or_path, trust_remote_code=trust_remote_code)
    return cfg.get_text_config() is not cfg


# ---- rewards ------------------------------------------------------------------------------------------
def checked_reward(func: Callable[..., Any], non_finite: str = "raise") -> Callable[..., Any]:
    """Wrap a GRPO/RLOO/PPO reward function so that a wrong number of rewards is a clear error naming it, and
    NaN/inf rewards follow the VLRM reward's ``non_finite`` policy (``reward.trl.check_finite``: raise, or
    ``"none"``: skip with a warning naming the sample)."""
    from trl.trainer.utils import get_callable_name, is_async_callable

    from .reward.trl import check_finite

    name = get_callable_name(func)

    def check(out: Any, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float | None]:
        n = len(out) if isinstance(out, Sequence) else None
        if n != len(completions):
            got = f"{n} rewards" if n is not None else f"a {type(out).__name__}"
            raise RewardLengthError(f"reward function {name!r} returned {got} for {len(completions)} completions; "
                                    "it must return one float (or None) per completion")
        return check_finite(name, list(out), prompts, completions, non_finite)  # type: ignore[arg-type]

    wraps = functools.wraps(func if callable(func) and hasattr(func, "__name__") else checked_reward)
    if is_async_callable(func):  # a served reward (RemoteReward): stays async, so TRL runs it concurrently
        @wraps
        async def wrapper(*, prompts: Sequence[Any], completions: Sequence[Any], **kw: Any) -> list[float | None]:
            return check(await func(prompts=prompts, completions=completions, **kw), prompts, completions)
    else:
        @wraps
        def wrapper(*, prompts: Sequence[Any], completions: Sequence[Any], **kw: Any) -> list[float | None]:
            return check(func(prompts=prompts, completions=completions, **kw), prompts, completions)

    wrapper.__name__ = name
    wrapper.__wrapped__ = func  # type: ignore[attr-defined]
    return wrapper


def probe_rewards(funcs: Sequence[Callable[..., Any]], dataset: Any, rows: int = 2) -> None:
    """Call each reward function that is not a VLRM once, before training, on the first ``rows`` prompts with a
    dummy completion: a wrong number of rewards raises ``RewardLengthError`` now instead of after the first
    generation. Other failures of the probe are ignored (the function may need real completions)."""
    from .reward.remote import call_reward
    from .reward.trl import RewardValueError, VLRMReward

    batch = dataset.select(range(min(rows, len(dataset))))
    columns = {c: list(batch[c]) for c in batch.column_names if c != "prompt"}
    completions = [[{"role": "assistant", "content": "ok"}] for _ in range(len(batch))]
    for f in funcs:
        if isinstance(getattr(f, "__wrapped__", f), VLRMReward):  # VLRMs are checked by check_reward_model
            continue
        try:
            call_reward(f, prompts=list(batch["prompt"]), completions=completions, completion_ids=[[0]] * len(batch),
                        trainer_state=None, log_extra=None, log_metric=None, **columns)
        except (RewardLengthError, RewardValueError):
            raise
        except Exception:  # noqa: BLE001, S110  (see the docstring)
            pass


def load_reward_funcs(reward_model_path: str | None, modes: Sequence[str] = ("vlrm",),
                      extra: Sequence[str] = (), **kw: Any) -> list[Callable[..., Any]]:
    """The VLRM reward functions (one per mode, see ``vlrm_rlhf.reward_funcs``) plus ``extra`` dotted import
    paths of reward functions (``my_module.my_reward``, imported relative to the working directory), each
    wrapped by ``checked_reward``. ``non_finite`` (``"raise"``/``"none"``) applies to all of them."""
    import importlib

    from .reward.factory import reward_funcs
    from .reward.remote import RemoteReward, is_url

    non_finite = kw.pop("non_finite", "raise")
    if non_finite not in ("raise", "none"):
        raise DataError(f"--reward_non_finite {non_finite!r}: use 'raise' or 'none'")
    if is_url(reward_model_path):  # a served reward (vlrm-rlhf serve): loading options belong to the server
        given = {k: v for k, v in kw.items() if v is not None}
        if given or tuple(modes) != ("vlrm",):
            raise DataError(f"--reward_model_path {reward_model_path} is a served reward: "
                            f"{sorted(given) or ['--reward_modes']} are set on the server (vlrm-rlhf serve), not here")
        funcs: list[Callable[..., Any]] = [RemoteReward(reward_model_path, non_finite=non_finite)]
    else:
        with loading(f"the reward model --reward_model_path {reward_model_path}"):
            funcs = list(reward_funcs(reward_model_path, modes=tuple(modes), non_finite=non_finite,
                                      **kw)) if reward_model_path else []
    for dotted in extra:
        module, _, attr = dotted.rpartition(".")
        if not module:
            raise DataError(f"reward function {dotted!r}: give a dotted import path like my_module.my_reward")
        sys.path.insert(0, os.getcwd())
        try:
            func = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise DataError(f"reward function {dotted!r} cannot be imported: {type(e).__name__}: {e}") from e
        if not callable(func):
            raise DataError(f"reward function {dotted!r} is a {type(func).__name__}, not a function")
        funcs.append(func)
    if not funcs:
        raise DataError("no reward: give --reward_model_path (a VLRM directory) and/or --reward_funcs")
    return [checked_reward(f, non_finite) for f in funcs]


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
    """``parser.parse_args_and_config()`` with batch-size errors explained (see ``explain_batch_error``); any
    other invalid setting or unreadable ``--config`` is a ``DataError`` with the parser's message."""
    try:
        return parser.parse_args_and_config()
    except VLRMError:
        raise
    except ValueError as e:
        err = explain_batch_error(e)
        raise (err if err is not e else DataError(f"invalid training arguments: {e}")) from None
    except OSError as e:
        raise DataError(f"cannot read the --config file: {e}") from None


def prepare_output(script_args: Any, training_args: Any, *, resolve: bool = True) -> None:
    """Before loading anything: decide what happens to ``output_dir``.

    ``--resume_from_checkpoint true`` (``True``, ``1``, ``yes``, or the YAML's ``true``) becomes the newest
    *complete* checkpoint there (``resolve``; otherwise just ``True``), a path must be a complete checkpoint
    (``checkpoints.resolve_resume``). Without it, an ``output_dir`` holding an earlier run is refused
    (``OutputInUseError``) unless ``--overwrite_output_dir`` is given, which deletes the old checkpoints.
    """
    out = training_args.output_dir
    asked = resume_requested(training_args.resume_from_checkpoint)
    if asked is not False:
        training_args.resume_from_checkpoint = resolve_resume(asked, out, optimizer=not training_args.save_only_model) \
            if resolve else asked
        return
    training_args.resume_from_checkpoint = None
    if getattr(script_args, "overwrite_output_dir", False):
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one process per machine deletes
            gone = clear_checkpoints(out)
            if gone:
                print(f"--overwrite_output_dir: deleted the earlier run's {', '.join(gone)} in {out}", file=sys.stderr)
        return
    found = previous_run(out)
    if found:
        listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise OutputInUseError(f"--output_dir {out} holds an earlier run ({listed}): pass --resume_from_checkpoint "
                               "true to continue it, or --overwrite_output_dir to start over (deletes its checkpoints)")


def run_recipe(main: Callable[..., None], parser: Any, *, resolve: bool = True) -> None:
    """A recipe's ``__main__``: parse the arguments, check the output folder (``prepare_output``), run ``main``.

    A bad input (any ``VLRMError``: data, reward, arguments, checkpoints) ends in one ``error:`` line naming the
    culprit on stderr and exit status 2, not a traceback (set ``VLRM_TRACEBACK=1`` to see it).
    """
    try:
        args = parse(parser)
        prepare_output(args[0], args[1], resolve=resolve)
        main(*args)
    except VLRMError as e:
        if os.environ.get("VLRM_TRACEBACK"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


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
                                non_finite=script_args.reward_non_finite, **script_args.reward_load_kwargs())
    # fail now, not after the first generation: a VLRM that cannot render these conversations, a reward
    # function that returns the wrong number of rewards
    if script_args.reward_model_path and hasattr(rewards[0].__wrapped__, "scorer"):  # served: checked by the server
        check_reward_model(rewards[0].__wrapped__.scorer, dataset, script_args.reward_model_path)
    probe_rewards(rewards, dataset)
    return policy, dataset, rewards


def train_and_save(trainer: Any, args: Any) -> None:
    """The end of every recipe: train (resuming from the newest *complete* checkpoint if asked, see
    ``checkpoints.resolve_resume``), save the model and ``trainer_state.json`` (the logged metrics), then
    ``Trainer.end()``: finish trackers and destroy the process group, for a clean DeepSpeed exit."""
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir, optimizer=not args.save_only_model)
    if resume:
        trainer.accelerator.print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    trainer.save_state()
    trainer.accelerator.print(f"saved to {args.output_dir}")
    trainer.end()
