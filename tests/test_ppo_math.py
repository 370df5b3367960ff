"""Pure PPO maths (``vlrm_rlhf.trainers.ppo_math``) and the micro-batch order, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlrm_rlhf.trainers.batching import ppo_micro_batches
from vlrm_rlhf.trainers.ppo_math import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    kl_estimate,
    kl_penalised_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
)

T = torch.tensor


def close(a: torch.Tensor, b, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=tol, atol=tol)


# ---- KL and rewards -------------------------------------------------------------------------------------------
def test_kl_estimators_k1_and_k3():
    logprobs, ref = T([-1.0, -2.0, -0.3]), T([-1.5, -1.0, -0.3])  # log r = ref - logprobs = [-0.5, 1.0, 0]
    close(kl_estimate(logprobs, ref, "k1"), [0.5, -1.0, 0.0])
    close(kl_estimate(logprobs, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, math.e - 2, 0.0])
    assert (kl_estimate(logprobs, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="'k2'"):
        kl_estimate(logprobs, ref, "k2")


def test_kl_penalised_rewards_put_the_score_after_the_last_token():
    kl = T([[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 2.0, 0.5]])
    lengths = T([1, 3])  # row 0 ends at token 1: score at 2; row 1 fills the width: score on its last token
    rewards, non_score = kl_penalised_rewards(T([5.0, -2.0]), kl, 0.1, lengths)
    close(non_score, [[-0.01, -0.02, -0.03, -0.04], [-0.1, 0.1, -0.2, -0.05]])
    close(rewards, [[-0.01, -0.02, 5.0 - 0.03, -0.04], [-0.1, 0.1, -0.2, -2.0 - 0.05]])


# ---- GAE ------------------------------------------------------------------------------------------------------
def test_gae_three_tokens_by_hand():
    rewards, values = T([[1.0, 0.0, 2.0]]), T([[0.5, 0.2, 0.1]])
    adv, ret = gae(rewards, values, gamma=0.9, lam=0.8)
    a2 = 2.0 - 0.1  # delta_2 (V_3 = 0)
    a1 = (0.0 + 0.9 * 0.1 - 0.2) + 0.72 * a2
    a0 = (1.0 + 0.9 * 0.2 - 0.5) + 0.72 * a1
    close(adv, [[a0, a1, a2]])
    close(ret, [[a0 + 0.5, a1 + 0.2, a2 + 0.1]])


def test_gae_equals_discounted_sum_of_td_errors():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    gamma, lam = 0.97, 0.9
    nxt = torch.cat([values[:, 1:], torch.zeros(3, 1)], 1)
    delta = rewards + gamma * nxt - values
    ref = torch.stack([sum((gamma * lam) ** k * delta[:, t + k] for k in range(7 - t)) for t in range(7)], 1)
    adv, ret = gae(rewards, values, gamma, lam)
    close(adv, ref, 1e-5)
    close(ret, ref + values, 1e-5)
    mc, _ = gae(rewards, values, 1.0, 1.0)  # gamma = lam = 1: reward-to-go minus the value
    close(mc, rewards.flip(1).cumsum(1).flip(1) - values, 1e-5)


# ---- whitening ------------------------------------------------------------------------------------------------
def test_masked_mean_var_and_whiten():
    x, mask = T([1.0, 2.0, 3.0, 4.0, 100.0]), T([True, True, True, True, False])
    close(masked_mean(x, mask), 2.5)
    close(masked_var(x, mask), 5 / 3)  # Bessel-corrected
    close(masked_var(x, mask, unbiased=False), 1.25)
    w = masked_whiten(x, mask)
    close(w[:4], (x[:4] - 2.5) / math.sqrt(5 / 3 + 1e-8))
    close(masked_mean(w, mask), 0.0)
    close(masked_var(w, mask), 1.0, 1e-5)
    close(masked_whiten(x, mask, shift_mean=False)[:4], (x[:4] - 2.5) / math.sqrt(5 / 3 + 1e-8) + 2.5)
    close(masked_mean(T([[1.0, 3.0], [5.0, 9.0]]), T([[True, True], [True, False]]), axis=1), [2.0, 5.0])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, T([False, False, True, False, False]))


# ---- clipped losses -------------------------------------------------------------------------------------------
def test_clipped_policy_loss_clips_both_sides():
    ratios = [1.5, 0.5, 1.1, 1.5, 1.0]
    adv = T([2.0, -1.0, 1.0, -1.0, 7.0])
    mask = T([True, True, True, True, False])  # the last position is padding (logprobs equal there)
    new = T([math.log(r) for r in ratios], requires_grad=True)
    out = clipped_policy_loss(new, torch.zeros(5), adv, mask, cliprange=0.2)
    # A > 0, r > 1 + eps: clipped (-2 * 1.2); A < 0, r < 1 - eps: clipped (1 * 0.8); inside the range: -1.1;
    # A < 0, r > 1 + eps: the unclipped, pessimistic term (1.5) wins
    close(out.loss, (-2.4 + 0.8 - 1.1 + 1.5) / 4)
    close(out.clipfrac, 0.5)
    close(out.approxkl, 0.5 * sum(math.log(r) ** 2 for r in ratios) / 5)
    close(out.ratio, sum(ratios) / 5)
    assert not (out.clipfrac.requires_grad or out.approxkl.requires_grad or out.ratio.requires_grad)
    out.loss.backward()
    close(new.grad, [0.0, 0.0, -1.1 / 4, 1.5 / 4, 0.0])  # no gradient through a clipped term or padding


def test_clipped_value_loss():
    values = T([0.5, -0.1, 0.3, 9.0], requires_grad=True)
    old, returns, mask = torch.zeros(4), T([1.0, 1.0, -1.0, 0.0]), T([True, True, True, False])
    out = clipped_value_loss(values, old, returns, mask, cliprange_value=0.2)
    # 0.5 -> clipped to 0.2: (0.2 - 1)^2 = 0.64 > 0.25 wins; -0.1 is inside: 1.21; 0.3 -> 0.2: 1.69 > 1.44
    close(out.loss, 0.5 * (0.64 + 1.21 + 1.69) / 3)
    close(out.clipfrac, 1 / 3)
    out.loss.backward()
    close(values.grad, [0.0, 0.5 * 2 * (-1.1) / 3, 0.5 * 2 * 1.3 / 3, 0.0])


def test_entropy_from_logits_ignores_suppressed_tokens():
    close(entropy_from_logits(torch.zeros(2, 4)), [math.log(4)] * 2)
    ent = entropy_from_logits(T([[0.0, 0.0, -math.inf], [math.log(3.0), 0.0, -math.inf]]))
    close(ent, [math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])


# ---- micro-batch order ----------------------------------------------------------------------------------------
def test_micro_batches_follow_one_permutation_per_epoch_drawn_lazily():
    np.random.seed(0)
    it = ppo_micro_batches(num_epochs=2, batch_size=8, mini_batch_size=4, micro_batch_size=2)
    first = next(it)
    between = np.random.rand()  # drawn after the first epoch's permutation, before the second's
    got = [first, *it]
    np.random.seed(0)
    p0, ref_between, p1 = np.random.permutation(8), np.random.rand(), np.random.permutation(8)
    assert between == ref_between
    assert [(m.epoch, m.minibatch, m.micro, m.last) for m in got] == [
        (e, mb, ga, ga == 1) for e in range(2) for mb in range(2) for ga in range(2)]
    for m in got:
        perm = p0 if m.epoch == 0 else p1
        start = 4 * m.minibatch + 2 * m.micro
        assert m.indices.tolist() == perm[start:start + 2].tolist()
