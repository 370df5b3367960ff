"""The short reward-source study inside ``vlrm-rlhf demo``: one seed, the demo's own models and merges, a
smaller budget; its table and over-optimisation plot go into the demo's report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .rl import default_workers, run_study
from .runs import SOURCES, StudySettings


def study_stage(work: Path, dirs: dict[str, Path], merges: dict[str, Path], val_acc: dict[str, dict[str, float]],
                best: str, *, seed: int, quick: bool, algos: tuple[str, ...] = ("ppo", "grpo"),
                progress: bool = True) -> dict[str, Any]:
    """Run the study for one seed on the demo's models; returns its summary, table and timing for the report."""
    ranked = sorted((m for m in merges if m in val_acc), key=lambda m: -val_acc[m]["overall"])
    prep = {"models": dirs, "best": merges[best], "best_name": best, "ranked_merges": [merges[m] for m in ranked],
            "val_accuracy": {m: val_acc[m]["overall"] for m in ranked}}
    st = StudySettings.quick() if quick else StudySettings.demo()
    res = run_study(work / "reward_study", seeds=[seed], algos=algos, sources=SOURCES, quick=quick, settings=st,
                    progress=progress, prepared={seed: prep}, workers=default_workers())
    return {"summary": res["summary"], "table": (work / "reward_study" / "table.md").read_text(),
            "seconds": res["seconds"], "settings": res["settings"], "ensemble_members": res["ensemble_members"]}


def markdown(study: dict[str, Any]) -> list[str]:
    """The report section: the table, what it measures, and where gold quality peaked along the KL axis."""
    st = study["settings"]
    lines = ["## Which reward trains the better policy? (RL against the gold judgement)", "",
             f"PPO and GRPO on the LVLM, {st['updates']} updates of {st['batch']} completions each, KL coefficient "
             f"{st['kl_coef']}, rewards whitened with running statistics; final greedy answers on {st['n_test']} "
             f"held-out test questions, graded by the world (correct / preferred style / both, %). "
             f"{study['seconds']:.0f} s.", "", study["table"],
             "![over-optimisation](reward_study/overoptimization.png)", ""]
    for algo, by_src in study["summary"].items():
        for src, d in by_src.items():
            pk = d["peak_sampled_both"]
            if pk["kl"] is not None:
                lines.append(f"- {algo.upper()} / {src}: sampled 'both' peaks at {pk['both']:.1f}% (KL {pk['kl']:.2f}, "
                             f"step {pk['step']:.0f}), ends at {pk['final']:.1f}%; greedy correct "
                             + " → ".join(f"{d[w]['correct']['mean']:.1f}" for w in ("start", "final")) + ".")
    return [*lines, ""]
