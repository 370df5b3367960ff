"""Reward sources of the RL study as TRL GRPO-protocol callables: any scorer with ``score_samples`` (text RM,
cascade, VLRM, LVLM likelihood judge), a merged ensemble, and ShapesWorld's gold scorer.

Every source goes through the same wrapper, so they differ only in what they score: empty answers get the
batch's lowest reward minus one (a likelihood judge would otherwise give an empty answer its best score, 0),
and optional running whitening / clipping apply identically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import VLRMError
from ..reward.inputs import Sample, make_sample
from ..reward.trl import as_messages, column_images
from ..worlds.gold import judge
from ..worlds.shapes import QA


class StudyError(VLRMError, ValueError):
    """A study that cannot run (unknown source or algorithm, missing demo models or columns); the message says why."""

__all__ = ["EnsembleSourceReward", "GoldReward", "ScorerReward", "qa_from_json", "qa_to_json"]


def qa_to_json(qa: QA) -> str:
    """A question as a JSON string (a dataset column the gold reward reads)."""
    return json.dumps({"kind": qa.kind, "question": qa.question, "gold": qa.gold, "wrong": list(qa.wrong)})


def qa_from_json(s: str) -> QA:
    """Inverse of :func:`qa_to_json`."""
    d = json.loads(s)
    return QA(d["kind"], d["question"], d["gold"], tuple(d["wrong"]))


def _texts(completions: Sequence[Any]) -> list[str]:
    out = []
    for c in completions:
        if isinstance(c, str):
            out.append(c)
            continue
        msgs = as_messages(c, "assistant")
        out.append(" ".join(b.get("text", "") if isinstance(b, dict) else str(b)
                            for m in msgs for b in (m["content"] if isinstance(m["content"], list) else [m["content"]])
                            if not isinstance(b, dict) or b.get("type", "text") == "text"))
    return out


class _Reward:
    """Shared post-processing: empty answers, running whitening, clipping, and a TRL-friendly ``__name__``."""

    def __init__(self, name: str, *, normalize: bool = False, clip: float | None = None):
        self.__name__ = name
        self.normalize, self.clip = normalize, clip
        self._n, self._mean, self._m2 = 0, 0.0, 0.0

    def _post(self, raw: list[float], texts: list[str]) -> list[float]:
        ok = [v for v, t in zip(raw, texts, strict=True) if t.strip() and math.isfinite(v)]
        floor = (min(ok) if ok else 0.0) - 1.0
        vals = [v if t.strip() and math.isfinite(v) else floor for v, t in zip(raw, texts, strict=True)]
        if self.normalize:
            for v in vals:  # Welford: whiten with the statistics of every reward seen so far
                self._n += 1
                d = v - self._mean
                self._mean += d / self._n
                self._m2 += d * (v - self._mean)
            std = math.sqrt(self._m2 / self._n) if self._n > 1 else 1.0
            vals = [(v - self._mean) / (std if std > 1e-6 else 1.0) for v in vals]
        if self.clip is not None:
            vals = [min(max(v, -self.clip), self.clip) for v in vals]
        return vals


class ScorerReward(_Reward):
    """``score_samples`` of any scorer (``VLRewardScorer`` in any mode, ``LVLMJudge``, :class:`MeanScorer`) as a
    GRPO-protocol reward; images come inline (TRL) or from the ``image``/``images`` column (``VLPPOTrainer``)."""

    def __init__(self, scorer: Any, name: str, **kw: Any):
        super().__init__(name, **kw)
        self.scorer = scorer

    def raw(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        """Unprocessed scores (NaN for empty answers)."""
        texts = _texts(completions)
        samples: list[Sample] = []
        keep = [i for i, t in enumerate(texts) if t.strip()]
        for i in keep:
            msgs = as_messages(prompts[i], "user") + as_messages(completions[i], "assistant")
            inline = any(isinstance(m["content"], list) and b.get("type") == "image" and b.get("image") is not None
                         for m in msgs for b in m["content"])
            samples.append(make_sample(msgs, None, None if inline else (column_images(columns, i) or None), i))
        scores = self.scorer.score_samples(samples) if samples else []
        out = [math.nan] * len(texts)
        for i, v in zip(keep, scores, strict=True):
            out[i] = float(v)
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        return self._post(self.raw(prompts, completions, **columns), _texts(completions))


class EnsembleSourceReward(_Reward):
    """A merged ensemble (:class:`~vlrm_rlhf.reward.ensemble.EnsembleReward`, image features shared by its
    members) whose members are standardised by fixed per-member (mean, std) — measured once on the starting
    policy's answers, so the scale does not drift while the policy moves — then combined by its rule."""

    def __init__(self, ensemble: Any, name: str, standardize: Sequence[tuple[float, float]] | None = None, **kw: Any):
        super().__init__(name, **kw)
        self.ensemble = ensemble
        self.standardize = list(standardize or [(0.0, 1.0)] * len(ensemble.members))

    def member_raw(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[list[float]]:
        """K x N raw member rewards."""
        cols = {k: v for k, v in columns.items() if k in ("image", "images")}
        return list(self.ensemble.member_rewards(prompts, completions, **cols).values())

    def raw(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        from ..reward.combine import combine_rewards

        per = self.member_raw(prompts, completions, **columns)
        scaled = [[(v - a) / b for v in r] for r, (a, b) in zip(per, self.standardize, strict=True)]
        beta = self.ensemble.beta if self.ensemble.combine == "mean_minus_std" else None
        return combine_rewards(scaled, self.ensemble.combine, beta)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        return self._post(self.raw(prompts, completions, **columns), _texts(completions))


class GoldReward(_Reward):
    """The world's answer quality (1 / 0.5 / 0) as a reward, read against the ``qa`` column: the upper bound."""

    def __init__(self, name: str = "gold", key: str = "quality", **kw: Any):
        super().__init__(name, **kw)
        self.key = key

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], qa: Sequence[str] | None = None,
                 **columns: Any) -> list[float]:
        if qa is None:
            raise StudyError("the gold reward needs the dataset's 'qa' column (JSON of the question and its answers)")
        texts = _texts(completions)
        raw = [judge(qa_from_json(q), t).as_dict()[self.key] for q, t in zip(qa, texts, strict=True)]
        return self._post(raw, texts)


RewardFn = Callable[..., list]
