"""PPO's maths as pure tensor functions (TRL 1.12's PPO, term for term): KL-penalised rewards, GAE, whitening,
the clipped policy and value losses.

In the spirit of torchtune's ``rlhf/rewards.py`` and ``rlhf/loss/ppo.py``: no models, no I/O, no RNG; the trainer
(:class:`~vlrm_rlhf.trainers.ppo.VLPPOTrainer`) gathers logprobs, values and scores and calls these. Shapes: ``(B, T)``
per-token tensors over the response positions, ``(B,)`` per-sequence tensors; masks are true where a position counts.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

__all__ = ["PolicyLoss", "ValueLoss", "clipped_policy_loss", "clipped_value_loss", "entropy_from_logits", "gae",
           "kl_estimate", "kl_penalised_rewards", "masked_mean", "masked_var", "masked_whiten"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (over everything, or along ``axis``)."""
    mask = mask.to(values.dtype)
    if axis is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(axis) / mask.sum(axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries (Bessel-corrected by default, as TRL 1.12 did)."""
    centered = values - masked_mean(values, mask)
    var = masked_mean(centered * centered, mask)
    if unbiased:
        n = mask.sum()
        if n <= 1:
            raise ValueError("whitening needs at least 2 unmasked values: increase the (mini)batch size")
        var = var * (n / (n - 1))
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardise ``values`` with the masked mean and variance (keep the mean when ``shift_mean`` is false)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"]) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from the sampled tokens' logprobs (joschu.net/blog/kl-approx).

    ``k1`` = ``logprobs - ref_logprobs`` (unbiased, can be negative); ``k3`` = ``r - 1 - log r`` with
    ``log r = ref_logprobs - logprobs`` (unbiased, never negative, lower variance).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3', not {estimator!r}")


def kl_penalised_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, lengths: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-in-reward: ``-kl_coef * kl`` at every token plus each sequence's score at its end.

    ``lengths[i]`` is the index of response ``i``'s last token; the score lands one position after it (TRL 1.12's
    ``sequence_lengths_p1``: the value model's last valid position), or on it when that would be past the end.
    Returns ``(rewards, non_score_rewards)``, both ``(B, T)``.
    """
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    width = kl.shape[1]
    end = torch.where(lengths + 1 < width, lengths + 1, lengths)
    rewards[torch.arange(kl.shape[0], device=kl.device), end] += scores
    return rewards, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the token axis; returns ``(advantages, returns)``.

    ``A_t = delta_t + gamma * lam * A_{t+1}``, ``delta_t = r_t + gamma * V_{t+1} - V_t``, with ``V_T = 0`` past the
    last position; ``returns = advantages + values``. Masked positions must already hold zero rewards and values.
    """
    n, width = rewards.shape
    advantages, last = torch.zeros_like(rewards), torch.zeros(n, device=rewards.device)
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t < width - 1 else 0.0
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values


class PolicyLoss(NamedTuple):
    """The clipped policy loss and the statistics TRL 1.12 logs for it (all but ``loss`` detached)."""

    loss: torch.Tensor
    clipfrac: torch.Tensor  # fraction of counted tokens where the clipped term was chosen
    approxkl: torch.Tensor  # 0.5 * mean (new - old logprob)^2 over every position
    ratio: torch.Tensor  # mean probability ratio over every position


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float) -> PolicyLoss:
    """PPO's clipped surrogate: masked mean of ``max(-A * r, -A * clip(r, 1 - eps, 1 + eps))``, ``r = exp(new - old)``."""
    diff = logprobs - old_logprobs
    ratio = diff.exp()
    pg1, pg2 = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(pg1, pg2), mask)
    with torch.no_grad():
        return PolicyLoss(loss, masked_mean((pg2 > pg1).float(), mask), 0.5 * (diff ** 2).mean(), ratio.mean())


class ValueLoss(NamedTuple):
    """The clipped value loss and the fraction of counted positions where the clipped term was chosen."""

    loss: torch.Tensor
    clipfrac: torch.Tensor


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       cliprange_value: float) -> ValueLoss:
    """``0.5 *`` masked mean of ``max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)``."""
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf1, vf2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    with torch.no_grad():
        return ValueLoss(loss, masked_mean((vf2 > vf1).float(), mask))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last axis; ``-inf`` logits (suppressed tokens) contribute 0, not NaN."""
    probs = logits.softmax(-1)
    plogits = torch.where(probs > 0, probs * logits, 0.0)
    return torch.logsumexp(logits, -1) - plogits.sum(-1)
