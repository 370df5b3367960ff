"""``reward_funcs``: the one entry point that turns reward model paths into TRL reward functions.

A path gives one ``VLRMReward`` per mode; a list of members, or a merge recipe with ``grid=``, gives one
``EnsembleReward``. It sits above ``trl.py``, ``ensemble.py`` and ``ensemble_recipe.py`` so none imports another
in a circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .combine import EnsembleError
from .ensemble import EnsembleReward, MemberSpec
from .ensemble_recipe import ensemble_from_recipe
from .scorer import Mode, VLRewardScorer
from .trl import VLRMReward, default_name, sibling_scorer

__all__ = ["ensemble_reward", "reward_funcs"]


def reward_funcs(path: str | Path | Sequence[str | Path | VLRewardScorer], *, modes: Sequence[Mode] = ("vlrm",),
                 **kw: Any) -> list[Any]:
    """Reward functions for ``GRPOTrainer``/``RLOOTrainer(reward_funcs=...)``: one ``VLRMReward`` per mode.

    Ensembles: a LIST of members (``[dir_a, dir_b, ...]``), or a merge recipe with ``grid="lambda=0.5,0.7,1.0"``
    (members merged in memory), returns ONE ``EnsembleReward`` (``reward/ensemble.py``; options ``combine``,
    ``beta``, ``member_normalize``, ...) instead of a list.

    ``kw`` holds ``VLRMReward`` options (``name`` is a base name; ``normalize``, ``clip``, ``non_finite``,
    ``accelerator``) and scorer options (``device``, ``dtype``, ``max_batch_tokens``, ...).

    A URL (``http://host:port/ROUTE``, what ``vlrm-rlhf serve`` prints) gives ``[RemoteReward(url, **kw)]``: an async
    reward function scored by the server (options ``name``, ``timeout``, ``retries``, ``backoff``, ``non_finite``,
    ``check``, ``send_paths``, ``expect_model``); the server must answer now, so a dead one fails before training.
    Modes
    ``vlrm``/``no_image`` load the model once and share it (e.g. ``modes=("vlrm", "no_image")`` logs the
    image ablation beside the reward; give it weight 0 with ``reward_weights``).
    """
    if isinstance(path, str) and path.startswith(("http://", "https://")):
        from .remote import RemoteReward

        if tuple(modes) != ("vlrm",):
            raise ValueError("modes=... does not apply to a served reward: the server's --mode decides")
        return [RemoteReward(path, **kw)]
    if not isinstance(path, str | Path) or "grid" in kw:
        if tuple(modes) != ("vlrm",):
            raise ValueError("modes=... does not apply to an ensemble: give its members as VLRewardScorers instead")
        return ensemble_reward(path, **kw)
    if not modes:
        raise ValueError("reward_funcs needs at least one mode")
    if len(set(modes)) != len(modes):
        raise ValueError(f"duplicate modes in {tuple(modes)}")
    own = {k: kw.pop(k) for k in ("normalize", "clip", "non_finite", "accelerator", "name") if k in kw}
    base = own.pop("name", None)
    out: list[VLRMReward] = []
    shared: VLRewardScorer | None = None
    for m in modes:
        name = None if base is None else (base if m == "vlrm" else f"{base}_{m}")
        if m in ("vlrm", "no_image") and shared is not None:
            out.append(VLRMReward(sibling_scorer(shared, m), name=name or default_name(path, m), **own))
            continue
        r = VLRMReward(path, mode=m, name=name, **own, **kw)
        if m in ("vlrm", "no_image"):
            shared = r.scorer
        out.append(r)
    for r in out:  # siblings were built from a scorer: they keep an explicitly chosen device too
        r._device_pinned = "device" in kw or "device_map" in kw
    return out


def ensemble_reward(members: Sequence[MemberSpec] | str | Path, *, grid: Any = None, **kw: Any) -> EnsembleReward:
    """An ``EnsembleReward`` from member directories/scorers, or from a merge recipe and a ``grid`` (in memory)."""
    if grid is not None:
        if not isinstance(members, str | Path):
            raise EnsembleError("grid=... builds an in-memory ensemble from ONE merge recipe; got a list of members")
        return ensemble_from_recipe(members, grid, **kw)
    if isinstance(members, str | Path):
        raise EnsembleError(f"{members}: an ensemble needs a list of members, or a merge recipe with grid=...")
    return EnsembleReward(members, **kw)
