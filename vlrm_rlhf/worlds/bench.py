"""Write ShapesWorld's held-out benchmarks to disk in the formats real benchmarks use.

Preference pairs go out in VL-RewardBench's format (``id, query, image, response[2], human_ranking`` plus an
explicit ``category``), so ``vlrm_rlhf.eval`` reads them exactly as it reads the real benchmark.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..files import atomic_output_dir, write_jsonl_atomic
from .shapes import QA, Pair, Split, World, questions


def pair_records(world: World, split: Split, pairs: list[Pair], image_dir: str, seed: int) -> list[dict]:
    """VL-RewardBench records; the chosen response's position is random (``human_ranking`` says which)."""
    rng = random.Random(f"order:{split.name}:{seed}")
    out = []
    for n, p in enumerate(pairs):
        first = rng.random() < 0.5
        scene = split.scenes[p.scene_index]
        out.append({
            "id": f"shapes_{split.name}_{p.category}_{n:05d}",
            "query": p.question,
            "image": f"{image_dir}/{split.name}_{p.scene_index:05d}.png",
            "response": [p.chosen, p.rejected] if first else [p.rejected, p.chosen],
            "human_ranking": [0, 1] if first else [1, 0],
            "category": p.category,
            "kind": p.kind,
            "description": scene.description,
            "unseen_combo": bool(scene.combos & world.unseen),
        })
    return out


def write_benchmark(world: World, out: Path, per_category: dict[str, int], seed: int) -> dict[str, Path]:
    """Write ``{split}.jsonl`` for each split in ``per_category`` (val, test, test_unseen) plus their images."""
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "images").mkdir()
        for name, n in per_category.items():
            split: Split = getattr(world, name)
            pairs = world.pairs(split, n, seed)
            for i in sorted({p.scene_index for p in pairs}):
                split.image(i).save(tmp / "images" / f"{name}_{i:05d}.png")
            write_jsonl_atomic(pair_records(world, split, pairs, "images", seed), tmp / f"{name}.jsonl")
    return {name: out / f"{name}.jsonl" for name in per_category}


def eval_questions(world: World, n: int, seed: int, split: str = "test") -> list[tuple[Any, QA]]:
    """``n`` (image, question) pairs from a held-out split, fixed per seed."""
    sp = getattr(world, split)
    rng = random.Random(f"rl-eval:{seed}")
    out = []
    for _ in range(n):
        i = rng.randrange(len(sp.scenes))
        out.append((sp.image(i), rng.choice(questions(sp.scenes[i]))))
    return out
