"""Reward ensembles: combine math on known rewards, shared image features equal to separate scorers (every
family, exactly), mixed members (text RM), per-member standardisation and logging, the non-finite policy, the
``reward_funcs`` dispatch, and the in-memory ensemble from one recipe and a grid equal to disk merges.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _helpers import recipe
from PIL import Image

import vlrm_rlhf
from vlrm_rlhf.errors import VLRMError
from vlrm_rlhf.merge import build
from vlrm_rlhf.reward.combine import (
    CombineError,
    RunningMoments,
    combine_rewards,
    member_spread,
    moments,
)
from vlrm_rlhf.reward.ensemble import EnsembleReward
from vlrm_rlhf.reward.ensemble_recipe import ensemble_from_recipe
from vlrm_rlhf.reward.scorer import VLRewardScorer
from vlrm_rlhf.reward.trl import NonFiniteRewardError, VLRMReward
from vlrm_rlhf.testing.zoo import FAMILIES, demo_image

QUESTION = "what color is the cat ?"
ANSWERS = ["red", "a blue dog", "the cat is big", "no", "yes the big red car"]
NAN = math.nan


# ---- combine math --------------------------------------------------------------------------------------
def test_combine_known_rewards():
    m = [[1.0, 0.0, -2.0], [3.0, 0.0, 2.0], [2.0, 0.0, 3.0]]  # 3 members x 3 samples
    assert combine_rewards(m, "mean") == pytest.approx([2.0, 0.0, 1.0])
    assert combine_rewards(m, "min") == [1.0, 0.0, -2.0]
    std0 = math.sqrt(2 / 3)  # population std of (1, 3, 2)
    std2 = math.sqrt(((-3) ** 2 + 1 + 2 ** 2) / 3)  # of (-2, 2, 3), mean 1
    assert combine_rewards(m, "mean_minus_std") == pytest.approx([2 - std0, 0.0, 1 - std2])
    assert combine_rewards(m, "mean_minus_std", beta=0.5) == pytest.approx([2 - 0.5 * std0, 0.0, 1 - 0.5 * std2])
    assert combine_rewards(m, "mean_minus_std", beta=0) == combine_rewards(m, "mean")
    assert combine_rewards([[4.0, -1.0]], "mean_minus_std", beta=3) == [4.0, -1.0]  # one member: std 0
    assert member_spread(m) == pytest.approx([std0, 0.0, std2])


def test_combine_non_finite_and_errors():
    m = [[1.0, NAN, 2.0, math.inf], [3.0, 5.0, 2.0, 1.0]]
    for rule in ("mean", "min", "mean_minus_std"):
        out = combine_rewards(m, rule)
        assert out[0] == pytest.approx({"mean": 2.0, "min": 1.0, "mean_minus_std": 1.0}[rule])
        assert math.isnan(out[1]) and math.isnan(out[3])  # any non-finite member: NaN, never the others' value
        assert out[2] == 2.0  # the other samples are untouched
    assert math.isnan(member_spread(m)[1])
    with pytest.raises(CombineError, match="unknown combine 'median'"):
        combine_rewards(m, "median")  # type: ignore[arg-type]
    with pytest.raises(CombineError, match="beta=.* only applies to combine='mean_minus_std'"):
        combine_rewards(m, "min", beta=1.0)
    with pytest.raises(CombineError, match="finite number >= 0"):
        combine_rewards(m, "mean_minus_std", beta=-1)
    with pytest.raises(CombineError, match="different numbers of rewards"):
        combine_rewards([[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="beta"):
        EnsembleReward(["unused"], combine="mean", beta=2.0)


def test_running_moments_match_direct():
    batches = [[1.0, 2.0, NAN], [5.0], [-3.0, 0.5, 7.0, math.inf]]
    rm = RunningMoments()
    for b in batches:
        rm.update(*moments(b))
    flat = [v for b in batches for v in b if math.isfinite(v)]
    mean = sum(flat) / len(flat)
    assert (rm.count, rm.mean) == (len(flat), pytest.approx(mean))
    assert rm.std == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in flat) / len(flat)))


# ---- fixtures ------------------------------------------------------------------------------------------
def _merges(zoo, family: str, root: Path) -> dict[str, Path]:
    """A family's trio and three merges of it: two task-arithmetic λ and one TIES."""
    trio = zoo(family)
    out = {**trio}
    for name, method, lv, rm in (("ta_a", "task_arithmetic", 0.5, 1.0), ("ta_b", "task_arithmetic", 1.0, 0.7),
                                 ("ties", "ties", 0.8, 1.0)):
        params = {"density": 0.6} if method == "ties" else {}
        out[name] = build(recipe(trio, method, lvlm={"weight": lv}, rm={"weight": rm}, params=params),
                          root / family / name, progress=False)
    return out


@pytest.fixture(scope="module")
def llava(zoo, tmp_path_factory) -> dict[str, Path]:
    return _merges(zoo, "llava", tmp_path_factory.mktemp("ens"))


def conv(image: Image.Image | None, text: str = QUESTION) -> list[dict[str, Any]]:
    blocks = [{"type": "image", "image": image}] if image is not None else []
    return [{"role": "user", "content": [*blocks, {"type": "text", "text": text}]}]


def batch(lvlm: Path) -> tuple[list[Any], list[str]]:
    """Five prompts: three images (one repeated), one text-only conversation, one plain string."""
    ims = [demo_image(lvlm, i) for i in range(2)]
    prompts = [conv(ims[0]), conv(ims[1]), conv(ims[0], "is it big ?"), conv(None), "what is the dog ?"]
    return prompts, list(ANSWERS)


# ---- shared image features: exactly the separate scorers' rewards --------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_features_equal_separate_scorers(zoo, tmp_path, family):
    d = _merges(zoo, family, tmp_path)
    prompts, completions = batch(d["lvlm"])
    members = [d["ta_a"], d["ta_b"], d["ties"]]
    ens = EnsembleReward(members, combine="mean_minus_std", beta=0.5)
    assert [m.vision for m in ens.members] == [0, 0, 0] and len(ens.groups) == 1, repr(ens)
    combined = ens(prompts, completions)
    separate = [VLRMReward(p)(prompts, completions) for p in members]
    assert list(ens.last_member_rewards.values()) == separate  # same floats, not approximately
    assert combined == combine_rewards(separate, "mean_minus_std", 0.5)
    assert separate[0] != separate[1] != separate[2]  # the members really differ
    lead = ens.groups[0].lead
    plan = lead.plan(lead.samples(prompts=prompts, responses=completions))
    image_batches = sum(1 for b in plan.batches if plan.samples[b[0]].images)
    assert ens.vision_calls == image_batches >= 1  # once per image micro-batch, not once per member
    # without sharing: the same rewards, K vision forwards per image micro-batch
    plain = EnsembleReward(members, share_vision=False, combine="mean_minus_std", beta=0.5)
    assert plain(prompts, completions) == combined
    assert plain.vision_calls == 3 * ens.vision_calls


def test_mixed_members_logging_and_member_normalize(llava):
    """A VLRM and a text RM (another scale): per-member logs, standardisation, separate plans."""
    prompts, completions = batch(llava["lvlm"])
    ens = EnsembleReward([llava["ta_a"], llava["rm"]], member_normalize="batch", name="ens", combine="min")
    assert [m.name for m in ens.members] == ["vlrm_ta_a", "vlrm_rm_text_rm"] and len(ens.groups) == 2
    assert ens.members[1].scorer.mode == "text_rm" and ens.members[1].vision is None
    metrics: dict[str, float] = {}
    extra: dict[str, list] = {}
    out = ens(prompts, completions, completion_ids=None, trainer_state=None,
              log_metric=metrics.__setitem__, log_extra=extra.__setitem__)
    raw = [VLRMReward(llava["ta_a"])(prompts, completions),
           VLRMReward(llava["rm"], mode="text_rm")(prompts, completions)]
    assert list(ens.last_member_rewards.values()) == raw
    std = []
    for r in raw:
        mu = sum(r) / len(r)
        std.append([(v - mu) / math.sqrt(sum((x - mu) ** 2 for x in r) / len(r)) for v in r])
    assert out == pytest.approx([min(a, b) for a, b in zip(*std, strict=True)], abs=1e-9)
    assert set(extra) == {"ens/vlrm_ta_a", "ens/vlrm_rm_text_rm"} and extra["ens/vlrm_ta_a"] == raw[0]
    assert metrics["ens/vlrm_ta_a/raw_mean"] == pytest.approx(sum(raw[0]) / 5)
    assert metrics["ens/vlrm_rm_text_rm/raw_mean"] == pytest.approx(sum(raw[1]) / 5)
    assert {"ens/member_std", "ens/raw_mean"} <= set(metrics)

    run = EnsembleReward([llava["ta_a"], llava["rm"]], member_normalize="running")
    run(prompts[:2], completions[:2])
    second = run(prompts[2:], completions[2:])
    stats = [m.stats for m in run.members]
    for s, r in zip(stats, raw, strict=True):
        mu = sum(r) / 5
        assert s.count == 5 and s.mean == pytest.approx(mu)
        assert s.std == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in r) / 5))
    expect = [sum(((r[i] - s.mean) / s.std) for s, r in zip(stats, raw, strict=True)) / 2 for i in range(2, 5)]
    assert second == pytest.approx(expect, abs=1e-9)
    restored = EnsembleReward([llava["ta_a"], llava["rm"]], member_normalize="running")
    restored.load_state_dict(run.state_dict())
    assert [m.stats for m in restored.members] == stats


def test_non_finite_member(llava):
    prompts, completions = batch(llava["lvlm"])
    bad = VLRewardScorer.from_pretrained(llava["ta_b"])
    with torch.no_grad():
        bad.model.score.weight.fill_(NAN)
    with pytest.raises(NonFiniteRewardError, match=r"sample 0 .*non-finite member reward\(s\): vlrm_ta_b=nan"):
        EnsembleReward([llava["ta_a"], bad])(prompts, completions)
    out = EnsembleReward([llava["ta_a"], bad], non_finite="none", names=["good", "bad"])(prompts, completions)
    assert out == [None] * 5


def test_reward_funcs_dispatch_and_errors(llava):
    ens = vlrm_rlhf.reward_funcs([llava["ta_a"], llava["ties"]], combine="min", name="pess")
    assert isinstance(ens, EnsembleReward) and ens.__name__ == "pess" and ens.combine == "min"
    from trl.trainer.utils import get_callable_name

    assert get_callable_name(ens) == "pess"
    with pytest.raises(VLRMError, match="listed twice"):  # a user error: the package's base class
        EnsembleReward([llava["ta_a"], llava["ta_a"]])
    with pytest.raises(ValueError, match="modes=... does not apply"):
        vlrm_rlhf.reward_funcs([llava["ta_a"]], modes=("no_image",))
    with pytest.raises(ValueError, match="ONE merge recipe"):
        vlrm_rlhf.reward_funcs([llava["ta_a"]], grid="lambda=0.5,1")
    with pytest.raises(ValueError, match="no config.json"):
        EnsembleReward([llava["ta_a"], llava["ta_a"].parent / "nope"])


# ---- in-memory ensemble from one recipe and a grid -----------------------------------------------------
def test_in_memory_ensemble_equals_disk_merges(llava, tmp_path):
    spec = recipe(llava, "task_arithmetic", lvlm={"weight": 1.0}, rm={"weight": 1.0})
    path = tmp_path / "vlrm.yaml"
    path.write_text(yaml.safe_dump(spec))
    ens = vlrm_rlhf.reward_funcs(path, grid="lambda=0.5,0.7,1.0", combine="mean")
    assert isinstance(ens, EnsembleReward)
    assert [m.name for m in ens.members] == ["lambda_0.5", "lambda_0.7", "lambda_1"]
    params = [dict(m.scorer.model.named_parameters()) for m in ens.members]
    shared = [n for n in params[0] if n.startswith(("model.vision_tower.", "model.multi_modal_projector.", "score."))]
    assert shared and all(p[n] is params[0][n] for p in params[1:] for n in shared)  # one copy in memory
    lm = "model.language_model.layers.0.mlp.up_proj.weight"
    assert len({p[lm].data_ptr() for p in params}) == 3  # each member owns its merged LM tensors
    prompts, completions = batch(llava["lvlm"])
    ens(prompts, completions)
    assert ens.vision_calls == 1
    for lam, got in zip((0.5, 0.7, 1.0), ens.last_member_rewards.values(), strict=True):
        disk = build(recipe(llava, "task_arithmetic", lvlm={"weight": lam}, rm={"weight": lam}),
                     tmp_path / f"disk_{lam}", progress=False)
        assert VLRMReward(disk)(prompts, completions) == got, lam
    one = ensemble_from_recipe(path, {"rm.weight": [0.5, 1.0]}, combine="min", names=["half", "full"])
    assert [m.name for m in one.members] == ["half", "full"]
