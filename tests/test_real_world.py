"""Classes of failure met on real-world checkpoints: mixed input dtypes, templates that refuse a system message,
a tied base under an untied LVLM, dtype of copied tensors, stale buffers, and Mllama's pad id."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from _helpers import load_all, recipe
from safetensors.torch import load_file, save_file

import vlrm_rlhf  # noqa: F401  (registers VLRM classes)
from vlrm_rlhf.merge import build
from vlrm_rlhf.merge.checkpoint import Checkpoint
from vlrm_rlhf.merge.methods import METHODS, SPARSIFYING
from vlrm_rlhf.testing.zoo import demo_image

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def cast_copy(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """A copy of checkpoint ``src`` with every floating tensor cast to ``dtype`` (config says so too)."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(f)
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, f, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def method_recipe(trio, method: str, with_base: bool = True) -> dict:
    """A valid recipe of ``method`` merging the RM into the LVLM (slerp: LVLM as base, RM as the other)."""
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(trio["lvlm"]), "dtype": "float32",
                "models": [{"model": str(trio["lvlm"]), "role": "lvlm"}, {"model": str(trio["rm"]), "role": "rm"}],
                "parameters": {"t": 0.3}, "seed": 0}
    extra = {"density": 0.5} if method in SPARSIFYING else {}
    r = recipe(trio, method, lvlm={"weight": 0.6, **extra}, rm={"weight": 0.5, **extra}, seed=0)
    if method == "linear" and with_base:  # mergekit: linear's base_model is one more weighted input
        r["models"].append({"model": str(trio["base"]), "role": "base", "parameters": {"weight": 0.2}})
        r["parameters"] = {"normalize": True}
    return r


CASES = [(m, True) for m in sorted(METHODS)] + [("linear", False)]
MIXES = {"lvlm16-rm_bf16-base32": (F16, BF16, F32), "lvlm_bf16-rm16-base16": (BF16, F16, F16)}


@pytest.fixture(scope="module")
def mixed(zoo, tmp_path_factory):
    """Per mix: the trio cast to (lvlm, rm, base) dtypes, and the same values held in float32."""
    cache = {}

    def get(mix):
        if mix not in cache:
            src = zoo("llava", rm_extra_pad_token=True)  # an RM-only pad token: rows gathered, not sliced
            root = tmp_path_factory.mktemp(f"mix_{mix}")
            got = {role: cast_copy(src[role], root / role, dt) for role, dt in zip(("lvlm", "rm", "base"), MIXES[mix])}
            ref = {role: cast_copy(got[role], root / f"{role}32", F32) for role in got}
            cache[mix] = got, ref
        return cache[mix]

    return get


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize(("method", "with_base"), CASES)
def test_every_method_accepts_mixed_input_dtypes(mixed, tmp_path, method, with_base, mix):
    """fp16 LVLM + bf16 RM (and the reverse): the merge computes in float32 exactly as if every input were fp32."""
    got, ref = mixed(mix)
    a = load_all(build(method_recipe(got, method, with_base), tmp_path / "a", progress=False))
    b = load_all(build(method_recipe(ref, method, with_base), tmp_path / "b", progress=False))
    assert a.keys() == b.keys()
    lv = Checkpoint(got["lvlm"], "lvlm")
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k
        if k in lv.other:  # copied: the source's dtype, bit-identical
            assert a[k].dtype == MIXES[mix][0] and torch.equal(a[k], lv.get(k)), k
        elif k != "score.weight":
            assert a[k].dtype == F32, k  # merged: the recipe's dtype


def test_copied_tensors_keep_their_dtype_unless_out_dtype(zoo, tmp_path):
    """`dtype: bfloat16` on an fp16 LVLM rounds only what is merged; `out_dtype` casts everything, and says so."""
    src = zoo("llava")
    trio = {r: cast_copy(src[r], tmp_path / r, F16) for r in ("lvlm", "rm", "base")}
    r = recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0})
    r["dtype"] = "bfloat16"
    out = build(r, tmp_path / "a", progress=False)
    got, lv = load_all(out), Checkpoint(trio["lvlm"], "lvlm")
    for k in lv.other:
        assert got[k].dtype == F16 and torch.equal(got[k], lv.get(k)), k
    for c, k in lv.text.items():
        if c != "lm_head.weight":
            assert got[k].dtype == BF16, k
    assert got["score.weight"].dtype == F16
    card = (out / "README.md").read_text()
    assert "copied tensors keep their source dtype" in card
    r["out_dtype"] = "bfloat16"
    out = build(r, tmp_path / "b", progress=False)
    got = load_all(out)
    assert all(t.dtype == BF16 for t in got.values())
    card = (out / "README.md").read_text()
    assert "float16 → bfloat16" in card and "out_dtype" in card


def _tie(src: Path, dst: Path) -> Path:
    """A SmolLM2-style tied copy of a text checkpoint: no lm_head tensor, ``tie_word_embeddings: true``."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(f)
    sd.pop("lm_head.weight", None)
    save_file(sd, f, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_output_lvlm_with_a_tied_base_and_an_untied_lvlm(zoo, tmp_path):
    """A tied model's lm_head is its embedding matrix: the base's and the LLM's stand in for theirs."""
    trio = dict(zoo("llava"))
    trio["base"], trio["llm"] = _tie(trio["base"], tmp_path / "base"), _tie(trio["llm"], tmp_path / "llm")
    r = recipe(trio, "task_arithmetic", output="lvlm", lvlm={"weight": 0.5}, llm={"weight": 0.7})
    got = load_all(build(r, tmp_path / "o", progress=False))
    lv, base, llm = (Checkpoint(trio[k], k) for k in ("lvlm", "base", "llm"))
    e_b, e_llm = base.get(base.embed_key), llm.get(llm.embed_key)
    head = lv.get(lv.lm_head_key)
    k = e_b.shape[0]
    expect = e_b + 0.5 * (head[:k] - e_b) + 0.7 * (e_llm - e_b)
    torch.testing.assert_close(got[lv.lm_head_key][:k], expect, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[lv.lm_head_key][k:], head[k:])  # image-token / padding rows: the LVLM's


def test_stale_buffers_are_ignored_with_a_note(zoo, tmp_path):
    """Keys transformers ignores on load (non-persistent buffers, the class's ignore patterns) are not refused."""
    trio = dict(zoo("llava"))
    trio["lvlm"], trio["rm"] = (Path(shutil.copytree(trio[k], tmp_path / k)) for k in ("lvlm", "rm"))
    for d, key, t in ((trio["lvlm"], "model.vision_tower.vision_model.embeddings.position_ids", torch.arange(17)[None]),
                      (trio["rm"], "model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4))):
        f = d / "model.safetensors"
        sd = load_file(f)
        sd[key] = t
        save_file(sd, f, metadata={"format": "pt"})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), tmp_path / "o",
                    progress=False)
    notes = [str(x.message) for x in w if "ignored" in str(x.message)]
    assert any("position_ids" in n and "lvlm" in n for n in notes), notes
    assert any("rotary_emb.inv_freq" in n and "rm" in n for n in notes), notes
    assert not any(k.endswith(("position_ids", "inv_freq")) for k in load_all(out))


@pytest.mark.parametrize("output", ["vlrm", "lvlm"])
def test_mllama_appended_tokens_stay_inside_the_text_vocabulary(zoo, tmp_path, output):
    """Mllama's embedding has vocab_size + 8 rows: an appended RM pad token grows vocab_size so that its id
    stays below it, and the embedding and lm_head grow with it."""
    from transformers import AutoModelForImageTextToText, AutoModelForSequenceClassification, AutoTokenizer

    trio = zoo("mllama", rm_extra_pad_token=True)
    r = recipe(trio, "task_arithmetic", output=output, lvlm={"weight": 0.5}, rm={"weight": 1.0})
    out = build(r, tmp_path / "o", progress=False)
    cfg = json.loads((out / "config.json").read_text())["text_config"]
    new_id = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<rm_pad>")
    assert new_id < cfg["vocab_size"]
    if output == "vlrm":
        assert cfg["pad_token_id"] == new_id
    got, lv = load_all(out), Checkpoint(trio["lvlm"], "lvlm")
    assert got[lv.embed_key].shape[0] == cfg["vocab_size"] + 8
    if output == "lvlm":
        assert got[lv.lm_head_key].shape[0] == cfg["vocab_size"]
    cls = AutoModelForSequenceClassification if output == "vlrm" else AutoModelForImageTextToText
    _, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


# ---- chat templates that refuse a message form -----------------------------------------------------------------
_REFUSE = ("{%- set ns = namespace(images=false) -%}{%- for m in messages -%}{%- if m['content'] is not string -%}"
           "{%- for p in m['content'] -%}{%- if p['type'] == 'image' -%}{%- set ns.images = true -%}{%- endif -%}"
           "{%- endfor -%}{%- endif -%}{%- endfor -%}"
           "{%- if ns.images and messages[0]['role'] == 'system' -%}"
           "{{ raise_exception('Prompting with images is incompatible with system messages.') }}{%- endif -%}")


@pytest.fixture(scope="module")
def refusing(zoo, tmp_path_factory):
    """A llava VLRM whose chat template raises on a system message when images are present (Llama-3.2-Vision)."""
    trio = zoo("llava")
    out = build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}),
                tmp_path_factory.mktemp("refusing") / "vlrm", progress=False)
    tpl = out / "chat_template.jinja"  # where the processor keeps its template
    tpl.write_text(_REFUSE + tpl.read_text())
    return trio, out


def test_system_message_is_folded_when_the_template_refuses_it(refusing):
    from vlrm_rlhf.reward.scorer import VLRewardScorer

    trio, out = refusing
    sc = VLRewardScorer.from_pretrained(out)
    im = demo_image(trio["lvlm"])
    system = {"role": "system", "content": "please answer with one color ."}
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the car ?"}]}
    with pytest.raises(Exception, match="incompatible with system messages"):  # the template does refuse it
        sc.processor.apply_chat_template([system, user], tokenize=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = sc.score(prompts=[[system, user]] * 2, responses=["red", "blue"], images=[[im]] * 2)
        sc.score(prompts=[[system, user]], responses=["red"], images=[[im]])
    folded = {"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": "please answer with one color .\n\nwhat color is the car ?"}]}
    b = sc.score(prompts=[[folded]] * 2, responses=["red", "blue"], images=[[im]] * 2)
    assert a == b
    notes = [str(x.message) for x in w if "system" in str(x.message)]
    assert len(notes) == 1 and "first user" in notes[0], notes
    # candidates (prefix reuse) and text-only conversations with a system message work too
    assert sc.score_candidates([system, user], ["red", "blue"], [im]) == pytest.approx(b, abs=1e-4)
    sc.score(prompts=[[system, {"role": "user", "content": "what color ?"}]], responses=["red"])


def test_readme_documents_the_folding():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    assert "system" in text and "first user turn" in text
