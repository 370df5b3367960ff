"""Torch thread counts that follow the cores other processes leave free.

On a shared machine a stage running one thread per core slows down ~10x once another busy process takes a core
(its threads wait on each other at every barrier), while one thread wastes the second core when the machine is
idle. ``adaptive_threads`` measures, every few seconds, how much CPU other processes used and sets torch's
intra-op thread count to the cores they left free.

Use it only where results do not depend on the thread count: forward passes, and training of the Llama-only
models (``tests/test_stage_threads.py`` compares bits). LayerNorm's backward (the CLIP vision tower) sums in a
thread-dependent order, so LVLM training runs on a fixed count (``pinned_threads``) to stay reproducible.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import torch

__all__ = ["ThreadGovernor", "adaptive_threads", "pinned_threads", "tick", "usable_cores"]

SLACK = 0.3  # a core counts as free when others use at most this much of it


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity set; all CPUs where affinity is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return list(range(os.cpu_count() or 1))


def _busy_seconds(cpus: list[int]) -> float:
    """CPU seconds spent not idle on ``cpus`` since boot, all processes together."""
    per = psutil.cpu_times(percpu=True)
    return sum(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
               + getattr(t, "steal", 0.0) for i, t in enumerate(per) if i in cpus)


def threads_for(others: float, cores: int) -> int:
    """Threads to run when other processes keep ``others`` cores busy out of ``cores`` (at least one)."""
    return max(1, min(cores, int(cores - others + SLACK)))


class ThreadGovernor:
    """Re-balances torch's thread count from other processes' CPU use over the last ``interval`` seconds."""

    def __init__(self, *, interval: float = 3.0, max_threads: int | None = None, probe: float = 0.2):
        self.cpus = usable_cores()
        self.max = min(max_threads or len(self.cpus), len(self.cpus))
        self.interval = interval
        self._proc = psutil.Process()
        self.history: list[tuple[float, float, int]] = []  # (seconds since start, others' busy cores, threads)
        self._t0 = time.monotonic()
        self._mark()
        if probe > 0:  # a short first look, so the first interval does not run on a guess
            time.sleep(probe)
            self.tick(force=True)
        else:
            torch.set_num_threads(1)

    def _mark(self) -> None:
        self._t, self._busy, self._own = time.monotonic(), _busy_seconds(self.cpus), self._own_seconds()

    def _own_seconds(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    def tick(self, *, force: bool = False) -> int:
        """Set the thread count if ``interval`` seconds passed since the last look (or ``force``); returns it."""
        now = time.monotonic()
        if not force and now - self._t < self.interval:
            return torch.get_num_threads()
        busy, own = _busy_seconds(self.cpus), self._own_seconds()
        others = max(0.0, ((busy - self._busy) - (own - self._own)) / max(now - self._t, 1e-3))
        n = threads_for(others, self.max)
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.history.append((round(now - self._t0, 1), round(others, 2), n))
        self._t, self._busy, self._own = now, busy, own
        return n


_ACTIVE: list[ThreadGovernor | None] = []  # innermost last; None: a pinned stage


@contextmanager
def adaptive_threads(**kwargs) -> Iterator[ThreadGovernor]:
    """Run a stage under a ``ThreadGovernor`` (``tick()`` re-balances it); restores the thread count after."""
    before = torch.get_num_threads()
    gov = ThreadGovernor(**kwargs)
    _ACTIVE.append(gov)
    try:
        yield gov
    finally:
        _ACTIVE.remove(gov)
        torch.set_num_threads(before)


@contextmanager
def pinned_threads(n: int = 1) -> Iterator[None]:
    """Run a stage on exactly ``n`` torch threads (no governor: ``tick`` does nothing inside), then restore the
    count. For stages whose results depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    _ACTIVE.append(None)
    try:
        yield
    finally:
        _ACTIVE.pop()
        torch.set_num_threads(before)


def tick() -> None:
    """Let the innermost active governor re-balance (cheap: it looks only every ``interval`` seconds)."""
    if _ACTIVE and _ACTIVE[-1] is not None:
        _ACTIVE[-1].tick()
