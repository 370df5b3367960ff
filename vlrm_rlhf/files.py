"""Every user-visible output file and folder, and JSONL input: the package's one file toolkit.

Outputs are never half-written and never replace a user's output without ``force``. A file writer fills a
temporary sibling, fsyncs it and moves it into place in one step; without ``force`` the final step is a hard
link, which fails if the file appeared meanwhile (so it survives). ``atomic_output_dir`` does the same for a
folder (a model directory, an analysis output). Every writer takes the data first, then the path.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import VLRMError

__all__ = ["FileFormatError", "OutputExistsError", "atomic_output_dir", "check_writable", "read_csv", "read_jsonl",
           "stale_partials", "write_atomic", "write_bytes_atomic", "write_csv_atomic", "write_figure_atomic",
           "write_json_atomic", "write_jsonl_atomic", "write_text_atomic"]


class FileFormatError(VLRMError, ValueError):
    """An input data file that is missing, empty or not what its format says; the message names the file and line."""


class OutputExistsError(VLRMError, FileExistsError):
    """The output file or directory exists and ``force`` was not given."""


# ---- files ---------------------------------------------------------------------------------------------
def check_writable(out: str | Path, force: bool) -> Path:
    """Fail early (before any work) if ``out`` exists and may not be replaced, or its folder is missing."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output file {out} already exists (use --force to replace it)")
    if out.is_dir():
        raise OutputExistsError(f"output path {out} is a directory")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    return out


def write_atomic(path: str | Path, write: Callable[[IO], Any], force: bool = False, *, binary: bool = False) -> Path:
    """Call ``write(f)`` on a temporary sibling of ``path`` (opened as UTF-8 text, or bytes if ``binary``), then
    move it into place (see the module docstring)."""
    path = check_writable(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the file appeared meanwhile: never clobber without --force
            except FileExistsError:
                raise OutputExistsError(f"output file {path} already exists (use --force to replace it)") from None
            except OSError:  # filesystems without hard links
                if path.exists():
                    raise OutputExistsError(f"output file {path} already exists (use --force to replace it)") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(text: str, path: str | Path, force: bool = False) -> Path:
    """Write ``text`` atomically."""
    return write_atomic(path, lambda f: f.write(text), force)


def write_bytes_atomic(data: bytes, path: str | Path, force: bool = False) -> Path:
    """Write ``data`` atomically."""
    return write_atomic(path, lambda f: f.write(data), force, binary=True)


def write_json_atomic(obj: Any, path: str | Path, force: bool = False) -> Path:
    """Write ``obj`` as indented JSON (NaN/Inf refused) atomically."""
    return write_text_atomic(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n", path, force)


def write_jsonl_atomic(rows: Iterable[Mapping[str, Any]], out: str | Path, *, force: bool = False) -> Path:
    """Write rows as JSONL atomically, streaming (a crash leaves any previous file intact)."""
    def write(f: IO[str]) -> None:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")

    return write_atomic(out, write, force)


def write_csv_atomic(rows: Sequence[Mapping[str, Any]], path: str | Path, *, force: bool = False) -> Path:
    """Write dict rows as CSV atomically (columns: union of keys in first-seen order; floats at full precision)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def write(f: IO[str]) -> None:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)

    return write_atomic(path, write, force)


def write_figure_atomic(fig: Any, path: str | Path, *, force: bool = False, **savefig: Any) -> Path:
    """Render a matplotlib figure (format from the suffix, PNG without one) and write it atomically;
    ``savefig`` goes to ``fig.savefig`` (e.g. ``dpi``)."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".").lower() or "png", **savefig)
    if not buf.getbuffer().nbytes:
        raise OSError(f"matplotlib wrote no image to {path}")
    return write_bytes_atomic(buf.getvalue(), path, force)


# ---- folders -------------------------------------------------------------------------------------------
def stale_partials(out_dir: Path) -> list[Path]:
    """Temporary siblings left behind by an interrupted run for the same output."""
    return sorted(out_dir.parent.glob(f".{out_dir.name}.partial-*"))


@contextmanager
def atomic_output_dir(out_dir: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``out_dir`` only if the block completes.

    An existing ``out_dir`` raises unless ``force``; with ``force`` it is replaced only after the new output
    is complete. Leftovers of killed runs (``.NAME.partial-*``) are removed on the next successful run.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not force:
        raise OutputExistsError(f"output directory {out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output path {out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for p in stale_partials(out_dir):
        shutil.rmtree(p, ignore_errors=True)


# ---- reading -------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path, *, what: str = "input file") -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file of objects; errors name the file and line
    (``what`` names the file in the not-found message)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FileFormatError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise FileFormatError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise FileFormatError(f"{path} has no rows")
    return rows


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV written by ``write_csv_atomic`` (values as strings)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
