"""In-memory merge sweeps: grid parsing, bit-identity with the disk merge, no state leak, outputs, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import load_all

import vlrm_rlhf  # noqa: F401  (registers the VLRM classes)
from vlrm_rlhf.eval.sweep import SweepError, plot_sweep, run_sweep
from vlrm_rlhf.files import OutputExistsError
from vlrm_rlhf.merge import MergeError, RecipeError, build, parse_recipe
from vlrm_rlhf.merge.grid import check_grid, grid_points, parse_grid, point_overrides
from vlrm_rlhf.merge.inmemory import InMemoryMerger, state_dict_names
from vlrm_rlhf.testing.zoo import demo_image, write_quick_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recipes(zoo, tmp_path_factory):
    """recipes(method, family="llava", **zoo_kw) -> a quick recipe path (weights 0.7 / 0.7, seed 0)."""
    root = tmp_path_factory.mktemp("sweep_recipes")

    def get(method: str, family: str = "llava", layout: str = "transformers", **kw) -> Path:
        trio = zoo(family, layout, **kw)
        tag = "_".join([method, family, layout, *map(str, kw.values())])
        return write_quick_recipe(trio, root / f"{tag}.yaml", method=method)

    return get


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- grid parsing ----------------------------------------------------------------------------------------
def test_parse_grid_ranges_lists_and_order():
    g = parse_grid(["lambda=0:1:0.1", "density=0.2,0.4", "rm.weight=0.5,1"])
    assert list(g) == ["lambda", "density", "rm.weight"]
    assert len(g["lambda"]) == 11 and g["lambda"][0] == 0.0 and g["lambda"][-1] == 1.0
    assert g["lambda"][3] == 0.3 and g["lambda"][7] == 0.7  # no 0.30000000000000004 in the CSV
    assert g["density"] == [0.2, 0.4] and g["rm.weight"] == [0.5, 1.0]
    assert parse_grid(["t=0.25:1:0.25"])["t"] == [0.25, 0.5, 0.75, 1.0]
    assert parse_grid(["t=1:0:-0.5"])["t"] == [1.0, 0.5, 0.0]
    assert parse_grid(["t=0:0.95:0.1"])["t"][-1] == 0.9  # stop not on the grid: not included
    pts = grid_points({"a": [1.0, 2.0], "b": [3.0, 4.0, 5.0]})
    assert pts[:4] == [{"a": 1.0, "b": 3.0}, {"a": 1.0, "b": 4.0}, {"a": 1.0, "b": 5.0}, {"a": 2.0, "b": 3.0}]
    assert len(pts) == 6


@pytest.mark.parametrize("specs, match", [
    (["lambda"], "expected KEY=VALUES"),
    (["=0.5"], "expected KEY=VALUES"),
    (["lambda=0:1"], "start:stop:step"),
    (["lambda=0:1:0"], "step 0 does not lead"),
    (["lambda=1:0:0.1"], "does not lead from 1 to 0"),
    (["lambda=0:x:0.1"], "'x' is not a number"),
    (["density=0.2,,0.4"], "'' is not a number"),
    (["density="], "no values"),
    (["density=0.2,nan"], "not finite"),
    (["density=0.2,0.2"], "listed twice"),
    (["lambda=0.5", "weight=1"], "already swept by 'lambda=0.5'"),
    ([], "empty grid"),
])
def test_parse_grid_errors_name_the_spec(specs, match):
    with pytest.raises(SweepError, match=match):
        parse_grid(specs)


def test_grid_keys_are_validated_against_the_method(recipes):
    r = parse_recipe(recipes("ties"))
    check_grid(r, {"lambda": [1.0], "rm.density": [0.5], "parameters.lambda": [1.0], "density": [0.5]})
    with pytest.raises(SweepError, match=r"unknown sweep key 'epsilon' for merge_method ties; valid keys: .*rm\.density"):
        check_grid(r, {"epsilon": [0.1]})
    with pytest.raises(SweepError, match="unknown sweep key 'llm.weight'"):  # no llm in this recipe
        check_grid(r, {"llm.weight": [0.1]})
    with pytest.raises(SweepError, match="unknown sweep key 't'"):
        check_grid(r, {"t": [0.1]})
    # a top-level default that a model's own value shadows is flagged
    notes = check_grid(r, {"weight": [1.0], "density": [0.5]})
    assert notes == []
    ov = point_overrides(r, {"lambda": 0.3, "rm.weight": 0.9, "parameters.lambda": 2.0, "density": 0.5})
    assert ov == {"lvlm.weight": 0.3, "rm.weight": 0.9, "lambda": 2.0, "density": 0.5}
    notes = check_grid(r.model_copy(update={"models": [m.model_copy(update={"parameters": {"weight": 1, "density": 0.3}})
                                                       if m.role == "rm" else m for m in r.models]}), {"density": [0.5]})
    assert len(notes) == 1 and "rm.density" in notes[0]


# ---- in-memory merge == disk merge -------------------------------------------------------------------------
CASES = [
    ("task_arithmetic", "llava", "transformers", {}, {"lvlm.weight": 0.3, "rm.weight": 1.2}),
    ("task_arithmetic", "mllama", "hub", {}, {"lvlm.weight": 0.5, "rm.weight": 0.8, "lambda": 0.9}),
    ("task_arithmetic", "qwen2_vl", "hub", {}, {"rm.weight": 0.4}),
    ("ties", "llava", "transformers", {}, {"density": 0.4, "rm.weight": 0.5}),
    ("ties", "llava", "transformers", {"rm_extra_pad_token": True}, {"density": 0.3}),  # donor-only vocab row
    ("dare_ties", "llava", "transformers", {}, {"density": 0.5, "lvlm.weight": 0.9}),
]


@pytest.mark.parametrize("method, family, layout, zoo_kw, overrides", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}{'-pad' if c[3] else ''}" for c in CASES])
def test_point_equals_disk_merge_bit_for_bit(recipes, tmp_path, method, family, layout, zoo_kw, overrides):
    from transformers import AutoModelForSequenceClassification

    m = InMemoryMerger(recipes(method, family, layout, **zoo_kw), progress=False)
    m.apply(overrides)
    out = build(m.recipe_for(overrides), tmp_path / "disk", progress=False)
    disk = load_all(out)
    names = state_dict_names(m.model, list(disk))
    mem = m.model.state_dict()
    assert set(disk) == set(m.plan.specs)
    for k, t in disk.items():
        assert torch.equal(mem[names[k]], t), k
    loaded = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    assert set(loaded) == set(mem)
    assert all(torch.equal(loaded[k], mem[k]) for k in mem)
    # the parameters really changed something: the disk merge at the recipe's own values differs
    base = load_all(build(m.recipe, tmp_path / "orig", progress=False))
    assert any(not torch.equal(base[k], disk[k]) for k in disk)


def test_points_in_any_order_give_identical_models(recipes):
    m = InMemoryMerger(recipes("dare_ties"), progress=False)
    points = [{"density": 0.3, "rm.weight": 0.5}, {"density": 0.8, "lvlm.weight": 0.1}, {"rm.density": 0.6}]
    first = []
    for p in points:
        m.apply(p)
        first.append(_state(m.model))
    for i in (2, 0, 1, 1):
        m.apply(points[i])
        now = m.model.state_dict()
        assert all(torch.equal(now[k], first[i][k]) for k in now), points[i]
    assert any(not torch.equal(first[0][k], first[1][k]) for k in first[0])
    m.apply({})  # back to the recipe's own parameters
    fresh = InMemoryMerger(recipes("dare_ties"), progress=False).model.state_dict()
    assert all(torch.equal(m.model.state_dict()[k], fresh[k]) for k in fresh)


def test_points_never_read_the_input_files(zoo, tmp_path):
    import shutil

    trio = {k: shutil.copytree(v, tmp_path / "in" / k) for k, v in zoo("llava").items()}
    rp = write_quick_recipe(trio, tmp_path / "r.yaml", method="dare_ties")
    m = InMemoryMerger(rp, progress=False)
    (tmp_path / "in").rename(tmp_path / "gone")  # every input file disappears after setup
    m.apply({"density": 0.4, "rm.weight": 0.6})
    got = _state(m.model)
    (tmp_path / "gone").rename(tmp_path / "in")
    disk = load_all(build(m.recipe_for({"density": 0.4, "rm.weight": 0.6}), tmp_path / "out", progress=False))
    assert all(torch.equal(got[m.names[k]], t) for k, t in disk.items())


def test_scores_equal_the_disk_merged_model(recipes, tmp_path):
    from vlrm_rlhf.reward.scorer import VLRewardScorer

    m = InMemoryMerger(recipes("ties"), progress=False)
    ov = {"density": 0.5, "lvlm.weight": 0.4}
    m.apply(ov)
    out = build(m.recipe_for(ov), tmp_path / "vlrm", progress=False)
    lvlm = Path(m.plan.lvlm.name)
    img = demo_image(lvlm, seed=1)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the car ?"}]}]
    kw = dict(prompts=[prompt, prompt, "describe the picture ."], responses=["a red car .", "a dog .", "a tree ."],
              images=[[img], [img], None])
    mem = VLRewardScorer(m.model, m.processor, mode="vlrm").score(**kw)
    disk = VLRewardScorer.from_pretrained(out, mode="vlrm").score(**kw)
    assert mem == disk
    assert len(set(mem)) == 3


def test_name_mapping_and_parameter_errors_fail_loudly(recipes):
    m = InMemoryMerger(recipes("ties"), progress=False)
    with pytest.raises(MergeError, match="no counterpart"):
        state_dict_names(m.model, [*m.plan.specs, "model.language_model.nope.weight"])
    with pytest.raises(MergeError, match="not produced by the merge"):
        state_dict_names(m.model, [n for n in m.plan.specs if n != "score.weight"])
    with pytest.raises(MergeError, match="density' must be in"):
        m.check({"density": 0.0})
    with pytest.raises(RecipeError, match="no model with role 'llm'"):
        m.apply({"llm.weight": 1.0})
    with pytest.raises(RecipeError, match="only parameter values may change"):
        m.plan.with_parameters(m.recipe.model_copy(update={"merge_method": "dare_ties"}))


# ---- run_sweep: CSV, plot, best merge --------------------------------------------------------------------
def _probe(model, processor) -> dict[str, float]:
    """A cheap stand-in evaluation: statistics of a merged tensor (changes with every parameter)."""
    w = model.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"]
    return {"overall": -float((w.mean() * 1e3 - 0.1).abs()), "spread": float(w.std())}


def test_inert_points_are_reported(recipes, tmp_path):
    r = parse_recipe(recipes("ties")).model_copy(update={"parameters": {"normalize": True}})
    m = InMemoryMerger(r, progress=False)
    assert any("cancel" in n for n in m.check({"lvlm.weight": 0.5, "rm.weight": 0.5, "density": 0.5}))
    assert not any("cancel" in n for n in m.check({"lvlm.weight": 0.5, "rm.weight": 0.7, "density": 0.5}))
    with pytest.warns(UserWarning, match="normalize=true divides by the sum of the"):
        run_sweep(r, ["lambda=0.5,1", "density=0.5"], _probe, out_dir=tmp_path / "sw", progress=False)


def test_run_sweep_writes_csv_plot_and_a_loadable_best(recipes, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rp = recipes("task_arithmetic")
    rows = run_sweep(rp, ["lambda=0:1:0.5", "rm.weight=0.2,0.9"], _probe, out_dir=tmp_path / "sw",
                     save_best=tmp_path / "best", progress=False)
    assert [(r["lambda"], r["rm.weight"]) for r in rows] == [(a, b) for a in (0.0, 0.5, 1.0) for b in (0.2, 0.9)]
    with open(tmp_path / "sw" / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["lambda", "rm.weight", "overall", "spread"] and len(table) == 6
    assert [float(t["overall"]) for t in table] == [r["overall"] for r in rows]
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "sw" / "sweep.partial.csv").exists()
    best = max(rows, key=lambda r: r["overall"])
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "best")
    assert _probe(saved, None)["overall"] == best["overall"]
    recipe = yaml.safe_load((tmp_path / "best" / "merge_recipe.yaml").read_text())
    by_role = {m["role"]: m["parameters"]["weight"] for m in recipe["models"]}
    assert by_role == {"lvlm": best["lambda"], "rm": best["rm.weight"]}
    with pytest.raises(OutputExistsError, match="--force"):
        run_sweep(rp, ["lambda=0.5"], _probe, out_dir=tmp_path / "sw", progress=False)
    with pytest.raises(OutputExistsError, match="save-best"):
        run_sweep(rp, ["lambda=0.5"], _probe, out_dir=tmp_path / "sw2", save_best=tmp_path / "best", progress=False)
    with pytest.raises(SweepError, match="metric 'macro' is not among .*overall, spread"):
        run_sweep(rp, ["lambda=0.5"], _probe, out_dir=tmp_path / "sw3", metric="macro", progress=False)


@pytest.mark.parametrize("keys", [["lambda"], ["lambda", "density"], ["lambda", "density", "rm.weight"]])
def test_plot_for_one_two_and_more_keys(tmp_path, keys):
    grid = {"lambda": [0.0, 0.5, 1.0], "density": [0.2, 0.4], "rm.weight": [0.5, 1.0]}
    rows = [{**p, "overall": 0.5 + 0.1 * p["lambda"] - p.get("density", 0), "macro": 0.4, "n": 16}
            for p in grid_points({k: grid[k] for k in keys})]
    plot_sweep(rows, keys, "overall", tmp_path / "p.png")
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


# ---- CLI ---------------------------------------------------------------------------------------------------
def _pref_file(lvlm: Path, d: Path, n: int = 4) -> Path:
    rows = []
    for i in range(n):
        demo_image(lvlm, seed=i).save(d / f"img{i}.png")
        rows.append({"id": f"RLAIF-V-{i}" if i % 2 else f"wildvision_{i}", "query": "what color is the car ?",
                     "image": f"img{i}.png", "response": ["a red car .", "the sky is blue ."],
                     "human_ranking": [i % 2, 1 - i % 2]})
    (d / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "prefs.jsonl"


def test_cli_sweep_end_to_end(recipes, tmp_path):
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app
    from vlrm_rlhf.eval.prefs import evaluate_prefs
    from vlrm_rlhf.eval.records import load_pref_records
    from vlrm_rlhf.reward.scorer import VLRewardScorer

    rp = recipes("ties")
    data = _pref_file(Path(parse_recipe(rp).model_of("lvlm").model), tmp_path)
    args = ["sweep", str(rp), "--grid", "lambda=0.2,1", "--grid", "density=0.5", "--data", str(data),
            "--out", str(tmp_path / "sw"), "--save-best", str(tmp_path / "best"), "--metric", "macro"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "2 points on 4 pairs; best macro" in res.output
    with open(tmp_path / "sw" / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["lambda"] for t in table] == ["0.2", "1.0"]
    assert {"overall", "macro", "general", "hallucination", "tie_rate", "n"} <= set(table[0])
    # the saved best scores the records exactly as the sweep did
    best = max(table, key=lambda t: float(t["macro"]))
    disk = evaluate_prefs(VLRewardScorer.from_pretrained(tmp_path / "best"), load_pref_records(data), progress=False)
    assert disk.metrics["macro"] == float(best["macro"])
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    bad = CliRunner().invoke(app, [*args[:2], "--grid", "gamma=0.1", *args[6:10]])
    assert bad.exit_code == 2 and "unknown sweep key 'gamma'" in bad.output


# ---- mistakes caught before the first point is evaluated ----------------------------------------------------------
def _no_models(monkeypatch):
    """Make any model loading fail loudly: the checks under test must come first."""
    import vlrm_rlhf.merge.inmemory as im

    def refuse(*a, **k):
        raise AssertionError("the sweep loaded models before checking its arguments")

    monkeypatch.setattr(im.InMemoryMerger, "__init__", refuse)


def test_metric_typo_fails_before_anything_is_merged(recipes, tmp_path, monkeypatch):
    _no_models(monkeypatch)
    with pytest.raises(SweepError, match=r"--metric 'overal' is not a metric of this evaluation; did you mean "
                                         r"'overall'\? \(metrics: overall, spread\)"):
        run_sweep(recipes("task_arithmetic"), ["lambda=0.5"], _probe, out_dir=tmp_path / "sw", metric="overal",
                  metrics=["overall", "spread"], progress=False)
    assert not (tmp_path / "sw").exists()


def test_save_best_over_an_input_is_refused_before_the_sweep(recipes, tmp_path, monkeypatch):
    from vlrm_rlhf.files import OverlapError

    rp = recipes("task_arithmetic")
    rm = parse_recipe(rp).model_of("rm").model
    _no_models(monkeypatch)
    for target, how in ((rm, "is the rm model folder"), (Path(rm).parent, "contains the")):
        with pytest.raises(OverlapError, match=f"--save-best .* {how}"):
            run_sweep(rp, ["lambda=0.5"], _probe, out_dir=tmp_path / "sw", save_best=target, force=True, progress=False)
    assert Path(rm, "config.json").is_file()


def test_cli_metric_typo_is_one_line_before_models_load(recipes, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    rp = recipes("ties")
    data = _pref_file(Path(parse_recipe(rp).model_of("lvlm").model), tmp_path)
    _no_models(monkeypatch)
    res = CliRunner().invoke(app, ["sweep", str(rp), "--grid", "lambda=0.2,1", "--data", str(data),
                                   "--out", str(tmp_path / "sw"), "--metric", "halucination"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "error: --metric 'halucination' is not a metric of this evaluation; did you mean 'hallucination'? "
        "(metrics: overall, macro, general, hallucination, tie_rate, n)"]
    assert not (tmp_path / "sw").exists()
