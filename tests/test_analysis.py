"""Layer analysis on zoo models: task files and scoring, task-vector table, ablation, layer-swap curves, CLI.

Metric values of the random zoo models mean nothing; the machinery is what is checked (exact restoration, exact
swap end points, hand-computed table entries, written and readable outputs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _helpers import load_all
from PIL import Image
from typer.testing import CliRunner

from vlrm_rlhf.analysis import AnalysisError
from vlrm_rlhf.analysis.ablate import ablate, ablation_table, load_lvlm, text_parameters, write_ablation
from vlrm_rlhf.analysis.outputs import analysis_dir
from vlrm_rlhf.analysis.params import params_for_recipe, write_params
from vlrm_rlhf.analysis.swap import LayerSwapper, swap_curve, write_swap
from vlrm_rlhf.analysis.tasks import TaskError, TaskScorer, load_tasks
from vlrm_rlhf.cli import app
from vlrm_rlhf.files import read_csv
from vlrm_rlhf.merge import build
from vlrm_rlhf.merge.checkpoint import Checkpoint
from vlrm_rlhf.testing.zoo import demo_image

RECORDS = [
    {"image": "img/0.png", "question": "what color is the cat ?", "choices": ["red", "blue", "green"], "answer": 0,
     "kind": "perception"},
    {"image": "img/1.png", "question": "is there a dog ?", "choices": ["yes", "no"], "answer": 1, "kind": "perception"},
    {"image": "img/0.png", "question": "how many cat are there ?", "choices": ["one", "two", "three"], "answer": 1,
     "kind": "reasoning"},
    {"image": None, "question": "which is big , the cat or the dog ?", "choices": ["the cat", "the dog"], "answer": 1,
     "kind": "reasoning"},
]


def write_tasks(folder: Path, lvlm: Path, records=RECORDS) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        demo_image(lvlm, i).save(folder / "img" / f"{i}.png")
    path = folder / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def reasoning(trio, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(trio["base"]), "output": "lvlm", "dtype": "float32",
            "models": [{"model": str(trio["lvlm"]), "role": "lvlm", "parameters": {"weight": 1.0}},
                       {"model": str(trio["llm"]), "role": "llm",
                        "parameters": {"weight": {"schedule": "linear", "start": 0.3, "end": 0.9}}}], **extra}


def png_ok(path: Path) -> bool:
    with Image.open(path) as im:
        return path.stat().st_size > 2000 and im.size[0] > 200 and im.size[1] > 150


@pytest.fixture(scope="module")
def llava(zoo, tmp_path_factory):
    trio = zoo("llava")
    return {**trio, "tasks": write_tasks(tmp_path_factory.mktemp("tasks"), trio["lvlm"])}


# ---- tasks ------------------------------------------------------------------------------------------------------
def test_task_file_errors_name_the_line(llava, tmp_path):
    assert [t.kind for t in load_tasks(llava["tasks"])] == ["perception", "perception", "reasoning", "reasoning"]
    cases = [({"answer": 3}, r"line 1: 'answer' must be the index of the correct choice \(0\.\.2\), got 3"),
             ({"kind": "counting"}, r"line 1: 'kind' must be one of perception, reasoning"),
             ({"image": "img/none.png"}, r"line 1: image file not found: .*none\.png"),
             ({"choices": ["red"]}, r"'choices' must be a list of at least 2"),
             ({"answers": 0}, r"unknown key\(s\) \['answers'\]")]
    for change, match in cases:
        path = write_tasks(tmp_path, llava["lvlm"], [{**RECORDS[0], **change}])
        with pytest.raises(TaskError, match=match):
            load_tasks(path)
    (tmp_path / "broken.jsonl").write_text(json.dumps(RECORDS[3]) + "\n{oops\n")
    with pytest.raises(TaskError, match=r"broken\.jsonl line 2: not valid JSON"):
        load_tasks(tmp_path / "broken.jsonl")


def test_choice_loglik_equals_a_hand_computation(llava):
    model, proc, _ = load_lvlm(llava["lvlm"])
    tasks = load_tasks(llava["tasks"])
    scores = TaskScorer(model, proc, batch_size=3).score(tasks)
    t = tasks[0]
    image = Image.open(t.image).convert("RGB")
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t.question}]}]
    prefix = proc.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    for j, choice in enumerate(t.choices):
        enc = proc(text=[prefix + " " + choice], images=[[image]], return_tensors="pt", add_special_tokens=False)
        n = proc(text=[prefix], images=[[image]], return_tensors="pt", add_special_tokens=False)["input_ids"].shape[1]
        with torch.no_grad():
            logp = model(**enc).logits[0].log_softmax(-1)
        ids = enc["input_ids"][0]
        want = sum(float(logp[i - 1, ids[i]]) for i in range(n, len(ids)))
        assert scores.loglik[0][j] == pytest.approx(want, abs=1e-4)
    m = scores.metrics["perception"]
    assert m["n"] == 2 and 0 <= m["accuracy"] <= 1 and m["logprob"] < 0


# ---- parameter view -------------------------------------------------------------------------------------------------
def test_params_table_matches_a_hand_computation(llava, tmp_path):
    r = reasoning(llava)
    rows, names = params_for_recipe(r)
    merged = Checkpoint(build(r, tmp_path / "merged", progress=False), "lvlm")
    ck = {role: Checkpoint(llava[role], role) for role in ("base", "lvlm", "llm")}

    def t(role: str, key: str) -> torch.Tensor:
        c = merged if role == "merged" else ck[role]
        return c.get(c.text[key]).double().reshape(-1)

    def tau(role: str, key: str) -> torch.Tensor:
        return t(role, key) - t("base", key)

    row = {(x["layer"], x["module"]): x for x in rows}
    key = "layers.1.self_attn.q_proj.weight"
    q = row[(1, "self_attn.q_proj")]
    a, o, m, b = tau("lvlm", key), tau("llm", key), tau("merged", key), t("base", key)
    assert q["tau_lvlm_norm"] == pytest.approx(float(a.norm()), rel=1e-9)
    assert q["tau_llm_rel"] == pytest.approx(float(o.norm() / b.norm()), rel=1e-9)
    assert q["cos_lvlm_llm"] == pytest.approx(float(a @ o / (a.norm() * o.norm())), rel=1e-9)
    assert q["cos_merged_llm"] == pytest.approx(float(m @ o / (m.norm() * o.norm())), rel=1e-6)
    attn = [k for k in ck["base"].text if k.startswith("layers.1.self_attn.")]
    agg = row[(1, "attention")]
    assert len(attn) == 4 and agg["numel"] == sum(t("base", k).numel() for k in attn)
    assert agg["tau_lvlm_norm"] == pytest.approx(math.sqrt(sum(float(tau("lvlm", k).norm()) ** 2 for k in attn)), rel=1e-9)
    dot = sum(float(tau("lvlm", k) @ tau("llm", k)) for k in attn)
    assert agg["cos_lvlm_llm"] == pytest.approx(dot / (agg["tau_lvlm_norm"] * agg["tau_llm_norm"]), rel=1e-9)
    assert {x["module"] for x in rows if x["layer"] == 0} >= {"self_attn.o_proj", "mlp.down_proj", "input_layernorm",
                                                               "attention", "mlp", "layer"}
    with analysis_dir(tmp_path / "out") as out:
        files = write_params(out, rows, names)
    csv = read_csv(tmp_path / "out" / "params.csv")
    assert len(csv) == len(rows) and float(csv[rows.index(q)]["tau_lvlm_norm"]) == q["tau_lvlm_norm"]
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == len(files) - 1 == 8 and all(png_ok(p) for p in pngs)


# ---- functional view: ablation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_ablation_restores_weights_and_changes_the_scores(zoo, tmp_path, family):
    trio = zoo(family)
    tasks = load_tasks(write_tasks(tmp_path, trio["lvlm"]))
    model, proc, ck = load_lvlm(trio["lvlm"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scorer, params = TaskScorer(model, proc), text_parameters(model, ck)
    intact, rows = ablate(scorer, params, tasks, mode="base", base=Checkpoint(trio["base"], "base"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [(r.layer, r.module) for r in rows] == [(i, g) for i in range(2) for g in ("attention", "mlp", "layer")]
    assert all(r.scores.loglik != intact.loglik for r in rows)  # every ablation reached the model
    assert scorer.score(tasks).loglik == intact.loglik  # ... and was undone
    intact0, zeroed = ablate(scorer, params, tasks, mode="zero", groups=["mlp"], layers=[1])
    assert zeroed[0].scores.loglik != intact0.loglik and intact0.loglik == intact.loglik
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    table = ablation_table(intact, rows, "base")
    assert table[0]["perception_accuracy_drop"] == intact.metrics["perception"]["accuracy"] - rows[0].scores.metrics["perception"]["accuracy"]
    with analysis_dir(tmp_path / "out") as out:
        files = write_ablation(out, table, "base", family)
    assert [f.name for f in files] == ["ablate.csv"] + [f"ablate_{k}_{m}_drop.png" for k in ("perception", "reasoning")
                                                         for m in ("accuracy", "logprob")]
    assert all(png_ok(f) for f in (tmp_path / "out").glob("*.png"))


def test_ablation_of_a_text_llm(llava, tmp_path):
    """A causal LM (the merge's `llm`) is analysed on text-only tasks; weights come back bit-identical."""
    text_records = [{**r, "image": None} for r in RECORDS]
    tasks = load_tasks(write_tasks(tmp_path, llava["lvlm"], text_records))
    model, tok, ck = load_lvlm(llava["llm"])
    assert not hasattr(model.config, "vision_config")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = TaskScorer(model, tok)
    intact, rows = ablate(scorer, text_parameters(model, ck), tasks, mode="base", base=Checkpoint(llava["base"], "base"))
    assert all(r.scores.loglik != intact.loglik for r in rows)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ablation_errors(llava, tmp_path):
    vlrm = build({**reasoning(llava), "output": "vlrm", "models": [
        {"model": str(llava["lvlm"]), "role": "lvlm", "parameters": {"weight": 1.0}},
        {"model": str(llava["rm"]), "role": "rm", "parameters": {"weight": 1.0}}]}, tmp_path / "vlrm", progress=False)
    with pytest.raises(AnalysisError, match=r"is a reward model .*need a generative LVLM"):
        load_lvlm(vlrm)
    model, proc, ck = load_lvlm(llava["lvlm"])
    scorer, params, tasks = TaskScorer(model, proc), text_parameters(model, ck), load_tasks(llava["tasks"])
    with pytest.raises(AnalysisError, match="mode base needs the base model"):
        ablate(scorer, params, tasks, mode="base")
    with pytest.raises(AnalysisError, match="layer 5 is out of range: the model has 2 base layers"):
        ablate(scorer, params, tasks, mode="zero", layers=[5])
    with pytest.raises(AnalysisError, match="unknown module group 'ffn'"):
        ablate(scorer, params, tasks, mode="zero", groups=["ffn"])


# ---- layer-swap curves -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_swapper_end_points_are_exact(zoo, tmp_path, family):
    trio = zoo(family)
    r = reasoning(trio)
    sw = LayerSwapper(r)
    plain = load_all(build(r, tmp_path / "plain", progress=False))
    lvlm_ck = Checkpoint(trio["lvlm"], "lvlm")
    params = text_parameters(sw.model, lvlm_ck)
    for k in (sw.n_layers, 0):  # to the LVLM and back: every tensor exact
        sw.set_k(k)
        state = sw.model.state_dict()
        if k == sw.n_layers:
            assert all(torch.equal(p, lvlm_ck.get(lvlm_ck.text[c])) for c, p in params.items())
        else:
            assert all(torch.equal(state[n], plain[n]) for n in plain)
    lv = load_all(trio["lvlm"])
    state = sw.model.state_dict()
    assert all(torch.equal(state[n], lv[n]) for n in lv if n not in {lvlm_ck.text[c] for c in lvlm_ck.text})
    sw.set_k(1)
    assert torch.equal(params["layers.0.mlp.up_proj.weight"], lvlm_ck.get(lvlm_ck.text["layers.0.mlp.up_proj.weight"]))
    assert torch.equal(params["embed_tokens.weight"], lvlm_ck.get(lvlm_ck.text["embed_tokens.weight"]))
    assert torch.equal(params["layers.1.mlp.up_proj.weight"], plain[lvlm_ck.text["layers.1.mlp.up_proj.weight"]])
    assert torch.equal(params["lm_head.weight"], plain[lvlm_ck.text["lm_head.weight"]])


def test_swap_curve_csv_and_plot(llava, tmp_path):
    sw = LayerSwapper(reasoning(llava), part="attention")
    rows = swap_curve(sw, load_tasks(llava["tasks"]))
    assert [r["k"] for r in rows] == [0, 1, 2] and rows[0]["embeddings_from_lvlm"] is False
    assert rows[1]["embeddings_from_lvlm"] is True and rows[2]["final_from_lvlm"] is False  # part attention
    assert rows[0]["reasoning_logprob"] != rows[2]["reasoning_logprob"]
    with analysis_dir(tmp_path / "out") as out:
        write_swap(out, rows, "test")
    assert len(read_csv(tmp_path / "out" / "swap.csv")) == 3 and png_ok(tmp_path / "out" / "swap.png")
    with pytest.raises(AnalysisError, match="need an `output: lvlm` recipe"):
        LayerSwapper({**reasoning(llava), "output": "vlrm", "models": [
            {"model": str(llava["lvlm"]), "role": "lvlm", "parameters": {"weight": 1.0}},
            {"model": str(llava["rm"]), "role": "rm", "parameters": {"weight": 1.0}}]})


# ---- CLI -------------------------------------------------------------------------------------------------------------
def test_cli_params_ablate_swap(llava, tmp_path):
    runner = CliRunner()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(reasoning(llava)))  # JSON is YAML
    res = runner.invoke(app, ["analyze", "params", "--recipe", str(recipe), "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p" / "params.csv").is_file() and png_ok(tmp_path / "p" / "params_cos_lvlm_llm.png")
    res = runner.invoke(app, ["analyze", "params", "--recipe", str(recipe), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "not empty; pass --force" in res.output
    res = runner.invoke(app, ["analyze", "params", "--recipe", str(recipe), "--out", str(tmp_path / "p"), "--force",
                              "--no-merged", "--other", "llm"])
    assert res.exit_code == 0 and "tau_merged_norm" not in (tmp_path / "p" / "params.csv").read_text()

    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["analyze", "ablate", "--model", str(llava["lvlm"]), "--tasks", str(llava["tasks"]),
                              "--out", str(tmp_path / "empty"), "--mode", "zero", "--groups", "attention,mlp"])
    assert res.exit_code == 0, res.output
    assert len(read_csv(tmp_path / "empty" / "ablate.csv")) == 4 and "intact:" in res.output
    res = runner.invoke(app, ["analyze", "ablate", "--model", str(llava["lvlm"]), "--tasks", str(llava["tasks"]),
                              "--out", str(tmp_path / "a2")])
    assert res.exit_code == 2 and "--mode base needs --base DIR" in res.output and not (tmp_path / "a2").exists()

    res = runner.invoke(app, ["analyze", "swap", "--recipe", str(recipe), "--tasks", str(llava["tasks"]),
                              "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert [r["k"] for r in read_csv(tmp_path / "s" / "swap.csv")] == ["0", "1", "2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**RECORDS[3], "answer": 7}) + "\n")
    res = runner.invoke(app, ["analyze", "swap", "--recipe", str(recipe), "--tasks", str(bad), "--out", str(tmp_path / "s2")])
    assert res.exit_code == 2 and "bad.jsonl line 1: 'answer'" in res.output and not (tmp_path / "s2").exists()


def test_cli_out_over_an_input_is_refused_even_with_force(llava, tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(reasoning(llava)))
    before = sorted(p.name for p in Path(llava["lvlm"]).iterdir())
    runner = CliRunner()
    for args, how in ((["params", "--recipe", str(recipe), "--out", str(llava["lvlm"])], "is the lvlm model folder"),
                      (["params", "--recipe", str(recipe), "--out", str(tmp_path)], "contains the recipe file"),
                      (["ablate", "--model", str(llava["lvlm"]), "--tasks", str(llava["tasks"]), "--mode", "zero",
                        "--out", str(Path(llava["lvlm"]) / "ablation")], "lies inside the model folder"),
                      (["swap", "--recipe", str(recipe), "--tasks", str(llava["tasks"]),
                        "--out", str(Path(llava["llm"]).parent)], "contains the")):
        res = runner.invoke(app, ["analyze", *args, "--force"])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and how in lines[0] and "never replaced" in lines[0], res.output
    assert sorted(p.name for p in Path(llava["lvlm"]).iterdir()) == before
