"""Evaluation results as markdown tables (accuracies shown in percent); the files are written by ``vlrm_rlhf.files``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .records import CATEGORY_ORDER

__all__ = ["bon_markdown_table", "markdown_table"]


def _pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown_table(results: Mapping[str, Mapping[str, Any]], categories: Sequence[str] | None = None) -> str:
    """Preference accuracies as a markdown table: a row per scorer (label → ``pref_metrics`` dict).

    Columns: overall (micro), macro, each category (VL-RewardBench's order, then others), tie rate, n; then
    ACC+ and the group count when any result has them (MM-RLHF-RewardBench), and unparsed judge verdicts
    when any result counts them (generative judges).
    """
    if categories is None:
        seen = {c for m in results.values() for c in m["categories"]}
        categories = [c for c in CATEGORY_ORDER if c in seen] + sorted(seen - set(CATEGORY_ORDER))
    plus = any("acc_plus" in m for m in results.values())
    unparsed = any("unparsed" in m for m in results.values())
    head = ["scorer", "overall %", "macro %", *(f"{c} %" for c in categories), "ties %", "n",
            *(["ACC+ %", "groups"] if plus else []), *(["unparsed"] if unparsed else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, m in results.items():
        cats = [_pct(m["categories"][c]["accuracy"]) if c in m["categories"] else "–" for c in categories]
        cells = [str(label).replace("|", "\\|"), _pct(m["overall"]), _pct(m["macro"]), *cats, _pct(m["tie_rate"]),
                 str(m["n"])]
        if plus:
            cells += [_pct(m.get("acc_plus")), str(m.get("groups", "–"))]
        if unparsed:
            cells.append(str(m.get("unparsed", "–")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bon_markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Best-of-n metrics (``bon.bon_metrics``, already in percent) as a markdown table, a row per scorer."""
    head = ["scorer", "Pass@1 %", "Pass@N %", "Random %", "RM accuracy %", "ties->first %", "ties %", "N", "rows"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, m in results.items():
        cells = [str(label).replace("|", "\\|"), *(f"{m[k]:.2f}" for k in ("pass@1", "pass@n", "random", "rm_accuracy",
                                                                           "rm_accuracy_first", "tie_rate")),
                 str(m["n"]), str(m["count"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
