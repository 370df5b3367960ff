"""Model-level differential test: our VLRM's language model vs mergekit 0.1.5 on the extracted text models.

This is the three-script workflow users run today (extract the LVLM's text model, merge with mergekit,
re-insert): on tensors both can merge, our one-step VLRM must carry the same language model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _helpers import load_all, recipe
from safetensors.torch import save_file

from vlrm_rlhf.merge import build
from vlrm_rlhf.merge.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_PY = ROOT / ".mergekit-venv" / "bin" / "python"

# name -> (method, lvlm params, rm params, shared params, slerp-style base = lvlm)
CASES = {
    "linear_norm": ("linear", {"weight": 0.7}, {"weight": 0.4}, {}, False),
    "linear_raw": ("linear", {"weight": 0.7}, {"weight": 0.4}, {"normalize": False}, False),
    "task_arithmetic_gradient": ("task_arithmetic", {"weight": [0.1, 0.9]}, {"weight": 1.0}, {}, False),
    "task_arithmetic_filter": ("task_arithmetic", {"weight": 0.5},
                               {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.3}]}, {"lambda": 0.8}, False),
    "ties_norm": ("ties", {"weight": 0.7, "density": 0.5}, {"weight": 0.5, "density": 0.6}, {"normalize": True}, False),
    "ties_raw": ("ties", {"weight": 0.7, "density": 0.5}, {"weight": 0.5, "density": 0.6}, {"normalize": False}, False),
    "breadcrumbs": ("breadcrumbs", {"weight": 0.7, "density": 0.8, "gamma": 0.05},
                    {"weight": 0.6, "density": 0.7, "gamma": 0.02}, {}, False),
    "slerp": ("slerp", {}, {}, {"t": [0.2, 0.7]}, True),
}


@pytest.fixture(scope="module")
def mergekit_python():
    if not MERGEKIT_PY.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must provide the mergekit oracle: run `bash .ci/mergekit-env.sh`")
        pytest.skip("mergekit oracle venv missing: run `bash .ci/mergekit-env.sh .venv/bin/python`")
    return MERGEKIT_PY


def extract_text_model(ck: Checkpoint, base: Checkpoint, out: Path) -> Path:
    """The LVLM's (or RM's) language model as a LlamaForCausalLM directory, vocab trimmed to the base's."""
    out.mkdir(parents=True)
    sd = {}
    v = base.shape(base.text["embed_tokens.weight"])[0]
    for c in base.text:
        src = ck if c in ck.text else base  # the RM has no lm_head: use the base's (zero task vector)
        t = src.get(src.text[c])
        sd["lm_head.weight" if c == "lm_head.weight" else "model." + c] = t[:v].clone() if c in (
            "embed_tokens.weight", "lm_head.weight") else t.clone()
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    for f in base.path.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    return out


def test_vlrm_language_model_equals_mergekit_on_extracted_models(zoo, tmp_path, mergekit_python):
    trio = zoo("llava")
    base = Checkpoint(trio["base"], "base")
    text = {"base": trio["base"]}
    for role in ("lvlm", "rm"):
        text[role] = extract_text_model(Checkpoint(trio[role], role), base, tmp_path / f"{role}_text")

    configs = {}
    for name, (method, pl, pr, shared, slerp) in CASES.items():
        cfg = {"merge_method": method, "dtype": "float32", "parameters": shared,
               **({} if method == "linear" else {"base_model": str(text["lvlm"] if slerp else text["base"])}),
               "models": [{"model": str(text["lvlm"]), "parameters": pl}, {"model": str(text["rm"]), "parameters": pr}]}
        if slerp:
            cfg["models"] = [{"model": str(text["lvlm"])}, {"model": str(text["rm"])}]
        configs[name] = cfg
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    driver = (
        "import json, sys\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.merge import run_merge, MergeOptions\n"
        "cfgs = json.load(open(sys.argv[1]))\n"
        "for name, c in cfgs.items():\n"
        "    run_merge(MergeConfiguration.model_validate(c), sys.argv[2] + '/' + name, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([str(mergekit_python), "-c", driver, str(tmp_path / "configs.json"), str(tmp_path / "mk")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    lv = Checkpoint(trio["lvlm"], "lvlm")
    worst = {}
    for name, (method, pl, pr, shared, slerp) in CASES.items():
        r = recipe(trio, method, lvlm=pl, rm=pr, params=shared, base=not slerp)
        if slerp:
            r["base_model"] = str(trio["lvlm"])
            r["models"][0]["parameters"] = {}
            r["models"][1]["parameters"] = {}
        ours = load_all(build(r, tmp_path / "ours" / name, progress=False))
        theirs = load_all(tmp_path / "mk" / name)
        worst[name] = 0.0
        for c, mk in lv.text.items():
            if c == "lm_head.weight":
                continue
            b = theirs["model." + c]
            a = ours[mk][: b.shape[0]]
            rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
            worst[name] = max(worst[name], rel)
            assert rel <= 1e-6, f"{name}: {c} differs from mergekit by {rel:.2e}"
    print("max relative error vs mergekit 0.1.5:", {k: f"{v:.1e}" for k, v in worst.items()})
    # a sanity check that the cases are not trivially equal to one input
    assert not torch.equal(load_all(tmp_path / "mk" / "ties_norm")["model.layers.0.mlp.up_proj.weight"],
                           load_all(tmp_path / "mk" / "ties_raw")["model.layers.0.mlp.up_proj.weight"])
