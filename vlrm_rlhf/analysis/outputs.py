"""Analysis outputs: a folder that appears complete or not at all, and CSV tables."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from . import AnalysisError


@contextmanager
def analysis_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder, renamed to ``out`` when the block completes.

    An existing non-empty ``out`` is refused unless ``force`` (then replaced only once the new one is complete);
    an existing empty folder is fine.
    """
    from ..merge.writer import atomic_output_dir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AnalysisError(f"output folder {out} exists and is not empty; pass --force to replace it")
    with atomic_output_dir(out, force=True) as tmp:
        yield tmp


def write_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write dict rows (columns: union of keys in first-seen order); floats at full precision."""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV written by ``write_csv`` (values as strings)."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
