"""``GoldCheckCallback``: measure an RL run against the truth while it optimises a proxy reward.

Every ``every`` optimisation steps (and before the first, and after the last) the callback generates answers
on held-out prompts with the current policy and logs, under ``gold/``:

* ``gold/<key>`` — the mean of each value the gold function returns for the greedy answers (ShapesWorld:
  ``correct``, ``style``, ``both``, ``quality``), and ``gold_sampled/<key>`` for sampled answers;
* ``gold/proxy_reward`` (sampled answers) and ``gold/proxy_reward_greedy`` — the mean reward of a proxy
  reward callable in TRL's GRPO protocol (the reward being optimised, or any other);
* ``gold/kl`` — the KL from the reference policy, ``E_{y~π}[Σ_t log π(y_t|·) − log π_ref(y_t|·)]``, estimated
  on the sampled answers (the x axis of Gao et al. 2022's over-optimisation curves).

The reference is a frozen copy of the policy taken at ``on_train_begin`` (or ``ref_model``), so it works with
any ``transformers.Trainer``: ``VLPPOTrainer`` (whose model wraps policy and value), TRL's ``GRPOTrainer`` and
``RLOOTrainer``. Metrics are appended to ``state.log_history`` (so they land in ``trainer_state.json``) and kept
in ``history`` for plots. Sampling runs under a forked RNG seeded per step: training randomness is untouched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

__all__ = ["GoldCheckCallback", "GoldPrompt", "frozen_copy", "sequence_kl"]

GoldFn = Callable[[Any, str], dict[str, float]]


@dataclass
class GoldPrompt:
    """One held-out prompt: chat messages (image blocks without payload) or text, its images, the ``item`` the
    gold function judges answers against, and extra dataset-like ``columns`` handed to the proxy reward."""

    prompt: list[dict[str, Any]] | str
    images: list[Any] = field(default_factory=list)
    item: Any = None
    columns: dict[str, Any] = field(default_factory=dict)


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate ``Σ_t mask·(log π − log π_ref)`` on tokens sampled from π (``(B, T)`` → ``(B,)``)."""
    return ((logp - ref_logp) * mask).sum(-1)


class GoldCheckCallback(TrainerCallback):
    """Periodic gold / proxy / KL check of the policy on held-out prompts (see the module docstring).

    Args:
        prompts: the held-out ``GoldPrompt`` s.
        processing_class: the policy's processor (or tokenizer, for text policies).
        gold: ``gold(item, completion_text) -> {name: value}``; means are logged as ``gold/<name>``.
        reward: optional proxy reward callable (TRL GRPO protocol) scored on the same answers.
        every: check every ``every`` optimisation steps (and at the start and the end).
        samples: sampled answers per prompt (for ``gold/kl``, ``gold/proxy_reward``, ``gold_sampled/*``).
        max_new_tokens, temperature, batch_size: generation settings (temperature also scales the KL's logits).
        ref_model: the reference policy (default: a frozen copy of the policy when training begins).
        seed: sampling seed (the step is added, so checks are reproducible and independent of training).
        examples: keep this many greedy answers per check under ``examples`` (default none).
    """

    def __init__(self, prompts: Sequence[GoldPrompt], processing_class: Any, gold: GoldFn, *,
                 reward: Callable[..., list] | None = None, every: int = 10, samples: int = 1,
                 max_new_tokens: int = 16, temperature: float = 1.0, batch_size: int = 32,
                 ref_model: torch.nn.Module | None = None, seed: int = 0, examples: int = 0):
        if not prompts:
            raise ValueError("GoldCheckCallback needs at least one held-out prompt")
        if every < 1 or samples < 1 or batch_size < 1:
            raise ValueError(f"every, samples and batch_size must be >= 1 (got {every}, {samples}, {batch_size})")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.prompts = list(prompts)
        self.processor = processing_class
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.gold, self.reward = gold, reward
        self.every, self.samples, self.batch_size = every, samples, batch_size
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.ref_model = ref_model
        self.examples = examples
        self.history: list[dict[str, float]] = []
        self._last_step = -1

    # ---- Trainer events --------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        policy = _policy(model)
        if self.ref_model is None:
            self.ref_model = frozen_copy(policy)
        self._check(policy, state)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.global_step % self.every == 0:
            self._check(_policy(model), state)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self._check(_policy(model), state)

    def _check(self, policy: torch.nn.Module, state: Any) -> None:
        if state.global_step == self._last_step:
            return
        self._last_step = state.global_step
        m = {"step": float(state.global_step), **self.evaluate(policy, step=state.global_step)}
        self.history.append(m)
        state.log_history.append(dict(m))

    # ---- the check itself ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, policy: torch.nn.Module, step: int = 0) -> dict[str, float]:
        """Gold means (greedy and sampled), proxy reward and KL to the reference for ``policy`` now."""
        if self.ref_model is None:
            raise RuntimeError("no reference policy yet: pass ref_model= or let training begin first")
        was_training = policy.training
        policy.eval()
        out: dict[str, float] = {}
        try:
            with torch.random.fork_rng(devices=[]):
                greedy = self.generate(policy, self.prompts, sample=False)
                torch.manual_seed(self.seed + step)
                rep = [p for p in self.prompts for _ in range(self.samples)]
                sampled = self.generate(policy, rep, sample=True)
            kl = self._kl(policy, rep, sampled)
        finally:
            policy.train(was_training)
        out.update(self._gold_means([t for t, _ in greedy], self.prompts, "gold"))
        out.update(self._gold_means([t for t, _ in sampled], rep, "gold_sampled"))
        out["gold/kl"] = float(kl.mean())
        if self.examples:  # a few greedy answers, to see what a hacked policy says
            out["examples"] = [t for t, _ in greedy[:self.examples]]  # type: ignore[assignment]
        if self.reward is not None:
            out["gold/proxy_reward"] = self._reward(rep, [t for t, _ in sampled])
            out["gold/proxy_reward_greedy"] = self._reward(self.prompts, [t for t, _ in greedy])
        return out

    def _gold_means(self, texts: list[str], prompts: list[GoldPrompt], prefix: str) -> dict[str, float]:
        sums: dict[str, float] = {}
        for p, t in zip(prompts, texts, strict=True):
            for k, v in self.gold(p.item, t).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {f"{prefix}/{k}": v / len(texts) for k, v in sums.items()}

    def _reward(self, prompts: list[GoldPrompt], texts: list[str]) -> float:
        cols: dict[str, list[Any]] = {}
        for p in prompts:
            for k, v in p.columns.items():
                cols.setdefault(k, []).append(v)
        if any(p.images for p in prompts):
            cols["images"] = [list(p.images) for p in prompts]
        vals = self.reward(prompts=[p.prompt for p in prompts],
                           completions=[[{"role": "assistant", "content": t}] if not isinstance(p.prompt, str) else t
                                        for p, t in zip(prompts, texts, strict=True)], **cols)
        finite = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
        return sum(finite) / len(finite) if finite else math.nan

    # ---- generation and log-probabilities --------------------------------------------------------------
    def _encode(self, prompts: list[GoldPrompt]) -> dict[str, torch.Tensor]:
        texts = [p.prompt if isinstance(p.prompt, str) else
                 self.processor.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            if any(p.images for p in prompts):
                return dict(self.processor(text=texts, images=[list(p.images) for p in prompts], padding=True,
                                           return_tensors="pt"))
            return dict(self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt"))
        finally:
            self.tokenizer.padding_side = side

    def generate(self, policy: torch.nn.Module, prompts: list[GoldPrompt], sample: bool
                  ) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """(decoded answer, {completion ids, completion mask}) per prompt, in order."""
        device = next(policy.parameters()).device
        eos = self.tokenizer.eos_token_id
        gen_kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": sample,
                                  "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": eos}
        if sample:
            gen_kw.update(temperature=self.temperature, top_k=0, top_p=1.0)
        media = _media_ids(policy)
        if media:
            gen_kw["suppress_tokens"] = media
        out: list[tuple[str, dict[str, torch.Tensor]]] = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = prompts[s:s + self.batch_size]
            enc = {k: v.to(device) for k, v in self._encode(chunk).items()}
            ids = policy.generate(**enc, **gen_kw)[:, enc["input_ids"].shape[1]:]
            mask = _until_eos(ids, eos)
            texts = self.tokenizer.batch_decode(ids.masked_fill(mask == 0, self.tokenizer.pad_token_id),
                                                skip_special_tokens=True)
            for i, t in enumerate(texts):
                out.append((t.strip(), {"ids": ids[i:i + 1].cpu(), "mask": mask[i:i + 1].cpu()}))
        return out

    def _kl(self, policy: torch.nn.Module, prompts: list[GoldPrompt],
            sampled: list[tuple[str, dict[str, torch.Tensor]]]) -> torch.Tensor:
        """Sequence-level KL estimate per sampled answer (the batch's prompts are re-padded together)."""
        kls = []
        for s in range(0, len(sampled), self.batch_size):
            chunk = sampled[s:s + self.batch_size]
            enc = {k: v.to(next(policy.parameters()).device) for k, v in self._encode(prompts[s:s + len(chunk)]).items()}
            ids = _pad_right([c["ids"][0] for _, c in chunk], self.tokenizer.pad_token_id)
            mask = _pad_right([c["mask"][0] for _, c in chunk], 0)
            lp = self._logprobs(policy, enc, ids, mask)
            ref = self._logprobs(self.ref_model, enc, ids, mask)
            kls.append(sequence_kl(lp, ref, mask.to(lp.dtype)))
        return torch.cat(kls)

    def _logprobs(self, model: torch.nn.Module, enc: dict[str, torch.Tensor], ids: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (at the sampling temperature, media tokens suppressed) of ``ids`` after the prompt."""
        device = next(model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        full = torch.cat([enc["input_ids"].to(device), ids.masked_fill(mask == 0, 0)], 1)
        attn = torch.cat([enc["attention_mask"].to(device), mask], 1)
        extra = {k: v.to(device) for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        if not _own_positions(model):
            extra["position_ids"] = (attn.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=full, attention_mask=attn, use_cache=False, **extra).logits
        logits = logits[:, enc["input_ids"].shape[1] - 1:-1].float() / self.temperature
        media = _media_ids(model)
        if media:
            logits[..., media] = float("-inf")
        return torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]


# ---- helpers --------------------------------------------------------------------------------------------
def _policy(model: Any) -> torch.nn.Module:
    """The generating policy inside what a Trainer hands callbacks (DDP ``module``, ``PolicyAndValue.policy``)."""
    if model is None:
        raise RuntimeError("GoldCheckCallback needs the trainer's model in its callback arguments")
    model = getattr(model, "module", model)
    return getattr(model, "policy", model)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy in eval mode. Forward overrides set on instances (accelerate's output-conversion
    wrappers, whose closures call the *original* module) are dropped, so the copy computes with its own weights."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    for m in ref.modules():
        m.__dict__.pop("forward", None)
    return ref


def _until_eos(ids: torch.Tensor, eos: int | None) -> torch.Tensor:
    """1 up to and including the first eos (everything when there is none), 0 after."""
    if eos is None:
        return torch.ones_like(ids)
    is_eos = (ids == eos).long()
    after = is_eos.cumsum(1) - is_eos  # eos tokens strictly before this position
    return (after == 0).long()


def _pad_right(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _media_ids(model: torch.nn.Module) -> list[int]:
    """Image/video placeholder token ids of a multimodal model (never sampled: they would need pixels)."""
    cfg = getattr(model, "config", None)
    ids = {getattr(cfg, k, None) for k in ("image_token_id", "image_token_index", "video_token_id")}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def _own_positions(model: torch.nn.Module) -> bool:
    """M-RoPE models (Qwen-VL) compute their own positions; the rest get positions from the attention mask."""
    cfg = getattr(model, "config", None)
    ropes = [getattr(cfg, "rope_parameters", None), getattr(getattr(cfg, "text_config", None), "rope_parameters", None)]
    return hasattr(model, "get_rope_index") or hasattr(getattr(model, "model", None), "get_rope_index") or \
        any(isinstance(r, dict) and "mrope_section" in r for r in ropes)
