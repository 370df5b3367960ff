"""Analysis outputs: a folder that appears complete or not at all (its files are written by ``vlrm_rlhf.files``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..files import atomic_output_dir
from . import AnalysisError


@contextmanager
def analysis_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder, renamed to ``out`` when the block completes.

    An existing non-empty ``out`` is refused unless ``force`` (then replaced only once the new one is complete);
    an existing empty folder is fine.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AnalysisError(f"output folder {out} exists and is not empty; pass --force to replace it")
    with atomic_output_dir(out, force=True) as tmp:
        yield tmp
