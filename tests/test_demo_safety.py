"""The demo never outlives itself and never shares or overwrites a folder: child processes die with it, one demo
per work folder, and a model folder is never a work folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vlrm_rlhf.worlds.children as children_module
from vlrm_rlhf.files import OutputBusyError, exclusive_lock

# A "demo-like" parent: imports the children runner without the package's heavy __init__ (fast to start) and
# runs two jobs of the tiny module below, which write their pid and then sleep (or fail).
_PARENT = """
import sys, types
pkg = types.ModuleType("vlrm_rlhf"); pkg.__path__ = [sys.argv[1]]; sys.modules["vlrm_rlhf"] = pkg
from vlrm_rlhf.worlds.children import run_children
import json
jobs = json.loads(sys.argv[2])
print(json.dumps(run_children(jobs, "tinyjob:run")), flush=True)
"""
_JOB = """
import os, sys, time
from pathlib import Path

def run(pidfile, seconds, fail=False):
    Path(pidfile).write_text(str(os.getpid()))
    if fail:
        sys.exit("tiny job failed on purpose")
    time.sleep(seconds)
    return {"pid": os.getpid()}
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _start_parent(tmp_path: Path, jobs: dict) -> subprocess.Popen:
    (tmp_path / "tinyjob.py").write_text(_JOB)
    pkg = str(Path(children_module.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(pkg).parent)])}
    return subprocess.Popen([sys.executable, "-c", _PARENT, pkg, json.dumps(jobs)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_pids(tmp_path: Path, names: list[str], timeout: float = 60) -> list[int]:
    deadline = time.time() + timeout
    files = [tmp_path / f"{n}.pid" for n in names]
    while time.time() < deadline and not all(f.exists() and f.read_text() for f in files):
        time.sleep(0.05)
    return [int(f.read_text()) for f in files]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_children_die_when_the_parent_is_killed(tmp_path):
    jobs = {k: {"pidfile": str(tmp_path / f"{k}.pid"), "seconds": 120} for k in ("lvlm", "rm")}
    parent = _start_parent(tmp_path, jobs)
    pids = _wait_pids(tmp_path, ["lvlm", "rm"])
    assert all(map(_alive, pids))
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 5
    while time.time() < deadline and any(map(_alive, pids)):
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "training children outlived the killed parent"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_failed_child_stops_the_other_at_once(tmp_path):
    jobs = {"lvlm": {"pidfile": str(tmp_path / "lvlm.pid"), "seconds": 120},
            "rm": {"pidfile": str(tmp_path / "rm.pid"), "seconds": 0, "fail": True}}
    t0 = time.time()
    parent = _start_parent(tmp_path, jobs)
    out, err = parent.communicate(timeout=90)
    assert parent.returncode != 0 and "rm failed (exit 1): tiny job failed on purpose" in err, err
    assert time.time() - t0 < 60
    (lvlm,) = _wait_pids(tmp_path, ["lvlm"], timeout=1)
    assert not _alive(lvlm)


def test_children_return_their_results(tmp_path):
    jobs = {k: {"pidfile": str(tmp_path / f"{k}.pid"), "seconds": 0} for k in ("a", "b")}
    parent = _start_parent(tmp_path, jobs)
    out, err = parent.communicate(timeout=90)
    assert parent.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert {k: v["pid"] for k, v in res.items()} == dict(zip("ab", _wait_pids(tmp_path, ["a", "b"]), strict=True))


def _demo_must_not_start(monkeypatch):
    import vlrm_rlhf.worlds.bench as bench

    def refuse(*a, **k):
        raise AssertionError("the demo started working")

    monkeypatch.setattr(bench, "write_benchmark", refuse)


def test_second_demo_in_one_work_folder_fails_at_once(tmp_path, monkeypatch):
    from vlrm_rlhf.demo.run import LOCK, run_demo

    _demo_must_not_start(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    with exclusive_lock(work / LOCK, "held by the first demo"), \
            pytest.raises(OutputBusyError, match=rf"another demo is running in {work} \(lock .*\.demo\.lock\)"):
        run_demo(work, quick=True, progress=False)


def test_work_dir_over_a_model_folder_is_refused(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    _demo_must_not_start(monkeypatch)
    model = tmp_path / "my-rm"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    for work, msg in ((model, f"--work-dir {model} is a model folder"),
                      (model / "demo", f"--work-dir {model / 'demo'} lies inside the model folder {model}")):
        res = CliRunner().invoke(app, ["demo", "--work-dir", str(work), "--quick"])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {msg}"), res.output
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
