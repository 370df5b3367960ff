"""``vlrm-rlhf demo``: the whole idea, end to end, on a laptop CPU.

Builds ShapesWorld, trains base / LVLM / text RM (cached), merges with every method, evaluates baselines and
merges on held-out pairs, sweeps task arithmetic's λ grid in memory (choosing on validation), reranks the
LVLM's best-of-n answers with the best VLRM, runs a short PPO with the merged reward, and writes
``report.md`` + ``report.json`` + PNG plots into the work directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VLRMError
from ..threads import adaptive_threads
from ..worlds.train import TrainConfig

LOCK = ".demo.lock"  # held in the work folder for the whole run: one demo per work folder


class DemoError(VLRMError, ValueError):
    """A work folder the demo may not use; the message names it."""


def _is_model_folder(d: Path, *, strict: bool) -> bool:
    """A Hugging Face model folder: config.json and weights (``strict``), or either of them."""
    config = (d / "config.json").is_file()
    weights = any(d.glob("*.safetensors")) or any(d.glob("*.bin")) or (d / "model.safetensors.index.json").is_file()
    return config and weights if strict else config or weights


def check_work_dir(work: str | Path) -> None:
    """Refuse a work folder that is, or lies inside, a model folder (symlinks resolved): the demo writes and
    replaces folders there. A demo work folder never holds config.json or weights itself."""
    w = Path(work).expanduser().resolve()
    if w.is_dir() and _is_model_folder(w, strict=False):
        raise DemoError(f"--work-dir {work} is a model folder (it holds config.json or weights), not a demo work "
                        "folder: choose an empty or new folder")
    inside = next((d for d in w.parents if _is_model_folder(d, strict=True)), None)
    if inside is not None:
        raise DemoError(f"--work-dir {work} lies inside the model folder {inside}: choose a folder outside it")


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of everything after training; ``quick`` is the CI variant."""

    val_per_cat: int = 100
    test_per_cat: int = 200
    unseen_per_cat: int = 100
    grid_lvlm: tuple[float, ...] = (0.0, 0.5, 1.0)
    grid_rm: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    bon_questions: int = 100
    bon_n: int = 8
    ppo_updates: int = 80
    ppo_batch: int = 16
    ppo_eval: int = 150
    llm_steps: int = 600
    reasoning_tasks_per_kind: int = 150

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(val_per_cat=8, test_per_cat=10, unseen_per_cat=6, grid_lvlm=(0.0, 1.0), grid_rm=(0.5, 1.0),
                   bon_questions=6, bon_n=4, ppo_updates=2, ppo_batch=4, ppo_eval=8, llm_steps=20,
                   reasoning_tasks_per_kind=6)


class _Clock:
    """Named stage timings, printed as they start."""

    def __init__(self, progress: bool):
        self.t: dict[str, float] = {}
        self.progress = progress
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str, msg: str, *, adaptive: bool = False) -> Iterator[None]:
        """Time a stage; ``adaptive`` runs it on the cores other processes leave free (only for stages whose
        results do not depend on the thread count: forward passes)."""
        if self.progress:
            print(f"[{time.perf_counter() - self._start:6.1f}s] {msg} ...", flush=True)
        t0 = time.perf_counter()
        with adaptive_threads() if adaptive else contextlib.nullcontext():
            yield
        self.t[name] = round(time.perf_counter() - t0, 1)


def run_demo(work_dir: str | Path = "runs/demo", *, seed: int = 0, quick: bool = False, with_reasoning: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Run every stage and write the report; returns ``report.json``'s content.

    The work folder may not be a model folder, and is locked for the run: a second demo there fails at once.
    """
    from ..files import exclusive_lock

    work = Path(work_dir)
    check_work_dir(work)
    work.mkdir(parents=True, exist_ok=True)
    lock = work / LOCK
    with exclusive_lock(lock, f"another demo is running in {work} (lock {lock})"):
        return _run(work, seed=seed, quick=quick, with_reasoning=with_reasoning, progress=progress)


def _run(work: Path, *, seed: int, quick: bool, with_reasoning: bool, progress: bool) -> dict[str, Any]:
    """Every stage of ``run_demo`` in a checked and locked work folder."""
    from ..eval.prefs import flat_accuracy
    from ..eval.records import load_pref_records
    from ..eval.sweep import run_sweep
    from ..files import write_bytes_atomic, write_json_atomic
    from ..merge import build
    from ..worlds.bench import eval_questions, write_benchmark
    from ..worlds.merges import METHOD_PARAMS, write_recipes
    from ..worlds.shapes import World
    from ..worlds.train import train_all
    from . import evaluate as ev
    from .report import plot_accuracy, plot_reward_curve, write_markdown
    from .rl import best_of_n_stage, ppo_stage

    cfg = TrainConfig.quick() if quick else TrainConfig()
    st = DemoSettings.quick() if quick else DemoSettings()
    clock = _Clock(progress)
    t_start = time.perf_counter()

    with clock.stage("world", "building ShapesWorld and its benchmark (VL-RewardBench format)"):
        world = World(seed, n_train=cfg.n_train)
        bench = write_benchmark(world, work / "bench", {"val": st.val_per_cat, "test": st.test_per_cat,
                                                        "test_unseen": st.unseen_per_cat}, seed)
    with clock.stage("train", "training base LM, LVLM and text RM (cached in models/)"):
        trained = train_all(work / "models", seed, cfg, progress=progress)
        dirs = trained["dirs"]
    with clock.stage("merge", f"merging with {len(METHOD_PARAMS)} methods"):
        recipes = write_recipes(dirs, work / "recipes", seed)
        merges = {m: build(p, work / "merges" / m, force=True, progress=False) for m, p in recipes.items()}

    splits = {s: load_pref_records(p) for s, p in bench.items()}
    raw = [json.loads(line) for p in bench.values() for line in p.read_text().splitlines()]
    descriptions = ev.descriptions_by_image([r for rs in splits.values() for r in rs], raw)

    with clock.stage("sweep", "sweeping task arithmetic's (λ_LVLM, λ_RM) grid in memory", adaptive=True):
        val, test = splits["val"], splits["test"]

        def evaluate(model, processor) -> dict[str, float]:
            from ..reward.scorer import VLRewardScorer

            sc = VLRewardScorer(model, processor, mode="vlrm")
            v, t = flat_accuracy(sc, val), flat_accuracy(sc, test)
            return {**{f"val_{k}": x for k, x in v.items()}, **{f"test_{k}": x for k, x in t.items()}}

        grid = {"lvlm.weight": list(st.grid_lvlm), "rm.weight": list(st.grid_rm)}
        swept = work / "merges" / "task_arithmetic_swept"
        sweep_rows = run_sweep(recipes["task_arithmetic"], grid, evaluate, out_dir=work / "sweep", metric="val_overall",
                               save_best=swept, seed=seed, progress=progress, force=True)
        merges["task_arithmetic_swept"] = swept
        sweep_best = max(sweep_rows, key=lambda r: r["val_overall"])

    with clock.stage("evaluate", "evaluating baselines and merges on validation, test and unseen-combination pairs", adaptive=True):
        res = ev.evaluate_all(ev.scorer_factories(dirs, merges, descriptions), splits, progress=progress)
        best = max(merges, key=lambda m: res["val"][m]["overall"])
        from ..reward.scorer import VLRewardScorer

        no_img = VLRewardScorer.from_pretrained(merges[best], mode="no_image")
        for s, recs in splits.items():
            res[s]["no_image"] = flat_accuracy(no_img, recs)

    with clock.stage("bon", "best-of-n: reranking the LVLM's sampled answers with the best VLRM", adaptive=True):
        items = eval_questions(world, st.bon_questions, seed)
        bon = best_of_n_stage(dirs["lvlm"], merges[best], items, st.bon_n, seed)
    with clock.stage("ppo", "PPO on the LVLM with the merged reward"):
        ppo = ppo_stage(world, dirs["lvlm"], merges[best], work, updates=st.ppo_updates, batch=st.ppo_batch,
                        seed=seed, eval_items=eval_questions(world, st.ppo_eval, seed + 1), progress=progress)

    with clock.stage("reward_study", "reward-source study: PPO and GRPO with each reward, against the gold judgement"):
        from ..study.demo import study_stage

        study = study_stage(work, dirs, merges, res["val"], best, seed=seed, quick=quick, progress=progress)

    reasoning = None
    if with_reasoning:
        from .reasoning import reasoning_stage

        with clock.stage("reasoning", "reasoning: training a text LLM, merging it into the LVLM, layer analyses",
                         adaptive=True):
            reasoning = reasoning_stage(world, dirs, work, seed=seed, quick=quick, steps=st.llm_steps,
                                        n_per_kind=st.reasoning_tasks_per_kind, progress=progress)

    acc = res["test"]
    gain_rm = 100 * (acc[best]["overall"] - acc["text_rm"]["overall"])
    gain_judge = 100 * (acc[best]["overall"] - acc["lvlm_judge"]["overall"])
    drop = 100 * (acc[best]["overall"] - acc["no_image"]["overall"])
    clock.t["total"] = round(time.perf_counter() - t_start, 1)
    order = ["text_rm", "lvlm_judge", "cascade", "text_rm_oracle", *METHOD_PARAMS,
             "task_arithmetic_swept", "no_image"]
    rep: dict[str, Any] = {
        "seed": seed, "quick": quick, "best_merge": best,
        "accuracy": acc, "accuracy_val": res["val"], "accuracy_unseen": res["test_unseen"],
        "targets": {"gain_over_text_rm_pts": gain_rm, "gain_over_lvlm_judge_pts": gain_judge,
                    "no_image_drop_pts": drop, "beats_text_rm": gain_rm >= 10, "beats_lvlm_judge": gain_judge >= 10,
                    "no_image_drop": drop >= 10},
        "sweep": sweep_rows, "sweep_best": sweep_best, "bon": bon,
        "ppo": {k: v for k, v in ppo.items() if k != "curve"}, "ppo_curve": ppo["curve"], "reward_study": study,
        "unseen_combos": sorted(world.unseen), "n_pairs": {s: len(r) for s, r in splits.items()},
        "training": trained["log"], "models_cached": trained["cached"], "timings": clock.t,
        "train_config": json.loads(cfg.key()),
    }
    if reasoning is not None:
        rep["reasoning"] = reasoning
    _check_finite(rep["accuracy"])
    plot_accuracy(acc, [n for n in order if n in acc], work / "accuracy.png",
                  f"ShapesWorld preference accuracy, test pairs (seed {seed})")
    if ppo["curve"]:
        plot_reward_curve(ppo["curve"], work / "reward_curve.png", f"PPO with the merged reward ({best})",
                          gold=ppo["gold_curve"])
    write_bytes_atomic((work / "sweep" / "sweep.png").read_bytes(), work / "sweep.png", force=True)
    write_markdown(rep, [n for n in order if n in acc], work / "report.md")
    write_json_atomic(rep, work / "report.json", force=True)  # last: its presence means the run completed
    if progress:
        print(f"[{clock.t['total']:6.1f}s] wrote {work / 'report.md'} and {work / 'report.json'}", flush=True)
    return rep


def _check_finite(acc: dict[str, dict[str, float]]) -> None:
    bad = [f"{n}.{k}" for n, a in acc.items() for k, v in a.items() if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite accuracies in the report: {bad}")
