"""Best-of-n evaluation of a JSONL file: check it, score it, rerank, write the scored rows.

The one action behind ``vlrm-rlhf rerank`` and ``vlrm-rlhf eval bon``. Bad input raises ``RecordError``
(or ``OSError`` for an unwritable output) naming the file and line, before any model is loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import bon
from .bon import RecordError
from .files import check_writable, read_jsonl, write_jsonl_atomic


def read_bon_file(input: Path, mode: str, images_dir: Path | None = None, image_key: str = "id",
                  n: int | None = None, images_root: Sequence[Path] = (),
                  ) -> tuple[list[dict[str, Any]], list[Path | None], list[str]]:
    """The rows of a best-of-n JSONL file, checked, with each row's image (None in text modes) and name.

    Images must lie inside the file's folder, ``images_dir`` or an ``images_root`` folder."""
    if images_dir is not None and not images_dir.is_dir():
        raise RecordError(f"--images-dir {images_dir} is not a folder")
    lines = read_jsonl(input)
    records = [r for _, r in lines]
    names = [f"{input} line {ln}" + (f" (id {r['id']})" if "id" in r else "") for ln, r in lines]
    paths: list[Path | None] = []
    for i, (name, rec) in enumerate(zip(names, records, strict=True)):
        bon.check_record(i, rec, n, where=name)
        path = None if mode in bon.TEXT_MODES else \
            bon.find_row_image(rec, name, input.parent, images_dir, image_key, images_root)
        if path is None and mode not in bon.TEXT_MODES:
            raise RecordError(f"{name}: no image, and --mode {mode} needs one per row: give --images-dir "
                              f"(files named {{{image_key}}}.jpg|.png) or an 'image' path in each row, "
                              "or score text only with --mode text_rm|no_image")
        paths.append(path)
    return records, paths, names


def rerank_file(input: Path, load_scorer: Callable[[], Any], *, mode: str = "vlrm", images_dir: Path | None = None,
                image_key: str = "id", out: Path | None = None, force: bool = False, batch_size: int = 8,
                n: int | None = None, images_root: Sequence[Path] = ()) -> tuple[dict[str, Any], float]:
    """Score every response of a best-of-n file and return its metrics and the scoring time in seconds.

    ``load_scorer()`` is called only once the file (and ``out``'s writability) has been checked, so bad input
    fails fast; the scored rows go to ``out`` (JSONL, atomic) when given.
    """
    if out is not None:
        check_writable(out, force)
    records, paths, names = read_bon_file(input, mode, images_dir, image_key, n, images_root)
    scorer = load_scorer()
    t0 = time.perf_counter()
    scores = bon.score_bon_rows(scorer, records, paths, n=n, batch_size=batch_size, names=names)
    it = iter(scores)  # rerank_records asks for the rows' scores in order: hand over the precomputed ones
    rows, metrics = bon.rerank_records(records, lambda rec, resp: next(it), n=n)
    if out is not None:
        write_jsonl_atomic(rows, out, force=force)
    return metrics, time.perf_counter() - t0
