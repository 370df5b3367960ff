"""One run of the reward-source study and its parts: settings, the demo's models per seed, each source's
reward, RL prompts, one PPO/GRPO run measured against the gold judgement, best-of-n, and the per-run cache
(what ``rl.run_study`` and its worker processes share)."""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .rewards import StudyError

SOURCES = ("text_rm", "lvlm_judge", "cascade", "vlrm", "ensemble", "gold")
ALGOS = ("ppo", "grpo")
GOLD_KEYS = ("correct", "style", "both")


@dataclass(frozen=True)
class StudySettings:
    """Budget and evaluation sizes; ``quick()`` is the CI variant."""

    updates: int = 40
    batch: int = 16
    grpo_generations: int = 4
    kl_coef: float = 0.1
    lr: float = 4e-5
    response_length: int = 10
    normalize: bool = True
    clip: float | None = None
    every: int = 10
    val_every: int = 20
    n_val: int = 60
    n_test: int = 120
    bon_n: tuple[int, ...] = (1, 2, 4, 8, 16)
    ensemble_k: int = 3
    ensemble_combine: str = "mean"

    @classmethod
    def demo(cls) -> StudySettings:
        """The short version inside ``vlrm-rlhf demo`` (one seed, a smaller budget and fewer held-out prompts)."""
        return cls(updates=16, every=8, val_every=16, n_val=24, n_test=48, bon_n=(1, 2, 4, 8))

    @classmethod
    def quick(cls) -> StudySettings:
        return cls(updates=2, batch=4, grpo_generations=2, every=1, val_every=1, n_val=4, n_test=6, bon_n=(1, 2),
                   ensemble_k=2)

    def bon_tag(self) -> str:
        """Cache key of the best-of-n results (independent of the RL settings)."""
        d = asdict(self)
        return json.dumps({k: d[k] for k in ("n_test", "bon_n", "response_length", "ensemble_k", "ensemble_combine")},
                          sort_keys=True)

    def tag(self) -> str:
        """Run-cache key of the settings that change a run."""
        d = asdict(self)
        return json.dumps({k: d[k] for k in ("updates", "batch", "grpo_generations", "kl_coef", "lr", "response_length",
                                             "normalize", "clip", "every", "val_every", "n_val", "n_test", "ensemble_k",
                                             "ensemble_combine")}, sort_keys=True)


# ---- per-seed models ---------------------------------------------------------------------------------------
def prepare_seed(demo_dir: Path, seed: int, *, quick: bool, progress: bool,
                 make_demo: Callable[..., Any] | None = None) -> dict[str, Any]:
    """The demo's models for a seed and its val-chosen merges; where the demo has not run, ``make_demo(demo_dir,
    seed=, quick=, progress=)`` runs it (the CLI passes ``demo.run.run_demo``; the study sits below the demo)."""
    rep_path = demo_dir / "report.json"
    if rep_path.is_file():
        val = {m: a["overall"] for m, a in json.loads(rep_path.read_text())["accuracy_val"].items()}
    elif (demo_dir / "merges" / "task_arithmetic_swept" / "config.json").is_file():
        val = _val_accuracy(demo_dir)  # the demo's merges exist but its report does not (yet)
    else:
        if make_demo is None:
            raise StudyError(f"no demo models in {demo_dir}: run `vlrm-rlhf demo --work-dir {demo_dir} --seed {seed}` "
                             "first (or `vlrm-rlhf study rl`, which runs it)")
        make_demo(demo_dir, seed=seed, quick=quick, progress=progress)
        val = {m: a["overall"] for m, a in json.loads(rep_path.read_text())["accuracy_val"].items()}
    order = _merge_order(demo_dir)
    merges = sorted((m for m in order if m in val), key=lambda m: (-val[m], order.index(m)))
    return {"models": {k: demo_dir / "models" / k for k in ("base", "lvlm", "rm")},
            "best": demo_dir / "merges" / merges[0], "best_name": merges[0],
            "ranked_merges": [demo_dir / "merges" / m for m in merges],
            "val_accuracy": {m: val[m] for m in merges}}


def _merge_order(demo_dir: Path) -> list[str]:
    """The demo's merges in its own order (methods, then the swept task arithmetic): ties go to the first, as there."""
    from ..worlds.merges import METHOD_PARAMS

    names = [*METHOD_PARAMS, "task_arithmetic_swept"]
    return [m for m in names if (demo_dir / "merges" / m / "config.json").is_file()]


def _val_accuracy(demo_dir: Path) -> dict[str, float]:
    """Overall preference accuracy of each merge on the demo's validation pairs (the demo's selection rule)."""
    from ..eval.prefs import flat_accuracy
    from ..eval.records import load_pref_records
    from ..reward.scorer import VLRewardScorer

    val = load_pref_records(demo_dir / "bench" / "val.jsonl")
    return {m: flat_accuracy(VLRewardScorer.from_pretrained(demo_dir / "merges" / m, mode="vlrm"), val)["overall"]
            for m in _merge_order(demo_dir)}


def make_reward(source: str, prep: dict[str, Any], st: StudySettings, calib: list[tuple[list, list, dict]] | None = None
                ) -> tuple[Any, Any]:
    """(training reward, raw twin for measuring) of one source; the twin shares the models."""
    from ..eval.judge import LVLMJudge
    from ..reward.scorer import VLRewardScorer
    from .rewards import EnsembleSourceReward, GoldReward, ScorerReward

    m = prep["models"]
    if source == "gold":
        return GoldReward(normalize=st.normalize, clip=st.clip), GoldReward()
    if source == "text_rm":
        scorer: Any = VLRewardScorer.from_pretrained(m["rm"], mode="text_rm")
    elif source == "lvlm_judge":
        scorer = LVLMJudge.from_pretrained(m["lvlm"], kind="loglik_sum")
    elif source == "cascade":
        scorer = VLRewardScorer.from_pretrained(m["rm"], mode="cascade", lvlm=m["lvlm"])
    elif source == "vlrm":
        scorer = VLRewardScorer.from_pretrained(prep["best"], mode="vlrm")
    elif source == "ensemble":
        from ..reward.ensemble import EnsembleReward

        ens = EnsembleReward([str(d) for d in prep["ranked_merges"][:st.ensemble_k]], combine=st.ensemble_combine)
        stats = _member_stats(EnsembleSourceReward(ens, "m"), calib) if calib else None
        return (EnsembleSourceReward(ens, source, stats, normalize=st.normalize, clip=st.clip),
                EnsembleSourceReward(ens, source, stats))
    else:
        raise StudyError(f"unknown reward source {source!r}; choose from {', '.join(SOURCES)}")
    return (ScorerReward(scorer, source, normalize=st.normalize, clip=st.clip), ScorerReward(scorer, source))


def _member_stats(ens: Any, calib: list[tuple[list, list, dict]]) -> list[tuple[float, float]]:
    """(mean, std) of each ensemble member's rewards on the starting policy's sampled answers."""
    per: list[list[float]] = []
    for p, c, cols in calib:
        rows = ens.member_raw(p, c, **cols)
        per = [a + b for a, b in zip(per, rows, strict=True)] if per else rows
    out = []
    for vals in per:
        ok = [v for v in vals if math.isfinite(v)]
        out.append((statistics.fmean(ok), statistics.pstdev(ok) or 1.0))
    return out


# ---- data ----------------------------------------------------------------------------------------------------
def train_rows(world: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """RL prompts from the train split: conversational prompt, its image, and the question as JSON (gold reward)."""
    from ..worlds.shapes import questions
    from ..worlds.text import messages
    from .rewards import qa_to_json

    rng = random.Random(f"study-rl:{seed}")
    rows = []
    for _ in range(n):
        i = rng.randrange(len(world.train.scenes))
        qa = rng.choice(questions(world.train.scenes[i]))
        rows.append({"prompt": messages(qa.question, image=True), "image": world.train.image(i), "qa": qa_to_json(qa)})
    return rows


def gold_prompts(world: Any, n: int, seed: int, split: str) -> list[Any]:
    """Held-out prompts of a split (``val`` for selection, ``test`` for reporting) as ``GoldPrompt`` s."""
    from ..trainers.gold_check import GoldPrompt
    from ..worlds.bench import eval_questions
    from ..worlds.text import messages
    from .rewards import qa_to_json

    return [GoldPrompt(messages(qa.question, image=True), [im], item=qa, columns={"qa": qa_to_json(qa)})
            for im, qa in eval_questions(world, n, seed + 1, split)]


def _gold_fn(qa: Any, text: str) -> dict[str, float]:
    from ..worlds.gold import gold_dict

    return gold_dict(qa, text)


# ---- one RL run ------------------------------------------------------------------------------------------------
def run_one(algo: str, source: str, world: Any, prep: dict[str, Any], st: StudySettings, seed: int, out: Path,
            calib: list | None = None, progress: bool = False) -> dict[str, Any]:
    """Train the LVLM with one algorithm and reward source; return the val/test gold-check histories."""
    from datasets import Dataset

    from ..models.processing import load_processor
    from ..trainers.gold_check import GoldCheckCallback

    lvlm = prep["models"]["lvlm"]
    reward, twin = make_reward(source, prep, st, calib)
    proc = load_processor(lvlm)
    kw = dict(samples=1, max_new_tokens=st.response_length, batch_size=64, seed=seed)
    val_cb = GoldCheckCallback(gold_prompts(world, st.n_val, seed, "val"), proc, _gold_fn, every=st.val_every, **kw)
    test_cb = GoldCheckCallback(gold_prompts(world, st.n_test, seed, "test"), proc, _gold_fn, reward=twin,
                                every=st.every, examples=6, **kw)
    ds = Dataset.from_list(train_rows(world, max(64, st.batch * 4), seed))
    t0 = time.perf_counter()
    if algo == "ppo":
        from ..trainers import VLPPOConfig, VLPPOTrainer

        args = VLPPOConfig(
            output_dir=str(out / "trainer"), per_device_train_batch_size=st.batch // 2, gradient_accumulation_steps=2,
            num_mini_batches=2, num_ppo_epochs=2, total_episodes=st.updates * st.batch,
            response_length=st.response_length, stop_token="eos", temperature=1.0, kl_coef=st.kl_coef,
            learning_rate=st.lr, lr_scheduler_type="constant", local_rollout_forward_batch_size=st.batch,
            value_model_path=str(prep["best"]), use_cpu=True, logging_steps=1, report_to="none", save_strategy="no",
            seed=seed, disable_tqdm=not progress)
        trainer: Any = VLPPOTrainer(model=str(lvlm), reward_funcs=reward, args=args, train_dataset=ds,
                                    callbacks=[val_cb, test_cb])
    elif algo == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(
            output_dir=str(out / "trainer"), per_device_train_batch_size=st.batch, gradient_accumulation_steps=1,
            num_generations=st.grpo_generations, max_steps=st.updates, max_completion_length=st.response_length,
            temperature=1.0, beta=st.kl_coef, learning_rate=st.lr, lr_scheduler_type="constant", use_cpu=True,
            bf16=False, logging_steps=1, report_to="none", save_strategy="no", seed=seed, disable_tqdm=not progress,
            gradient_checkpointing=False, log_completions=False)
        trainer = GRPOTrainer(model=str(lvlm), reward_funcs=reward, args=args, train_dataset=ds,
                              callbacks=[val_cb, test_cb])
    else:
        raise StudyError(f"unknown algorithm {algo!r}; choose from {', '.join(ALGOS)}")
    trainer.train()
    return {"algo": algo, "source": source, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
            "val": val_cb.history, "test": test_cb.history}


# ---- best-of-n --------------------------------------------------------------------------------------------------
def best_of_n(world: Any, prep: dict[str, Any], st: StudySettings, seed: int, sources: Sequence[str],
              calib_out: list | None = None) -> dict[str, list[dict[str, float]]]:
    """Best-of-n of the starting policy per source on the test prompts: gold of the proxy's pick, at KL
    ``log n − (n−1)/n``; picks among the first n of ``max(bon_n)`` samples per prompt."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ..models.loading import pretrained
    from ..models.processing import load_processor
    from ..trainers.gold_check import GoldCheckCallback
    from ..worlds.gold import judge

    lvlm = prep["models"]["lvlm"]
    prompts = gold_prompts(world, st.n_test, seed, "test")
    n_max = max(st.bon_n)
    cb = GoldCheckCallback(prompts, load_processor(lvlm), _gold_fn, max_new_tokens=st.response_length, batch_size=64)
    policy = pretrained(AutoModelForImageTextToText, lvlm).eval()
    rep = [p for p in prompts for _ in range(n_max)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        texts = [t for t, _ in cb.generate(policy, rep, sample=True)]
    conv = ([p.prompt for p in rep], [[{"role": "assistant", "content": t}] for t in texts],
            {"images": [p.images for p in rep], "qa": [p.columns["qa"] for p in rep]})
    if calib_out is not None:
        calib_out.append(conv)
    golds = [judge(p.item, t) for p, t in zip(rep, texts, strict=True)]
    out: dict[str, list[dict[str, float]]] = {}
    for source in sources:
        _, twin = make_reward(source, prep, st, [conv] if source == "ensemble" else None)
        scores = twin(conv[0], conv[1], **conv[2])
        rows = []
        for n in st.bon_n:
            picks = []
            for j in range(len(prompts)):
                block = scores[j * n_max: j * n_max + n]
                picks.append(golds[j * n_max + max(range(n), key=lambda i: block[i])])
            rows.append({"n": n, "kl": math.log(n) - (n - 1) / n,
                         **{k: statistics.fmean(getattr(g, k) for g in picks) for k in GOLD_KEYS},
                         "proxy": statistics.fmean(max(scores[j * n_max: j * n_max + n]) for j in range(len(prompts)))})
        out[source] = rows
    return out


def load_run(path: Path, st: StudySettings, bon: bool = False) -> Any:
    """A cached result made with these settings, or None."""
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return d["result"] if d.get("settings") == (st.bon_tag() if bon else st.tag()) else None


def save_run(path: Path, st: StudySettings, result: Any, bon: bool = False) -> None:
    """Cache a run's (or best-of-n's) result with the settings that made it."""
    from ..files import write_json_atomic

    write_json_atomic({"settings": st.bon_tag() if bon else st.tag(), "result": result}, path, force=True)
