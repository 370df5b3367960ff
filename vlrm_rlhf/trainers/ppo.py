"""``VLPPOTrainer``: PPO for vision-language (and text) policies with GRPO-protocol rewards.

The algorithm is TRL 1.12's PPO (TRL removed ``PPOTrainer`` in 1.13): sample responses with temperature, score
them, put a per-token KL penalty against a frozen reference into the reward (``k1``/``k3``), add the score at the
last response token (minus ``missing_eos_penalty`` when no eos), optionally whiten rewards, estimate advantages
with GAE on a learned value model, whiten them, then run ``num_ppo_epochs`` x ``num_mini_batches`` steps of the
clipped policy loss + ``vf_coef`` x clipped value loss. Metric names match TRL 1.12.

What differs, and why:

* **Images reach every forward.** Rows carry conversational ``prompt`` messages and ``image``/``images``; each
  prompt is processed alone and image tensors are re-assembled per subset (:func:`collate_visual`), so
  generation, the reference, the value model and the PPO forwards all see the sample's own pixels.
* **No forced position ids for M-RoPE models**: Qwen-VL computes its 3-D positions itself; other models get the
  exclusive-cumsum positions ``generate`` used under left padding (so rollout and training logprobs agree).
* **Rewards are callables in TRL's GRPO protocol** (e.g. :class:`~vlrm_rlhf.reward.trl.VLRMReward`), weighted
  by ``reward_weights``; a VLRM directory string builds one, a URL (``vlrm-rlhf serve``) a ``RemoteReward``
  (async: awaited here). A ``*ForSequenceClassification`` module sharing the
  policy's tokenizer is scored on token ids exactly as TRL 1.12 did (what the parity test uses).
* **Value model**: a (VL)M with a scalar ``score`` head applied per token; by default loaded with
  ``AutoModelForSequenceClassification`` from ``value_model_path`` or from the VLRM reward's directory.
* **Multi-process** (``accelerate launch``: DDP, DeepSpeed ZeRO-2/3): the accelerator's sync flag marks the last
  micro-batch of each minibatch, so DDP all-reduces once per optimizer step and a DeepSpeed engine owns
  accumulation, clipping (``max_grad_norm``, default off as in TRL 1.12) and the step. Under ZeRO-3 generation
  gathers the partitioned policy (``ds3_gather_for_generation``) and the frozen reference is re-loaded from the
  policy's checkpoint. The same seed gives the same metrics on DDP, ZeRO-2 and ZeRO-3.
* **Trainer machinery**: optimizer/scheduler, accelerate, logging (``report_to``), checkpoints and
  ``train(resume_from_checkpoint=...)`` come from ``transformers.Trainer``.
* **Sample generations** (``num_sample_generations``, on TRL 1.12's schedule) are greedy and run with the RNG
  state saved and restored, so logging them never changes the training run.

The maths (KL-in-reward, GAE, whitening, clipped losses) is in :mod:`.ppo_math`, the data plumbing and the
micro-batch order in :mod:`.batching`, the model wrappers and loaders in :mod:`.ppo_models`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    AutoProcessor,
    GenerationConfig,
    PreTrainedModel,
    Trainer,
    TrainerState,
)
from transformers.trainer_callback import ExportableState
from trl.models.utils import prepare_deepspeed, unwrap_model_for_generation
from trl.trainer.utils import disable_dropout_in_model, selective_log_softmax

with warnings.catch_warnings():  # TRL warns on any trl.experimental import; these two helpers are stable
    warnings.simplefilter("ignore")
    from trl.experimental.utils import first_true_indices, get_reward

from ..checkpoints import resolve_resume
from ..models.loading import pretrained
from ..reward.remote import call_reward
from ..reward.trl import check_finite
from .batching import (
    TEXT_KEYS,
    EpochSampler,
    collate_visual,
    columns,
    count_image_blocks,
    ppo_micro_batches,
    repeat,
    row_images,
    strip_images,
    truncate_after,
    uses_own_positions,
)
from .ppo_config import VLPPOConfig
from .ppo_math import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    kl_estimate,
    kl_penalised_rewards,
    masked_whiten,
)
from .ppo_models import (
    PolicyAndValue,
    default_value_model,
    load_policy,
    reference_copy,
    reward_from_path,
    special_media_ids,
    token_values,
)

__all__ = ["PPOTrainerState", "PolicyAndValue", "VLPPOTrainer"]

logger = logging.getLogger(__name__)
SAMPLES_FILE = "sample_generations.jsonl"  # where num_sample_generations' samples are appended
INVALID_LOGPROB = 1.0  # TRL 1.12's fill value for logprobs past the end of a response
RewardFunc = Callable[..., list] | nn.Module | str


@dataclass
class PPOTrainerState(TrainerState):
    """``TrainerState`` plus the number of episodes (prompts) seen, saved in checkpoints."""

    episode: int = 0
    sampler_seeds: list[int] | None = None  # one per data epoch started, to replay the data order on resume


class VLPPOTrainer(Trainer):
    """PPO trainer for vision-language or text policies (see the module docstring).

    Args:
        model: the policy (a model or a path loaded with ``AutoModelForImageTextToText``/``AutoModelForCausalLM``).
        reward_funcs: one or several GRPO-protocol callables, VLRM directories or text ``*ForSequenceClassification``
            modules (TRL 1.12 ``reward_model`` semantics); weighted by ``args.reward_weights``.
        args: a :class:`VLPPOConfig`.
        train_dataset: rows with ``prompt`` (messages or text) and optionally ``image``/``images``; or
            pre-tokenized ``input_ids`` (text-only, TRL 1.12 style). Other columns reach the reward callables.
        processing_class: processor or tokenizer (default: ``AutoProcessor`` of the policy).
        value_model: default ``AutoModelForSequenceClassification.from_pretrained(args.value_model_path or VLRM dir)``.
        ref_model: default a frozen copy of the policy, or (PEFT) the policy with adapters disabled.
        peft_config: wrap the policy with this PEFT config.
    """

    _tag_names = ["trl", "ppo", "vlrm-rlhf"]

    def __init__(self, model: PreTrainedModel | str, reward_funcs: RewardFunc | Sequence[RewardFunc],
                 args: VLPPOConfig, train_dataset: Any, processing_class: Any = None,
                 value_model: PreTrainedModel | None = None, ref_model: PreTrainedModel | None = None,
                 eval_dataset: Any = None, peft_config: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None)):
        if isinstance(model, str):
            model = load_policy(model)
        processing_class = processing_class or pretrained(AutoProcessor, model.config._name_or_path)
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (PPO pads responses with it)")
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        self.reward_funcs = [reward_from_path(f) if isinstance(f, (str, Path)) else f for f in funcs]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"{len(weights)} reward_weights for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        value_model = value_model or default_value_model(args, self.reward_funcs)
        if args.stop_token == "eos":
            self.stop_token_id = self.tokenizer.eos_token_id
        else:
            self.stop_token_id = args.stop_token_id
        model.generation_config.eos_token_id = self.stop_token_id
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.is_peft_model = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        if ref_model is model:
            raise ValueError("ref_model must not be the policy itself (pass None for a frozen copy)")
        if ref_model is None and not self.is_peft_model:
            ref_model = reference_copy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.policy, self.ref_model, self.value_model = model, ref_model, value_model
        for m in (model, ref_model, value_model, *[f for f in self.reward_funcs if isinstance(f, nn.Module)]):
            if m is not None:
                disable_dropout_in_model(m)
        self._own_positions = uses_own_positions(model)
        # A sampled <image> (etc.) token would make the next forward expect one image more than it has; such
        # ids get -inf logits in generation and in every logprob (the same distribution everywhere).
        self._suppress = special_media_ids(model.config)
        super().__init__(model=PolicyAndValue(model, value_model), args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        self.state = PPOTrainerState(
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=[c for c in self.callback_handler.callbacks + [self.control]
                                if isinstance(c, ExportableState)])
        self._setup_batches(len(train_dataset))
        self.timing: dict[str, float] = {"update_s": 0.0, "reward_s": 0.0, "updates": 0}

    # ---- setup ----------------------------------------------------------------------------------------
    def _setup_batches(self, n_rows: int) -> None:
        """Derive TRL 1.12's batch sizes and build the shuffled, repeating prompt loader."""
        args, acc = self.args, self.accelerator
        if args.total_episodes is None:
            args.total_episodes = int(args.num_train_epochs * n_rows)
        world = acc.num_processes  # = args.world_size (TrainingArguments' property)
        args.local_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        args.micro_batch_size = args.per_device_train_batch_size * world
        args.batch_size = args.local_batch_size * world
        for name, total in (("mini_batch_size", args.batch_size), ("local_mini_batch_size", args.local_batch_size)):
            if total % args.num_mini_batches:
                raise ValueError(f"batch size {total} is not a multiple of num_mini_batches={args.num_mini_batches}")
            setattr(args, name, total // args.num_mini_batches)
        if args.whiten_rewards and args.local_mini_batch_size < 8:
            raise ValueError(f"whiten_rewards needs a per-rank minibatch of >= 8, not {args.local_mini_batch_size}")
        if n_rows < args.local_batch_size:
            raise ValueError(f"{n_rows} training rows cannot fill one rollout batch of {args.local_batch_size}")
        args.num_total_batches = math.ceil(args.total_episodes / args.batch_size)
        if args.max_steps > 0:  # TrainingArguments' max_steps, when set, counts PPO updates and wins
            args.num_total_batches = args.max_steps
        self.local_seed = args.seed + acc.process_index * 100003
        self.sampler = EpochSampler(n_rows, args.seed, own_generator=acc.num_processes > 1)
        loader = DataLoader(self.train_dataset, batch_size=args.local_batch_size, sampler=self.sampler,
                            drop_last=True, collate_fn=list)
        torch.manual_seed(args.seed)  # same shuffling on every rank, then a per-rank seed for sampling
        self.dataloader = acc.prepare(loader)
        torch.manual_seed(self.local_seed)

    def get_train_dataloader(self) -> DataLoader:
        return self.dataloader

    @contextmanager
    def _reference(self):
        """The reference policy: the frozen copy, or the PEFT policy with its adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        policy = self.accelerator.unwrap_model(self.model).policy
        name = self.args.ref_adapter_name
        with nullcontext() if name else policy.disable_adapter():
            if name:
                policy.set_adapter(name)
            yield policy
            if name:
                policy.set_adapter(self.args.model_adapter_name or "default")

    # ---- data -----------------------------------------------------------------------------------------
    def _encode(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor]:
        """Process each prompt alone; return per-sample records and the left-padded ``(B, L)`` ids and mask."""
        samples = []
        for i, row in enumerate(rows):
            images = row_images(row, i)
            if "prompt" not in row and "input_ids" in row:
                ids, visual, prompt = torch.as_tensor(row["input_ids"]), {}, None
            else:
                prompt = row["prompt"]
                n_blocks = count_image_blocks(prompt)
                if n_blocks and n_blocks != len(images):
                    raise ValueError(f"row {i}: the prompt has {n_blocks} image block(s) but the row holds "
                                     f"{len(images)} image(s) in 'image'/'images'")
                text = prompt if isinstance(prompt, str) else self.processing_class.apply_chat_template(
                    strip_images(prompt), tokenize=False, add_generation_prompt=True)
                enc = (self.processing_class(text=[text], images=[images], return_tensors="pt") if images
                       else self.tokenizer([text], return_tensors="pt", add_special_tokens=False))
                ids = enc["input_ids"][0]
                visual = {k: v for k, v in enc.items() if k not in TEXT_KEYS}
            if self.args.max_prompt_length and len(ids) > self.args.max_prompt_length:
                raise ValueError(f"row {i}: prompt of {len(ids)} tokens > max_prompt_length")
            samples.append({"row": row, "prompt": prompt, "ids": ids, "visual": visual, "images": images})
        width = max(len(s["ids"]) for s in samples)
        pad = self.tokenizer.pad_token_id
        queries = torch.full((len(samples), width), pad, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, s in enumerate(samples):
            queries[i, width - len(s["ids"]):], mask[i, width - len(s["ids"]):] = s["ids"], 1
        return samples, queries, mask

    def _inputs(self, samples: list[dict], idx: Sequence[int], ids: torch.Tensor, mask: torch.Tensor,
                device: torch.device) -> dict[str, Any]:
        """Model inputs for the samples ``idx``: ids (pads as 0), mask, positions (unless M-RoPE), their images."""
        out: dict[str, Any] = {"input_ids": ids.masked_fill(mask == 0, 0).to(device),
                               "attention_mask": mask.to(device)}
        if not self._own_positions:
            out["position_ids"] = (mask.cumsum(1) - mask).to(device)
        visual = collate_visual(samples, idx)
        return out | {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in visual.items()}

    def _mask_media(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf logits for the suppressed multimodal token ids (no-op for text policies)."""
        if not self._suppress:
            return logits
        return logits.index_fill(-1, torch.tensor(self._suppress, device=logits.device), float("-inf"))

    # ---- rewards --------------------------------------------------------------------------------------
    def _scores(self, samples: list[dict], queries: torch.Tensor, responses: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        """Weighted sum over reward functions of each response's score. ``None`` (a skipped sample) counts as 0;
        NaN/inf raises ``NonFiniteRewardError`` naming the function and sample (to skip such samples, wrap the
        function with ``scripts.checked_reward(f, non_finite="none")``: it warns and returns ``None``)."""
        device, pad = queries.device, self.tokenizer.pad_token_id
        n, chunk = len(samples), self.args.local_rollout_forward_batch_size
        cols = columns([s["row"] for s in samples])
        ids = [responses[i, : int(lengths[i]) + 1].tolist() for i in range(n)]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        prompts = [s["prompt"] if s["prompt"] is not None else self.tokenizer.decode(s["ids"], skip_special_tokens=True)
                   for s in samples]
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts, strict=True)]
        per_func = torch.zeros(n, len(self.reward_funcs), device=device)
        for j, func in enumerate(self.reward_funcs):
            if isinstance(func, nn.Module):  # TRL 1.12 reward_model: token ids, same tokenizer as the policy
                for s in range(0, n, chunk):
                    qr = torch.cat((queries[s:s + chunk], responses[s:s + chunk]), 1)
                    per_func[s:s + chunk, j] = get_reward(func, qr, pad, queries.shape[1])[1]
                check_finite(type(func).__name__, per_func[:, j].tolist(), prompts, completions)
                continue
            out = call_reward(func, prompts=prompts, completions=completions, completion_ids=ids,
                              trainer_state=self.state, log_extra=lambda *a: None,
                              log_metric=lambda k, v: self._metrics.__setitem__(k, v), **cols)
            if len(out) != n:
                raise ValueError(f"reward function {getattr(func, '__name__', func)!r} returned {len(out)} "
                                 f"rewards for {n} completions")
            out = check_finite(getattr(func, "__name__", repr(func)), out, prompts, completions)
            per_func[:, j] = torch.tensor([math.nan if r is None else r for r in out], device=device)
        return torch.nansum(per_func * self.reward_weights.to(device), 1)

    # ---- one PPO update ---------------------------------------------------------------------------------
    def _generate(self, samples: list[dict], queries: torch.Tensor, qmask: torch.Tensor,
                  gen_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate a response per sample, in chunks of ``local_rollout_forward_batch_size``.

        Returns the responses right-padded with the pad token and the logprobs of their tokens under the
        generation distribution (0 past each chunk's end), both ``(B, T)``.
        """
        args, acc, device = self.args, self.accelerator, self.accelerator.device
        pad, n, L = self.tokenizer.pad_token_id, len(samples), queries.shape[1]
        chunk = args.local_rollout_forward_batch_size
        responses, logprobs = [], []
        with unwrap_model_for_generation(self.model, acc, gather_deepspeed3_params=args.ds3_gather_for_generation,
                                         generation_kwargs=gen_kwargs) as unwrapped:
            for s in range(0, n, chunk):
                idx = range(s, min(s + chunk, n))
                inputs = self._inputs(samples, idx, queries[s:s + chunk], qmask[s:s + chunk], device)
                inputs.pop("position_ids", None)  # generate derives them from the mask
                config = GenerationConfig(**gen_kwargs, pad_token_id=pad, eos_token_id=self.stop_token_id,
                                          return_dict_in_generate=True, output_scores=True)
                out = unwrapped.policy.generate(**inputs, generation_config=config)
                resp = out.sequences[:, L:]
                responses.append(resp)
                logprobs.append(selective_log_softmax(torch.stack(out.scores, 1), resp))
        width = max(r.shape[1] for r in responses)
        responses = torch.cat([nn.functional.pad(r, (0, width - r.shape[1]), value=pad) for r in responses])
        logprobs = torch.cat([nn.functional.pad(x, (0, width - x.shape[1]), value=0.0) for x in logprobs])
        return responses, logprobs

    @torch.no_grad()
    def _rollout(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Generate, score and compute advantages/returns for one batch of prompts (TRL 1.12 math)."""
        args, acc, device = self.args, self.accelerator, self.accelerator.device
        pad, temp = self.tokenizer.pad_token_id, args.temperature + 1e-7
        samples, queries, qmask = self._encode(rows)
        queries, qmask, n, L = queries.to(device), qmask.to(device), len(samples), queries.shape[1]
        chunk = args.local_rollout_forward_batch_size
        gen_kwargs = {"max_new_tokens": args.response_length, "temperature": temp, "top_k": 0, "top_p": 1.0,
                      "do_sample": True, "suppress_tokens": self._suppress or None}
        responses, logprobs = self._generate(samples, queries, qmask, gen_kwargs)
        width = responses.shape[1]
        full_mask = torch.cat((qmask, (responses != pad).long()), 1)
        qr = torch.cat((queries, responses), 1)
        ref_logprobs, values = [], []
        value_model = acc.unwrap_model(self.model).value_model
        for s in range(0, n, chunk):
            inputs = self._inputs(samples, range(s, min(s + chunk, n)), qr[s:s + chunk], full_mask[s:s + chunk],
                                  device)
            with self._reference() as ref:
                ref_logits = self._mask_media(ref(**inputs, use_cache=False).logits[:, L - 1:-1]) / temp
            ref_logprobs.append(selective_log_softmax(ref_logits, responses[s:s + chunk]))
            values.append(token_values(value_model, inputs)[:, L - 1:-1])
        ref_logprobs, values = torch.cat(ref_logprobs), torch.cat(values)
        post = responses if self.stop_token_id is None else truncate_after(responses, self.stop_token_id, pad)
        lengths = first_true_indices(post == pad) - 1
        t0 = time.perf_counter()
        scores = self._scores(samples, queries, post, lengths)
        self.timing["reward_s"] += time.perf_counter() - t0
        if args.missing_eos_penalty is not None:
            scores[~(post == self.tokenizer.eos_token_id).any(-1)] -= args.missing_eos_penalty
        pos = torch.arange(width, device=device).expand(n, -1)
        pad_mask, pad_mask_p1 = pos > lengths[:, None], pos > lengths[:, None] + 1
        logprobs, ref_logprobs = logprobs.masked_fill(pad_mask, INVALID_LOGPROB), ref_logprobs.masked_fill(
            pad_mask, INVALID_LOGPROB)
        values = values.masked_fill(pad_mask_p1, 0)
        kl = kl_estimate(logprobs, ref_logprobs, args.kl_estimator)
        rewards, non_score = kl_penalised_rewards(scores, kl, args.kl_coef, lengths)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, ~pad_mask_p1, shift_mean=False).masked_fill(pad_mask_p1, 0)
        advantages, returns = gae(rewards, values, args.gamma, args.lam)
        advantages = masked_whiten(advantages, ~pad_mask).masked_fill(pad_mask, 0)
        return {"samples": samples, "qr": qr, "mask": full_mask, "responses": responses, "L": L,
                "logprobs": logprobs, "values": values, "returns": returns, "advantages": advantages,
                "pad_mask": pad_mask, "pad_mask_p1": pad_mask_p1, "scores": scores, "kl": kl,
                "non_score": non_score}

    def _optimize(self, b: dict[str, Any]) -> dict[str, torch.Tensor]:
        """PPO epochs over the rollout: clipped policy + value losses; returns the per-micro-batch stats."""
        args, acc, device = self.args, self.accelerator, self.accelerator.device
        # TRL 1.12 sized the last dim gradient_accumulation_steps, which leaves zeros (and halves val/ratio)
        # whenever num_mini_batches > 1; here it is the true number of micro-batches per minibatch.
        micro = math.ceil(args.local_mini_batch_size / args.per_device_train_batch_size)
        shape = (args.num_ppo_epochs, args.num_mini_batches, micro)
        stats = {k: torch.zeros(shape, device=device) for k in
                 ("approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")}
        L, temp = b["L"], args.temperature + 1e-7
        # Gradients are summed over the micro-batches of a minibatch, then one optimizer step. The accelerator's
        # sync flag marks the last micro-batch: DDP skips the all-reduce before it (``no_sync``); a DeepSpeed
        # engine gets it as its accumulation boundary (``accelerator.backward`` -> ``engine.backward`` then
        # ``engine.step`` on the boundary only, so DeepSpeed owns accumulation, clipping and the step) and scales
        # the loss by 1 / its own ``gradient_accumulation_steps``, which ``scale`` undoes.
        ds_steps = self.model.gradient_accumulation_steps() if self.is_deepspeed_enabled else 1
        scale = ds_steps / micro
        for epoch, mb, ga, idx, last in ppo_micro_batches(args.num_ppo_epochs, args.local_batch_size,
                                                          args.local_mini_batch_size, args.per_device_train_batch_size):
            t_idx = torch.as_tensor(idx, device=device)
            acc.gradient_state._set_sync_gradients(last)
            with nullcontext() if last else acc.no_sync(self.model):
                inputs = self._inputs(b["samples"], list(idx), b["qr"][t_idx], b["mask"][t_idx], device)
                logits, vpred = self.model(**inputs)
                logits = self._mask_media(logits[:, L - 1:-1]) / temp
                pmask, vmask = ~b["pad_mask"][t_idx], ~b["pad_mask_p1"][t_idx]
                new_logprobs = selective_log_softmax(logits, b["responses"][t_idx]).masked_fill(~pmask, INVALID_LOGPROB)
                vpred = vpred[:, L - 1:-1].masked_fill(~vmask, 0)
                pg = clipped_policy_loss(new_logprobs, b["logprobs"][t_idx], b["advantages"][t_idx], pmask,
                                         args.cliprange)
                vf = clipped_value_loss(vpred, b["values"][t_idx], b["returns"][t_idx], vmask, args.cliprange_value)
                acc.backward((pg.loss + args.vf_coef * vf.loss) * scale)
            if last:  # under DeepSpeed these are no-ops: engine.step ran in acc.backward
                if args.max_grad_norm and not self.is_deepspeed_enabled:
                    acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            with torch.no_grad():
                for k, v in (("approxkl", pg.approxkl), ("pg_clipfrac", pg.clipfrac), ("pg_loss", pg.loss),
                             ("vf_loss", vf.loss), ("vf_clipfrac", vf.clipfrac),
                             ("entropy", entropy_from_logits(logits).mean()), ("ratio", pg.ratio)):
                    stats[k][epoch, mb, ga] = v
        acc.gradient_state._set_sync_gradients(True)
        return stats

    # ---- sample generations ---------------------------------------------------------------------------
    def _sample_generations_due(self) -> bool:
        """TRL 1.12's schedule: after update 1, then every ``num_total_batches // num_sample_generations`` updates."""
        k = self.args.num_sample_generations
        if k <= 0 or self.eval_dataset is None:
            return False
        return (self.state.global_step - 1) % max(1, self.args.num_total_batches // k) == 0

    @torch.no_grad()
    def log_sample_generations(self) -> list[dict[str, Any]]:
        """Greedy completions of the first ``per_device_eval_batch_size`` eval prompts, with their scores.

        What TRL 1.12's ``generate_completions`` showed during training: the main process logs them as a table
        and appends them to ``<output_dir>/sample_generations.jsonl`` (one record per prompt, with the step).
        Training is unaffected: the RNG states are restored afterwards and the rewards' ``log_metric`` calls are
        dropped. Every process runs it (generation and rewards may be collective), so it returns the records.
        """
        rows = [self.eval_dataset[i] for i in range(min(len(self.eval_dataset), self.args.per_device_eval_batch_size))]
        device, pad = self.accelerator.device, self.tokenizer.pad_token_id
        samples, queries, qmask = self._encode(rows)
        queries, qmask = queries.to(device), qmask.to(device)
        gen_kwargs = {"max_new_tokens": self.args.response_length, "do_sample": False,
                      "suppress_tokens": self._suppress or None}
        cuda = [device.index or 0] if device.type == "cuda" else []
        metrics, self._metrics = self._metrics, {}
        try:
            with torch.random.fork_rng(devices=cuda):
                responses, _ = self._generate(samples, queries, qmask, gen_kwargs)
                if self.stop_token_id is not None:
                    responses = truncate_after(responses, self.stop_token_id, pad)
                lengths = first_true_indices(responses == pad) - 1
                scores = self._scores(samples, queries, responses, lengths)
        finally:
            self._metrics = metrics
        records = [{"step": self.state.global_step, "episode": self.state.episode,
                    "prompt": self.tokenizer.decode(s["ids"], skip_special_tokens=True),
                    "completion": self.tokenizer.decode(responses[i, : int(lengths[i]) + 1], skip_special_tokens=True),
                    "score": float(scores[i])} for i, s in enumerate(samples)]
        if self.is_world_process_zero():
            table = "\n".join(f"  {r['score']:+.4f} | {r['prompt']!r} -> {r['completion']!r}" for r in records)
            logger.info("sample generations at step %d (score | prompt -> completion):\n%s",
                        self.state.global_step, table)
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, SAMPLES_FILE), "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return records

    def _metrics_for(self, b: dict[str, Any], stats: dict[str, torch.Tensor], start: float) -> dict[str, float]:
        """TRL 1.12's metric names, averaged over ranks."""
        g = self.accelerator.gather_for_metrics
        mean_kl, non_score = b["kl"].sum(1).mean(), b["non_score"].sum(1).mean()
        entropy = (-b["logprobs"] * (~b["pad_mask"]).float()).sum(1).mean()
        m = {"eps": int(self.state.episode / max(time.time() - start, 1e-9)),
             "objective/kl": g(mean_kl).mean().item(), "objective/entropy": g(entropy).mean().item(),
             "objective/non_score_reward": g(non_score).mean().item(),
             "objective/rlhf_reward": g(non_score + b["scores"].mean()).mean().item(),
             "objective/scores": g(b["scores"].mean()).mean().item()}
        for name, key in (("policy/approxkl_avg", "approxkl"), ("policy/clipfrac_avg", "pg_clipfrac"),
                          ("loss/policy_avg", "pg_loss"), ("loss/value_avg", "vf_loss"),
                          ("val/clipfrac_avg", "vf_clipfrac"), ("policy/entropy_avg", "entropy"),
                          ("val/ratio", "ratio")):
            m[name] = g(stats[key]).mean().item()
        m["val/ratio_var"] = g(stats["ratio"]).var().item()
        m["val/num_eos_tokens"] = (b["responses"] == self.tokenizer.eos_token_id).sum().item()
        m["lr"] = self.lr_scheduler.get_last_lr()[0]
        m["episode"] = self.state.episode
        return m

    # ---- training loop -----------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> PPOTrainerState:
        """Run ``num_total_batches`` PPO updates, resuming from a checkpoint directory, or with ``True`` (or
        ``"true"``) from the newest *complete* one in ``output_dir`` (``checkpoints.resolve_resume``)."""
        args, acc = self.args, self.accelerator
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, args.output_dir,
                                                optimizer=not args.save_only_model)
        if resume_from_checkpoint:
            self._load_weights(resume_from_checkpoint)
        self._metrics: dict[str, float] = {}
        if args.gradient_checkpointing:  # Trainer.train would do this; the policy's forwards only
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
        self.create_optimizer_and_scheduler(num_training_steps=args.num_total_batches)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.model_wrapped = self.model
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model
            if self.ref_model is not None:
                self.ref_model = prepare_deepspeed(self.ref_model, acc)
            self.reward_funcs = [prepare_deepspeed(f, acc) if isinstance(f, nn.Module) else f
                                 for f in self.reward_funcs]
        else:
            if self.ref_model is not None:
                self.ref_model.to(acc.device)
            for f in self.reward_funcs:
                if isinstance(f, nn.Module):
                    f.to(acc.device)
        self.state.max_steps, self.state.logging_steps = args.num_total_batches, args.logging_steps
        self.state.save_steps = args.save_steps
        self.state.num_train_epochs = args.total_episodes / len(self.train_dataset)
        batches = repeat(self.dataloader)
        if resume_from_checkpoint:
            self.state = PPOTrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self.sampler.replay = list(self.state.sampler_seeds or [])
            for _ in range(self.state.global_step):  # replay the data order of the interrupted run
                next(batches)
            self._load_rng_state(resume_from_checkpoint)
        self.model.train()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        start = time.time()
        while self.state.global_step < args.num_total_batches:
            t0 = time.perf_counter()
            self.state.episode += args.batch_size
            rows = next(batches)
            self.state.sampler_seeds = list(self.sampler.seeds)
            batch = self._rollout(rows)
            stats = self._optimize(batch)
            with torch.no_grad():
                metrics = self._metrics_for(batch, stats, start) | self._metrics
            self._metrics = {}
            self.state.epoch = self.state.episode / len(self.train_dataset)
            self.state.global_step += 1
            self.log(metrics)
            self.lr_scheduler.step()
            self.timing["update_s"] += time.perf_counter() - t0
            self.timing["updates"] += 1
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_save:
                self._save_checkpoint(self.model, trial=None)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if self._sample_generations_due():
                self.log_sample_generations()
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return self.state

    # ---- saving / loading -----------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the policy (PEFT: its adapter) + processor at ``output_dir``, the value model in ``value_model/``."""
        output_dir = output_dir or self.args.output_dir
        state = self.accelerator.get_state_dict(self.model)
        if not self.args.should_save:
            return
        wrapper = self.accelerator.unwrap_model(self.model)
        for prefix, module, sub in (("policy.", wrapper.policy, ""), ("value_model.", wrapper.value_model,
                                                                      "value_model")):
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            module.save_pretrained(os.path.join(output_dir, sub), state_dict=part)
        self.processing_class.save_pretrained(output_dir)

    def _load_weights(self, checkpoint: str) -> None:
        """Load policy (or adapter) and value weights saved by :meth:`save_model`."""
        for module, sub in ((self.policy, ""), (self.value_model, "value_model")):
            folder = Path(checkpoint, sub)
            adapter = folder / "adapter_model.safetensors"
            if self.is_peft_model and module is self.policy:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(module, load_file(adapter))
                continue
            state: dict[str, torch.Tensor] = {}
            for f in sorted(folder.glob("*.safetensors")):
                state.update(load_file(f))
            if not state:
                raise FileNotFoundError(f"no weights in {folder}")
            missing, unexpected = module.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:
                raise RuntimeError(f"{folder}: missing {missing[:3]}, unexpected {unexpected[:3]}")
