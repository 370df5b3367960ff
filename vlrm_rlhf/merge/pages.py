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

import torch

__all__ = ["PAGE", "release"]

PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if os.name == "posix" else None


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
