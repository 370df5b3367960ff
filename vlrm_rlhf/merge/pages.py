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
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["PAGE", "mapped_inputs", "release", "release_mapped"]

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
