"""Scoring cost of a K = 4 merged reward ensemble with shared image features vs 4 separate scorers (CPU, fp32).

One run, one model family: the scoring benchmark's LLaVA trio (``benchmarks/scoring.py``: Llama text 256x4, CLIP
256x4 at 224 px, patch 14 -> 256 image tokens per image), merged with task arithmetic at K values of λ (the
LVLM's and the RM's weight together). Contenders, each scoring the same ``--pairs`` (prompt with one distinct
image, response) pairs and giving all K members' rewards:

- ``separate``: K ``VLRMReward``s called one after the other (each plans, preprocesses the images, runs the
  vision tower and its language model): what K reward functions in a TRL trainer cost.
- ``ensemble``: one ``EnsembleReward`` over the K directories: one plan and one encoding per micro-batch, the
  image features computed once and reused by every member's language model.
- ``ensemble, no sharing``: the same without feature sharing (``share_vision=False``): splits the gain between
  the shared encoding and the shared vision forward.

Every timing is the median of ``--repeats`` after one warm-up, contenders interleaved per round; the member
rewards of every contender must be identical (max |diff| printed; 0 expected). Threads are pinned with
``torch.set_num_threads(--threads)``.
Run:  ``python benchmarks/ensemble.py [--work-dir runs/bench_ensemble] [--pairs 32] [--k 4] [--repeats 3]
[--threads 1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import transformers as tf
from scoring import HIDDEN, IMAGE, LAYERS, PATCH, VISION, build_trio_224, timed, words

from vlrm_rlhf.merge import build
from vlrm_rlhf.reward.ensemble import EnsembleReward
from vlrm_rlhf.reward.trl import VLRMReward
from vlrm_rlhf.testing import zoo


def build_members(work: Path, k: int) -> tuple[list[Path], Path]:
    """The 224 px LLaVA trio and K task-arithmetic merges of it (λ evenly from 0.4 to 1.0); returns (dirs, lvlm)."""
    trio = build_trio_224(work)
    lams = [round(0.4 + 0.6 * i / max(1, k - 1), 3) for i in range(k)]
    dirs = []
    for lam in lams:
        r = {"merge_method": "task_arithmetic", "base_model": str(trio["base"]), "dtype": "float32", "output": "vlrm",
             "models": [{"model": str(trio["lvlm"]), "role": "lvlm", "parameters": {"weight": lam}},
                        {"model": str(trio["rm"]), "role": "rm", "parameters": {"weight": lam}}]}
        dirs.append(build(r, work / f"vlrm_lambda_{lam:g}", force=True, progress=False))
    return dirs, trio["lvlm"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", type=Path, default=Path("runs/bench_ensemble"))
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, metavar="OUT")
    a = ap.parse_args()
    tf.utils.logging.disable_progress_bar()
    torch.set_num_threads(a.threads)

    dirs, lvlm = build_members(a.work_dir.resolve(), a.k)
    rng = random.Random(0)
    prompts = [[{"role": "user", "content": [{"type": "image", "image": zoo.demo_image(lvlm, seed=i)},
                                             {"type": "text", "text": words(rng, 6, 24) + " ?"}]}]
               for i in range(a.pairs)]
    completions = [words(rng, 8, 48) + " ." for _ in range(a.pairs)]

    separate = [VLRMReward(d) for d in dirs]
    shared = EnsembleReward(dirs)
    unshared = EnsembleReward(dirs, share_vision=False)
    lead = shared.groups[0].lead
    n_img_tok = int((lead.encode(["<image>"], [[prompts[0][0]["content"][0]["image"]]])["input_ids"]
                     == lead.model.config.image_token_id).sum())
    print(f"K={a.k} task-arithmetic merges (λ {', '.join(d.name.removeprefix('vlrm_lambda_') for d in dirs)}) of a "
          f"LLaVA VLRM: Llama text {HIDDEN}x{LAYERS}, CLIP {VISION['hidden_size']}x{VISION['num_hidden_layers']} "
          f"{IMAGE}px/p{PATCH} -> {n_img_tok} image tokens; {a.pairs} pairs, one distinct image each; "
          f"torch threads {torch.get_num_threads()}; median of {a.repeats}; {shared!r}")

    def run_separate() -> list[list[float]]:
        return [[float(x) for x in f(prompts, completions)] for f in separate]

    def run_ensemble(e: EnsembleReward) -> list[list[float]]:
        return list(e.member_rewards(prompts, completions).values())

    t0 = time.perf_counter()
    m = timed(a.repeats, separate=run_separate, ensemble=lambda: run_ensemble(shared),
              unshared=lambda: run_ensemble(unshared))
    wall = time.perf_counter() - t0
    (t_sep, r_sep), (t_ens, r_ens), (t_uns, r_uns) = m["separate"], m["ensemble"], m["unshared"]
    diff = max(abs(x - y) for ra, rb in ((r_sep, r_ens), (r_sep, r_uns))
               for a_, b_ in zip(ra, rb, strict=True) for x, y in zip(a_, b_, strict=True))
    calls = a.repeats + 1
    rows = [
        (f"{a.k} separate scorers: s per {a.pairs} pairs", t_sep),
        ("ensemble, shared image features: s", t_ens),
        ("ensemble, shared encoding only: s", t_uns),
        ("  ratio separate / shared features", t_sep / t_ens),
        ("  ratio separate / shared encoding only", t_sep / t_uns),
        ("  ratio shared encoding only / shared features", t_uns / t_ens),
        ("vision forwards per call: separate / ensemble",
         f"{sum(1 for _ in separate) * (shared.vision_calls // calls)} / {shared.vision_calls // calls}"),
        ("max |member reward diff| between contenders", diff),
    ]
    print(f"\n{'measure':<52} {'value':>10}")
    for name, v in rows:
        val = v if isinstance(v, str) else (f"{v:.1e}" if "diff" in name else f"{v:.3f}")
        print(f"{name:<52} {val:>10}")
    print(f"(pairs/s x members: separate {a.k * a.pairs / t_sep:.1f}, ensemble {a.k * a.pairs / t_ens:.1f}; "
          f"timing wall {wall:.0f} s)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({
            "k": a.k, "pairs": a.pairs, "threads": torch.get_num_threads(), "repeats": a.repeats,
            "image_tokens": n_img_tok, "seconds": {"separate": t_sep, "ensemble": t_ens, "ensemble_no_sharing": t_uns},
            "ratio_separate_over_ensemble": t_sep / t_ens, "max_abs_diff": diff,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
