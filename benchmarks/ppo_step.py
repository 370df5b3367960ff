"""Seconds per PPO update: ``VLPPOTrainer`` vs TRL 1.12's ``PPOTrainer``, and the reward share for a VLM policy.

Text-only tiny setup (the zoo's ``LlamaForCausalLM`` base as policy, its text RM as reward *and* value model),
the same seed, data and config for both trainers; each runs in its own subprocess (TRL 1.12 comes from the
isolated ``.trl112/`` target dir, installed by ``.ci/trl112-env.sh``, first on ``sys.path`` there only).
The first update of each run is warm-up and excluded. Then a tiny LLaVA policy with a merged VLRM reward
(``VLRMReward``) and a VLRM value model: the share of an update spent in reward scoring.

The same ``run`` entry point (``python benchmarks/ppo_step.py --impl vl|trl112 --out FILE``) produces the
per-update metrics the parity test in ``tests/test_ppo.py`` compares.

Usage: python benchmarks/ppo_step.py [--updates 8] [--target 1.25]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRL112 = ROOT / ".trl112"
PROMPTS = ["what color is the cat ?", "describe the image please", "is the dog big ?", "which car is red ?",
           "how big is the tree ?", "the man is here .", "what is this ?", "is it a good photo ?"]


def config_kwargs(out_dir: str, updates: int, seed: int, response_length: int = 12) -> dict[str, Any]:
    """The PPO config both trainers get (TRL 1.12 field names)."""
    return dict(output_dir=out_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=1,
                num_ppo_epochs=2, total_episodes=8 * updates, response_length=response_length, stop_token="eos",
                temperature=0.9, kl_coef=0.05, learning_rate=3e-4, local_rollout_forward_batch_size=8, seed=seed,
                use_cpu=True, bf16=False, logging_steps=1, report_to="none", save_strategy="no",
                num_sample_generations=0, gradient_checkpointing=False, missing_eos_penalty=0.5,
                disable_tqdm=True)


def run(impl: str, zoo_dir: str, updates: int, seed: int) -> dict[str, Any]:
    """Train ``updates`` PPO updates with ``impl`` ("vl" or "trl112"); return log history and per-update seconds."""
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(1)
    zoo = Path(zoo_dir)
    tok = AutoTokenizer.from_pretrained(zoo / "base", padding_side="left")
    ds = Dataset.from_dict({"input_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS * 4]})
    policy = AutoModelForCausalLM.from_pretrained(zoo / "base")
    rm = AutoModelForSequenceClassification.from_pretrained(zoo / "rm", num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(zoo / "rm", num_labels=1)
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        """Wall time between consecutive step ends (one PPO update each)."""

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    with tempfile.TemporaryDirectory() as out:
        transformers.set_seed(seed)
        if impl == "trl112":
            from trl.experimental.ppo import PPOConfig, PPOTrainer

            args = PPOConfig(**config_kwargs(out, updates, seed))
            trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=rm,
                                 train_dataset=ds, value_model=value, callbacks=[Timer()])
        else:
            from vlrm_rlhf.trainers import VLPPOConfig, VLPPOTrainer

            args = VLPPOConfig(**config_kwargs(out, updates, seed))
            trainer = VLPPOTrainer(model=policy, reward_funcs=rm, args=args, train_dataset=ds, processing_class=tok,
                                   value_model=value, callbacks=[Timer()])
        trainer.train()
    import trl

    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    return {"impl": impl, "trl": trl.__version__, "logs": logs, "seconds": times}


def run_subprocess(impl: str, zoo_dir: str | Path, updates: int, seed: int = 0) -> dict[str, Any]:
    """``run`` in a fresh interpreter (TRL 1.12 first on sys.path for ``trl112``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        if impl == "trl112":
            env["PPO_STEP_PREPEND"] = str(TRL112)
        cmd = [sys.executable, __file__, "--impl", impl, "--zoo", str(zoo_dir), "--updates", str(updates),
               "--seed", str(seed), "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"{impl} run failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def vlm_reward_share(updates: int = 4) -> dict[str, float]:
    """Seconds per update and the share spent in ``VLRMReward`` for a tiny LLaVA policy."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlrm_rlhf.merge import build
    from vlrm_rlhf.reward.trl import VLRMReward
    from vlrm_rlhf.testing.zoo import build_trio, demo_image
    from vlrm_rlhf.trainers import VLPPOConfig, VLPPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        trio = build_trio("llava", Path(tmp) / "zoo")
        vlrm = Path(tmp) / "vlrm"
        build({"merge_method": "task_arithmetic", "base_model": str(trio["base"]), "dtype": "float32",
               "output": "vlrm", "parameters": {}, "models": [
                   {"model": str(trio["lvlm"]), "role": "lvlm", "parameters": {"weight": 0.5}},
                   {"model": str(trio["rm"]), "role": "rm", "parameters": {"weight": 1.0}}]}, vlrm, progress=False)
        rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                 "image": demo_image(trio["lvlm"], i)} for i, p in enumerate(PROMPTS * 2)]
        args = VLPPOConfig(**{**config_kwargs(str(Path(tmp) / "out"), updates, 0), "total_episodes": 8 * updates})
        trainer = VLPPOTrainer(model=AutoModelForImageTextToText.from_pretrained(trio["lvlm"]),
                               reward_funcs=VLRMReward(vlrm), args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=AutoProcessor.from_pretrained(trio["lvlm"]))
        trainer.train()
        t = trainer.timing
        return {"s_per_update": t["update_s"] / t["updates"], "reward_share": t["reward_s"] / t["update_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=["vl", "trl112"])
    ap.add_argument("--zoo", help="zoo trio directory (default: built in a temp dir)")
    ap.add_argument("--updates", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--target", type=float, default=1.25)
    a = ap.parse_args()
    if a.impl:  # worker mode
        json_out = run(a.impl, a.zoo, a.updates, a.seed)
        Path(a.out).write_text(json.dumps(json_out))
        return
    from vlrm_rlhf.testing.zoo import build_trio

    with tempfile.TemporaryDirectory() as tmp:
        zoo = a.zoo or build_trio("llava", Path(tmp) / "zoo")["base"].parent
        res = {impl: run_subprocess(impl, zoo, a.updates, a.seed) for impl in ("trl112", "vl")}
    med = {k: sorted(v["seconds"][1:])[len(v["seconds"][1:]) // 2] for k, v in res.items()}
    ratio = med["vl"] / med["trl112"]
    share = vlm_reward_share()
    print(f"{'measure':44s} {'value':>10s}  verdict")
    print(f"{'TRL 1.12 PPOTrainer s/update (median)':44s} {med['trl112']:10.4f}")
    print(f"{'VLPPOTrainer s/update (median)':44s} {med['vl']:10.4f}")
    print(f"{'ratio VLPPO / TRL 1.12':44s} {ratio:10.3f}  {'PASS' if ratio <= a.target else 'FAIL'} "
          f"(target <= {a.target})")
    print(f"{'LLaVA + VLRM: s/update':44s} {share['s_per_update']:10.4f}")
    print(f"{'LLaVA + VLRM: share of update in reward':44s} {share['reward_share']:10.1%}")


if __name__ == "__main__":
    if os.environ.get("PPO_STEP_PREPEND"):
        sys.path.insert(0, os.environ["PPO_STEP_PREPEND"])
    main()
