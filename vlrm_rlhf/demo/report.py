"""The demo's report: PNG plots and ``report.md`` with the same numbers as ``report.json``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import write_figure_atomic, write_text_atomic

CATS = ("hallucination", "general", "reasoning")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(acc: Mapping[str, Mapping[str, float]], order: Sequence[str], path: Path, title: str) -> None:
    """Grouped bars: accuracy per scorer (rows of ``order``) and category, plus overall."""
    import numpy as np

    plt = _plt()
    cols = ("overall", *CATS)
    x = np.arange(len(order))
    w = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(order) + 2), 4.5), dpi=110)
    for j, c in enumerate(cols):
        ax.bar(x + (j - (len(cols) - 1) / 2) * w, [100 * acc[n][c] for n in order], w, label=c)
    ax.axhline(50, color="grey", ls=":", lw=1)
    ax.set_xticks(x, order, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="preference accuracy (%)", ylim=(0, 105), title=title)
    ax.legend(fontsize=8, ncol=4, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    write_figure_atomic(fig, path, force=True)
    plt.close(fig)


def study_markdown(study: Mapping) -> list[str]:
    """The reward-source study's report section (see :mod:`vlrm_rlhf.study.demo`)."""
    from ..study.demo import markdown

    return markdown(dict(study))


def plot_reward_curve(curve: Sequence[Mapping[str, float]], path: Path, title: str,
                      gold: Sequence[Mapping[str, float]] | None = None) -> None:
    """Mean merged reward per PPO update with a moving average; ``gold``: the gold checks (right axis)."""
    plt = _plt()
    x = [r["update"] for r in curve]
    y = [r["mean_reward"] for r in curve]
    k = max(1, len(y) // 10)
    smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(x, y, alpha=0.35, lw=1, color="tab:blue", label="mean VLRM reward per update")
    ax.plot(x, smooth, lw=2, color="tab:blue", label=f"{k}-update moving average")
    ax.set(xlabel="PPO update", ylabel="merged reward (objective/scores)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if gold:
        from ..study.plots import gold_axis

        gold_axis(ax, gold)
    fig.tight_layout()
    write_figure_atomic(fig, path, force=True)
    plt.close(fig)


def _row(name: str, a: Mapping[str, float]) -> str:
    return f"| {name} | " + " | ".join(f"{100 * a[c]:.1f}" for c in ("overall", *CATS)) + f" | {100 * a['tie_rate']:.1f} |"


def accuracy_table(acc: Mapping[str, Mapping[str, float]], order: Sequence[str]) -> str:
    head = "| scorer | overall | hallucination | general | reasoning | ties |\n|---|---|---|---|---|---|\n"
    return head + "\n".join(_row(n, acc[n]) for n in order if n in acc) + "\n"


def sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lv = sorted({r["lvlm.weight"] for r in rows})
    rm = sorted({r["rm.weight"] for r in rows})
    cell = {(r["lvlm.weight"], r["rm.weight"]): r for r in rows}
    head = "| λ_LVLM \\ λ_RM | " + " | ".join(f"{v:g}" for v in rm) + " |\n|---|" + "---|" * len(rm) + "\n"
    lines = []
    for a in lv:
        vals = [f"{100 * cell[(a, b)]['val_overall']:.1f} / {100 * cell[(a, b)]['test_overall']:.1f}" for b in rm]
        lines.append(f"| **{a:g}** | " + " | ".join(vals) + " |")
    return head + "\n".join(lines) + "\n"


def grid_findings(rep: Mapping[str, Any]) -> str:
    """What the λ grid and the baselines say, computed from the numbers (test overall)."""
    rows, acc = rep["sweep"], rep["accuracy"]

    def best(pred) -> float:
        vals = [r["test_overall"] for r in rows if pred(r)]
        return 100 * max(vals) if vals else float("nan")

    top_rm = max(r["rm.weight"] for r in rows)
    l0, lpos = best(lambda r: r["lvlm.weight"] == 0), best(lambda r: r["lvlm.weight"] > 0)
    r0, rtop = best(lambda r: r["rm.weight"] == 0), best(lambda r: r["rm.weight"] == top_rm)
    d = lpos - l0
    verdict = (f"adds {d:.1f} pts" if d > 3 else
               f"adds nothing beyond noise ({d:+.1f} pts)" if d >= -3 else f"hurts ({d:+.1f} pts)")
    casc, bm = 100 * acc["cascade"]["overall"], 100 * acc[rep["best_merge"]]["overall"]
    return (
        f"Findings (test overall, best cell of each slice): with λ_LVLM = 0 — the RM's language model plus the "
        f"LVLM's vision tower and projector — the grid reaches {l0:.1f}; with λ_LVLM > 0 it reaches {lpos:.1f}, so "
        f"the LVLM's task vector {verdict}. λ_RM matters: {r0:.1f} at λ_RM = 0 (the LVLM's LM under the RM's head) "
        f"vs {rtop:.1f} at λ_RM = {top_rm:g}. The gain comes from the projector (trained to put image tokens where "
        f"the text RM reads its description) together with the RM's language model. The cascade (LVLM caption → "
        f"text RM) scores {casc:.1f} vs {bm:.1f} for the best merge."
    )


def reasoning_section(r: Mapping[str, Any]) -> list[str]:
    """Markdown for the ``--with-reasoning`` stage: accuracy table, main finding, links to the plots."""
    lines = ["## Reasoning transfer: merging a text LLM into the LVLM", "",
             f"Multiple choice by log-likelihood over test images ({r['n_tasks']['perception']} perception and "
             f"{r['n_tasks']['reasoning']} reasoning questions; reasoning questions were never shown to the LVLM).",
             "", "| model | perception | reasoning |", "|---|---|---|"]
    for name, a in r["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * a[k]:.1f}" if k in a else "–"
                                               for k in ("perception", "reasoning")) + " |")
    lines += ["", "Layer ablation (each layer's weights replaced by the base's; accuracy drop in points; the LLM answers "
              "from the gold description):", "",
              "| model | task | most important layer (drop) | mean drop, first half | mean drop, second half |",
              "|---|---|---|---|---|"]
    for model, kinds in r["finding"].items():
        for kind, f in kinds.items():
            lines.append(f"| {model} | {kind} | {f['worst_layer']} ({100 * f['worst_drop']:+.1f}) | "
                         f"{100 * f['early_mean_drop']:+.1f} | {100 * f['late_mean_drop']:+.1f} |")
    lines += ["", "Plots: `reasoning/params/*.png` (task-vector norms and cosines per layer and module), "
              "`reasoning/ablate_*/*.png` (ablation heatmaps), `reasoning/swap/swap.png` (layer-swap curve).",
              "", "![ablation, merged, reasoning](reasoning/ablate_merged_ta/ablate_reasoning_accuracy_drop.png)",
              "![swap](reasoning/swap/swap.png)", ""]
    return lines


def write_markdown(rep: Mapping[str, Any], order: Sequence[str], path: Path) -> None:
    """``report.md``: what ran, the tables, the plots, and what the numbers say."""
    acc, best = rep["accuracy"], rep["best_merge"]
    t = rep["targets"]
    lines = [
        f"# ShapesWorld demo report (seed {rep['seed']}{', quick' if rep['quick'] else ''})",
        "",
        "A miniature of the paper, trained here from scratch: a base LM, an LVLM (LLaVA-style, two stages) and a "
        "text RM that never sees images. Merging them gives a VLRM with no preference training on images.",
        f"Held-out test pairs: {rep['n_pairs']['test']} ({rep['n_pairs']['test'] // 3} per category); the best "
        f"merge is chosen on {rep['n_pairs']['val']} validation pairs, never on test.",
        "",
        "## Preference accuracy on the test pairs (%)",
        "",
        accuracy_table(acc, order),
        "![accuracy by method and category](accuracy.png)",
        "",
        f"**Best merge (chosen on validation): `{best}`** — {100 * acc[best]['overall']:.1f} overall vs "
        f"text RM {100 * acc['text_rm']['overall']:.1f} ({t['gain_over_text_rm_pts']:+.1f} pts) and LVLM judge "
        f"{100 * acc['lvlm_judge']['overall']:.1f} ({t['gain_over_lvlm_judge_pts']:+.1f} pts); without the image it "
        f"scores {100 * acc['no_image']['overall']:.1f} ({-t['no_image_drop_pts']:+.1f} pts).",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| best merge ≥ text RM + 10 pts | {t['gain_over_text_rm_pts']:+.1f} pts | {t['beats_text_rm']} |",
        f"| best merge ≥ LVLM judge + 10 pts | {t['gain_over_lvlm_judge_pts']:+.1f} pts | {t['beats_lvlm_judge']} |",
        f"| no-image ablation loses ≥ 10 pts | {t['no_image_drop_pts']:.1f} pts | {t['no_image_drop']} |",
        "",
        "## Scenes with colour/shape combinations never seen in training",
        f"Held-out combinations: {', '.join(' '.join(c) for c in rep['unseen_combos'])}.",
        "",
        accuracy_table(rep["accuracy_unseen"], order),
        "## Task-arithmetic λ grid (validation / test overall %, chosen on validation)",
        "",
        sweep_table(rep["sweep"]),
        f"Best on validation: λ_LVLM = {rep['sweep_best']['lvlm.weight']:g}, λ_RM = {rep['sweep_best']['rm.weight']:g}."
        " ![sweep](sweep.png)",
        "",
        grid_findings(rep),
        "",
        "## Best-of-n with the best merge",
        "",
        "| Pass@1 | Random | VLRM pick | Pass@n (oracle) | n | questions |",
        "|---|---|---|---|---|---|",
        "| {pass@1:.1f} | {random:.1f} | {rm_accuracy:.1f} | {pass@n:.1f} | {n} | {count} |".format(**rep["bon"]),
        "",
        "Answer quality per candidate: 1 = right answer in the preferred style, 0.5 = right answer in the other "
        "style, 0 = wrong (graded by the world's rules, not by a model).",
        "",
        "## PPO with the merged reward",
        "",
        f"{rep['ppo']['updates']} PPO updates in {rep['ppo']['seconds']:.0f} s. Greedy answer quality on held-out "
        f"questions: {100 * rep['ppo']['quality_before']:.1f} → {100 * rep['ppo']['quality_after']:.1f} "
        f"(correct {100 * rep['ppo']['correct_before']:.1f} → {100 * rep['ppo']['correct_after']:.1f}).",
        "",
        "![reward curve](reward_curve.png)",
        "",
        *(study_markdown(rep["reward_study"]) if "reward_study" in rep else []),
        *(reasoning_section(rep["reasoning"]) if "reasoning" in rep else []),
        "## Timings (s)",
        "",
        "| " + " | ".join(rep["timings"]) + " |",
        "|" + "---|" * len(rep["timings"]),
        "| " + " | ".join(f"{v:.0f}" for v in rep["timings"].values()) + " |",
        "",
    ]
    write_text_atomic("\n".join(lines), path, force=True)
