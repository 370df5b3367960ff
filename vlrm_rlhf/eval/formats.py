"""Preference benchmark formats: detect a file's format from its columns and map its rows to VL-RewardBench's.

Formats (``--format``; default ``auto`` = detected from the first row's columns):

* ``vl-rewardbench``: ``id, query, image, response[2], human_ranking[2]`` (the native form);
* ``multimodal-rewardbench``: ``ID, Image, Text, Output1, Output2, Better`` (``"Output1"``/``"Output2"``, or
  ``1``/``2``); category from ``Meta`` (a dict or JSON string; its ``Category``/``category`` key, else "general");
* ``mm-rlhf``: MM-RLHF-RewardBench, ``id, image, prompt, chosen, rejected``; several pairs share an id, which
  becomes the record's ``group`` (ACC+ counts a group right only when all its pairs are);
* ``rlaif-v``: ``image, question, chosen, rejected`` (id from ``id`` or ``idx``, else the row index).

An explicit ``category`` column wins in every format. A missing column is an error naming it and the file.
"""

from __future__ import annotations

import json
from typing import Any

from ..reward.inputs import InputError

__all__ = ["FORMATS", "REQUIRED", "FormatError", "PrefDataError", "detect_format", "to_vlrb"]

REQUIRED: dict[str, tuple[str, ...]] = {
    "vl-rewardbench": ("query", "response", "human_ranking"),
    "multimodal-rewardbench": ("ID", "Text", "Output1", "Output2", "Better"),
    "mm-rlhf": ("id", "prompt", "chosen", "rejected"),
    "rlaif-v": ("question", "chosen", "rejected"),
}
FORMATS = ("auto", *REQUIRED)


class PrefDataError(InputError):
    """A preference file or record that cannot be evaluated; the message names the file, row and field."""


class FormatError(PrefDataError):
    """A preference file whose columns match no known format, or lack one the chosen format needs."""


def detect_format(columns: set[str], source: str) -> str:
    """The format whose required columns are all present (``response`` may be ``responses``); else an error
    naming the file and, for the closest format, the missing columns."""
    cols = set(columns) | ({"response"} if "responses" in columns else set())
    for fmt, need in REQUIRED.items():
        if all(c in cols for c in need):
            return fmt
    best = max(REQUIRED, key=lambda f: sum(c in cols for c in REQUIRED[f]))
    missing = [c for c in REQUIRED[best] if c not in cols]
    raise FormatError(f"{source}: unknown preference format (columns {sorted(columns)}); closest is {best}, "
                      f"missing column(s) {', '.join(repr(c) for c in missing)}; or choose one with --format "
                      f"({', '.join(FORMATS[1:])})")


def check_columns(row: dict[str, Any], fmt: str, where: str) -> None:
    """Raise naming the first column ``fmt`` needs that ``row`` lacks."""
    for c in REQUIRED[fmt]:
        if c not in row and not (c == "response" and "responses" in row):
            raise FormatError(f"{where}: missing column {c!r} (format {fmt})")


def to_vlrb(row: dict[str, Any], fmt: str, index: int, where: str) -> dict[str, Any]:
    """The row in VL-RewardBench's form (``id, query, response, human_ranking, image, category, group``)."""
    check_columns(row, fmt, where)
    if fmt == "vl-rewardbench":
        return row
    extra = {"category": row["category"]} if row.get("category") is not None else {}
    if fmt == "multimodal-rewardbench":
        better = str(row["Better"]).strip().lower().replace(" ", "")
        if better not in ("output1", "output2", "1", "2"):
            raise FormatError(f"{where}: field 'Better': expected 'Output1' or 'Output2', got {row['Better']!r}")
        rank = [0, 1] if better in ("output1", "1") else [1, 0]
        out = {"id": row["ID"], "query": row["Text"], "response": [row["Output1"], row["Output2"]],
               "human_ranking": rank, "image": row.get("Image"),
               "category": extra.get("category") or _meta_category(row.get("Meta"), where)}
        return out
    rid = row.get("id", row.get("idx"))
    query = row["prompt"] if fmt == "mm-rlhf" else row["question"]
    out = {"id": rid if rid is not None else index, "query": query, "response": [row["chosen"], row["rejected"]],
           "human_ranking": [0, 1], "image": row.get("image", row.get("images")), **extra}
    if fmt == "mm-rlhf":
        out["group"] = str(rid)
    out.setdefault("category", "general")
    return out


def _meta_category(meta: Any, where: str) -> str:
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return meta.strip() or "general"
    if isinstance(meta, dict):
        cat = meta.get("Category", meta.get("category"))
        if isinstance(cat, str) and cat.strip():
            return cat
    return "general"
