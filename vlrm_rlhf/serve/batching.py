"""Scoring several callers' requests together (what one ``@serve.batch`` call of a replica runs); no Ray here.

Two policies:

* ``exact`` (default): each request is planned and run on its own, exactly as ``VLRMReward`` runs it in process
  (same rendering, truncation, token-budget micro-batches and padding), so every reward equals the in-process
  one bit for bit. Callers share the replica's queue and its thread hop, not forwards: a GEMM's rows are not
  independent of the row count on CPU (measured: stacking two callers' equal-shape micro-batches moved rewards
  by 1 ulp), so exactness rules out merged forwards.
* ``throughput``: all requests' samples form one plan, so micro-batches fill up across callers (fewer, fuller
  forwards). Padding and row counts then depend on the other callers, which moves rewards by float32 rounding
  (~1e-7 relative); use it when that does not matter.

A request whose samples cannot be planned (e.g. a response longer than the context) fails alone: its error is
returned in its slot, the other requests are scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from ..reward.inputs import Sample
from ..reward.scorer import Plan, VLRewardScorer

Batching = Literal["exact", "throughput"]
Result = list[float] | BaseException

__all__ = ["Batching", "forward_plan", "score_jobs"]


def score_jobs(scorer: VLRewardScorer, jobs: Sequence[list[Sample]], batching: Batching = "exact",
               stats: dict[str, int] | None = None) -> list[Result]:
    """Raw rewards (NaN kept) of each job's samples, in order; a job that fails gets its exception instead.
    ``stats`` (if given) counts ``forwards`` and ``samples`` run."""
    stats = stats if stats is not None else {}
    if batching == "throughput" and len(jobs) > 1:
        flat = [s for job in jobs for s in job]
        try:
            out = forward_plan(scorer, scorer.plan(flat), stats)
        except Exception:  # noqa: BLE001  (some job is bad: score them apart so only that one fails)
            return score_jobs(scorer, jobs, "exact", stats)
        res: list[Result] = []
        k = 0
        for job in jobs:
            res.append(out[k:k + len(job)])
            k += len(job)
        return res
    results: list[Result] = []
    for job in jobs:
        try:
            results.append(forward_plan(scorer, scorer.plan(job), stats))
        except Exception as e:  # noqa: BLE001  (returned in the job's slot)
            results.append(e)
    return results


@torch.no_grad()
def forward_plan(scorer: VLRewardScorer, plan: Plan, stats: dict[str, int]) -> list[float]:
    """A plan's micro-batches through the scorer's own ``forward``, one by one (as ``score_samples`` does)."""
    out = [math.nan] * len(plan.samples)
    for batch in plan.batches:
        for i, v in zip(batch, scorer.forward(plan, batch), strict=True):
            out[i] = v
        stats["forwards"] = stats.get("forwards", 0) + 1
        stats["samples"] = stats.get("samples", 0) + len(batch)
    return out
