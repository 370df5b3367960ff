"""Demo training stages run on one torch thread in the main process, as its child processes do."""

from __future__ import annotations

import torch

import vlrm_rlhf.worlds.train as train
from vlrm_rlhf.worlds.training_utils import pinned_threads


def test_pinned_threads_sets_and_restores():
    before = torch.get_num_threads()
    with pinned_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_train_all_trains_the_base_and_sequential_jobs_on_one_thread(tmp_path, monkeypatch):
    seen = {}

    def fake_base(world, cfg, out, seed, progress=True):
        seen["base"] = torch.get_num_threads()
        out.mkdir(parents=True, exist_ok=True)
        return {"loss": 0.0}

    def fake_job(kind, seed, cfg, base_dir, out, progress=False):
        seen[kind] = torch.get_num_threads()
        out.mkdir(parents=True, exist_ok=True)
        return {"loss": 0.0}

    monkeypatch.setattr(train, "train_base", fake_base)
    monkeypatch.setattr(train, "_train_job", fake_job)
    monkeypatch.setattr(train, "World", lambda *a, **k: None)
    torch.set_num_threads(2)
    try:
        train.train_all(tmp_path, 0, train.TrainConfig.quick(), progress=False, parallel=False)
        assert seen == {"base": 1, "lvlm": 1, "rm": 1}
        assert torch.get_num_threads() == 2, "the caller's thread count is restored"
    finally:
        torch.set_num_threads(1)
