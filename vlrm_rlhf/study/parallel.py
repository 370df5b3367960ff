"""The study's trainings in child processes, one thread each: a run's numbers depend on the thread count
(LayerNorm's backward in the LVLM policy), so runs are spread over processes rather than threads, and give
exactly what the same runs give one after another in the main process."""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..worlds.children import run_children

__all__ = ["run_in_workers", "worker"]


def run_in_workers(runs: list[tuple[str, str]], prep: dict[str, Any], st: Any, seed: int, sdir: Path, *,
                   quick: bool, calib_bon_n: tuple[int, ...] | None, workers: int) -> None:
    """Train every ``(algorithm, source)`` of ``runs`` in ``workers`` child processes and cache each result where
    ``run_study`` reads it. Each worker takes the next unclaimed run (a claim file), so none idles while runs
    are left. ``calib_bon_n``: the best-of-n sizes whose samples calibrate the
    ensemble's members in the parent (the workers draw the same samples), or None without an ensemble run."""
    claims = [_claim_path(sdir, algo, source) for algo, source in runs]
    for c in claims:  # left by an interrupted study: the run was not finished (its result is not cached)
        c.unlink(missing_ok=True)
    paths = {"models": {k: str(v) for k, v in prep["models"].items()}, "best": str(prep["best"]),
             "ranked_merges": [str(d) for d in prep["ranked_merges"]], "best_name": prep["best_name"],
             "val_accuracy": prep["val_accuracy"]}
    jobs = {f"worker{i}": {"runs": [list(r) for r in runs], "prep": paths, "settings": asdict(st), "seed": seed,
                           "sdir": str(sdir), "quick": quick,
                           "calib_bon_n": list(calib_bon_n) if calib_bon_n else None}
            for i in range(min(workers, len(runs)))}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        run_children(jobs, "vlrm_rlhf.study.parallel:worker", env=env)
    finally:
        for c in claims:
            c.unlink(missing_ok=True)


def _claim_path(sdir: Path, algo: str, source: str) -> Path:
    return Path(sdir) / f".{algo}_{source}.claim"


def _claim(path: Path) -> bool:
    """Take a run for this worker (atomic: exactly one worker creates the claim file)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def worker(runs: list[list[str]], prep: dict[str, Any], settings: dict[str, Any], seed: int, sdir: str, quick: bool,
           calib_bon_n: list[int] | None) -> dict[str, Any]:
    """One child: on one thread, train every run of ``runs`` no other worker has claimed, caching each result;
    returns the names it trained."""
    import torch

    from ..worlds.shapes import World
    from ..worlds.train import TrainConfig
    from .runs import StudySettings, best_of_n, run_one, save_run

    torch.set_num_threads(1)
    st = StudySettings(**{**settings, "bon_n": tuple(settings["bon_n"])})
    prep = {"models": {k: Path(v) for k, v in prep["models"].items()}, "best": Path(prep["best"]),
            "ranked_merges": [Path(d) for d in prep["ranked_merges"]], "best_name": prep["best_name"],
            "val_accuracy": prep["val_accuracy"]}
    cfg = TrainConfig.quick() if quick else TrainConfig()
    world = World(seed, n_train=cfg.n_train)
    calib: list = []
    done = []
    for algo, source in runs:
        if not _claim(_claim_path(Path(sdir), algo, source)):
            continue  # another worker has it
        if source == "ensemble" and calib_bon_n and not calib:  # the parent's calibration samples, drawn again
            best_of_n(world, prep, replace(st, bon_n=tuple(calib_bon_n)), seed, [], calib)
        res = run_one(algo, source, world, prep, st, seed, Path(sdir) / f"{algo}_{source}", calib, progress=False)
        save_run(Path(sdir) / f"{algo}_{source}.json", st, res)
        done.append(f"{algo}_{source}")
    return {"done": done}
