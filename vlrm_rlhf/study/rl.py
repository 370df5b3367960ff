"""``vlrm-rlhf study rl``: which reward trains the better ShapesWorld policy, measured against the truth.

For each seed the demo's cached models are reused (``WORK/demo_s{seed}``; the demo runs first where its
``report.json`` is missing). The LVLM policy is trained with PPO (``VLPPOTrainer``) and GRPO (TRL
``GRPOTrainer``), same prompts, budget (completions), learning rate and KL coefficient, once per reward source:

* ``text_rm`` — the text RM on the question only; ``lvlm_judge`` — the LVLM's log-likelihood of the answer;
  ``cascade`` — LVLM caption → text RM; ``vlrm`` — the best merge on validation pairs (as the demo picks it);
  ``ensemble`` — the mean of the ``k`` best merges on validation (each member standardised on the initial
  policy's answers); ``gold`` — the world's answer quality (the upper bound).

A :class:`~vlrm_rlhf.trainers.gold_check.GoldCheckCallback` measures gold quality, the proxy reward and the KL
to the starting policy on validation prompts (used for any selection) and test prompts (reported). Best-of-n
from the starting policy, at its analytic KL ``log n − (n−1)/n``, is computed per source on the same test
prompts. Every finished run is cached as JSON, so an interrupted study resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .rewards import StudyError
from .runs import ALGOS, SOURCES, StudySettings, best_of_n, load_run, prepare_seed, run_one, save_run

__all__ = ["default_workers", "run_study"]


def default_workers() -> int:
    """One study worker process per usable core, at most 4 (each holds its own copy of the small models)."""
    from ..threads import usable_cores

    return max(1, min(4, len(usable_cores())))


# ---- the study ----------------------------------------------------------------------------------------------------
def run_study(work_dir: str | Path = "runs/study", *, seeds: Sequence[int] = (0, 1, 2), algos: Sequence[str] = ALGOS,
              sources: Sequence[str] = SOURCES, demo_dir: str | None = None, quick: bool = False,
              settings: StudySettings | None = None, progress: bool = True,
              prepared: dict[int, dict[str, Any]] | None = None, with_bon: bool = True,
              make_demo: Callable[..., Any] | None = None, workers: int = 1) -> dict[str, Any]:
    """Run (or resume) every (seed, algorithm, source) and write ``results.json``, ``table.md`` and plots.

    ``prepared`` maps a seed to what :func:`prepare_seed` returns (the demo passes its own models and merges).
    Runs train on one thread each (their numbers depend on the thread count); with ``workers`` > 1 a seed's
    missing runs are spread over that many child processes, with the same results."""
    from ..threads import pinned_threads

    with pinned_threads(1):
        return _run_study(work_dir, seeds=seeds, algos=algos, sources=sources, demo_dir=demo_dir, quick=quick,
                          settings=settings, progress=progress, prepared=prepared, with_bon=with_bon,
                          make_demo=make_demo, workers=workers)


def _run_study(work_dir: str | Path, *, seeds: Sequence[int], algos: Sequence[str], sources: Sequence[str],
               demo_dir: str | None, quick: bool, settings: StudySettings | None, progress: bool,
               prepared: dict[int, dict[str, Any]] | None, with_bon: bool, make_demo: Callable[..., Any] | None,
               workers: int) -> dict[str, Any]:
    """``run_study``'s body, on one thread."""
    from ..worlds.shapes import World
    from ..worlds.train import TrainConfig
    from .parallel import run_in_workers
    from .plots import plot_overoptimization
    from .report import per_seed_markdown, summarize, table_markdown, targets

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    st = settings or (StudySettings.quick() if quick else StudySettings())
    for a in algos:
        if a not in ALGOS:
            raise StudyError(f"unknown algorithm {a!r}; choose from {', '.join(ALGOS)}")
    for s in sources:
        if s not in SOURCES:
            raise StudyError(f"unknown reward source {s!r}; choose from {', '.join(SOURCES)}")
    cfg = TrainConfig.quick() if quick else TrainConfig()
    runs: list[dict[str, Any]] = []
    bon: dict[int, dict[str, list]] = {}
    preps: dict[int, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for seed in seeds:
        if prepared and seed in prepared:
            prep = preps[seed] = prepared[seed]
        else:
            ddir = Path((demo_dir or str(work / "demo_s{seed}")).format(seed=seed))
            prep = preps[seed] = prepare_seed(ddir, seed, quick=quick, progress=progress, make_demo=make_demo)
        world = World(seed, n_train=cfg.n_train)
        sdir = work / f"seed{seed}"
        sdir.mkdir(parents=True, exist_ok=True)
        bon_path = sdir / "bon.json"
        calib: list = []
        calib_bon_n: tuple[int, ...] | None = None  # the best-of-n sizes whose samples calibrate the ensemble
        cached = load_run(bon_path, st, bon=True)
        if not with_bon or (cached is not None and set(sources) <= set(cached)):
            bon[seed] = cached if with_bon else {}
            if "ensemble" in sources:
                calib_bon_n = (1,)
                best_of_n(world, prep, replace(st, bon_n=calib_bon_n), seed, [], calib)  # members' calibration
        else:
            bon[seed] = best_of_n(world, prep, st, seed, sources, calib)
            calib_bon_n = st.bon_n
            save_run(bon_path, st, bon[seed], bon=True)
        todo = [(a, s) for a in algos for s in sources if load_run(sdir / f"{a}_{s}.json", st) is None]
        if workers > 1 and len(todo) > 1:
            if progress:
                print(f"[{time.perf_counter() - t_start:7.1f}s] seed {seed}: {len(todo)} runs in "
                      f"{min(workers, len(todo))} processes ...", flush=True)
            run_in_workers(todo, prep, st, seed, sdir, quick=quick, workers=workers,
                           calib_bon_n=calib_bon_n if "ensemble" in sources else None)
        for algo in algos:
            for source in sources:
                path = sdir / f"{algo}_{source}.json"
                res = load_run(path, st)
                if res is None:
                    if progress:
                        print(f"[{time.perf_counter() - t_start:7.1f}s] seed {seed}: {algo} with {source} ...", flush=True)
                    res = run_one(algo, source, world, prep, st, seed, sdir / f"{algo}_{source}", calib,
                                  progress=False)
                    save_run(path, st, res)
                runs.append(res)
    summary = summarize(runs, bon)
    result = {"settings": asdict(st), "seeds": list(seeds), "algos": list(algos), "sources": list(sources),
              "best_merge": {s: p["best_name"] for s, p in preps.items()},
              "ensemble_members": {s: [d.name for d in p["ranked_merges"][:st.ensemble_k]] for s, p in preps.items()},
              "summary": summary, "targets": targets(runs), "bon": {str(k): v for k, v in bon.items()},
              "runs": runs, "seconds": round(time.perf_counter() - t_start, 1)}
    from ..files import write_json_atomic

    (work / "table.md").write_text(table_markdown(summary, algos, sources) + "\nFinal greedy gold 'both' (%) per seed:\n\n"
                                   + per_seed_markdown(runs, algos, sources))
    plot_overoptimization(runs, bon, algos, sources, work / "overoptimization.png")
    write_json_atomic(result, work / "results.json", force=True)
    if progress:
        print(table_markdown(summary, algos, sources))
        print(f"wrote {work / 'results.json'}, {work / 'table.md'}, {work / 'overoptimization.png'} "
              f"({result['seconds']:.0f} s)", flush=True)
    return result
