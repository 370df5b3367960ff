"""The tiny checkpoint zoo: every family x layout loads cleanly, is related as promised, and is deterministic.

The checks here are deliberately independent of the builder's own helpers: LM prefixes and
hub-layout roots are written out by hand (what real checkpoints look like), the Mllama layer
shift is recomputed from the saved config, and "the LVLM's LM is the base's" is proven
functionally (zero delta gives bit-identical text logits).
"""

from __future__ import annotations

import bisect
import functools
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from vlrm_rlhf.testing.zoo import FAMILIES, SPECS, build_trio, demo_image, lvlm_inputs, write_quick_recipe

AUTO = {"base": AutoModelForCausalLM, "llm": AutoModelForCausalLM, "rm": AutoModelForSequenceClassification,
        "lvlm": AutoModelForImageTextToText}
LM_PREFIX = {"idefics3": "model.text_model."}  # loaded-module prefix of the LM; default below
LM_PREFIX["smolvlm"] = LM_PREFIX["idefics3"]
HUB_ROOTS = {  # first key component(s) of real hub checkpoints
    "llava": {"language_model", "vision_tower", "multi_modal_projector"},
    "llava_next": {"language_model", "vision_tower", "multi_modal_projector", "image_newline"},
    "mllama": {"language_model", "vision_model", "multi_modal_projector"},
    "qwen2_vl": {"model", "visual", "lm_head"},
    "qwen2_5_vl": {"model", "visual", "lm_head"},
    "idefics3": {"model", "lm_head"},
    "smolvlm": {"model", "lm_head"},
    "gemma3": {"language_model", "vision_tower", "multi_modal_projector"},
}
HUB_PREFIXES = {  # each must start at least one hub key (e.g. CLIP/SigLIP towers keep `vision_model.`)
    "llava": ("language_model.model.layers.", "language_model.lm_head.", "vision_tower.vision_model.encoder."),
    "mllama": ("language_model.model.layers.", "language_model.lm_head.", "vision_model.transformer."),
    "qwen2_vl": ("model.layers.", "model.embed_tokens.", "visual.blocks.", "visual.merger."),
    "idefics3": ("model.text_model.layers.", "model.vision_model.encoder.", "model.connector."),
    "gemma3": ("language_model.model.layers.", "vision_tower.vision_model.encoder.",
               "multi_modal_projector.mm_input_projection_weight"),
}
HUB_PREFIXES |= {"llava_next": HUB_PREFIXES["llava"] + ("image_newline",), "qwen2_5_vl": HUB_PREFIXES["qwen2_vl"],
                 "smolvlm": HUB_PREFIXES["idefics3"]}
IMAGE_TOKEN = {"llava": "<image>", "llava_next": "<image>", "mllama": "<|image|>", "qwen2_vl": "<|image_pad|>",
               "qwen2_5_vl": "<|image_pad|>", "idefics3": "<image>", "smolvlm": "<image>", "gemma3": "<image_soft_token>"}
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ."}]}]
layouts = pytest.mark.parametrize("layout", ["transformers", "hub"])
families = pytest.mark.parametrize("family", FAMILIES)


@functools.cache
def load(path: Path, role: str) -> torch.nn.Module:
    """Load with the role's Auto class, asserting no missing/unexpected/mismatched keys."""
    model, info = AUTO[role].from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), f"{path}: {info}"
    return model.eval()


def disk_keys(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


def base_name(family: str, key: str, cross: list[int]) -> str | None:
    """Base parameter an LVLM parameter derives from (Mllama: text layer j -> j - bisect_left(C, j))."""
    if key == "lm_head.weight":
        return key
    prefix = LM_PREFIX.get(family, "model.language_model.")
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    if m := re.match(r"layers\.(\d+)\.(.+)", rest):
        j = int(m[1])
        if j in cross:
            return None
        rest = f"layers.{j - bisect.bisect_left(cross, j)}.{m[2]}"
    return "model." + rest


@layouts
@families
def test_every_directory_loads_cleanly(zoo, family, layout):
    trio, spec = zoo(family, layout), SPECS[family]
    assert set(trio) == {"base", "lvlm", "rm", "llm"}
    names = {"base": spec.causal_lm_cls, "llm": spec.causal_lm_cls, "rm": spec.seq_cls, "lvlm": spec.lvlm_cls}
    for role, path in trio.items():
        assert type(load(path, role)).__name__ == names[role]
    assert load(trio["rm"], "rm").config.num_labels == 1
    roots = {k.split(".")[0] for k in disk_keys(trio["lvlm"])}
    if layout == "hub":
        assert roots == HUB_ROOTS[family]
        for prefix in HUB_PREFIXES[family]:
            assert any(k.startswith(prefix) for k in disk_keys(trio["lvlm"])), prefix
    else:
        assert roots <= {"model", "lm_head"}
        assert any(k.startswith(LM_PREFIX.get(family, "model.language_model.")) for k in disk_keys(trio["lvlm"]))


@families
def test_hub_layout_loads_to_the_same_tensors(zoo, family):
    a = load(zoo(family, "transformers")["lvlm"], "lvlm").state_dict()
    b = load(zoo(family, "hub")["lvlm"], "lvlm").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for role in ("base", "rm", "llm"):  # text models are the same in both layouts
        assert disk_keys(zoo(family, "transformers")[role]) == disk_keys(zoo(family, "hub")[role])


def _check_delta(base: dict, other: dict, mapping: dict[str, str], scale: float, head: bool = True) -> None:
    assert set(mapping.values()) == set(base) - (set() if head else {"lm_head.weight"}), "base tensor left out"
    for key, bkey in mapping.items():
        b = base[bkey].float()
        d = other[key][: b.shape[0]].float() - b
        ref = b.pow(2).mean().sqrt().item() or 1.0
        rel = d.pow(2).mean().sqrt().item() / ref
        assert d.abs().max() > 0 and 0.4 * scale < rel < 2.5 * scale, (key, rel)


@layouts
@families
def test_derived_language_models_are_base_plus_small_delta(zoo, family, layout):
    trio = zoo(family, layout)
    base = load(trio["base"], "base").state_dict()
    lvlm = load(trio["lvlm"], "lvlm")
    cross = sorted(getattr(lvlm.config.get_text_config(), "cross_attention_layers", None) or [])
    lsd = lvlm.state_dict()
    mapping = {k: n for k in lsd if (n := base_name(family, k, cross)) is not None and n in base}
    _check_delta(base, lsd, mapping, 0.02)
    for role in ("rm", "llm"):
        sd = load(trio[role], role).state_dict()
        _check_delta(base, sd, {k: k for k in sd if k in base}, 0.02, head=role == "llm")
    if cross:  # Mllama: the cross-attention layers are extra, random, and the only unmatched LM layers
        n_text = lvlm.config.get_text_config().num_hidden_layers
        assert n_text == load(trio["base"], "base").config.num_hidden_layers + len(cross)


@families
def test_zero_delta_gives_identical_text_behaviour(zoo, family):
    """With delta_scale=0 the LVLM's text-only logits (and the RM's features) are the base's, bit for bit."""
    trio = zoo(family, delta_scale=0.0)
    tok = AutoTokenizer.from_pretrained(trio["base"])
    ids = tok(["what is the color of the sky ?"], return_tensors="pt")
    base, lvlm, rm = load(trio["base"], "base"), load(trio["lvlm"], "lvlm"), load(trio["rm"], "rm")
    with torch.no_grad():
        want = base(**ids, output_hidden_states=True)
        got = lvlm(**ids).logits[..., : want.logits.shape[-1]]
        feats = rm.model(**ids).last_hidden_state
    assert torch.equal(got, want.logits)
    assert torch.equal(feats, want.hidden_states[-1])


@families
def test_tokens_rows_and_image_token_ids(zoo, family):
    spec, trio = SPECS[family], zoo(family, rm_extra_pad_token=True)
    base_tok = AutoTokenizer.from_pretrained(trio["base"])
    tok = AutoTokenizer.from_pretrained(trio["lvlm"])
    n = len(base_tok)
    assert [tok.convert_tokens_to_ids(t) for t in spec.mm_tokens] == list(range(n, n + len(spec.mm_tokens)))
    assert len(tok) == n + len(spec.mm_tokens)
    text = "user : what is the color of the sky ?"
    for role in ("base", "rm", "llm", "lvlm"):  # AutoTokenizer must not rebuild the tokenizer (Qwen2 trap)
        t = AutoTokenizer.from_pretrained(trio[role])
        assert t(text)["input_ids"] == base_tok(text)["input_ids"], role
        assert len(set(t(text)["input_ids"])) > 5
    lvlm = load(trio["lvlm"], "lvlm")
    cfg = lvlm.config
    image_id = getattr(cfg, "image_token_id", None) or cfg.image_token_index
    assert image_id == tok.convert_tokens_to_ids(IMAGE_TOKEN[family]) >= n
    emb, head = lvlm.get_input_embeddings().weight, lvlm.get_output_embeddings().weight
    assert emb.shape[0] >= len(tok)
    if family == "llava":  # LLaVA-1.5 style padding rows beyond the tokenizer
        assert emb.shape[0] % 16 == 0 and emb.shape[0] > len(tok) and head.shape[0] == emb.shape[0]
    if family == "mllama":  # vocab+8 embedding rows, image token = first extra row, lm_head = vocab rows
        assert (emb.shape[0], head.shape[0], image_id) == (n + 8, n, n)
    assert (head is emb) == (family == "gemma3")
    rm_tok = AutoTokenizer.from_pretrained(trio["rm"])
    rm = load(trio["rm"], "rm")
    assert rm_tok.pad_token == "<rm_pad>" and rm_tok.pad_token_id == n == rm.config.pad_token_id
    assert rm.get_input_embeddings().weight.shape[0] == n + 1


@families
def test_lvlm_forward_and_generate_with_an_image(zoo, family):
    path = zoo(family, "hub")["lvlm"]
    model = load(path, "lvlm")
    inputs = lvlm_inputs(path, MESSAGES, [demo_image(path)])
    other = lvlm_inputs(path, MESSAGES, [demo_image(path, seed=1)])
    with torch.no_grad():
        a, b = model(**inputs).logits, model(**other).logits
    assert a.shape[:2] == inputs["input_ids"].shape and torch.isfinite(a).all()
    assert not torch.equal(a[0, -1], b[0, -1]), "the image must influence the logits"
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("layout", ["transformers", "hub"])
def test_builds_are_byte_identical(zoo, tmp_path, layout):
    for family in FAMILIES:
        again = build_trio(family, tmp_path / family, layout=layout)
        for role, path in zoo(family, layout).items():
            for f in sorted(p.name for p in path.iterdir()):
                assert (path / f).read_bytes() == (again[role] / f).read_bytes(), (family, role, f)


def test_seed_dtype_and_global_rng(tmp_path):
    state = torch.random.get_rng_state()
    a = build_trio("llava", tmp_path / "a", seed=1, dtype=torch.bfloat16)
    assert torch.equal(state, torch.random.get_rng_state()), "the caller's RNG must be untouched"
    with safe_open(str(a["lvlm"] / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert load(a["lvlm"], "lvlm").dtype == torch.bfloat16
    b = build_trio("llava", tmp_path / "b", seed=2)
    assert (a["base"] / "model.safetensors").read_bytes() != (b["base"] / "model.safetensors").read_bytes()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        build_trio("blip", tmp_path)
    with pytest.raises(ValueError, match="layout"):
        build_trio("llava", tmp_path, layout="gguf")  # type: ignore[arg-type]


def test_quick_recipe(zoo, tmp_path):
    trio = zoo("llava")
    path = write_quick_recipe(trio, tmp_path / "r" / "recipe.yaml")
    r = yaml.safe_load(path.read_text())
    assert r["merge_method"] == "task_arithmetic" and r["base_model"] == str(trio["base"])
    assert r["models"] == [{"model": str(trio["lvlm"]), "role": "lvlm", "parameters": {"weight": 0.7}},
                           {"model": str(trio["rm"]), "role": "rm", "parameters": {"weight": 0.7}}]
    assert (r["parameters"], r["dtype"], r["output"], r["seed"]) == ({"normalize": False}, "float32", "vlrm", 0)
    assert json.loads((trio["lvlm"] / "zoo.json").read_text())["family"] == "llava"
