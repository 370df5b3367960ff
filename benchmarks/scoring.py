"""Reward-scoring throughput of ``VLRewardScorer`` on a tiny-but-not-trivial LLaVA VLRM (CPU, fp32).

What it measures (one run does everything, on one model):

0. Builds a LLaVA trio with the zoo's machinery but a real-sized vision input (text: Llama, hidden 256, 4 layers;
   vision: CLIP, hidden 256, 4 layers, 224 px images, patch 14 -> 256 image tokens per image), then merges the RM
   into the LVLM with ``vlrm_rlhf.merge.build`` (task arithmetic) and loads it with ``VLRewardScorer.from_pretrained``.
1. Pairs/s over ``--pairs`` (prompt with one distinct image, response) pairs: batched ``scorer.score(...)`` vs the
   one-sequence-per-forward loop of the paper's code (render, processor call and model forward for each pair alone).
   Target: batched >= 5x the loop.
2. Scoring ``--n`` candidates for one (image, prompt), relative to scoring ONE candidate with a single plain forward
   (the loop's cost for one pair): ``score_candidates`` (prefix KV reuse; target <= 2x), ``scorer.score`` on the N
   pairs (no reuse; reported) and N separate forwards (no reuse; expected ~Nx, checked within 0.75N..1.25N).
3. Agreement: max |reward difference| between the paths (target <= 1e-4).

Every timing is the median of ``--repeats`` after one warm-up call, the contenders of 1. and of 2. timed in
interleaved rounds; torch's default thread count is used (printed).
Run:  ``/work/venv/bin/python benchmarks/scoring.py [--work-dir runs/bench_scoring] [--pairs 64] [--n 8]
[--repeats 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

import torch
import transformers as tf
from torch.utils.flop_counter import FlopCounterMode

from vlrm_rlhf.merge import build
from vlrm_rlhf.reward.inputs import make_sample
from vlrm_rlhf.reward.scorer import VLRewardScorer, render
from vlrm_rlhf.testing import zoo

HIDDEN, LAYERS, IMAGE, PATCH = 256, 4, 224, 14
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
              image_size=IMAGE, patch_size=PATCH)


def llava_224_spec() -> zoo.FamilySpec:
    """The zoo's LLaVA spec with a 224 px / patch 14 CLIP tower (the zoo's own is 32 px, 2x32 wide)."""
    spec = zoo.SPECS["llava"]

    def make(t: dict, ids: dict[str, int]) -> tf.LlavaConfig:
        return tf.LlavaConfig(text_config=tf.LlamaConfig(**t), vision_config=tf.CLIPVisionConfig(**VISION),
                              image_token_index=ids["<image>"], image_seq_length=(IMAGE // PATCH) ** 2,
                              pad_token_id=t["pad_token_id"])

    return dataclasses.replace(
        spec, make_config=make, image_size=(IMAGE, IMAGE),
        image_processor=lambda: tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                                         crop_size={"height": IMAGE, "width": IMAGE}),
        processor_kwargs={**spec.processor_kwargs, "patch_size": PATCH})


def build_trio_224(work: Path) -> dict:
    """Write the 224 px LLaVA trio (its spec swapped into the zoo only while building)."""
    saved = zoo.SPECS["llava"]
    zoo.SPECS["llava"] = llava_224_spec()
    try:
        return zoo.build_trio("llava", work / "trio", hidden_size=HIDDEN, num_layers=LAYERS)
    finally:
        zoo.SPECS["llava"] = saved


def build_vlrm(work: Path) -> tuple[Path, Path]:
    """Write the trio and merge it; returns (vlrm, lvlm) dirs."""
    trio = build_trio_224(work)
    recipe = zoo.write_quick_recipe(trio, work / "recipe.yaml")
    return build(recipe, work / "vlrm", force=True, progress=False), trio["lvlm"]


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(zoo.WORDS[3:]) for _ in range(rng.randint(lo, hi)))


@torch.inference_mode()
def loop_scores(scorer: VLRewardScorer, prompts, responses, images) -> list[float]:
    """The paper's code: for each pair, render, process and forward it alone (no padding, no batching)."""
    out = []
    for p, r, im in zip(prompts, responses, images, strict=True):
        text = render(scorer.processor, make_sample(p, r, [im]).messages)
        enc = scorer.processor(text=[text], images=[[im]], return_tensors="pt", add_special_tokens=False)
        enc = {k: v.to(scorer.device, dtype=scorer.model.dtype) if v.is_floating_point() else v.to(scorer.device)
               for k, v in enc.items()}
        out.append(scorer.model(**enc, use_cache=False).logits[0, 0].item())
    return out


def timed(repeats: int, **fns) -> dict[str, tuple[float, list[float]]]:
    """name -> (median seconds over ``repeats`` after one warm-up, result); rounds interleave the contenders,
    so load from other processes hits them alike."""
    res = {k: f() for k, f in fns.items()}
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            res[k] = f()
            ts[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(ts[k]), res[k]) for k in fns}


def maxdiff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", type=Path, default=Path("runs/bench_scoring"))
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, metavar="OUT")
    ap.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as stored, fp32)")
    a = ap.parse_args()
    tf.utils.logging.disable_progress_bar()

    vlrm_dir, lvlm_dir = build_vlrm(a.work_dir.resolve())  # recipe paths resolve against the recipe file
    scorer = VLRewardScorer.from_pretrained(vlrm_dir, device=a.device, dtype=a.dtype)
    rng = random.Random(0)
    prompts = [words(rng, 6, 24) + " ?" for _ in range(a.pairs)]
    responses = [words(rng, 8, 48) + " ." for _ in range(a.pairs)]
    images = [zoo.demo_image(lvlm_dir, seed=i) for i in range(a.pairs)]
    ids = scorer.encode(["<image>"], [[images[0]]])["input_ids"]
    n_img_tok = int((ids == scorer.model.config.image_token_id).sum())
    threads = torch.get_num_threads()
    print(f"VLRM {vlrm_dir}: Llama text {HIDDEN}x{LAYERS}, CLIP {VISION['hidden_size']}x{VISION['num_hidden_layers']} "
          f"{IMAGE}px/p{PATCH} -> {n_img_tok} image tokens; torch threads {threads}; median of {a.repeats}")

    # 1. pairs/s: batched vs one sequence per forward
    m = timed(a.repeats, batch=lambda: scorer.score(prompts=prompts, responses=responses,
                                                    images=[[im] for im in images]),
              loop=lambda: loop_scores(scorer, prompts, responses, images))
    (t_batch, r_batch), (t_loop, r_loop) = m["batch"], m["loop"]
    speedup = t_loop / t_batch
    with FlopCounterMode(display=False) as fc:  # useful FLOPs (no padding), to read the speedup against peak
        loop_scores(scorer, prompts, responses, images)
    gflop = fc.get_total_flops() / 1e9

    # 2. N candidates for one (image, prompt) vs one candidate
    p0, im0, cands = prompts[0], images[0], [words(rng, 8, 48) + " ." for _ in range(a.n)]
    m = timed(a.repeats, one=lambda: loop_scores(scorer, [p0], cands[:1], [im0]),
              reuse=lambda: scorer.score_candidates(p0, cands, [im0]),
              plain=lambda: scorer.score(prompts=[p0] * a.n, responses=cands, images=[[im0]] * a.n),
              loopn=lambda: loop_scores(scorer, [p0] * a.n, cands, [im0] * a.n))
    (t_one, r_one), (t_reuse, r_reuse), (t_plain, r_plain), (t_loopn, r_loopn) = m.values()
    diff_pairs = maxdiff(r_batch, r_loop)
    diff_cands = max(maxdiff(r_reuse, r_loopn), maxdiff(r_plain, r_loopn), abs(r_one[0] - r_loopn[0]))

    n = a.n
    tol = 1e-4 if scorer.model.dtype == torch.float32 else 5e-2  # bf16/fp16 batches round differently
    rows = [  # name, value, target text, pass
        (f"batched score(), {a.pairs} pairs: pairs/s", a.pairs / t_batch, "", None),
        (f"one-per-forward loop, {a.pairs} pairs: pairs/s", a.pairs / t_loop, "", None),
        ("  speedup batched / loop", speedup, ">= 5x", speedup >= 5),
        ("one candidate, one forward: ms", 1e3 * t_one, "", None),
        (f"score_candidates (prefix reuse), N={n}: x one", t_reuse / t_one, "<= 2x", t_reuse / t_one <= 2),
        (f"score() on the {n} pairs (no reuse): x one", t_plain / t_one, "(info)", None),
        (f"{n} separate forwards (no reuse): x one", t_loopn / t_one, f"~{n}x",
         0.75 * n <= t_loopn / t_one <= 1.25 * n),
        (f"max |diff| batched vs loop ({a.pairs} pairs)", diff_pairs, f"<= {tol:g}", diff_pairs <= tol),
        (f"max |diff| reuse / score() / loop (N={n})", diff_cands, f"<= {tol:g}", diff_cands <= tol),
    ]
    print(f"\n{'measure':<50} {'value':>12}  {'target':<8} result")
    for name, v, target, ok in rows:
        val = f"{v:.2e}" if "diff" in name else f"{v:.2f}"
        print(f"{name:<50} {val:>12}  {target:<8} {'' if ok is None else ('PASS' if ok else 'FAIL')}")
    print(f"\nuseful compute: {gflop / a.pairs:.2f} GFLOP/pair -> loop sustains {gflop / t_loop:.0f} GFLOP/s, "
          f"batched {gflop / t_batch:.0f} GFLOP/s (batching can only win up to the CPU's peak / the loop's rate)")
    print(f"(times, s: batched {t_batch:.3f}, loop {t_loop:.3f}, one {t_one:.4f}, reuse {t_reuse:.4f}, "
          f"score() {t_plain:.4f}, {n} forwards {t_loopn:.4f})")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({
            "threads": threads, "repeats": a.repeats, "pairs": a.pairs, "n": n, "image_tokens": n_img_tok,
            "gflop_pairs": gflop, "seconds": {"batched": t_batch, "loop": t_loop, "one": t_one, "reuse": t_reuse,
                                              "score_n": t_plain, "loop_n": t_loopn},
            "results": [{"measure": name, "value": v, "target": target, "pass": ok} for name, v, target, ok in rows],
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
