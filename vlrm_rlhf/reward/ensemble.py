"""Reward ensembles as one TRL GRPO/RLOO reward function: K reward models, one combined reward per completion.

``EnsembleReward(members, combine="mean" | "min" | "mean_minus_std", beta=...)`` scores every completion with
every member (VLRMs, merges at other λ or with other methods, text RMs, or any ready ``VLRewardScorer``) and
combines the members' rewards per completion (``reward/combine.py``). It keeps ``VLRMReward``'s protocol: TRL's
call signature, images from the prompts or the ``image``/``images`` column, the non-finite policy (a completion
with a non-finite reward from any member raises, or gets ``None``), optional normalisation and clipping of the
combined reward, and multi-process lockstep (every rank runs the same sequence of forwards for every member).

What is shared, so that K members cost less than K separate reward functions:

- Members whose processing is identical (same mode, processor, tokenizer, chat template, pad id, length limits,
  device and dtype) share one plan: the samples are rendered, tokenised and micro-batched once, and every
  micro-batch is encoded (image preprocessing included) once for all of them.
- Members that also share the vision tower and projector (every merge of one LVLM does; detected by comparing
  those tensors) compute the image features once per micro-batch (``reward/shared_vision.py``); each then runs
  only its language model. Families without a way to take precomputed features run their own vision path.

Each member's reward is exactly what its own ``VLRewardScorer`` gives (the same batches, the same inputs; tested
with ``==``). Per-member standardisation (``member_normalize``) puts members with different scales on one scale
before combining.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from .combine import (
    Combine,
    EnsembleError,
    RunningMoments,
    batch_stats,
    check_combine,
    combine_rewards,
    member_spread,
    moments,
    standardize,
)
from .inputs import InputError, Sample, make_sample
from .scorer import Plan, VLRewardScorer
from .shared_vision import (
    SharingKind,
    image_features,
    same_tensors,
    sharing_kind,
    vision_tensors,
    with_features,
)
from .trl import NonFiniteRewardError, VLRMReward, default_name

__all__ = ["EnsembleError", "EnsembleReward", "Member", "ensemble_reward"]

MemberNormalize = Literal["batch", "running"]
MemberSpec = str | Path | VLRewardScorer


@dataclass
class Member:
    """One ensemble member: its name (in logs), its scorer, and what it shares with the others."""

    name: str
    scorer: VLRewardScorer
    share: SharingKind | None = None  # how it takes precomputed image features (None: runs its own vision path)
    vision: int | None = None  # vision-path class: members with the same class share image features
    stats: RunningMoments = field(default_factory=RunningMoments)


@dataclass
class _Group:
    """Members scored from one plan (identical processing); ``members`` index ``EnsembleReward.members``."""

    lead: VLRewardScorer
    members: list[int]


class EnsembleReward(VLRMReward):
    """K reward models as one GRPO/RLOO reward function; see the module docstring.

    Args:
        members: reward model directories (a VLRM is scored in mode ``vlrm``, a text RM in ``text_rm``) or ready
            ``VLRewardScorer``s (any mode, e.g. ``cascade``).
        combine: ``mean``, ``min`` or ``mean_minus_std`` (mean − beta · population std over the members).
        beta: the std weight of ``mean_minus_std`` (default 1.0; an error with other rules).
        member_normalize: ``None`` (raw member rewards), ``"batch"`` (standardise each member with this call's
            mean/std over all ranks) or ``"running"`` (with the member's running mean/std over every call so far,
            this call included): for members whose reward scales differ. Standardisation is per member and
            happens before combining.
        names: one name per member for the logs (default: ``vlrm_<dirname>``, made unique).
        share_vision: compute the image features once for members with the same vision path (default True).
        name, normalize, clip, non_finite, accelerator: as in ``VLRMReward``, applied to the combined reward.
        scorer_kwargs: passed to ``VLRewardScorer.from_pretrained`` for members given as paths.

    Logs (when TRL passes ``log_metric`` / ``log_extra``): ``<name>/<member>/raw_mean`` per member,
    ``<name>/member_std`` (the members' mean disagreement) and ``<name>/raw_mean`` (the combined reward before
    normalisation); one completions-table column ``<name>/<member>`` per member. ``last_member_rewards`` holds
    the raw per-member rewards of the last call; ``vision_calls`` counts the vision forwards run.
    """

    def __init__(
        self,
        members: Sequence[MemberSpec],
        *,
        combine: Combine = "mean",
        beta: float | None = None,
        member_normalize: MemberNormalize | None = None,
        names: Sequence[str] | None = None,
        share_vision: bool = True,
        name: str | None = None,
        normalize: Literal["batch", "running"] | None = None,
        clip: tuple[float, float] | None = None,
        non_finite: Literal["raise", "none"] = "raise",
        accelerator: Any = None,
        **scorer_kwargs: Any,
    ):
        self.beta = check_combine(combine, beta)
        self.combine = combine
        if member_normalize not in (None, "batch", "running"):
            raise EnsembleError(f"member_normalize must be None, 'batch' or 'running', not {member_normalize!r}")
        if isinstance(members, str | Path | VLRewardScorer) or not members:
            raise EnsembleError("an ensemble needs a list of members (reward model directories or VLRewardScorers)")
        if names is not None and len(names) != len(members):
            raise EnsembleError(f"{len(names)} names for {len(members)} members")
        seen = [str(Path(m).resolve()) for m in members if not isinstance(m, VLRewardScorer)]
        dup = next((p for i, p in enumerate(seen) if p in seen[:i]), None)
        if dup is not None:
            raise EnsembleError(f"ensemble member {dup} is listed twice")
        if scorer_kwargs and len(seen) < len(members):
            raise TypeError(f"scorer options {sorted(scorer_kwargs)} apply to members given as paths only; "
                            "build the VLRewardScorer members with them instead")
        scorers = [m if isinstance(m, VLRewardScorer) else _load(m, scorer_kwargs) for m in members]
        super().__init__(scorers[0], name=name or f"vlrm_ensemble_{combine}", normalize=normalize, clip=clip,
                         non_finite=non_finite, accelerator=accelerator)
        self._device_pinned = "device" in scorer_kwargs
        self.member_normalize = member_normalize
        labels = list(names) if names is not None else _unique(
            [default_name(_source(m, s), s.mode) for m, s in zip(members, scorers, strict=True)])
        if len(set(labels)) != len(labels):
            raise EnsembleError(f"member names must be unique, got {labels}")
        self.members = [Member(n, s) for n, s in zip(labels, scorers, strict=True)]
        self.groups = _group(self.members)
        if share_vision:
            _classify_vision(self.members, self.groups)
        self.vision_calls = 0
        self.last_member_rewards: dict[str, list[float]] = {}

    def __repr__(self) -> str:
        shared = sum(1 for m in self.members if m.vision is not None)
        return (f"EnsembleReward({self.__name__!r}, members={[m.name for m in self.members]}, combine={self.combine!r}"
                f"{f', beta={self.beta:g}' if self.combine == 'mean_minus_std' else ''}, plans={len(self.groups)}, "
                f"sharing image features: {shared}/{len(self.members)})")

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
        """One combined reward per completion (``None`` for non-finite ones when ``non_finite="none"``)."""
        raw = self._member_raw(prompts, completions, columns)
        self.last_member_rewards = {m.name: list(r) for m, r in zip(self.members, raw, strict=True)}
        self._log_members(raw, log_extra, log_metric)
        scaled = self._standardize(raw)
        combined = combine_rewards(scaled, self.combine, self.beta if self.combine == "mean_minus_std" else None)
        try:
            return self._postprocess(combined, prompts, completions, log_metric)
        except NonFiniteRewardError as e:
            bad = [(m.name, r[i]) for i in range(len(combined)) if not math.isfinite(combined[i])
                   for m, r in zip(self.members, raw, strict=True) if not math.isfinite(r[i])][:4]
            raise NonFiniteRewardError(f"{e}; non-finite member reward(s): "
                                       f"{', '.join(f'{n}={v}' for n, v in bad) or 'on another rank'}") from None

    def member_rewards(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> dict[str, list[float]]:
        """Raw rewards per member (name -> one float per completion, NaN kept), without combining."""
        raw = self._member_raw(prompts, completions, columns)
        return {m.name: r for m, r in zip(self.members, raw, strict=True)}

    # ---- scoring --------------------------------------------------------------------------------------
    def _member_raw(self, prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, Any]) -> list[list[float]]:
        """K x N raw rewards: every group plans the samples once, then runs its micro-batches in lockstep."""
        self._setup()
        error: BaseException | None = None
        plans: list[tuple[Plan, list[list[int]], list[list[int]]]] = []
        try:
            if len(prompts) != len(completions):
                raise InputError(f"{len(prompts)} prompts for {len(completions)} completions")
            samples = [self._sample(i, prompts[i], completions[i], columns) for i in range(len(prompts))]
            for g in self.groups:  # each group plans its own copy: truncation edits a sample's text in place
                plan = g.lead.plan([_copy(s) for s in samples])
                plans.append((plan, [b for b in plan.batches if not plan.samples[b[0]].images],
                              [b for b in plan.batches if plan.samples[b[0]].images]))
        except Exception as e:  # noqa: BLE001  (re-raised below, after telling the other ranks)
            error, plans = e, []
        counts = [x for p in plans for x in (len(p[1]), len(p[2]))] or [0] * (2 * len(self.groups))
        *totals, failed = self._all_reduce([*counts, error is not None], "max")
        if failed:
            if error is not None:
                raise error
            raise RuntimeError(f"{self.__name__}: another rank failed to prepare its reward inputs")
        raw = [[math.nan] * len(prompts) for _ in self.members]
        for gi, (g, (plan, text_b, image_b)) in enumerate(zip(self.groups, plans, strict=True)):
            self._run_group(g, plan, text_b, int(totals[2 * gi]), raw, "text")
            self._run_group(g, plan, image_b, int(totals[2 * gi + 1]), raw, "image")
        return raw

    @torch.no_grad()
    def _run_group(self, g: _Group, plan: Plan, batches: list[list[int]], total: int, raw: list[list[float]],
                   kind: str) -> None:
        """This rank's micro-batches of one kind for every member of the group, then padding forwards (lockstep)."""
        for batch in batches:
            for k, vals in zip(g.members, self._forward(g, plan, batch), strict=True):
                for i, v in zip(batch, vals, strict=True):
                    raw[k][i] = v
        for _ in range(total - len(batches)):
            self._forward(g, _dummy_plan(g.lead, kind), [0])
            self.dummy_calls += 1

    def _forward(self, g: _Group, plan: Plan, batch: list[int]) -> list[list[float]]:
        """Every group member's rewards for one micro-batch: one encoding, image features once per vision class."""
        enc = g.lead.encode([plan.texts[i] for i in batch], [plan.samples[i].images for i in batch])
        pixels = any(plan.samples[i].images for i in batch)
        features: dict[int, Any] = {}
        out = []
        for k in g.members:
            m = self.members[k]
            inputs = enc
            if pixels and m.share is not None and m.vision is not None:
                if m.vision not in features:
                    features[m.vision] = image_features(m.scorer.model, m.share, enc)
                    self.vision_calls += 1
                inputs = with_features(enc, m.share, features[m.vision])
            elif pixels:
                self.vision_calls += 1
            self.forward_calls += 1
            out.append(m.scorer.model(**inputs, use_cache=False).logits[:, 0].float().tolist())
        return out

    # ---- rewards --------------------------------------------------------------------------------------
    def _standardize(self, raw: list[list[float]]) -> list[list[float]]:
        """Per-member standardisation (``member_normalize``), statistics summed over all ranks in one collective."""
        if self.member_normalize is None:
            return raw
        flat = self._all_reduce([x for r in raw for x in moments(r)], "sum")
        out = []
        for k, (m, r) in enumerate(zip(self.members, raw, strict=True)):
            n, total, sq = flat[3 * k: 3 * k + 3]
            if self.member_normalize == "running":
                m.stats.update(n, total, sq)
                mean, std = m.stats.mean, m.stats.std
            else:
                mean, std = batch_stats(n, total, sq)
            out.append(standardize(r, mean, std) if n > 0 else list(r))
        return out

    def _log_members(self, raw: list[list[float]], log_extra: Callable[[str, list], None] | None,
                     log_metric: Callable[[str, float], None] | None) -> None:
        """Per-member raw means and disagreement (``log_metric``) and per-completion columns (``log_extra``)."""
        if log_metric is not None:
            for m, r in zip(self.members, raw, strict=True):
                finite = [v for v in r if math.isfinite(v)]
                if finite:
                    log_metric(f"{self.__name__}/{m.name}/raw_mean", math.fsum(finite) / len(finite))
            spread = [v for v in member_spread(raw) if math.isfinite(v)]
            if spread:
                log_metric(f"{self.__name__}/member_std", math.fsum(spread) / len(spread))
        if log_extra is not None:
            for m, r in zip(self.members, raw, strict=True):
                log_extra(f"{self.__name__}/{m.name}", [v if math.isfinite(v) else None for v in r])

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Running normalisation state of the combined reward and of every member (to save with a checkpoint)."""
        return {**super().state_dict(),
                "members": {m.name: [m.stats.count, m.stats.mean, m.stats.m2] for m in self.members}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; every member's state must be present."""
        super().load_state_dict(state)
        saved = state.get("members", {})
        missing = [m.name for m in self.members if m.name not in saved]
        if missing:
            raise KeyError(f"no saved running stats for member(s) {missing}; saved: {sorted(saved)}")
        for m in self.members:
            m.stats = RunningMoments(*(float(x) for x in saved[m.name]))

    def _setup(self) -> None:
        """First call: place every member's model as ``VLRMReward`` places its own (ZeRO-3 engine or device)."""
        if self._ready:
            return
        for m in self.members:
            self.scorer, self._ready = m.scorer, False
            super()._setup()
        self.scorer, self._ready = self.members[0].scorer, True


# ---- construction helpers -------------------------------------------------------------------------------
def _load(path: str | Path, kw: dict[str, Any]) -> VLRewardScorer:
    """A member directory as a scorer: mode ``vlrm`` for a VLRM, ``text_rm`` for a text RM."""
    import json

    p = Path(path)
    if not (p / "config.json").is_file():
        raise InputError(f"ensemble member {p}: no config.json (not a reward model directory)")
    cfg = json.loads((p / "config.json").read_text())
    mode = "vlrm" if ("text_config" in cfg or "vision_config" in cfg) else "text_rm"
    return VLRewardScorer.from_pretrained(p, mode=mode, **kw)


def _source(spec: MemberSpec, scorer: VLRewardScorer) -> str:
    if isinstance(spec, VLRewardScorer):
        return getattr(scorer.model.config, "_name_or_path", "") or "member"
    return str(spec)


def _unique(names: list[str]) -> list[str]:
    """Names made unique by appending ``_<index>`` to repeats (two members in directories with one name)."""
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _digest(x: Any) -> str:
    return sha256(repr(x).encode()).hexdigest()


def _processing_key(s: VLRewardScorer) -> tuple:
    """Everything that decides how a scorer renders, tokenises, batches and encodes samples."""
    tok, proc = s.tokenizer, s.processor
    backend = getattr(tok, "backend_tokenizer", None)
    tok_state = backend.to_str() if backend is not None else sorted(tok.get_vocab().items())
    if hasattr(proc, "to_json_string"):
        proc_state = proc.to_json_string()
    else:  # the image-only fallback processor: its config and image processor
        ip = getattr(proc, "image_processor", None)
        proc_state = (getattr(proc, "config", None), ip.to_json_string() if ip is not None else None)
    templates = (getattr(proc, "chat_template", None), getattr(tok, "chat_template", None))
    param = next(s.model.parameters())
    return (s.mode, type(proc).__name__, type(tok).__name__, _digest(tok_state), _digest(proc_state),
            _digest(templates), tok.padding_side, getattr(tok, "truncation_side", None), s.pad_id, s.max_length,
            s.max_batch_tokens, str(s.device), param.dtype, id(s.captioner) if s.mode == "cascade" else None)


def _group(members: list[Member]) -> list[_Group]:
    """Members with identical processing share one plan and one encoding per micro-batch."""
    groups: dict[tuple, _Group] = {}
    for k, m in enumerate(members):
        key = _processing_key(m.scorer)
        if key in groups:
            groups[key].members.append(k)
        else:
            groups[key] = _Group(m.scorer, [k])
    return list(groups.values())


def _classify_vision(members: list[Member], groups: list[_Group]) -> None:
    """Give members of one group that can take precomputed features a vision class (equal vision tensors)."""
    reps: list[tuple[int, type, SharingKind, dict[str, torch.Tensor]]] = []
    for g in groups:
        if g.lead.mode not in ("vlrm",):
            continue  # no images reach the model in the other modes
        for k in g.members:
            m = members[k]
            kind = sharing_kind(m.scorer.model)
            tensors = vision_tensors(m.scorer.model) if kind is not None else None
            if kind is None or tensors is None:
                continue
            m.share = kind
            bb_type = type(m.scorer.model)
            cls = next((c for c, t, kd, ref in reps if t is bb_type and kd == kind and same_tensors(ref, tensors)), None)
            if cls is None:
                cls = len(reps)
                reps.append((cls, bb_type, kind, tensors))
            m.vision = cls


def _copy(s: Sample) -> Sample:
    """A sample whose messages and blocks can be edited (truncation) without touching the original."""
    return Sample([{**m, "content": [dict(b) for b in m["content"]]} for m in s.messages], list(s.images))


def _dummy_plan(scorer: VLRewardScorer, kind: str) -> Plan:
    """A one-sample plan of the given kind (``image`` runs the vision path) for padding forwards."""
    content: list[dict[str, Any]] = [{"type": "text", "text": "."}]
    if kind == "image":
        content.insert(0, {"type": "image", "image": Image.new("RGB", (64, 64), (127, 127, 127))})
    sample = make_sample([{"role": "user", "content": content}, {"role": "assistant", "content": "."}], None, None)
    return scorer.plan([sample])


def ensemble_reward(members: Sequence[MemberSpec] | str | Path, *, grid: Any = None, **kw: Any) -> EnsembleReward:
    """An ``EnsembleReward`` from member directories/scorers, or from a merge recipe and a ``grid`` (in memory)."""
    if grid is not None:
        if not isinstance(members, str | Path):
            raise EnsembleError("grid=... builds an in-memory ensemble from ONE merge recipe; got a list of members")
        from .ensemble_recipe import ensemble_from_recipe

        return ensemble_from_recipe(members, grid, **kw)
    if isinstance(members, str | Path):
        raise EnsembleError(f"{members}: an ensemble needs a list of members, or a merge recipe with grid=...")
    return EnsembleReward(members, **kw)


def member_label(point: dict[str, float]) -> str:
    """A log-friendly member name for a grid point: ``lambda_0.5``, ``rm.density_0.3_lambda_1``."""
    return re.sub(r"[^\w.-]+", "_", "_".join(f"{k}_{v:g}" for k, v in point.items())).strip("_")
