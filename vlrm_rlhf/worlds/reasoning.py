"""ShapesWorld reasoning: questions that combine position, colour and count, a text-only "reasoning LLM"
fine-tuned on them from the base (it reads the scene description, never an image), and multiple-choice task
files for perception and reasoning over images.

Neither the base, the LVLM nor the RM ever saw these questions, so an LVLM that answers them from an image
got the skill from a merge: the setting of "Bring Reason to Vision" (arXiv 2505.05464), in miniature.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..files import write_jsonl_atomic
from ..models.loading import pretrained
from .shapes import COLOURS, NUMBERS, QA, Scene, Split, World, answer, questions
from .text import DESCRIPTION_PREFIX, build_tokenizer, text_seq

PERCEPTION_KINDS = ("colour", "kind")
REASONING_KINDS = ("where", "count_colour", "side_colour")


def reasoning_questions(scene: Scene) -> list[QA]:
    """Questions that need two facts about the scene at once (position + shape, colour + count, side + colour)."""
    out = []
    for o in scene.objects:
        on_left = scene.left == o
        out.append(QA("where", f"is the {o.shape} on the left ?", "yes" if on_left else "no",
                      ("no",) if on_left else ("yes",)))
    present = {o.colour for o in scene.objects}
    for c in COLOURS:
        n = int(c in present)
        out.append(QA("count_colour", f"how many {c} shapes are there ?", NUMBERS[n], (NUMBERS[1 - n],)))
    for side in ("left", "right"):
        o = scene.side(side)
        if o is not None:
            other = [x.colour for x in scene.objects if x != o]
            absent = [c for c in COLOURS if c not in present]
            out.append(QA("side_colour", f"what colour is the shape on the {side} ?", o.colour,
                          tuple(other + absent)))
    return out


def task_records(world: World, split: Split, n_per_kind: int, seed: int, image_dir: Path) -> list[dict]:
    """Multiple-choice records for ``vlrm_rlhf.analysis`` (image, question, choices, answer, kind)."""
    rng = random.Random(f"tasks:{split.name}:{seed}")
    image_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for kinds, family in ((PERCEPTION_KINDS, "perception"), (REASONING_KINDS, "reasoning")):
        for _ in range(n_per_kind):
            i = rng.randrange(len(split.scenes))
            scene = split.scenes[i]
            pool = [q for q in (questions(scene) + reasoning_questions(scene)) if q.kind in kinds]
            qa = rng.choice(pool)
            wrong = list(qa.wrong)
            rng.shuffle(wrong)
            choices = [qa.gold, *wrong[:3]]
            rng.shuffle(choices)
            img = image_dir / f"{split.name}_{i:05d}.png"
            if not img.exists():
                split.image(i).save(img)
            out.append({"id": f"{split.name}_{family}_{len(out):05d}", "image": str(img.relative_to(image_dir.parent)),
                        "question": qa.question, "choices": [answer(c, "good") for c in choices],
                        "answer": choices.index(qa.gold), "kind": family,
                        "meta": {"subkind": qa.kind, "description": scene.description}})
    return out


def write_tasks(world: World, out: Path, n_per_kind: int, seed: int) -> tuple[Path, Path]:
    """Write ``tasks.jsonl`` (+ images) for the test split, and ``tasks_text.jsonl``: the same questions for a text
    LM, the image replaced by its gold description. Each file is written atomically (temp file, then rename)."""
    rows = task_records(world, world.test, n_per_kind, seed, out / "images")
    text_rows = [{**r, "image": None, "question": f"{DESCRIPTION_PREFIX}{r['meta']['description']}\n{r['question']}"}
                 for r in rows]
    return (write_jsonl_atomic(rows, out / "tasks.jsonl", force=True),
            write_jsonl_atomic(text_rows, out / "tasks_text.jsonl", force=True))


def train_llm(world: World, base_dir: Path, out: Path, seed: int, *, steps: int = 600, batch: int = 64,
              lr: float = 1e-3, progress: bool = True) -> dict:
    """Fine-tune the base LM (all weights) on description-grounded reasoning QA, with 30% of the old QA mixed in
    so it keeps its language; answers in the preferred style. Saved as a ``LlamaForCausalLM`` directory."""
    from transformers import LlamaForCausalLM

    from .training_utils import cosine_schedule, encode_texts, lm_loss, optimizer_step, save_model_dir

    tok = build_tokenizer()
    torch.manual_seed(seed + 3)
    model = pretrained(LlamaForCausalLM, base_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = cosine_schedule(opt, steps)
    rng = random.Random(f"llm:{seed}")
    a_id = tok.convert_tokens_to_ids("<a>")
    t0 = time.perf_counter()
    losses = []
    for _ in tqdm(range(steps), desc="train reasoning LLM", disable=not progress, leave=False):
        texts = []
        for _ in range(batch):
            scene = world.train.scenes[rng.randrange(len(world.train.scenes))]
            pool = reasoning_questions(scene) if rng.random() < 0.7 else questions(scene)
            qa = rng.choice(pool)
            texts.append(text_seq(qa.question, answer(qa.gold, "good"), scene.description))
        enc = encode_texts(tok, texts)
        ids = enc["input_ids"]
        after = ((ids == a_id).int().cumsum(1) > 0) & (ids != a_id) & (enc["attention_mask"] == 1)
        losses.append(optimizer_step(lm_loss(model(**enc).logits, ids.masked_fill(~after, -100)), opt, sched))

    def save(d: Path) -> None:
        model.eval().save_pretrained(d)
        tok.save_pretrained(d)

    save_model_dir(save, out)
    return {"final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(time.perf_counter() - t0, 1)}
