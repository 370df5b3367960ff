"""Reward-ensemble math on plain floats: combining K members' rewards per sample, and running moments.

Pure functions and a small accumulator, no models: ``EnsembleReward`` (``reward/ensemble.py``) feeds them the
members' raw rewards. A sample with a non-finite reward from ANY member gets a NaN combined reward (never a
value combined from the remaining members: a missing pessimistic member would silently make ``min`` optimistic),
so the reward function's non-finite policy (raise, or ``None`` for TRL to ignore) decides what happens to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import VLRMError

Combine = Literal["mean", "min", "mean_minus_std"]
COMBINES: tuple[str, ...] = ("mean", "min", "mean_minus_std")
EPS = 1e-6  # a standard deviation below this is treated as 1 when standardising (constant rewards stay put)


class EnsembleError(VLRMError, ValueError):
    """A bad ensemble: combine rule, beta, member list or member-reward matrix; the message names the culprit."""


CombineError = EnsembleError  # the name the combine math raises under


def check_combine(combine: str, beta: float | None) -> float:
    """Validate a combine rule and its ``beta``; return the beta to use (1.0 by default for mean_minus_std).

    ``beta`` only applies to ``mean_minus_std`` (naming it with another rule is an error, not a silent no-op)
    and must be finite and >= 0 (a negative beta would reward disagreement between members).
    """
    if combine not in COMBINES:
        raise CombineError(f"unknown combine {combine!r}: use one of {', '.join(COMBINES)}")
    if combine != "mean_minus_std":
        if beta is not None:
            raise CombineError(f"beta={beta!r} only applies to combine='mean_minus_std', not {combine!r}")
        return 0.0
    beta = 1.0 if beta is None else float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise CombineError(f"beta must be a finite number >= 0, got {beta!r}")
    return beta


def combine_rewards(member_rewards: Sequence[Sequence[float]], combine: Combine = "mean",
                    beta: float | None = None) -> list[float]:
    """Combine a K x N matrix (``member_rewards[k][i]``: member k's reward for sample i) into N rewards.

    ``mean``: the members' mean; ``min``: the lowest member; ``mean_minus_std``: mean − beta · std, with the
    population standard deviation over the K members (ddof = 0, so one member gives std 0). A sample with any
    non-finite member reward gets NaN.
    """
    b = check_combine(combine, beta)
    if not member_rewards:
        raise CombineError("no member rewards to combine")
    n = len(member_rewards[0])
    if any(len(r) != n for r in member_rewards):
        raise CombineError(f"members gave different numbers of rewards: {[len(r) for r in member_rewards]}")
    out: list[float] = []
    for i in range(n):
        col = [float(r[i]) for r in member_rewards]
        if not all(math.isfinite(v) for v in col):
            out.append(math.nan)
            continue
        if combine == "min":
            out.append(min(col))
            continue
        mean = math.fsum(col) / len(col)
        if combine == "mean":
            out.append(mean)
        else:
            var = math.fsum((v - mean) ** 2 for v in col) / len(col)
            out.append(mean - b * math.sqrt(var))
    return out


def member_spread(member_rewards: Sequence[Sequence[float]]) -> list[float]:
    """Population std over members per sample (NaN where a member is non-finite): the members' disagreement."""
    out = []
    for col in zip(*member_rewards, strict=True):
        if not all(math.isfinite(v) for v in col):
            out.append(math.nan)
            continue
        mean = math.fsum(col) / len(col)
        out.append(math.sqrt(math.fsum((v - mean) ** 2 for v in col) / len(col)))
    return out


def moments(values: Sequence[float]) -> tuple[int, float, float]:
    """(count, sum, sum of squares) of the finite values: what ranks add up before standardising."""
    finite = [float(v) for v in values if math.isfinite(v)]
    return len(finite), math.fsum(finite), math.fsum(v * v for v in finite)


@dataclass
class RunningMoments:
    """Running count / mean / M2 over every batch seen (Chan et al.'s parallel update), for standardising."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, n: float, total: float, sq: float) -> None:
        """Merge a batch given as (count, sum, sum of squares) of its finite values."""
        if n <= 0:
            return
        bmean = total / n
        bvar = max(sq / n - bmean * bmean, 0.0)
        c = self.count + n
        d = bmean - self.mean
        self.mean += d * n / c
        self.m2 += bvar * n + d * d * self.count * n / c
        self.count = c

    @property
    def std(self) -> float:
        """Population standard deviation of everything seen (0 before any value)."""
        return math.sqrt(self.m2 / self.count) if self.count else 0.0


def standardize(values: Sequence[float], mean: float, std: float) -> list[float]:
    """``(v - mean) / std`` (std below EPS counts as 1); non-finite values pass through unchanged."""
    s = std if std > EPS else 1.0
    return [(v - mean) / s if math.isfinite(v) else v for v in values]


def batch_stats(n: float, total: float, sq: float) -> tuple[float, float]:
    """(mean, population std) from (count, sum, sum of squares); (0, 0) for an empty batch."""
    if n <= 0:
        return 0.0, 0.0
    mean = total / n
    return mean, math.sqrt(max(sq / n - mean * mean, 0.0))
