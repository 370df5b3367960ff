"""Every user-visible output file and folder, and JSONL input: the package's one file toolkit.

Outputs are never half-written and never replace a user's output without ``force``. A file writer fills a
temporary sibling, fsyncs it and moves it into place in one step; without ``force`` the final step is a hard
link, which fails if the file appeared meanwhile (so it survives). ``atomic_output_dir`` does the same for a
folder (a model directory, an analysis output), under an exclusive lock so that two runs never write one output
at once. ``check_not_overlapping`` keeps outputs away from the inputs. Every writer takes the data first, then
the path. Faults a user can fix (a read-only folder, a full disk, a busy output) raise one message naming the path.
"""

from __future__ import annotations

import csv
import errno
import fcntl
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

__all__ = ["DiskFullError", "FileFormatError", "OutputBusyError", "OutputExistsError", "OutputFolderError",
           "OverlapError", "atomic_output_dir", "check_not_overlapping", "check_output_dir", "check_writable", "exclusive_lock",
           "read_csv", "read_jsonl", "stale_partials", "write_atomic", "write_bytes_atomic", "write_csv_atomic",
           "write_figure_atomic", "write_json_atomic", "write_jsonl_atomic", "write_text_atomic"]


class FileFormatError(VLRMError, ValueError):
    """An input data file that is missing, empty or not what its format says; the message names the file and line."""


class OutputExistsError(VLRMError, FileExistsError):
    """The output file or directory exists and ``force`` was not given (or it is a file, never replaced)."""


class OutputBusyError(VLRMError, OSError):
    """Another run holds the lock of this output (or work folder); the message names the folder and the lock."""


class OutputFolderError(VLRMError, PermissionError):
    """The output's folder cannot be written (read-only, or no permission); the message names the folder."""


class DiskFullError(VLRMError, OSError):
    """The disk filled up while an output was written; the message names the output (nothing was replaced)."""


class OverlapError(VLRMError, ValueError):
    """An output that is, contains or lies inside one of the command's inputs (it would replace them)."""


_NO_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _fault(e: OSError, folder: Path, output: Path, partial: Path | None = None) -> OSError:
    """The package's error for an OS error while writing ``output`` in ``folder``, or ``e`` itself (a file of the
    temporary ``partial`` folder is named by its path inside the output)."""
    if isinstance(e, VLRMError):
        return e
    if e.errno in _NO_WRITE:
        return OutputFolderError(f"cannot write into folder {folder}: {e.strerror or 'permission denied'} "
                                 "(read-only or no permission); choose another output")
    if e.errno in _FULL:
        name = Path(e.filename) if e.filename else None
        if name is not None and partial is not None and name.is_relative_to(partial):
            name = name.relative_to(partial)
        where = f" (file {name})" if name is not None and name != output else ""
        return DiskFullError(f"no space left on device while writing {output}{where}: free some space and rerun "
                             "(nothing was replaced)")
    return e


def check_not_overlapping(out: str | Path, inputs: Mapping[str, str | Path | None] | Iterable[tuple[str, str | Path | None]],
                          *, what: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside an input (symlinks resolved), with or without ``force``.

    ``inputs``: label -> path (e.g. ``{"rm model": ..., "recipe": ...}``); ``what`` names the output option.
    """
    o = Path(out).expanduser().resolve()
    for label, p in (inputs.items() if isinstance(inputs, Mapping) else inputs):
        if p is None:
            continue
        q = Path(p).expanduser().resolve()
        rel = "is" if o == q else "contains" if o in q.parents else "lies inside" if q in o.parents else None
        if rel is not None:
            kind = "folder" if q.is_dir() else "file"
            raise OverlapError(f"{what} {out} {rel} the {label} {kind} {q}: choose an output outside the inputs "
                               "(inputs are never replaced, not even with --force)")


@contextmanager
def exclusive_lock(lock: str | Path, busy: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on file ``lock`` for the block (created, and removed on release).

    Never waits: when another process holds it, raise ``OutputBusyError(busy)`` (plus the holder's pid). The lock
    dies with its process, so a killed run never leaves a held lock behind.
    """
    lock = Path(lock)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _fault(e, lock.parent, lock) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise OutputBusyError(busy + (f" (pid {holder})" if holder.isdigit() else "")) from None
        try:
            st, mine = os.stat(lock), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(lock)  # while still held: a waiting process then sees a new file and retries
        except FileNotFoundError:
            pass
        os.close(fd)


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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _fault(e, path.parent, path) from None
    try:
        try:
            with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _fault(e, path.parent, path) from None
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

    The whole write holds an exclusive lock next to the output (``.NAME.lock``): a second writer fails at once
    with ``OutputBusyError`` and never touches the first one's files. An existing ``out_dir`` raises unless
    ``force``; with ``force`` it is replaced only after the new output is complete. An existing *file* is never
    replaced. Leftovers of killed runs (``.NAME.partial-*``) are removed under the lock, where no live run can
    own them.
    """
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, force)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _fault(e, parent, out_dir) from None
    lock = parent / f".{out_dir.name}.lock"
    with exclusive_lock(lock, f"another run is writing {out_dir} (lock {lock})"):
        check_output_dir(out_dir, force)  # again: the output may have appeared before we held the lock
        for p in stale_partials(out_dir):  # under the lock every partial belongs to a dead run
            shutil.rmtree(p, ignore_errors=True)
        tmp = parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
        except OSError as e:
            raise _fault(e, parent, out_dir) from None
        try:
            yield tmp
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and (err := _fault(e, parent, out_dir, tmp)) is not e:
                raise err from None
            raise
        old = None
        try:
            if out_dir.exists():
                old = parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
                out_dir.rename(old)
            tmp.rename(out_dir)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not out_dir.exists():
                old.rename(out_dir)
            raise _fault(e, parent, out_dir) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_output_dir(out_dir: Path, force: bool) -> None:
    """An output folder may be written: absent, or present and ``force``; a file is never replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output path {out_dir} is an existing file, not a folder; it is never replaced "
                                "(remove it or choose another output)")
    if out_dir.exists() and not force:
        raise OutputExistsError(f"output directory {out_dir} already exists; pass --force to replace it")


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
