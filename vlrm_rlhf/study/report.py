"""Summaries of the RL study: final gold quality per (algorithm, reward source), mean ± sd over seeds, the
starting policy's values, and where along the KL axis gold quality peaks (over-optimisation)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

KEYS = ("correct", "style", "both")


def _ms(xs: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(runs: Sequence[dict[str, Any]], bon: dict[int, dict[str, list]] | None = None) -> dict[str, Any]:
    """``{algo: {source: {"final": {key: {mean, sd, n}}, "start": ..., "kl": ..., "proxy_gain": ..., "peak": ...}}}``
    from the test-prompt gold checks (greedy answers for quality; sampled answers for the KL curve)."""
    out: dict[str, Any] = {}
    for algo in sorted({r["algo"] for r in runs}):
        out[algo] = {}
        for source in dict.fromkeys(r["source"] for r in runs if r["algo"] == algo):
            rs = [r for r in runs if r["algo"] == algo and r["source"] == source]
            first, last = [r["test"][0] for r in rs], [r["test"][-1] for r in rs]
            curve = mean_curve([r["test"] for r in rs])
            peak = max(curve, key=lambda p: p["both"]) if curve else {}
            out[algo][source] = {
                "final": {k: _ms([100 * h[f"gold/{k}"] for h in last]) for k in KEYS},
                "start": {k: _ms([100 * h[f"gold/{k}"] for h in first]) for k in KEYS},
                "final_val": {k: _ms([100 * r["val"][-1][f"gold/{k}"] for r in rs]) for k in KEYS},
                "kl": _ms([h["gold/kl"] for h in last]),
                "proxy_gain": _ms([h.get("gold/proxy_reward", math.nan) - f.get("gold/proxy_reward", math.nan)
                                   for f, h in zip(first, last, strict=True)]),
                "seconds": _ms([r["seconds"] for r in rs]),
                "peak_sampled_both": {"kl": peak.get("kl"), "both": peak.get("both"), "step": peak.get("step"),
                                      "final": curve[-1]["both"] if curve else None},
            }
    return out


def mean_curve(histories: Sequence[Sequence[dict[str, float]]]) -> list[dict[str, float]]:
    """Per check (aligned by index), the mean over seeds of KL, sampled gold (%), and proxy gain since step 0."""
    n = min(len(h) for h in histories) if histories else 0
    out = []
    for i in range(n):
        pts = [h[i] for h in histories]
        out.append({"step": pts[0]["step"], "kl": statistics.fmean(p["gold/kl"] for p in pts),
                    **{k: 100 * statistics.fmean(p[f"gold_sampled/{k}"] for p in pts) for k in KEYS},
                    **{f"greedy_{k}": 100 * statistics.fmean(p[f"gold/{k}"] for p in pts) for k in KEYS},
                    "proxy_gain": statistics.fmean(p.get("gold/proxy_reward", math.nan)
                                                   - h[0].get("gold/proxy_reward", math.nan)
                                                   for p, h in zip(pts, histories, strict=True))})
    return out


def _cell(d: dict[str, float]) -> str:
    return f"{d['mean']:.1f} ± {d['sd']:.1f}" if d["n"] > 1 else f"{d['mean']:.1f}"


def table_markdown(summary: dict[str, Any], algos: Sequence[str], sources: Sequence[str]) -> str:
    """Final greedy gold quality on test prompts (%), mean ± sd over seeds, one row per reward source."""
    head = "| reward source | " + " | ".join(f"{a.upper()} {k}" for a in algos for k in KEYS) + " | " + \
        " | ".join(f"{a.upper()} KL" for a in algos) + " |"
    lines = [head, "|" + "---|" * (1 + 4 * len(algos))]
    first = next((summary[a][s] for a in algos for s in sources if s in summary.get(a, {})), None)
    if first is not None:
        lines.append("| *starting policy* | " + " | ".join(_cell(first["start"][k]) for _ in algos for k in KEYS)
                     + " | " + " | ".join("0" for _ in algos) + " |")
    for s in sources:
        cells = []
        for a in algos:
            d = summary.get(a, {}).get(s)
            cells += [_cell(d["final"][k]) if d else "–" for k in KEYS]
        kls = []
        for a in algos:
            d = summary.get(a, {}).get(s)
            kls.append(f"{d['kl']['mean']:.2f}" if d else "–")
        lines.append(f"| {s} | " + " | ".join(cells) + " | " + " | ".join(kls) + " |")
    return "\n".join(lines) + "\n"


def targets(runs: Sequence[dict[str, Any]], merged: Sequence[str] = ("vlrm", "ensemble"),
            baselines: Sequence[str] = ("text_rm", "lvlm_judge")) -> dict[str, Any]:
    """The issue's targets per algorithm, seed by seed (final greedy gold on test prompts, points):
    ``gap`` = best merged source's "both" minus the better baseline's; ``kept_correct`` = for each source,
    correctness ends no more than 1 point below the start while the preferred style rises."""
    out: dict[str, Any] = {}
    for algo in sorted({r["algo"] for r in runs}):
        fin = {(r["source"], r["seed"]): r["test"][-1] for r in runs if r["algo"] == algo}
        start = {(r["source"], r["seed"]): r["test"][0] for r in runs if r["algo"] == algo}
        seeds = sorted({s for _, s in fin})
        gaps = {}
        for seed in seeds:
            m = [100 * fin[(s, seed)]["gold/both"] for s in merged if (s, seed) in fin]
            b = [100 * fin[(s, seed)]["gold/both"] for s in baselines if (s, seed) in fin]
            if m and b:
                gaps[seed] = max(m) - max(b)
        kept = {src: all(100 * (fin[k]["gold/correct"] - start[k]["gold/correct"]) >= -1
                         and fin[k]["gold/style"] > start[k]["gold/style"] for k in fin if k[0] == src)
                for src in dict.fromkeys(s for s, _ in fin)}
        out[algo] = {"gap_both_pts": gaps, "beats_baselines_by_10": bool(gaps) and all(g >= 10 for g in gaps.values()),
                     "kept_correct_style_up": kept}
    return out


def per_seed_markdown(runs: Sequence[dict[str, Any]], algos: Sequence[str], sources: Sequence[str]) -> str:
    """Final greedy gold "both" (%) per seed (rows) and (algorithm, source) (columns): the targets are per seed."""
    seeds = sorted({r["seed"] for r in runs})
    fin = {(r["algo"], r["source"], r["seed"]): 100 * r["test"][-1]["gold/both"] for r in runs}
    head = "| seed | " + " | ".join(f"{a.upper()} {s}" for a in algos for s in sources) + " |"
    lines = [head, "|" + "---|" * (1 + len(algos) * len(sources))]
    for seed in seeds:
        lines.append(f"| {seed} | " + " | ".join(f"{fin[(a, s, seed)]:.1f}" if (a, s, seed) in fin else "–"
                                                 for a in algos for s in sources) + " |")
    return "\n".join(lines) + "\n"
