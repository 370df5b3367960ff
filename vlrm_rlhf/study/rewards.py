"""Reward sources of the RL study as TRL GRPO-protocol callables: any scorer with ``score_samples`` (text RM,
cascade, VLRM, LVLM likelihood judge), an average of several (an ensemble), and ShapesWorld's gold scorer.

Every source goes through the same wrapper, so they differ only in what they score: empty answers get the
batch's lowest reward minus one (a likelihood judge would otherwise give an empty answer its best score, 0),
and optional running whitening / clipping apply identically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from ..reward.inputs import Sample, make_sample
from ..reward.trl import _as_messages, _column_images
from ..worlds.gold import judge
from ..worlds.shapes import QA

__all__ = ["Combine", "GoldReward", "MeanScorer", "ScorerReward", "qa_from_json", "qa_to_json"]

Combine = Literal["mean", "min", "mean_minus_std"]


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
        msgs = _as_messages(c, "assistant")
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
            msgs = _as_messages(prompts[i], "user") + _as_messages(completions[i], "assistant")
            inline = any(isinstance(m["content"], list) and b.get("type") == "image" and b.get("image") is not None
                         for m in msgs for b in m["content"])
            samples.append(make_sample(msgs, None, None if inline else (_column_images(columns, i) or None), i))
        scores = self.scorer.score_samples(samples) if samples else []
        out = [math.nan] * len(texts)
        for i, v in zip(keep, scores, strict=True):
            out[i] = float(v)
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        return self._post(self.raw(prompts, completions, **columns), _texts(completions))


class MeanScorer:
    """Several scorers as one: ``mean``, ``min`` or ``mean - beta * std`` of their scores (a reward ensemble;
    members are standardised by fixed per-member (offset, scale) given at construction, default (0, 1))."""

    def __init__(self, members: Sequence[Any], combine: Combine = "mean", beta: float = 1.0,
                 standardize: Sequence[tuple[float, float]] | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if combine not in ("mean", "min", "mean_minus_std"):
            raise ValueError(f"combine must be 'mean', 'min' or 'mean_minus_std', not {combine!r}")
        self.members, self.combine, self.beta = list(members), combine, beta
        self.standardize = list(standardize or [(0.0, 1.0)] * len(self.members))

    def score_samples(self, samples: list[Sample]) -> list[float]:
        cols = [[(v - a) / b for v in m.score_samples(samples)]
                for m, (a, b) in zip(self.members, self.standardize, strict=True)]
        return [combine_scores([c[i] for c in cols], self.combine, self.beta) for i in range(len(samples))]


def combine_scores(xs: Sequence[float], combine: Combine, beta: float = 1.0) -> float:
    """One ensemble score from member scores."""
    mean = sum(xs) / len(xs)
    if combine == "mean":
        return mean
    if combine == "min":
        return min(xs)
    return mean - beta * math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


class GoldReward(_Reward):
    """The world's answer quality (1 / 0.5 / 0) as a reward, read against the ``qa`` column: the upper bound."""

    def __init__(self, name: str = "gold", key: str = "quality", **kw: Any):
        super().__init__(name, **kw)
        self.key = key

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], qa: Sequence[str] | None = None,
                 **columns: Any) -> list[float]:
        if qa is None:
            raise ValueError("the gold reward needs the dataset's 'qa' column (JSON of the question and its answers)")
        texts = _texts(completions)
        raw = [judge(qa_from_json(q), t).as_dict()[self.key] for q, t in zip(qa, texts, strict=True)]
        return self._post(raw, texts)


RewardFn = Callable[..., list]
