"""End-to-end merge engine properties on tiny models of every family, in both checkpoint layouts."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import lm_tensors, load_all, recipe

import vlrm_rlhf  # noqa: F401  (registers VLRM classes)
from vlrm_rlhf.merge import build
from vlrm_rlhf.merge.checkpoint import Checkpoint
from vlrm_rlhf.testing.zoo import FAMILIES


@pytest.fixture(scope="module")
def merged(zoo, tmp_path_factory):
    """Per (family, layout): the trio, a VLRM equal to the RM's LM, and an LVLM equal to the LVLM's LM."""
    cache = {}

    def get(family, layout):
        if (family, layout) not in cache:
            trio = zoo(family, layout)
            root = tmp_path_factory.mktemp(f"m_{family}_{layout}")
            vlrm = build(recipe(trio, lvlm={"weight": 0.0}, rm={"weight": 1.0}), root / "vlrm", progress=False)
            lvlm = build(recipe(trio, output="lvlm", lvlm={"weight": 1.0}, rm={"weight": 0.0}), root / "lvlm",
                         progress=False)
            cache[family, layout] = trio, vlrm, lvlm
        return cache[family, layout]

    return get


@pytest.mark.parametrize("layout", ["transformers", "hub"])
@pytest.mark.parametrize("family", FAMILIES)
def test_vlrm_parts_are_bit_identical_and_text_reward_matches_rm(merged, family, layout):
    from transformers import AutoModelForSequenceClassification

    trio, vlrm_dir, _ = merged(family, layout)
    got = load_all(vlrm_dir)
    lv = Checkpoint(trio["lvlm"], "lvlm")
    rm = Checkpoint(trio["rm"], "rm")
    # vision tower, projector (and Mllama cross layers): bit-identical to the LVLM
    for mk in lv.other:
        assert torch.equal(got[mk], lv.get(mk)), mk
    assert torch.equal(got["score.weight"], rm.get("score.weight"))
    # language model: the RM's exactly (linear weight 1 on the RM); extra embedding rows from the LVLM
    for c, mk in lv.text.items():
        if c == "lm_head.weight":
            assert mk not in got
            continue
        r = rm.get(rm.text[c])
        if c == "embed_tokens.weight":
            assert torch.equal(got[mk][: r.shape[0]], r)
            assert torch.equal(got[mk][r.shape[0]:], lv.get(mk)[r.shape[0]:])
        else:
            assert torch.equal(got[mk], r), c
    cfg = json.loads((vlrm_dir / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForSequenceClassification")
    model, info = AutoModelForSequenceClassification.from_pretrained(vlrm_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    rm_model = AutoModelForSequenceClassification.from_pretrained(trio["rm"]).eval()
    assert model.config.get_text_config().pad_token_id == rm_model.config.pad_token_id
    ids = torch.tensor([[1, 7, 8, 9, 10, 2], [1, 11, 12, 2, 0, 0]])
    ids[ids == 0] = rm_model.config.pad_token_id
    with torch.no_grad():
        a = model.eval()(input_ids=ids, use_cache=False).logits
        b = rm_model(input_ids=ids, use_cache=False).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["transformers", "hub"])
@pytest.mark.parametrize("family", FAMILIES)
def test_linear_weight_one_on_lvlm_returns_it_and_generates(merged, family, layout):
    from transformers import AutoModelForImageTextToText

    trio, _, lvlm_dir = merged(family, layout)
    got = load_all(lvlm_dir)
    lv = Checkpoint(trio["lvlm"], "lvlm")
    for mk in lv.ckpt_key:
        if mk in got:
            assert torch.equal(got[mk], lv.get(mk)), mk
        else:
            assert lv.tied and mk == lv.lm_head_key
    model, info = AutoModelForImageTextToText.from_pretrained(lvlm_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    out = model.generate(input_ids=torch.tensor([[1, 7, 8]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("family", ["llava", "mllama", "qwen2_vl"])
def test_task_arithmetic_zero_returns_base(zoo, tmp_path, family):
    trio = zoo(family)
    out = build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.0}, rm={"weight": 0.0}), tmp_path / "o",
                progress=False)
    got = load_all(out)
    lv = Checkpoint(trio["lvlm"], "lvlm")
    base = lm_tensors(trio["base"], "base")
    for c, mk in lv.text.items():
        if c == "lm_head.weight":
            continue
        b = base[c]
        assert torch.equal(got[mk][: b.shape[0]], b), c


def test_task_arithmetic_matches_formula_and_gradients(zoo, tmp_path):
    """θ = θ_b + Σ λ_i τ_i with a per-layer gradient on the LVLM weight and a filtered RM weight."""
    trio = zoo("mllama")
    lam_l = [0.2, 0.8]
    r = recipe(trio, "task_arithmetic", lvlm={"weight": lam_l},
               rm={"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.4}]}, params={"normalize": False})
    out = build(r, tmp_path / "o", progress=False)
    got = load_all(out)
    lv = Checkpoint(trio["lvlm"], "lvlm")
    base, L, R = (lm_tensors(trio[k], k) for k in ("base", "lvlm", "rm"))
    n_layers = 1 + max(int(c.split(".")[1]) for c in base if c.startswith("layers."))
    for c, mk in lv.text.items():
        if c == "lm_head.weight":
            continue
        t = int(c.split(".")[1]) / (n_layers - 1) if c.startswith("layers.") else 0.0
        wl = lam_l[0] + t * (lam_l[1] - lam_l[0])
        wr = 0.9 if "mlp" in c else 0.4
        b = base[c]
        k = b.shape[0]
        expect = b + wl * (L[c][:k] - b) + wr * (R[c][:k] - b)
        torch.testing.assert_close(got[mk][:k], expect, rtol=1e-6, atol=1e-6, msg=c)
    # Mllama cross-attention layers are copied from the LVLM untouched
    cross = [k for k in lv.other if ".language_model." in k or k.startswith("model.language_model")]
    assert cross, "mllama fixture should have cross-attention layers"
    for k in cross:
        assert torch.equal(got[k], lv.get(k))


def test_sharded_output_loads(zoo, tmp_path):
    from transformers import AutoModelForSequenceClassification

    trio = zoo("llava")
    out = build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 0.5}), tmp_path / "o",
                max_shard_size="20KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert (out / "README.md").read_text().count("task_arithmetic") >= 1
    assert (out / "merge_recipe.yaml").is_file()


def test_embedding_rows_matched_by_token_string(zoo, tmp_path):
    """RM-only tokens are appended (row from the RM), image-token rows come from the LVLM, pad id is remapped."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trio = zoo("llava", rm_extra_pad_token=True)
    out = build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), tmp_path / "o",
                progress=False)
    got = load_all(out)
    lv, rm, base = (Checkpoint(trio[k], k) for k in ("lvlm", "rm", "base"))
    tok_out, tok_rm, tok_lv = (AutoTokenizer.from_pretrained(d) for d in (out, trio["rm"], trio["lvlm"]))
    emb = got[lv.embed_key]
    e_rm, e_lv, e_b = rm.get(rm.text["embed_tokens.weight"]), lv.get(lv.embed_key), base.get(base.embed_key)
    # the RM's private pad token: appended after the LVLM's rows, its row copied from the RM
    assert tok_rm.pad_token == "<rm_pad>" and "<rm_pad>" not in tok_lv.get_vocab()
    new_id = tok_out.convert_tokens_to_ids("<rm_pad>")
    assert new_id >= len(tok_lv)
    assert torch.equal(emb[new_id], e_rm[tok_rm.convert_tokens_to_ids("<rm_pad>")])
    assert emb.shape[0] == max(e_lv.shape[0], new_id + 1)
    # the VLRM pads with that token and its config says so
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.get_text_config().pad_token_id == new_id == tok_out.pad_token_id
    # LVLM-only tokens (the image token) keep the LVLM's row
    img = next(t for t in tok_lv.get_vocab() if t not in tok_rm.get_vocab())
    assert torch.equal(emb[tok_out.convert_tokens_to_ids(img)], e_lv[tok_lv.convert_tokens_to_ids(img)])
    # shared tokens are merged by the method: θ_b + 0.5 τ_L + 1.0 τ_R, matched by string
    for t in ("red", "<eos>", "what"):
        i_o, i_b = tok_out.convert_tokens_to_ids(t), AutoTokenizer.from_pretrained(trio["base"]).convert_tokens_to_ids(t)
        i_l, i_r = tok_lv.convert_tokens_to_ids(t), tok_rm.convert_tokens_to_ids(t)
        expect = e_b[i_b] + 0.5 * (e_lv[i_l] - e_b[i_b]) + (e_rm[i_r] - e_b[i_b])
        torch.testing.assert_close(emb[i_o], expect, rtol=1e-6, atol=1e-7)


def test_cli_merge_and_errors(zoo, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    trio = zoo("llava")
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe(trio, "dare_ties", lvlm={"weight": 0.5, "density": 0.5},
                                       rm={"weight": 1.0, "density": 0.5})))
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(r), "--out", str(tmp_path / "a"), "--seed", "3"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["merge", str(r), "--out", str(tmp_path / "b"), "--seed", "3"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["merge", str(r), "--out", str(tmp_path / "c"), "--seed", "4"])
    a, b, c = (load_all(tmp_path / x) for x in "abc")
    k = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k]), "DARE must be deterministic per seed"
    assert yaml.safe_load((tmp_path / "a" / "merge_recipe.yaml").read_text())["seed"] == 3
    res = runner.invoke(app, ["merge", str(r), "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["merge", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "z")])
    assert res.exit_code == 2 and "recipe file not found" in res.output
