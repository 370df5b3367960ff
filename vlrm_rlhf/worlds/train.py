"""Train ShapesWorld's three models from scratch on a CPU and save them as ordinary HF directories.

- **base**: a tiny ``LlamaForCausalLM`` pretrained on descriptions and description-grounded text QA;
- **lvlm**: ``LlavaForConditionalGeneration`` = base + a from-scratch CLIP tower + projector, trained in two
  stages like real adapters (LM frozen, then unfrozen so the LVLM has its own task vector), with an
  alignment loss pulling projected image token k onto the base's embedding of slot word k;
- **rm**: ``LlamaForSequenceClassification`` = base + score head, Bradley-Terry on text-only pairs whose
  prompt holds the scene description (correctness pairs and style pairs).

Design and hyperparameters follow the measured spike (``../shared/SHAPESWORLD-SPIKE.md``).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.loading import pretrained
from ..threads import adaptive_threads, pinned_threads
from .shapes import IMAGE_SIZE, WORLD_VERSION, World, answer, make_pair
from .text import N_IMAGE_TOKENS, build_processor, build_tokenizer, description_seq, text_seq
from .training_utils import (
    cached_log,
    cosine_schedule,
    encode_texts,
    lm_loss,
    mark_trained,
    optimizer_step,
    save_model_dir,
)

DESCRIBE_Q = "describe the image ."


@dataclass(frozen=True)
class TrainConfig:
    """Sizes and step counts; ``quick()`` is the CI-sized variant."""

    hidden: int = 96
    layers: int = 4
    heads: int = 4
    vision_hidden: int = 64
    vision_layers: int = 2
    base_steps: int = 1500
    base_batch: int = 64
    base_lr: float = 2e-3
    lvlm_steps1: int = 1000
    lvlm_steps2: int = 1000
    lvlm_batch: int = 64
    lvlm_lr_vision: float = 3e-3
    lvlm_lr_lm: float = 3e-4
    align_weight: float = 1.0
    rm_steps: int = 1200
    rm_batch: int = 32
    rm_lr_lm: float = 3e-4
    rm_lr_head: float = 1e-3
    n_train: int = 4000

    @classmethod
    def quick(cls) -> TrainConfig:
        return cls(hidden=32, layers=2, heads=2, vision_hidden=32, vision_layers=1, base_steps=60, lvlm_steps1=30,
                   lvlm_steps2=30, rm_steps=40, n_train=300)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# ------------------------------------------------------------------------------------------------ configs
def llama_config(tok, cfg: TrainConfig, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra,
    )


def llava_config(tok, cfg: TrainConfig):
    from transformers import CLIPVisionConfig, LlavaConfig

    from .text import PATCH

    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
                              patch_size=PATCH, projection_dim=cfg.vision_hidden)
    c = LlavaConfig(vision_config=vision, text_config=llama_config(tok, cfg),
                    image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                    vision_feature_select_strategy="default", projector_hidden_act="gelu")
    c.pad_token_id = tok.pad_token_id
    return c


# ------------------------------------------------------------------------------------------------ helpers
def _answer_labels(tok, ids: torch.Tensor) -> torch.Tensor:
    """Labels that train only the tokens after ``<a>`` (the answer and its ``<eos>``)."""
    a = tok.convert_tokens_to_ids("<a>")
    after = (ids == a).int().cumsum(1) > 0
    after &= ids != a
    return ids.masked_fill(~after | (ids == tok.pad_token_id), -100)


def _qa_text(rng: random.Random, world: World, i: int, qa, *, image: bool) -> str:
    scene = world.train.scenes[i]
    if qa is None:  # captioning
        return text_seq(DESCRIBE_Q, scene.description, None if image else scene.description, image=image)
    return text_seq(qa.question, answer(qa.gold, rng.choice(("good", "bad"))),
                    None if image else scene.description, image=image)


# ------------------------------------------------------------------------------------------------ base LM
def train_base(world: World, cfg: TrainConfig, out: Path, seed: int, progress: bool = True) -> dict:
    """Causal LM on 25% description-only and 75% description + QA sequences (both answer styles)."""
    from transformers import LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tok, cfg)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, weight_decay=0.01)
    sched = cosine_schedule(opt, cfg.base_steps)
    rng = random.Random(f"base:{seed}")
    stream = world.qa_stream(world.train, seed)
    losses = []
    for _ in tqdm(range(cfg.base_steps), desc="train base LM", disable=not progress, leave=False):
        texts = []
        for _ in range(cfg.base_batch):
            i, qa = next(stream)
            if rng.random() < 0.25:
                texts.append(description_seq(world.train.scenes[i].description))
            else:
                texts.append(_qa_text(rng, world, i, qa, image=False))
        enc = encode_texts(tok, texts)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        losses.append(optimizer_step(lm_loss(model(**enc).logits, labels), opt, sched))

    def save(d: Path) -> None:
        model.eval().save_pretrained(d)
        tok.save_pretrained(d)

    save_model_dir(save, out)
    return {"final_loss": sum(losses[-20:]) / len(losses[-20:])}


# ------------------------------------------------------------------------------------------------ LVLM
def _image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    feats = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default")
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, list | tuple):
        feats = torch.stack(list(feats))
    return feats.reshape(pixel_values.shape[0], N_IMAGE_TOKENS, -1)


def lvlm_forward(model, input_ids, attention_mask, pixel_values):
    """LLaVA's own forward path, exposing the projected image tokens (for the alignment loss)."""
    feats = _image_features(model, pixel_values)
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_index).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
    h = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    return model.lm_head(h), feats


def train_lvlm(world: World, cfg: TrainConfig, base_dir: Path, out: Path, seed: int, progress: bool = True) -> dict:
    """Stage 1: LM frozen, vision + projector learn (50% captioning); stage 2: all unfrozen (20% captioning).

    Both stages add ``align × ‖proj(img)_k − E[slot word k]‖² / ‖E‖²`` with E the base's embeddings, detached.
    """
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    tok = build_tokenizer()
    proc = build_processor(tok)
    torch.manual_seed(seed + 1)
    model = LlavaForConditionalGeneration(llava_config(tok, cfg))
    base = pretrained(LlamaForCausalLM, base_dir)
    missing = model.model.language_model.load_state_dict(base.model.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    model.lm_head.load_state_dict(base.lm_head.state_dict())
    emb = base.get_input_embeddings().weight.detach().clone()
    del base
    pix = proc.image_processor(images=[world.train.image(i) for i in range(len(world.train.scenes))],
                               return_tensors="pt")["pixel_values"]
    slot_ids = torch.tensor([tok.convert_tokens_to_ids(s.description.split()) for s in world.train.scenes])
    rng = random.Random(f"lvlm:{seed}")
    stream = world.qa_stream(world.train, seed + 7)
    lm_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    vis_params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    log = {}
    bar = tqdm(total=cfg.lvlm_steps1 + cfg.lvlm_steps2, desc="train LVLM", disable=not progress, leave=False)
    for stage, steps, caption_p in ((1, cfg.lvlm_steps1, 0.5), (2, cfg.lvlm_steps2, 0.2)):
        for p in lm_params:
            p.requires_grad_(stage == 2)
        groups = [{"params": vis_params, "lr": cfg.lvlm_lr_vision}]
        if stage == 2:
            groups.append({"params": lm_params, "lr": cfg.lvlm_lr_lm})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        sched = cosine_schedule(opt, steps)
        model.train()
        losses = []
        for _ in range(steps):
            idx, texts = [], []
            for _ in range(cfg.lvlm_batch):
                i, qa = next(stream)
                idx.append(i)
                texts.append(_qa_text(rng, world, i, None if rng.random() < caption_p else qa, image=True))
            enc = encode_texts(tok, texts)
            logits, feats = lvlm_forward(model, enc["input_ids"], enc["attention_mask"], pix[idx])
            lm = lm_loss(logits, _answer_labels(tok, enc["input_ids"]))
            target = emb[slot_ids[idx]]
            align = ((feats - target) ** 2).sum(-1).mean() / (target**2).sum(-1).mean()
            optimizer_step(lm + cfg.align_weight * align, opt, sched)
            losses.append((lm.item(), align.item()))
            bar.update()
        tail = losses[-20:]
        log[f"stage{stage}_lm_loss"] = sum(x for x, _ in tail) / len(tail)
        log[f"stage{stage}_align_loss"] = sum(y for _, y in tail) / len(tail)
    bar.close()
    for p in lm_params:
        p.requires_grad_(True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id

    def save(d: Path) -> None:
        model.eval().save_pretrained(d)
        proc.save_pretrained(d)

    save_model_dir(save, out)
    return log


# ------------------------------------------------------------------------------------------------ text RM
def rm_pair_texts(world: World, rng: random.Random, stream, n: int) -> tuple[list, list]:
    """``n`` training pairs (chosen texts, rejected texts): half correctness pairs, half style pairs."""
    chosen, rejected = [], []
    for _ in range(n):
        i, qa = next(stream)
        p = make_pair(qa, rng, kind="style" if rng.random() < 0.5 else "correct")
        desc = world.train.scenes[i].description
        chosen.append(text_seq(p.question, p.chosen, desc))
        rejected.append(text_seq(p.question, p.rejected, desc))
    return chosen, rejected


def train_rm(world: World, cfg: TrainConfig, base_dir: Path, out: Path, seed: int, progress: bool = True) -> dict:
    """Bradley-Terry on text pairs whose prompt holds the description; the score head reads ``<eos>``."""
    from transformers import LlamaForSequenceClassification

    tok = build_tokenizer()
    torch.manual_seed(seed + 2)
    model = pretrained(LlamaForSequenceClassification, base_dir, num_labels=1).train()
    torch.nn.init.normal_(model.score.weight, std=0.02)
    opt = torch.optim.AdamW([{"params": model.model.parameters(), "lr": cfg.rm_lr_lm},
                             {"params": model.score.parameters(), "lr": cfg.rm_lr_head}], weight_decay=0.0)
    sched = cosine_schedule(opt, cfg.rm_steps)
    rng = random.Random(f"rm:{seed}")
    stream = world.qa_stream(world.train, seed + 13)
    losses, accs = [], []
    for _ in tqdm(range(cfg.rm_steps), desc="train text RM", disable=not progress, leave=False):
        c, r = rm_pair_texts(world, rng, stream, cfg.rm_batch)
        enc = encode_texts(tok, c + r)
        s = model(**enc).logits[:, 0]
        margin = s[: len(c)] - s[len(c):]
        losses.append(optimizer_step(-F.logsigmoid(margin).mean(), opt, sched))
        accs.append((margin > 0).float().mean().item())

    def save(d: Path) -> None:
        model.eval().save_pretrained(d)
        tok.save_pretrained(d)

    save_model_dir(save, out)
    return {"final_loss": sum(losses[-20:]) / 20, "train_acc": sum(accs[-50:]) / len(accs[-50:])}


# ------------------------------------------------------------------------------------------------ all three
def train_all(work: Path, seed: int, cfg: TrainConfig, *, progress: bool = True, parallel: bool = True) -> dict:
    """Train (or reuse) base, LVLM and RM under ``work``; returns their directories and training logs.

    Each model is cached on its own: a directory is reused when its ``shapes_train.json`` matches the seed and
    config. The base trains on as many threads as other processes leave cores free (``vlrm_rlhf.threads``); then,
    with ``parallel``, the LVLM and RM train in two child processes, one thread each.
    """
    work.mkdir(parents=True, exist_ok=True)
    dirs = {k: work / k for k in ("base", "lvlm", "rm")}
    stamp = json.dumps({"seed": seed, "config": json.loads(cfg.key()), "world": WORLD_VERSION}, sort_keys=True)
    log = {k: cached_log(d, stamp) for k, d in dirs.items()}
    if all(v is not None for v in log.values()):
        return {"dirs": dirs, "log": log, "cached": True}
    if log["base"] is None:
        log["lvlm"] = log["rm"] = None  # both are built on the base
        t0 = time.perf_counter()
        with adaptive_threads():  # Llama-only: bit-identical on any thread count, so use the cores left free
            log["base"] = train_base(World(seed, n_train=cfg.n_train), cfg, dirs["base"], seed, progress)
        log["base"]["seconds"] = round(time.perf_counter() - t0, 1)
        mark_trained(dirs["base"], stamp, log["base"])
    todo = [k for k in ("lvlm", "rm") if log[k] is None]
    if progress:
        print(f"training {' and '.join(todo)} {'in parallel processes' if parallel and len(todo) > 1 else ''}...",
              flush=True)
    if parallel and len(todo) > 1:  # one thread each, in children that die with this process
        from .children import run_children

        jobs = {k: {"kind": k, "seed": seed, "cfg": asdict(cfg), "base": str(dirs["base"]), "out": str(dirs[k])}
                for k in todo}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        results = run_children(jobs, "vlrm_rlhf.worlds.train:train_job", env=env)
    else:
        with pinned_threads(1):  # the LVLM's result depends on the thread count: the same one as in the children
            results = {k: _train_job(k, seed, cfg, dirs["base"], dirs[k], progress) for k in todo}
    for k, r in results.items():
        log[k] = r
        mark_trained(dirs[k], stamp, r)
    return {"dirs": dirs, "log": log, "cached": False}


def _train_job(kind: str, seed: int, cfg: TrainConfig, base_dir: Path, out: Path, progress: bool = False) -> dict:
    world = World(seed, n_train=cfg.n_train)
    t = time.perf_counter()
    fn = train_lvlm if kind == "lvlm" else train_rm
    r = fn(world, cfg, base_dir, out, seed, progress=progress)
    r["seconds"] = round(time.perf_counter() - t, 1)
    return r


def train_job(kind: str, seed: int, cfg: dict, base: str, out: str) -> dict:
    """One training job of ``train_all``'s child processes (JSON in, JSON out), on one thread: the LVLM's weights
    depend on the thread count (LayerNorm's backward), so it is fixed."""
    with pinned_threads(1):
        return _train_job(kind, seed, TrainConfig(**cfg), Path(base), Path(out))
