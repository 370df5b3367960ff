"""A VLRM as a TRL 1.16 GRPO/RLOO reward function (the one-line switch to merged rewards).

TRL 1.16 scores an ``nn.Module`` reward on text only and cannot load a VLRM from a string id, so a VLRM
reaches ``GRPOTrainer``/``RLOOTrainer`` as a *callable that owns its model*::

    trainer = GRPOTrainer(model=policy, reward_funcs=vlrm_rlhf.reward_funcs("path/to/vlrm"), ...)

TRL calls it as ``f(prompts=, completions=, completion_ids=, trainer_state=, log_extra=, log_metric=,
**dataset_columns)`` and expects one float (or ``None``, which TRL turns into NaN and ignores) per completion.
With a VLM policy the prompts already carry ``{"type": "image", "image": PIL}`` blocks and the dataset's
``image``/``images`` column arrives as a keyword too (the same images): inline images win, the column only
fills prompts without inline images (and plain-string prompts).

Multi-process training: every rank scores its own completions, but all ranks run the *same sequence* of
reward forwards (text-only micro-batches, then micro-batches with images), padding with dummy forwards where a
rank has fewer. Under DeepSpeed ZeRO-3 each forward all-gathers the sharded parameters of the modules it
runs, so ranks that ran different numbers (or kinds: the vision tower runs only with images) of forwards
would deadlock. Under ZeRO-3 the reward model is wrapped with ``trl.models.prepare_deepspeed``; otherwise
it is moved to the accelerator's device. Setup happens lazily at the first call, when the trainer's
``Accelerator`` exists (and DeepSpeed's ``"auto"`` config values are resolved), so no ``accelerator``
needs to be passed to the constructor.
"""

from __future__ import annotations

import math
import re
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from ..errors import VLRMError
from .inputs import InputError, Sample, make_sample
from .scorer import Mode, Plan, VLRewardScorer

__all__ = ["NonFiniteRewardError", "NonFiniteRewardWarning", "RewardValueError", "VLRMReward", "as_messages",
           "check_finite", "column_images", "default_name", "sibling_scorer"]

Normalize = Literal["batch", "running"]
_EPS = 1e-6
# DeepSpeed engines by the raw model they wrap: reward functions sharing one model share one engine.
_ENGINES: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


class NonFiniteRewardError(VLRMError, FloatingPointError):
    """The reward model returned NaN/inf for a sample (``non_finite="raise"``); the message names it."""


class NonFiniteRewardWarning(UserWarning):
    """A NaN/inf reward was skipped (``non_finite="none"``); the message names the function and the sample."""


class RewardValueError(VLRMError, TypeError):
    """A reward function returned something that is neither a number nor ``None``; the message names it."""


def check_finite(name: str, rewards: Sequence[Any], prompts: Sequence[Any], completions: Sequence[Any],
                 non_finite: Literal["raise", "none"] = "raise") -> list[float | None]:
    """The non-finite policy of ``VLRMReward`` for any reward function's output: NaN/inf rewards raise a
    ``NonFiniteRewardError`` naming ``name``, the sample, its prompt and completion (``"raise"``), or become
    ``None`` (TRL skips the sample) with a ``NonFiniteRewardWarning`` naming them (``"none"``). ``None`` stays."""
    out: list[float | None] = []
    for i, r in enumerate(rewards):
        if r is None:
            out.append(None)
            continue
        try:
            out.append(float(r))
        except (TypeError, ValueError):
            raise RewardValueError(f"reward function {name!r} returned {r!r:.80} (a {type(r).__name__}) for sample "
                                   f"{i}; a reward must be a float (or None to skip the sample)") from None
    bad = [i for i, v in enumerate(out) if v is not None and not math.isfinite(v)]
    if not bad:
        return out
    i = bad[0]
    where = (f"{name}: non-finite reward {out[i]} for sample {i} (of {len(out)}; {len(bad)} non-finite); "
             f"prompt: {_preview(prompts[i])}; completion: {_preview(completions[i])}")
    if non_finite == "raise":
        raise NonFiniteRewardError(f"{where}. Return None to skip a sample, or set non_finite='none' "
                                   "(--reward_non_finite none) to skip such samples with a warning")
    warnings.warn(f"{where}: skipped", NonFiniteRewardWarning, stacklevel=2)
    return [None if j in bad else v for j, v in enumerate(out)]


class VLRMReward:
    """A VLRM (or an ablation mode of it) as a GRPO/RLOO reward function; see the module docstring.

    Args:
        path_or_scorer: a VLRM directory (loaded with ``VLRewardScorer.from_pretrained(path, mode=...,
            **scorer_kwargs)``) or a ready ``VLRewardScorer``.
        mode: scorer mode (``vlrm``, ``no_image``, ``text_rm``, ``cascade``). Default: ``vlrm`` for a path;
            the scorer's own mode for a scorer (another mode builds a sibling scorer on the same model).
        name: the function's ``__name__`` (TRL logs ``rewards/<name>/mean``); default ``vlrm_<dirname>``,
            with ``_<mode>`` appended for modes other than ``vlrm``.
        normalize: ``None`` (raw rewards), ``"batch"`` (whiten with the mean/std of this call's rewards,
            over all ranks) or ``"running"`` (whiten with a running mean/std over every call so far).
        clip: ``(lo, hi)`` applied after normalisation.
        non_finite: ``"raise"`` a ``NonFiniteRewardError`` naming the sample index and prompt, or return
            ``"none"`` (TRL ignores that completion) for NaN/inf rewards.
        accelerator: the training ``Accelerator``; default: detected at the first call from accelerate's
            shared state (what ``accelerate launch`` + a TRL trainer create).
        scorer_kwargs: passed to ``VLRewardScorer.from_pretrained`` (``device``, ``dtype``, ``max_length``,
            ``max_batch_tokens``, ``lvlm`` for cascade, ...).

    Attributes ``forward_calls`` / ``dummy_calls`` count the reward forwards run (all / padding only).
    """

    def __init__(
        self,
        path_or_scorer: str | Path | VLRewardScorer,
        *,
        mode: Mode | None = None,
        name: str | None = None,
        normalize: Normalize | None = None,
        clip: tuple[float, float] | None = None,
        non_finite: Literal["raise", "none"] = "raise",
        accelerator: Any = None,
        **scorer_kwargs: Any,
    ):
        if normalize not in (None, "batch", "running"):
            raise ValueError(f"normalize must be None, 'batch' or 'running', not {normalize!r}")
        if non_finite not in ("raise", "none"):
            raise ValueError(f"non_finite must be 'raise' or 'none', not {non_finite!r}")
        if clip is not None:
            lo, hi = (float(x) for x in clip)
            if not lo < hi:
                raise ValueError(f"clip must be (lo, hi) with lo < hi, got {clip!r}")
            clip = (lo, hi)
        if isinstance(path_or_scorer, VLRewardScorer):
            if scorer_kwargs:
                raise TypeError(f"scorer options {sorted(scorer_kwargs)} need a path, not a ready VLRewardScorer")
            scorer = path_or_scorer
            if mode is not None and mode != scorer.mode:
                scorer = sibling_scorer(scorer, mode)
            source = getattr(scorer.model.config, "_name_or_path", "") or ""
        else:
            scorer = VLRewardScorer.from_pretrained(path_or_scorer, mode=mode or "vlrm", **scorer_kwargs)
            source = str(path_or_scorer)
        self.scorer = scorer
        self.mode: str = scorer.mode
        self.normalize, self.clip, self.non_finite = normalize, clip, non_finite
        self.accelerator = accelerator
        self._device_pinned = "device" in scorer_kwargs or "device_map" in scorer_kwargs
        self.__name__ = name or default_name(source, self.mode)
        self.forward_calls = 0
        self.dummy_calls = 0
        self._ready = False
        self._running = [0.0, 0.0, 0.0]  # count, mean, M2 (Chan et al. parallel variance)

    def __repr__(self) -> str:
        return f"VLRMReward({self.__name__!r}, mode={self.mode!r}, normalize={self.normalize!r}, clip={self.clip!r})"

    # ---- TRL protocol ---------------------------------------------------------------------------------
    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        trainer_state: Any = None,
        log_extra: Callable[[str, list], None] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **columns: Any,
    ) -> list[float | None]:
        """One reward per completion (``None`` for non-finite ones when ``non_finite="none"``)."""
        self._setup()
        error: BaseException | None = None
        try:
            if len(prompts) != len(completions):
                raise InputError(f"{len(prompts)} prompts for {len(completions)} completions")
            samples = [self._sample(i, prompts[i], completions[i], columns) for i in range(len(prompts))]
            plan, kinds = self._plan(samples)
        except Exception as e:  # noqa: BLE001  (re-raised below, after telling the other ranks)
            error, plan, kinds = e, None, ([], [])
        # lockstep: agree on the number of text-only and image micro-batches (and on failure) before any forward
        n_text, n_image, failed = self._all_reduce([len(kinds[0]), len(kinds[1]), error is not None], "max")
        if failed:
            if error is not None:
                raise error
            raise RuntimeError(f"{self.__name__}: another rank failed to prepare its reward inputs")
        raw: list[float] = [math.nan] * len(samples)
        self._run(kinds[0], int(n_text), plan, raw, kind="text")
        self._run(kinds[1], int(n_image), plan, raw, kind="image")
        return self._postprocess(raw, prompts, completions, log_metric)

    # ---- inputs ---------------------------------------------------------------------------------------
    def _sample(self, i: int, prompt: Any, completion: Any, columns: dict[str, Any]) -> Sample:
        """Sample i as one conversation (prompt + completion), with its images (inline first, else columns)."""
        messages = as_messages(prompt, "user") + as_messages(completion, "assistant")
        inline = sum(1 for m in messages if isinstance(m.get("content"), list)
                     for b in m["content"] if b.get("type") == "image" and b.get("image") is not None)
        given = column_images(columns, i)
        if inline and given:
            if len(given) != inline:
                raise InputError(f"sample {i}: the prompt carries {inline} inline image(s) but the image column "
                                 f"gives {len(given)}; prompt: {_preview(prompt)}")
            given = []  # TRL passes the column's images inline too: the same images
        try:
            return make_sample(messages, None, given or None, i)
        except InputError as e:
            raise InputError(f"{self.__name__}: {e}; prompt: {_preview(prompt)}") from e

    def _plan(self, samples: list[Sample]) -> tuple[Plan, tuple[list[list[int]], list[list[int]]]]:
        """The scorer's plan (rendered, truncated, token-budget micro-batches), split into text-only and image
        micro-batches: ranks pad each kind separately since only image batches run the vision tower."""
        plan = self.scorer.plan(samples)
        text_batches = [b for b in plan.batches if not plan.samples[b[0]].images]
        image_batches = [b for b in plan.batches if plan.samples[b[0]].images]
        return plan, (text_batches, image_batches)

    # ---- forwards -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, batches: list[list[int]], total: int, plan: Plan, out: list[float], kind: str) -> None:
        """Run this rank's micro-batches of one kind, then dummy forwards up to ``total`` (lockstep)."""
        for batch in batches:
            self.forward_calls += 1
            for i, v in zip(batch, self.scorer.forward(plan, batch), strict=True):
                out[i] = v
        for _ in range(total - len(batches)):
            self.forward_calls += 1
            self.scorer.forward(self._dummy(kind), [0])
            self.dummy_calls += 1

    def _dummy(self, kind: str) -> Plan:
        """A one-sample plan of the given kind (``image`` runs the vision tower too) for padding forwards."""
        content: list[dict[str, Any]] = [{"type": "text", "text": "."}]
        if kind == "image":
            content.insert(0, {"type": "image", "image": Image.new("RGB", (64, 64), (127, 127, 127))})
        sample = make_sample([{"role": "user", "content": content}, {"role": "assistant", "content": "."}], None, None)
        return self.scorer.plan([sample])

    # ---- rewards --------------------------------------------------------------------------------------
    def _postprocess(self, raw: list[float], prompts: Sequence[Any], completions: Sequence[Any],
                     log_metric: Callable[[str, float], None] | None) -> list[float | None]:
        finite = [v for v in raw if math.isfinite(v)]
        bad = [i for i, v in enumerate(raw) if not math.isfinite(v)]
        if log_metric is not None:
            if finite:
                log_metric(f"{self.__name__}/raw_mean", sum(finite) / len(finite))
            if bad:
                log_metric(f"{self.__name__}/non_finite", float(len(bad)))
        need_stats = self.normalize is not None
        need_flag = self.non_finite == "raise" and self._world() > 1
        if need_stats or need_flag:  # one collective, taken by every rank (same config everywhere)
            n, total, sq, n_bad = self._all_reduce(
                [len(finite), sum(finite), sum(v * v for v in finite), len(bad)], "sum")
        else:
            n, total, sq, n_bad = len(finite), sum(finite), 0.0, len(bad)
        if self.non_finite == "raise" and n_bad:
            if bad:
                i = bad[0]
                raise NonFiniteRewardError(
                    f"{self.__name__}: non-finite reward {raw[i]} for sample {i} (of {len(raw)}; "
                    f"{len(bad)} non-finite here); prompt: {_preview(prompts[i])}; completion: {_preview(completions[i])}. "
                    "Pass non_finite='none' to skip such samples instead")
            raise NonFiniteRewardError(f"{self.__name__}: another rank got {int(n_bad)} non-finite reward(s)")
        if bad:  # non_finite="none": skipped, but never silently
            i = bad[0]
            warnings.warn(f"{self.__name__}: non-finite reward {raw[i]} for sample {i} (of {len(raw)}; {len(bad)} "
                          f"non-finite); prompt: {_preview(prompts[i])}; completion: {_preview(completions[i])}: "
                          "skipped", NonFiniteRewardWarning, stacklevel=3)
        rewards = raw
        if need_stats and n > 0:
            mean = total / n
            var = max(sq / n - mean * mean, 0.0)
            if self.normalize == "running":
                mean, var = self._update_running(n, mean, var)
            std = math.sqrt(var)
            std = std if std > _EPS else 1.0
            rewards = [(v - mean) / std for v in raw]
        if self.clip is not None:
            lo, hi = self.clip
            rewards = [min(max(v, lo), hi) if math.isfinite(v) else v for v in rewards]
        return [float(v) if math.isfinite(v) else None for v in rewards]

    def _update_running(self, n: float, mean: float, var: float) -> tuple[float, float]:
        """Merge a batch's (count, mean, population variance) into the running stats; return the new mean/var."""
        c0, m0, s0 = self._running
        c = c0 + n
        d = mean - m0
        m = m0 + d * n / c
        s = s0 + var * n + d * d * c0 * n / c
        self._running = [c, m, s]
        return m, s / c

    @property
    def running_stats(self) -> dict[str, float]:
        """Running count/mean/std (``normalize="running"``)."""
        c, m, s = self._running
        return {"count": c, "mean": m, "std": math.sqrt(s / c) if c else 0.0}

    def state_dict(self) -> dict[str, Any]:
        """The running normalisation state (to save beside a training checkpoint)."""
        return {"running": list(self._running)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` (resuming a run keeps the same reward scale)."""
        self._running = [float(x) for x in state["running"]]

    # ---- distributed ----------------------------------------------------------------------------------
    def _setup(self) -> None:
        """First call: place the model (ZeRO-3: ``prepare_deepspeed``; else the accelerator's device)."""
        if self._ready:
            return
        acc = self.accelerator
        if acc is None:
            try:
                from accelerate.state import AcceleratorState, is_initialized
            except ImportError:  # pragma: no cover - accelerate is a dependency
                is_initialized = None
            if is_initialized is not None and is_initialized():
                acc = types.SimpleNamespace(state=AcceleratorState(), device=AcceleratorState().device)
        s = self.scorer
        if acc is not None:
            plugin = getattr(acc.state, "deepspeed_plugin", None)
            if plugin is not None and plugin.zero_stage == 3:
                raw = s.model
                if raw not in _ENGINES:
                    from trl.models import prepare_deepspeed

                    _ENGINES[raw] = prepare_deepspeed(raw, acc)
                s.model = _ENGINES[raw]
                s.device = torch.device(acc.device)
            elif not self._device_pinned:
                s.device = torch.device(acc.device)
                s.model.to(s.device)
        self._ready = True

    def _world(self) -> int:
        if self.accelerator is not None:
            return int(self.accelerator.num_processes)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1

    def _all_reduce(self, values: Sequence[float], op: Literal["max", "sum"]) -> list[float]:
        """Element-wise max/sum of ``values`` over all ranks (itself when single-process)."""
        if self._world() == 1:
            return [float(v) for v in values]
        dev = self.scorer.device
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
        if self.accelerator is not None:
            g = self.accelerator.gather(t[None]).view(-1, len(values))
            return (g.amax(0) if op == "max" else g.sum(0)).tolist()
        dist = torch.distributed
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()


# ---- helpers ------------------------------------------------------------------------------------------
def default_name(source: str | Path, mode: str) -> str:
    """``vlrm_<dirname>`` (+ ``_<mode>`` for other modes), an identifier-like name for TRL's logs."""
    stem = re.sub(r"\W+", "_", Path(str(source).rstrip("/\\")).name).strip("_") or "model"
    return f"vlrm_{stem}" + ("" if mode == "vlrm" else f"_{mode}")


def sibling_scorer(scorer: VLRewardScorer, mode: Mode) -> VLRewardScorer:
    """A scorer in another mode over the same model and processor (no second copy of the weights)."""
    return VLRewardScorer(scorer.model, scorer.processor, mode=mode, device=scorer.device,
                          captioner=scorer.captioner, captioner_processor=scorer.captioner_processor,
                          max_length=scorer.max_length, max_batch_tokens=scorer.max_batch_tokens,
                          caption_max_new_tokens=scorer.caption_max_new_tokens)


def _clean_block(b: Any) -> Any:
    """A content block without ``None`` fields (Arrow gives every block every struct field, set to None)."""
    return {k: v for k, v in b.items() if v is not None} if isinstance(b, dict) else b


def as_messages(x: Any, role: str) -> list[dict[str, Any]]:
    """A prompt or completion as chat messages: strings become one ``role`` message."""
    if x is None:
        return []
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, dict):
        x = [x]
    out = []
    for m in x:
        content = m.get("content")
        if isinstance(content, list):
            content = [_clean_block(b) for b in content]
        out.append({**m, "role": m.get("role", role), "content": "" if content is None else content})
    return out


def column_images(columns: dict[str, Any], i: int) -> list[Any]:
    """Sample i's images from the ``images`` (a list per sample) or ``image`` (one per sample) column."""
    for key in ("images", "image"):
        col = columns.get(key)
        if col is None:
            continue
        if not isinstance(col, list | tuple):
            raise InputError(f"the {key!r} column must hold one entry per sample, got {type(col).__name__}")
        if i >= len(col):
            raise InputError(f"the {key!r} column has {len(col)} entries; sample {i} has none")
        x = col[i]
        if x is None:
            return []
        return [y for y in x if y is not None] if isinstance(x, list | tuple) else [x]
    return []


def _preview(x: Any, limit: int = 160) -> str:
    """Short text of a prompt/completion for error messages (image blocks shown as <image>)."""
    if isinstance(x, str):
        text = x
    else:
        parts = []
        for m in [x] if isinstance(x, dict) else (x or []):
            c = m.get("content") if isinstance(m, dict) else m
            if isinstance(c, list):
                c = " ".join("<image>" if isinstance(b, dict) and b.get("type") == "image"
                             else str(b.get("text", "")) if isinstance(b, dict) else str(b) for b in c)
            parts.append(f"{m.get('role', '?') if isinstance(m, dict) else '?'}: {c}")
        text = " | ".join(parts)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
