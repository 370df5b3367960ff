"""Give memory-mapped input pages back to the kernel once a merge has consumed them.

A merge reads tens of GB of memory-mapped safetensors; left alone, every touched page stays mapped and counts as
the process's file-backed RSS (and against a cgroup memory limit) until the end. ``release`` drops the mapping of a
consumed element range (``madvise(MADV_DONTNEED)``): the data stays in the page cache, so a later read of the same
range is a minor fault, never a wrong value (the mappings are never written).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch

__all__ = ["PAGE", "Prefetcher", "mapped_inputs", "release", "release_mapped"]

PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if os.name == "posix" else None
_CURRENT: ContextVar[frozenset[int]] = ContextVar("vlrm_mapped_inputs", default=frozenset())


@contextmanager
def mapped_inputs(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Within this block, ``release_mapped`` may drop pages of ``tensors`` (file-mapped inputs the caller holds
    alive): lets whole-tensor passes deep in the merge math (top-k thresholds) give pages back as they go."""
    token = _CURRENT.set(frozenset(t.untyped_storage().data_ptr() for t in tensors))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def release_mapped(t: torch.Tensor, start: int = 0, end: int | None = None) -> None:
    """``release`` when ``t`` views one of the current ``mapped_inputs``; nothing for any other tensor."""
    if _CURRENT.get() and t.untyped_storage().data_ptr() in _CURRENT.get():
        release(t, start, end)


def release(t: torch.Tensor, start: int = 0, end: int | None = None) -> None:
    """Unmap the whole pages inside elements ``[start, end)`` of the file-backed contiguous tensor ``t``.

    Only for tensors memory-mapped from a file (``Checkpoint.get`` of a safetensors checkpoint): on anonymous
    memory MADV_DONTNEED would zero the data. Page-rounding is inward at the start and outward at the end of the
    tensor, so the pages shared with neighbours are only released once the tensor's last element is consumed.
    """
    if _libc is None or not t.is_contiguous() or t.device.type != "cpu":
        return
    n = t.numel() if end is None else min(end, t.numel())
    es = t.element_size()
    addr0 = t.data_ptr()
    a = addr0 + start * es
    b = addr0 + n * es
    a = -(-a // PAGE) * PAGE if start > 0 else a // PAGE * PAGE
    b = b // PAGE * PAGE if n < t.numel() else -(-b // PAGE) * PAGE
    if b > a:
        _libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED)


Range = tuple[Path, int, int]  # a file and a byte range [start, end) in it


class Prefetcher:
    """Reads the inputs of a merge ahead of it: a background thread asks the kernel to read the next steps (each
    step: the byte ranges of the input tensors of one output tensor, read in lockstep) into the page cache while the
    merge computes the current one, at most ``window`` bytes ahead of the position the merge reports (``at``).

    Requests (``posix_fadvise(WILLNEED)``, asynchronous, issued without holding the GIL) cover ``piece`` bytes of a
    step at a time, split over its inputs: the kernel reads at most its readahead size per call and drops the rest,
    so pieces stay small. A hint only: no page is mapped (RSS does not grow), and a step read out of order, or pages
    evicted under memory pressure, only cost a normal read. Behind the merge, the same thread drops the pages of
    consumed steps from the page cache (``done``, with ``drop``): a merge larger than memory then never fills it.
    """

    def __init__(self, steps: list[list[Range]], window: int = 512 << 20, piece: int = 4 << 20, *,
                 drop: bool = False):
        self._steps = [_unique(rs) for rs in steps]
        self.drop = drop  # ``done`` drops consumed steps from the page cache (may be set before entering)
        self._bytes = [sum(e - s for _, s, e in rs) for rs in self._steps]
        self._start = [0]
        for b in self._bytes:
            self._start.append(self._start[-1] + b)
        self._window, self._piece = window, piece
        self._pos = 0  # bytes of the steps the merge has consumed
        self._cv = threading.Condition()
        self._stop = False
        self._drops: list[Range] = []  # consumed ranges the reader thread is to drop from the page cache
        self._fds: dict[Path, int] = {}
        self._thread = threading.Thread(target=self._run, name="merge-prefetch", daemon=True)

    @property
    def nbytes(self) -> int:
        """Bytes of input the steps read (a range shared by steps counted once per step)."""
        return self._start[-1]

    def __enter__(self) -> Prefetcher:
        if hasattr(os, "posix_fadvise"):
            for path in dict.fromkeys(p for rs in self._steps for p, _, _ in rs):
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError:  # a hint: the merge opens the file itself and reports the error
                    pass
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join()
        for path, s, e in self._drops:  # consumed after the reader stopped
            _advise(self._fds.get(path), s, e - s, "POSIX_FADV_DONTNEED")
        for fd in self._fds.values():
            os.close(fd)

    def at(self, step: int, fraction: float = 0.0) -> None:
        """The merge is ``fraction`` of the way through step ``step``: let the reader run up to a window past it."""
        pos = self._start[step] + int(fraction * self._bytes[step])
        with self._cv:
            if pos > self._pos:
                self._pos = pos
                self._cv.notify()

    def done(self, step: int) -> None:
        """Step ``step`` is consumed: the reader thread drops its pages from the page cache
        (``posix_fadvise(DONTNEED)``), so a merge larger than memory never makes the kernel reclaim the cache under
        pressure. Only with ``drop``; only whole, unmapped pages go (``release`` them first); a range needed again
        is just read again."""
        if self.drop:
            with self._cv:
                self._drops.extend(self._steps[step])
                self._cv.notify()

    def _requests(self) -> Iterator[tuple[int, list[Range]]]:
        """The read-ahead requests in order: (position in the steps' bytes, the ranges to ask for)."""
        for i, rs in enumerate(self._steps):
            size, done = self._bytes[i], 0
            while done < size:
                step = min(size - done, self._piece)
                # the same fraction of every input: the merge reads them in lockstep
                yield self._start[i] + done, [(path, s + (e - s) * done // size, s + -(-(e - s) * (done + step) // size))
                                              for path, s, e in rs]
                done += step

    def _run(self) -> None:
        ahead = self._requests()
        nxt = next(ahead, None)
        while True:
            with self._cv:
                while not (self._stop or self._drops or (nxt is not None and nxt[0] < self._pos + self._window)):
                    self._cv.wait()
                if self._stop:
                    return
                drops, self._drops = self._drops, []
            for path, s, e in drops:
                _advise(self._fds.get(path), s, e - s, "POSIX_FADV_DONTNEED")
            if nxt is not None and nxt[0] < self._pos + self._window:
                for path, s, e in nxt[1]:
                    _advise(self._fds.get(path), s, e - s, "POSIX_FADV_WILLNEED")
                nxt = next(ahead, None)


def _advise(fd: int | None, offset: int, length: int, advice: str) -> None:
    """``posix_fadvise`` ignoring errors (a hint; the merge reads the file itself and reports any error)."""
    if fd is not None and length > 0:
        try:
            os.posix_fadvise(fd, offset, length, getattr(os, advice))
        except OSError:
            pass


def _unique(rs: list[Range]) -> list[Range]:
    """``rs`` without repeats (a base standing in for a model that lacks a tensor)."""
    return list(dict.fromkeys(rs))
