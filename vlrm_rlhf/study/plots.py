"""Over-optimisation plots of the RL study: gold quality and proxy-reward gain against KL to the starting
policy, one line per reward source, with best-of-n at its analytic KL on the same axes."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import mean_curve


def plot_overoptimization(runs: Sequence[dict[str, Any]], bon: dict[int, dict[str, list]], algos: Sequence[str],
                          sources: Sequence[str], out: Path, metric: str = "both") -> None:
    """Rows: algorithms; left: sampled gold ``metric`` (%) vs KL (lines: RL; dashed markers: best-of-n);
    right: proxy reward gain since the start vs KL. Test prompts, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(algos), 2, figsize=(11, 4 * len(algos)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for r, algo in enumerate(algos):
        for c, src in enumerate(sources):
            hs = [x["test"] for x in runs if x["algo"] == algo and x["source"] == src]
            if not hs:
                continue
            curve = mean_curve(hs)
            kl = [p["kl"] for p in curve]
            axes[r][0].plot(kl, [p[metric] for p in curve], "-o", ms=3, color=colours(c), label=src)
            axes[r][1].plot(kl, [p["proxy_gain"] for p in curve], "-o", ms=3, color=colours(c), label=src)
            rows = [b[src] for b in bon.values() if src in b]
            if rows:
                bkl = [p["kl"] for p in rows[0]]
                axes[r][0].plot(bkl, [100 * statistics.fmean(rw[i][metric] for rw in rows) for i in range(len(bkl))],
                                "--^", ms=4, color=colours(c), alpha=0.6)
        axes[r][0].set(title=f"{algo.upper()}: gold '{metric}' (sampled answers; dashed ^: best-of-n)",
                       xlabel="KL(policy || start) [nats]", ylabel=f"gold {metric} (%)")
        axes[r][1].set(title=f"{algo.upper()}: proxy reward gain since the start", xlabel="KL(policy || start) [nats]",
                       ylabel="Δ proxy reward (raw units)")
        for ax in axes[r]:
            ax.grid(alpha=0.3)
        axes[r][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def gold_axis(ax: Any, gold: Sequence[dict[str, float]]) -> None:
    """Gold quality (greedy answers, %) on a right-hand axis of a reward-vs-update plot: the truth beside the proxy."""
    right = ax.twinx()
    steps = [g["step"] for g in gold]
    for key, colour in (("correct", "tab:green"), ("style", "tab:orange"), ("both", "tab:red")):
        right.plot(steps, [100 * g[f"gold/{key}"] for g in gold], "-o", ms=3, color=colour, label=f"gold {key} (greedy)")
    right.set(ylabel="gold quality on held-out questions (%)", ylim=(-2, 102))
    right.legend(fontsize=8, loc="lower right")
