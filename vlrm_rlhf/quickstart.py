"""The README's first command until the ShapesWorld demo lands: tiny local models → merged VLRM → rewards.

Builds a base LM, an LVLM and a text RM that share the base (tiny, from configs; no hub), merges them with
task arithmetic, reloads the VLRM with ``AutoModelForSequenceClassification`` and scores a few inputs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def _score(model, tok, processor, text: str, image=None) -> float:
    if image is None:
        enc = tok([text], return_tensors="pt")
    else:
        enc = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        return float(model(**enc, use_cache=False).logits[0, 0])


def run_quickstart(work_dir: str | Path, *, family: str = "llava", seed: int = 0) -> dict[str, float]:
    """Build, merge, reload and score; returns the rewards it printed."""
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForSequenceClassification, AutoProcessor, AutoTokenizer

    from .merge import build
    from .testing.zoo import build_trio, write_quick_recipe

    work = Path(work_dir)
    t0 = time.perf_counter()
    trio = build_trio(family, work / "models" / family, seed=seed)
    recipe = write_quick_recipe(trio, work / f"{family}_task_arithmetic.yaml")
    out = build(recipe, work / f"vlrm_{family}", force=True)
    print(f"merged {family} trio into {out} in {time.perf_counter() - t0:.1f} s (recipe: {recipe})")

    vlrm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(trio["rm"]).eval()
    tok = AutoTokenizer.from_pretrained(out)
    try:
        processor = AutoProcessor.from_pretrained(out)
    except Exception:  # noqa: BLE001 - families whose processor needs torchvision
        processor = None
    text = "what is the color of the car ? the car is red ."
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    rewards = {"text RM (text only)": _score(rm, AutoTokenizer.from_pretrained(trio["rm"]), None, text),
               "VLRM (text only)": _score(vlrm, tok, None, text)}
    if processor is not None and hasattr(processor, "image_token"):
        image_text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], tokenize=False
        )
        rewards["VLRM (with image)"] = _score(vlrm, tok, processor, image_text, image)
    print(f"{type(vlrm).__name__}: {sum(p.numel() for p in vlrm.parameters()):,} parameters")
    for k, v in rewards.items():
        print(f"  reward {k:22s} {v:+.4f}")
    return rewards
