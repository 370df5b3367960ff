"""Demo stages run as many torch threads as other processes leave cores free, and the count does not change
what the tiny models learn."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

import vlrm_rlhf.threads as threads
import vlrm_rlhf.worlds.train as train
from vlrm_rlhf.threads import ThreadGovernor, adaptive_threads, threads_for


@pytest.mark.parametrize(("others", "cores", "want"), [(0.0, 2, 2), (0.25, 2, 2), (0.5, 2, 1), (1.0, 2, 1),
                                                       (1.9, 2, 1), (3.0, 2, 1), (0.0, 1, 1), (1.2, 8, 7)])
def test_threads_for_leaves_the_busy_cores_alone(others, cores, want):
    assert threads_for(others, cores) == want


class _FakeClock:
    """Other processes' CPU use, advanced by hand: ``busy`` cores for ``dt`` seconds."""

    def __init__(self, monkeypatch):
        self.t, self.busy_s = 1000.0, 0.0
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.t)
        monkeypatch.setattr(threads.time, "sleep", lambda s: self.run(0.0, s))
        monkeypatch.setattr(threads, "_busy_seconds", lambda cpus: self.busy_s)
        monkeypatch.setattr(threads, "usable_cores", lambda: [0, 1])

    def run(self, busy: float, dt: float) -> None:
        self.t += dt
        self.busy_s += busy * dt


def test_governor_follows_other_processes_and_restores(monkeypatch):
    clock = _FakeClock(monkeypatch)
    monkeypatch.setattr(ThreadGovernor, "_own_seconds", lambda self: 0.0)
    torch.set_num_threads(1)
    try:
        with adaptive_threads(interval=3.0) as gov:
            assert torch.get_num_threads() == 2, "idle machine: both cores"
            clock.run(1.0, 1.0)
            assert gov.tick() == 2, "looks again only after the interval"
            clock.run(1.0, 3.0)
            assert gov.tick() == 1 and torch.get_num_threads() == 1, "a busy neighbour takes a core"
            clock.run(0.05, 3.0)
            threads.tick()
            assert torch.get_num_threads() == 2, "the neighbour left"
            assert [h[2] for h in gov.history] == [2, 1, 2]
        assert torch.get_num_threads() == 1, "the caller's count is restored"
    finally:
        torch.set_num_threads(1)


def test_governor_measures_a_real_busy_process():
    """A spinning child process adds about one busy core (this process's own CPU time is not counted)."""
    before = ThreadGovernor(interval=0.0, probe=1.0).history[-1][1]  # whatever else the machine is doing
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<4: pass"])
    try:
        time.sleep(0.5)
        gov = ThreadGovernor(interval=0.0, probe=1.0)
        others = gov.history[-1][1]
        assert min(gov.max - 0.2, before + 0.6) <= others <= before + 1.4, (before, gov.history)
        assert gov.history[-1][2] == threads_for(others, gov.max)
    finally:
        child.kill()
        child.wait()
        torch.set_num_threads(1)


def test_training_is_bit_identical_on_one_and_two_threads(tmp_path):
    """The governor may change the thread count mid-run: the tiny models' weights must not depend on it."""
    from safetensors.torch import load_file

    from vlrm_rlhf.worlds.shapes import World

    cfg = train.TrainConfig.quick()
    world = World(0, n_train=cfg.n_train)
    out = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        train.train_base(world, cfg, tmp_path / f"t{n}", 0, progress=False)
        out[n] = load_file(tmp_path / f"t{n}" / "model.safetensors")
    torch.set_num_threads(1)
    assert out[1].keys() == out[2].keys()
    assert all(torch.equal(out[1][k], out[2][k]) for k in out[1])


def test_train_all_runs_every_stage_under_the_governor(tmp_path, monkeypatch):
    seen = []

    def fake_base(world, cfg, out, seed, progress=True):
        seen.append(("base", len(threads._ACTIVE)))
        out.mkdir(parents=True, exist_ok=True)
        return {"loss": 0.0}

    def fake_job(kind, seed, cfg, base_dir, out, progress=False):
        seen.append((kind, len(threads._ACTIVE)))
        out.mkdir(parents=True, exist_ok=True)
        return {"loss": 0.0}

    monkeypatch.setattr(train, "train_base", fake_base)
    monkeypatch.setattr(train, "_train_job", fake_job)
    monkeypatch.setattr(train, "World", lambda *a, **k: None)
    torch.set_num_threads(1)
    train.train_all(tmp_path, 0, train.TrainConfig.quick(), progress=False, parallel=False)
    assert seen == [("base", 1), ("lvlm", 1), ("rm", 1)]
    assert torch.get_num_threads() == 1 and not threads._ACTIVE
