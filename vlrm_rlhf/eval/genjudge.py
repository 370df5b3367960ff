"""Preference accuracy of a generative judge (``reward/generative.py``) on preference records.

Pairwise judge: a record's scores are the votes for each response over both orders (a tie in votes is a model
tie, credit 0.5). Pointwise judge: each response is scored on its own. Outputs the parser cannot read are
counted (``unparsed`` outputs, ``unparsed_records`` with no usable verdict at all, which are scored as ties and
never as a preference) and reported beside the accuracy with the number of judge prompts run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..reward.generative import GenerativeJudge
from .prefs import PrefResult, record_samples, result_of
from .records import PrefRecord

__all__ = ["evaluate_judge"]


def evaluate_judge(judge: GenerativeJudge, records: Sequence[PrefRecord], *, progress: bool = True) -> PrefResult:
    """Judge every record and compute the metrics (plus ``unparsed``, ``unparsed_records``, ``judge_calls``)."""
    from tqdm.auto import tqdm

    scores: list[tuple[float, float]] = []
    extra: list[dict[str, Any]] = []
    unparsed = dead = 0
    calls0 = judge.stats["calls"]
    for rec in tqdm(records, desc="judged pairs", unit="pair", disable=not progress):
        if judge.config.mode == "pairwise":
            v = judge.compare(rec.query, rec.responses[0], rec.responses[1], rec.images)
            pair = (float(v.votes[0]), float(v.votes[1]))
            unparsed += v.unparsed
            none = sum(v.votes) + v.ties == 0
            extra.append({"votes": v.votes, "vote_ties": v.ties, "unparsed": v.unparsed, "calls": v.calls})
        else:
            before = judge.stats["unparsed"]
            s = judge.score_samples(record_samples(rec))
            unparsed += judge.stats["unparsed"] - before
            none = not all(math.isfinite(x) for x in s)
            pair = (0.0, 0.0) if none else (s[0], s[1])
            extra.append({"judge_scores": [x if math.isfinite(x) else None for x in s], "unparsed": none})
        dead += none
        scores.append(pair)
    result = result_of(records, scores, extra=extra)
    result.metrics.update({"unparsed": unparsed, "unparsed_records": dead, "judge_calls": judge.stats["calls"] - calls0})
    return result
