"""Output files that are never half-written and never replace a user's file without ``force``.

Each writer fills a temporary sibling, fsyncs it and moves it into place in one step; without ``force`` the
final step is a hard link, which fails if the file appeared meanwhile (so it survives).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any


def check_writable(out: str | Path, force: bool) -> Path:
    """Fail early (before any work) if ``out`` exists and may not be replaced, or its folder is missing."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output file {out} already exists (use --force to replace it)")
    if out.is_dir():
        raise FileExistsError(f"output path {out} is a directory")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    return out


def write_atomic(path: str | Path, write: Callable[[IO[str]], Any], force: bool = False) -> Path:
    """Call ``write(f)`` on a temporary sibling of ``path``, then move it into place (see the module docstring)."""
    path = check_writable(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the file appeared meanwhile: never clobber without --force
            except FileExistsError:
                raise FileExistsError(f"output file {path} already exists (use --force to replace it)") from None
            except OSError:  # filesystems without hard links
                if path.exists():
                    raise FileExistsError(f"output file {path} already exists (use --force to replace it)") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(text: str, path: str | Path, force: bool = False) -> Path:
    """Write ``text`` atomically."""
    return write_atomic(path, lambda f: f.write(text), force)


def write_json_atomic(obj: Any, path: str | Path, force: bool = False) -> Path:
    """Write ``obj`` as indented JSON (NaN/Inf refused) atomically."""
    return write_text_atomic(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n", path, force)


def write_jsonl_atomic(rows: Iterable[Mapping[str, Any]], out: str | Path, *, force: bool = False) -> Path:
    """Write rows as JSONL atomically, streaming (a crash leaves any previous file intact)."""
    def write(f: IO[str]) -> None:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")

    return write_atomic(out, write, force)
