"""Preference accuracy of a reward model (or judge) on pairs: per category, micro and macro, with ties.

A record is correct when the scorer gives the human-preferred response the higher score. A tie in the
model's scores (``|s0 - s1| <= tol``) earns 0.5, the expected value of a coin flip: the original
VL-RewardBench / VLRM evaluation took ``argmax``, which silently counts every tie as a pick of response 0.
The tie rate is reported beside the accuracy. Accuracies are fractions in [0, 1].

``pref_metrics`` is the pure arithmetic; ``evaluate_prefs`` scores records with any *pair scorer* — an
object with ``score_samples(list[Sample]) -> list[float]`` (``VLRewardScorer``, ``LVLMJudge``) or with
``score(prompts=, responses=, images=)`` — and returns a ``PrefResult``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..reward.inputs import InputError, Sample, make_sample
from .records import CATEGORY_ORDER, PrefDataError, PrefRecord

__all__ = ["PrefResult", "acc_plus", "credit", "evaluate_prefs", "pick", "pref_metrics", "record_samples"]


def pick(s0: float, s1: float, tol: float = 0.0) -> int | None:
    """The response a scorer prefers (0 or 1), or None for a tie (``|s0 - s1| <= tol``); NaN is an error."""
    if math.isnan(s0) or math.isnan(s1):
        raise ValueError(f"NaN score in pair ({s0}, {s1})")
    if s0 == s1 or abs(s0 - s1) <= tol:
        return None
    return 0 if s0 > s1 else 1


def credit(picked: int | None, preferred: int) -> float:
    """1 for the preferred response, 0 for the other, 0.5 for a tie."""
    return 0.5 if picked is None else float(picked == preferred)


def pref_metrics(
    scores: Sequence[Sequence[float]],
    preferred: Sequence[int],
    categories: Sequence[str],
    *,
    tol: float = 0.0,
) -> dict[str, Any]:
    """Accuracy (micro over records, macro over categories), tie rate and counts, overall and per category.

    Returns ``{"overall", "macro", "tie_rate", "n", "categories": {name: {"accuracy", "n", "tie_rate"}}}``;
    categories appear in VL-RewardBench's order (general, hallucination, reasoning), then sorted.
    """
    if not (len(scores) == len(preferred) == len(categories)):
        raise ValueError(f"{len(scores)} score pairs, {len(preferred)} labels, {len(categories)} categories")
    if not scores:
        raise ValueError("no records to evaluate")
    if tol < 0 or math.isnan(tol):
        raise ValueError(f"tol must be >= 0, got {tol}")
    per: dict[str, list[float]] = {}
    ties: dict[str, int] = {}
    for i, (pair, p, c) in enumerate(zip(scores, preferred, categories)):
        if len(pair) != 2:
            raise ValueError(f"record {i}: {len(pair)} scores, expected 2")
        if p not in (0, 1):
            raise ValueError(f"record {i}: preferred must be 0 or 1, got {p!r}")
        try:
            k = pick(float(pair[0]), float(pair[1]), tol)
        except ValueError as e:
            raise ValueError(f"record {i}: {e}") from None
        per.setdefault(c, []).append(credit(k, p))
        ties[c] = ties.get(c, 0) + (k is None)
    names = [c for c in CATEGORY_ORDER if c in per] + sorted(c for c in per if c not in CATEGORY_ORDER)
    cats = {c: {"accuracy": sum(per[c]) / len(per[c]), "n": len(per[c]), "tie_rate": ties[c] / len(per[c])}
            for c in names}
    n = len(scores)
    return {
        "overall": sum(sum(v) for v in per.values()) / n,
        "macro": sum(m["accuracy"] for m in cats.values()) / len(cats),
        "tie_rate": sum(ties.values()) / n,
        "n": n,
        "categories": cats,
    }


def acc_plus(credits: Sequence[float], groups: Sequence[str]) -> dict[str, Any]:
    """MM-RLHF-RewardBench's ACC+: the fraction of groups (records sharing an id) whose pairs are ALL right
    (a tie, credit 0.5, is not right). Returns ``{"acc_plus", "groups"}``."""
    if len(credits) != len(groups):
        raise ValueError(f"{len(credits)} credits for {len(groups)} groups")
    ok: dict[str, bool] = {}
    for c, g in zip(credits, groups):
        ok[g] = ok.get(g, True) and c == 1.0
    if not ok:
        raise ValueError("no records to evaluate")
    return {"acc_plus": sum(ok.values()) / len(ok), "groups": len(ok)}


@dataclass
class PrefResult:
    """Scores, metrics and per-record rows of one evaluation (``rows``: id, category, scores, picked, ...)."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]

    def accuracy_by_category(self) -> dict[str, float]:
        """Flat accuracies: ``{"overall", "macro", <category>: ...}`` (fractions)."""
        return {"overall": self.metrics["overall"], "macro": self.metrics["macro"],
                **{c: m["accuracy"] for c, m in self.metrics["categories"].items()}}


def record_samples(rec: PrefRecord) -> list[Sample]:
    """The record's two (images + query, response) conversations, ready for ``score_samples``."""
    prompt = [{"role": "user", "content": [{"type": "image"} for _ in rec.images] + [{"type": "text", "text": rec.query}]}]
    try:
        return [make_sample(prompt, r, list(rec.images) or None, j) for j, r in enumerate(rec.responses)]
    except InputError as e:
        raise PrefDataError(f"{rec.where or rec.id}: {e}") from e


def _score(scorer: Any, samples: list[Sample]) -> list[float]:
    if hasattr(scorer, "score_samples"):
        return [float(x) for x in scorer.score_samples(samples)]
    prompts = [[m for m in s.messages if m["role"] != "assistant"] for s in samples]
    return [float(x) for x in scorer.score(prompts=prompts, responses=[s.text_of("assistant") for s in samples],
                                           images=[s.images or None for s in samples])]


def evaluate_prefs(
    scorer: Any,
    records: Sequence[PrefRecord],
    *,
    tol: float = 0.0,
    progress: bool = True,
    batch_size: int = 16,
) -> PrefResult:
    """Score both responses of every record (``batch_size`` records per scorer call) and compute the metrics.

    Records keep their decoded images, so calling this repeatedly on the same records never re-reads files.
    A scorer error is re-raised naming the record; a non-finite score is an error naming the record.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not records:
        raise PrefDataError("no records to evaluate")
    scores: list[tuple[float, float]] = []
    bar = tqdm(total=len(records), desc="preference pairs", unit="pair", disable=not progress)
    with bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            samples = [s for rec in chunk for s in record_samples(rec)]
            try:
                flat = _score(scorer, samples)
            except InputError as e:
                for rec in chunk:  # name the culprit
                    try:
                        _score(scorer, record_samples(rec))
                    except InputError as e2:
                        raise PrefDataError(f"{rec.where or rec.id}: {e2}") from e2
                raise PrefDataError(str(e)) from e
            if len(flat) != len(samples):
                raise PrefDataError(f"the scorer returned {len(flat)} scores for {len(samples)} responses")
            for j, rec in enumerate(chunk):
                pair = (flat[2 * j], flat[2 * j + 1])
                if not all(math.isfinite(x) for x in pair):
                    raise PrefDataError(f"{rec.where or rec.id}: non-finite score {pair}")
                scores.append(pair)
            bar.update(len(chunk))
    return result_of(records, scores, tol)


def result_of(records: Sequence[PrefRecord], scores: Sequence[tuple[float, float]], tol: float = 0.0,
              extra: Sequence[Mapping[str, Any]] | None = None) -> PrefResult:
    """Metrics and per-record rows of scored records (ACC+ added when records carry groups); ``extra``:
    more fields per row (e.g. a judge's votes)."""
    metrics = pref_metrics(scores, [r.preferred for r in records], [r.category for r in records], tol=tol)
    rows = []
    for i, (rec, pair) in enumerate(zip(records, scores)):
        k = pick(*pair, tol)
        rows.append({"id": rec.id, "category": rec.category, "scores": list(pair), "preferred": rec.preferred,
                     "picked": k, "correct": credit(k, rec.preferred), **({"group": rec.group} if rec.group else {}),
                     **(dict(extra[i]) if extra is not None else {})})
    if any(r.group for r in records):
        metrics.update(acc_plus([r["correct"] for r in rows], [r.group or r.id for r in records]))
    return PrefResult(metrics, rows)


def summarize(metrics: Mapping[str, Any]) -> str:
    """One line: overall / macro / per-category accuracy in percent and the tie rate."""
    cats = " ".join(f"{c} {m['accuracy'] * 100:.1f}" for c, m in metrics["categories"].items())
    plus = f" | ACC+ {metrics['acc_plus'] * 100:.1f} ({metrics['groups']} groups)" if "acc_plus" in metrics else ""
    return (f"overall {metrics['overall'] * 100:.1f} | macro {metrics['macro'] * 100:.1f} | {cats} | "
            f"ties {metrics['tie_rate'] * 100:.1f} % | n {metrics['n']}{plus}")


def flat_accuracy(scorer: Any, records: Sequence[Any]) -> dict[str, float]:
    """Flat accuracies (overall, macro, per category, tie_rate) of one scorer on one split."""
    res = evaluate_prefs(scorer, records, progress=False, batch_size=64)
    return {**res.accuracy_by_category(), "tie_rate": res.metrics["tie_rate"]}
