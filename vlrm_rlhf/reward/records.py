"""Reward of plain ``{"prompt", "response"}`` records with their image files (serves ``vlrm-rlhf score``).

Records are scored in batches by a ``VLRewardScorer``; every error is a ``RecordError`` naming its row, and so
is a non-finite reward (the VLRM reward's default ``non_finite="raise"`` policy: nothing is written).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .inputs import InputError, confine_image_path, image_roots, load_image, make_sample

__all__ = ["RecordError", "row_image_paths", "score_records"]


class RecordError(InputError):
    """A record (or a scorer's answer for it) that cannot be evaluated; the message names the row."""


def row_image_paths(rec: Mapping[str, Any], where: str, base_dir: Path,
                    images_root: Sequence[Path] = ()) -> list[Path]:
    """Image files of a ``score`` row: ``image`` (a path or null) and/or ``images`` (paths), relative to
    ``base_dir``; each must resolve inside ``base_dir`` or an ``images_root`` folder, and exist (the error
    names the row and the file)."""
    roots = image_roots(base_dir, extra=images_root)
    raw = rec.get("images") or []
    if not isinstance(raw, list):
        raise RecordError(f"{where}: 'images' must be a list of paths")
    if rec.get("image") is not None:
        if raw:
            raise RecordError(f"{where}: give 'image' or 'images', not both")
        raw = [rec["image"]]
    paths = []
    for x in raw:
        if not isinstance(x, str) or not x:
            raise RecordError(f"{where}: image paths must be non-empty strings, got {x!r}")
        p = Path(x) if Path(x).is_absolute() else base_dir / x
        try:
            confine_image_path(p, x, roots)
        except InputError as e:
            raise RecordError(f"{where}: {e}") from None
        if not p.is_file():
            raise RecordError(f"{where}: image file not found: {p}")
        paths.append(p)
    return paths


def score_records(
    scorer: Any,
    records: Sequence[Mapping[str, Any]],
    image_paths: Sequence[Sequence[Path]],
    *,
    batch_size: int = 32,
    names: Sequence[str] | None = None,
) -> list[float]:
    """Reward of each ``{"prompt", "response"}`` row with its images, ``batch_size`` rows per scorer call.

    Images are loaded one batch at a time; every error names its row (``names[i]``, default ``row i``).
    """
    names = list(names) if names is not None else [f"row {i}" for i in range(len(records))]
    rewards: list[float] = []
    for start in range(0, len(records), batch_size):
        samples = []
        for i in range(start, min(start + batch_size, len(records))):
            rec = records[i]
            if not isinstance(rec.get("prompt"), str | list) or not rec["prompt"]:
                raise RecordError(f"{names[i]}: missing 'prompt'")
            if not isinstance(rec.get("response"), str | list):
                raise RecordError(f"{names[i]}: missing 'response'")
            try:
                images = [load_image(p) for p in image_paths[i]]
                samples.append(make_sample(rec["prompt"], rec["response"], images or None, i))
            except InputError as e:
                raise RecordError(f"{names[i]}: {str(e).removeprefix(f'sample {i}: ')}") from e
        try:
            with warnings.catch_warnings():  # the scorer's own non-finite warning: replaced by the error below
                warnings.filterwarnings("ignore", message="non-finite reward")
                got = [float(x) for x in scorer.score_samples(samples)]
        except InputError as e:
            raise RecordError(f"rows {names[start]}..{names[start + len(samples) - 1]}: {e}") from e
        for j, v in enumerate(got):
            if not math.isfinite(v):
                raise RecordError(f"{names[start + j]}: non-finite reward {v} from the reward model "
                                  "(check its weights and this row's input)")
        rewards += got
    return rewards
