"""Child processes that die with their parent: the demo trains its LVLM and text RM in two of them at once.

``run_children`` starts one fresh interpreter per job (no fork, so no ``__main__`` rules) that calls
``target(**job)`` (``"module:function"``) and returns its JSON result. A child never outlives the run that
started it: it asks the kernel to kill it when its parent dies (Linux ``PR_SET_PDEATHSIG``, set before anything
heavy is imported), watches its parent's pid as a second guard (and on systems without ``prctl``), and the parent
terminates every child still running when it stops early (a failed job, Ctrl-C, any exception).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ChildJobError", "run_children"]

# The child's whole program: kept free of package imports so that the death signal is set within milliseconds.
_CHILD = r"""
import ctypes, importlib, json, os, signal, sys, threading, time
spec = json.loads(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
except (OSError, AttributeError):
    pass
if os.getppid() != spec["parent"]:  # the parent died before the line above took effect
    sys.exit(1)

def watch():
    while os.getppid() == spec["parent"]:
        time.sleep(0.5)
    os._exit(1)

threading.Thread(target=watch, daemon=True).start()
module, _, name = spec["target"].partition(":")
result = getattr(importlib.import_module(module), name)(**spec["job"])
with open(spec["result"], "w") as f:
    json.dump(result, f)
"""


class ChildJobError(RuntimeError):
    """A child job failed; the message names the job and ends with its error output."""


def run_children(jobs: Mapping[str, Mapping[str, Any]], target: str, *, env: Mapping[str, str] | None = None,
                 poll_s: float = 0.2) -> dict[str, Any]:
    """Run ``target(**job)`` for every job in its own process, all at once; return ``{name: result}``.

    The first failure terminates the other children and raises ``ChildJobError``; so does any exception in the
    parent (e.g. ``KeyboardInterrupt``). Call from the main thread: the kernel's death signal follows the thread
    that started the child.
    """
    procs: dict[str, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory(prefix="vlrm-children-") as tmp:
        logs = {k: Path(tmp) / f"{k}.err" for k in jobs}
        try:
            for k, job in jobs.items():
                spec = {"target": target, "job": dict(job), "result": str(Path(tmp) / f"{k}.json"),
                        "parent": os.getpid()}
                with logs[k].open("w") as err:
                    procs[k] = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)],
                                                env=dict(env) if env is not None else None,
                                                stdout=subprocess.DEVNULL, stderr=err)
            while None in (codes := [p.poll() for p in procs.values()]):  # poll every child, every round
                if any(c not in (None, 0) for c in codes):
                    break  # one failed: stop the others now rather than after their work
                time.sleep(poll_s)
            failed = [k for k, p in procs.items() if p.returncode not in (None, 0)]
            if failed:
                raise ChildJobError("; ".join(f"{k} failed (exit {procs[k].returncode}): "
                                              f"{logs[k].read_text(errors='replace')[-3000:].strip()}" for k in failed))
            return {k: json.loads((Path(tmp) / f"{k}.json").read_text()) for k in jobs}
        finally:
            _stop(procs.values())


def _stop(procs) -> None:
    """Terminate (then kill) every child still running, and reap them all."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + 5
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
