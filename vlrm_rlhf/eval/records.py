"""Loading preference records in VL-RewardBench's format: ``id, query, image, response[2], human_ranking[2]``.

Other benchmarks (Multimodal RewardBench, MM-RLHF-RewardBench, RLAIF-V pairs) are read unchanged: their
format is detected from the columns (or given as ``fmt``) and each row mapped to this form (``formats.py``).

Sources: a ``.jsonl`` file, a ``.json`` array, a ``.parquet`` file or a ``datasets.save_to_disk`` directory. ``image`` (or
``images``) may be a path (relative to ``--images-dir`` if given, else to the data file's folder), a list of
paths, a ``datasets`` Image value (PIL, or ``{"bytes", "path"}``), raw bytes, or missing/None (text only).
A path must resolve (after symlinks) inside the data file's folder, ``images_dir`` or an ``images_root`` folder.
Every image is decoded **once**, here: records hold RGB PIL images, so evaluating the same records many
times (e.g. a merge sweep) never touches the disk again.

``human_ranking``: lower rank = better, so ``[0, 1]`` prefers response 0 and ``[1, 0]`` response 1. A tie in
the human ranking (``[0, 0]``) carries no preference: such records are skipped and counted (``PrefData.skipped``)
unless ``ties="error"``.

Category: an explicit ``category`` column wins (stripped, lower-cased). Otherwise VL-RewardBench's id
rules, matched case-insensitively on the id with ``-`` read as ``_``: ``mmmu`` (MMMU-Pro) or ``mathverse``
→ ``reasoning``; ``hallucination`` (POVID ids are ``hallucination_pair...``), ``rlaif`` (RLAIF-V), ``rlhf``
(RLHF-V) or ``povid`` → ``hallucination``; anything else (WildVision) → ``general``. Reasoning is tested
first. The commonly copied VL-RewardBench snippet matches lower-case substrings case-*sensitively*, which
sends ids like ``RLAIF-V-...`` to "general"; we do not.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from ..reward.inputs import InputError, confine_image_path, image_roots, inside_roots, open_image
from .formats import FORMATS, PrefDataError, detect_format, to_vlrb

__all__ = ["CATEGORY_ORDER", "PrefData", "PrefDataError", "PrefRecord", "category_of_id", "load_pref_data",
           "load_pref_records"]

CATEGORY_ORDER = ("general", "hallucination", "reasoning")  # VL-RewardBench's table order
RESERVED = ("overall", "macro")  # names of the aggregate columns: not allowed as categories
_REASONING = ("mmmu", "mathverse")
_HALLUCINATION = ("hallucination", "rlaif", "rlhf", "povid")


@dataclass
class PrefRecord:
    """One preference pair: the query, its images (decoded), two responses and which one humans prefer."""

    id: str
    query: str
    responses: tuple[str, str]
    preferred: int  # 0 or 1
    category: str
    images: list[Image.Image] = field(default_factory=list)
    where: str = ""  # "file line 3 (id x)": used in error messages
    group: str = ""  # records sharing a group (MM-RLHF-RewardBench's id) count once in ACC+


@dataclass
class PrefData:
    """The records of a file, plus the ids of the records skipped for a tie in the human ranking."""

    records: list[PrefRecord]
    skipped: list[str]
    path: Path
    format: str = "vl-rewardbench"


def category_of_id(record_id: str) -> str:
    """VL-RewardBench's category of a record id: reasoning, hallucination or general (see module docstring)."""
    s = str(record_id).lower().replace("-", "_")
    if any(k in s for k in _REASONING):
        return "reasoning"
    if any(k in s for k in _HALLUCINATION):
        return "hallucination"
    return "general"


def load_pref_records(path: str | Path, **kw: Any) -> list[PrefRecord]:
    """The records of a preference file (see ``load_pref_data``; skipped human ties are only logged)."""
    return load_pref_data(path, **kw).records


def load_pref_data(
    path: str | Path,
    *,
    images_dir: str | Path | None = None,
    images_root: Sequence[str | Path] = (),
    limit: int | None = None,
    split: str | None = None,
    ties: Literal["skip", "error"] = "skip",
    fmt: str = "auto",
) -> PrefData:
    """Load, validate and decode a preference file (first ``limit`` rows); errors name file, row and field.

    Image paths must resolve inside the file's folder, ``images_dir`` or an ``images_root`` folder. ``fmt``:
    ``auto`` (detected from the first row's columns) or one of ``formats.FORMATS``."""
    import logging

    if ties not in ("skip", "error"):
        raise ValueError(f"ties must be 'skip' or 'error', not {ties!r}")
    if fmt not in FORMATS:
        raise PrefDataError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
    path = Path(path)
    if images_dir is not None and not Path(images_dir).is_dir():
        raise PrefDataError(f"images folder not found: {images_dir}")
    base = path if path.is_dir() else path.parent
    imgs = Path(images_dir) if images_dir is not None else None
    roots = image_roots(base, imgs, extra=images_root)
    records, skipped = [], []
    for i, (where, row) in enumerate(_rows(path, limit, split)):
        if not isinstance(row, dict):
            raise PrefDataError(f"{where}: expected an object, got {_type(row)}")
        if fmt == "auto":
            fmt = detect_format(set(row), str(path))
        row = to_vlrb(row, fmt, i, where)
        rec = _record(row, i, where, base, imgs, roots)
        if rec is None:
            if ties == "error":
                where += f" (id {row['id']})" if row.get("id") is not None else ""
                raise PrefDataError(f"{where}: field 'human_ranking': tied ranking {row.get('human_ranking')} "
                                    "(no preferred response)")
            skipped.append(str(row.get("id", i)))
            continue
        records.append(rec)
    if skipped:
        logging.getLogger(__name__).warning("%s: skipped %d record(s) with a tie in the human ranking",
                                            path, len(skipped))
    if not records:
        raise PrefDataError(f"{path}: no records to evaluate" + (f" ({len(skipped)} skipped as human ties)"
                                                                  if skipped else ""))
    return PrefData(records, skipped, path, fmt)


# ---- reading rows -------------------------------------------------------------------------------------
def _rows(path: Path, limit: int | None, split: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row dict) for the first ``limit`` rows of a jsonl / parquet file or save_to_disk folder."""
    if limit is not None and limit < 1:
        raise PrefDataError(f"limit must be >= 1, got {limit}")
    if not path.exists():
        raise PrefDataError(f"data not found: {path}")
    if path.is_dir():
        yield from _dataset_rows(path, limit, split)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        from ..files import FileFormatError, read_jsonl

        try:
            lines = read_jsonl(path)
        except FileFormatError as e:
            raise PrefDataError(str(e)) from None
        for ln, row in lines[:limit]:
            yield f"{path} line {ln}", row
    elif suffix == ".json":  # a JSON array of records
        import json

        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PrefDataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list):
            raise PrefDataError(f"{path}: expected a JSON array of records (or use .jsonl)")
        for i, row in enumerate(rows[:limit]):
            yield f"{path} item {i}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise PrefDataError(f"{path}: cannot read parquet file ({e})") from e
        if limit is not None:
            table = table.slice(0, limit)
        for i, row in enumerate(table.to_pylist()):
            yield f"{path} row {i}", row
    else:
        raise PrefDataError(f"{path}: unsupported data file (use .jsonl, .json, .parquet or a datasets save_to_disk folder)")


def _dataset_rows(path: Path, limit: int | None, split: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise PrefDataError(f"{path}: not a datasets save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = sorted(ds)
        name = split or ("test" if "test" in ds else names[0] if len(names) == 1 else None)
        if name not in ds:
            raise PrefDataError(f"{path}: choose a split with --split (has {names})")
        ds = ds[name]
    elif split is not None:
        raise PrefDataError(f"{path}: a single dataset has no splits (got split {split!r})")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    for i, row in enumerate(ds):  # Image features decode to PIL here, once
        yield f"{path} row {i}", row


# ---- validating one row -------------------------------------------------------------------------------
def _record(row: dict[str, Any], index: int, where: str, base: Path, images_dir: Path | None,
            roots: Sequence[Path]) -> PrefRecord | None:
    """A validated record (id: the ``id`` field, else the row index), or None for a tie in the human ranking."""
    if not isinstance(row, dict):
        raise PrefDataError(f"{where}: expected an object, got {_type(row)}")
    rid = row.get("id")
    if rid is not None:
        where = f"{where} (id {rid})"
    rid = str(rid) if rid is not None else str(index)
    query = row.get("query")
    if not isinstance(query, str):
        raise PrefDataError(f"{where}: field 'query': expected a string, got {_type(query)}")
    responses = row.get("response", row.get("responses"))
    if not isinstance(responses, Sequence) or isinstance(responses, str) or len(responses) != 2:
        n = len(responses) if isinstance(responses, Sequence) and not isinstance(responses, str) else _type(responses)
        raise PrefDataError(f"{where}: field 'response': expected a list of 2 responses, got {n}")
    for j, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise PrefDataError(f"{where}: field 'response': response {j} is empty or not a string")
    preferred = _preferred(row.get("human_ranking"), where)
    if preferred is None:
        return None
    category = _category(row, rid if row.get("id") is not None else "", where)
    key = "image" if row.get("image") is not None or "images" not in row else "images"
    images = [_decode(x, f"{where}: field {key!r}", base, images_dir, roots) for x in _image_items(row.get(key))]
    group = str(row["group"]) if row.get("group") is not None else ""
    return PrefRecord(rid, query, (responses[0], responses[1]), preferred, category, images, where, group)


def _preferred(ranking: Any, where: str) -> int | None:
    """Index of the better response (lower rank), None for a tie."""
    ok = isinstance(ranking, Sequence) and not isinstance(ranking, str) and len(ranking) == 2
    if ok:
        try:
            ranks = [_as_int(x) for x in ranking]
        except ValueError:
            ok = False
    if not ok:
        raise PrefDataError(f"{where}: field 'human_ranking': expected 2 integer ranks like [0, 1], got {ranking!r}")
    if ranks[0] == ranks[1]:
        return None
    return 0 if ranks[0] < ranks[1] else 1


def _as_int(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int | float) or x != int(x):
        raise ValueError(x)
    return int(x)


def _category(row: dict[str, Any], rid: str, where: str) -> str:
    raw = row.get("category")
    if raw is None:
        return category_of_id(rid)
    if not isinstance(raw, str) or not raw.strip():
        raise PrefDataError(f"{where}: field 'category': expected a non-empty string, got {raw!r}")
    cat = raw.strip().lower()
    if cat in RESERVED:
        raise PrefDataError(f"{where}: field 'category': {raw!r} is reserved for the aggregate columns")
    return cat


def _image_items(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [x for x in value if x is not None]
    return [value]


def _decode(x: Any, where: str, base: Path, images_dir: Path | None, roots: Sequence[Path]) -> Image.Image:
    """An RGB PIL image from a PIL image, bytes, a datasets ``{bytes, path}`` dict or a (confined) path."""
    if isinstance(x, dict):  # bytes win: a hub parquet's "path" is only the original file name
        x = x.get("bytes") if x.get("bytes") is not None else x.get("path")
    if isinstance(x, Image.Image):
        return x if x.mode == "RGB" else x.convert("RGB")
    if isinstance(x, bytes | bytearray):
        src, shown = io.BytesIO(x), "image bytes"
    elif isinstance(x, str | Path) and str(x):
        src = _resolve(Path(x), base, images_dir, roots, where)
        shown = f"image file {src}"
    else:
        raise PrefDataError(f"{where}: unsupported image value {_type(x)}")
    try:
        return open_image(src, shown)
    except InputError as e:
        raise PrefDataError(f"{where}: {e}") from None


def _resolve(p: Path, base: Path, images_dir: Path | None, roots: Sequence[Path], where: str) -> Path:
    """The image file a path names: absolute, else under ``images_dir`` first, then the data file's folder.
    Only candidates inside ``roots`` are looked at; none inside is a refusal naming the path."""
    tried = [p] if p.is_absolute() else [d / p for d in (images_dir, base) if d is not None]
    allowed = [t for t in tried if inside_roots(t, roots)]
    if not allowed:
        try:
            confine_image_path(tried[0], p, roots)
        except InputError as e:
            raise PrefDataError(f"{where}: {e}") from None
    for t in allowed:
        if t.is_file():
            return t
    raise PrefDataError(f"{where}: image file not found: {' or '.join(map(str, allowed))}")


def _type(x: Any) -> str:
    return "nothing" if x is None else type(x).__name__
