"""Bad input gets a clear error naming the culprit, and nothing half-written is left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import recipe
from safetensors.torch import load_file, save_file

from vlrm_rlhf.files import OutputExistsError
from vlrm_rlhf.merge import MergeError, RecipeError, build, parse_recipe
from vlrm_rlhf.merge.embeddings import VocabularyError
from vlrm_rlhf.models.families import UnknownFamilyError


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(d: Path, fn) -> None:
    f = d / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def no_output_left(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def test_missing_role_file(zoo, tmp_path):
    trio = dict(zoo("llava"))
    trio["rm"] = tmp_path / "nope"
    with pytest.raises(MergeError, match="rm model directory not found: .*nope"):
        build(recipe(trio), tmp_path / "out", progress=False)
    assert no_output_left(tmp_path / "out")


def test_shape_mismatch_names_tensor_and_shapes(zoo, tmp_path):
    trio = dict(zoo("llava"))
    rm = copy_model(trio["rm"], tmp_path / "rm")
    key = "model.layers.1.mlp.up_proj.weight"

    def bad(sd):
        sd[key] = sd[key][:-1].contiguous()

    edit_weights(rm, bad)
    trio["rm"] = rm
    with pytest.raises(MergeError, match=r"shape mismatch for layers\.1\.mlp\.up_proj\.weight: rm .* has \(63, 32\), base .* has \(64, 32\)"):
        build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 0.5}), tmp_path / "out", progress=False)
    assert no_output_left(tmp_path / "out")


def test_tensor_in_one_model_only(zoo, tmp_path):
    trio = dict(zoo("llava"))
    rm = copy_model(trio["rm"], tmp_path / "rm")
    edit_weights(rm, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    trio["rm"] = rm
    with pytest.raises(MergeError, match=r"rm model .*rm lacks tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        build(recipe(trio), tmp_path / "out", progress=False)
    rm2 = copy_model(zoo("llava")["rm"], tmp_path / "rm2")

    def extra(sd):
        sd["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(2, 2)

    edit_weights(rm2, extra)
    trio["rm"] = rm2
    with pytest.raises(MergeError, match=r"tensor model\.layers\.1\.mlp\.extra_proj\.weight of rm model .*present in this model only"):
        build(recipe(trio), tmp_path / "out", progress=False)
    assert no_output_left(tmp_path / "out")


def test_rm_that_is_not_a_sequence_classifier(zoo, tmp_path):
    trio = dict(zoo("llava"))
    trio["rm"] = trio["llm"]
    with pytest.raises(MergeError, match="role rm expects a \\*ForSequenceClassification.*role: llm"):
        build(recipe(trio), tmp_path / "out", progress=False)


def test_base_that_is_not_the_common_ancestor_warns(zoo, tmp_path):
    trio = dict(zoo("llava"))
    other = zoo("llava", seed=7)  # an unrelated random "base"
    trio["base"] = other["base"]
    with pytest.warns(UserWarning, match="does not look like the common ancestor"):
        build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 0.5}), tmp_path / "out",
              progress=False)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_is_named(zoo, tmp_path, value, method):
    trio = dict(zoo("llava"))
    rm = copy_model(trio["rm"], tmp_path / "rm")

    def bad(sd):
        sd["model.layers.0.self_attn.q_proj.weight"][0, 0] = value

    edit_weights(rm, bad)
    trio["rm"] = rm
    with pytest.raises(MergeError, match=r"non-finite .*layers\.0\.self_attn\.q_proj\.weight.* rm model .*rm"):
        build(recipe(trio, method, lvlm={"weight": 0.5, "density": 0.5}, rm={"weight": 0.5, "density": 0.5}),
              tmp_path / "out", progress=False)
    assert no_output_left(tmp_path / "out")


def test_truncated_shard(zoo, tmp_path):
    trio = dict(zoo("llava"))
    lv = copy_model(trio["lvlm"], tmp_path / "lvlm")
    f = lv / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    trio["lvlm"] = lv
    with pytest.raises(MergeError, match=r"lvlm/model\.safetensors: truncated or corrupt"):
        build(recipe(trio), tmp_path / "out", progress=False)


def test_wrong_family_pairing(zoo, tmp_path):
    trio = dict(zoo("llava"))
    trio["lvlm"] = zoo("qwen2_vl")["lvlm"]
    with pytest.raises(MergeError, match="llama language model but lvlm .*qwen2"):
        build(recipe(trio), tmp_path / "out", progress=False)


def test_incompatible_tokenizers(zoo, tmp_path):
    trio = dict(zoo("llava"))
    rm = copy_model(trio["rm"], tmp_path / "rm")
    tj = json.loads((rm / "tokenizer.json").read_text())
    tj["model"]["vocab"] = {f"zz{k}": v for k, v in tj["model"]["vocab"].items()}
    (rm / "tokenizer.json").write_text(json.dumps(tj))
    trio["rm"] = rm
    with pytest.raises(VocabularyError, match="tokenizer of .*rm is incompatible"):
        build(recipe(trio), tmp_path / "out", progress=False)


def test_unknown_family_lists_supported(zoo, tmp_path):
    trio = dict(zoo("llava"))
    lv = copy_model(trio["lvlm"], tmp_path / "lvlm")
    cfg = json.loads((lv / "config.json").read_text())
    cfg["model_type"] = "paligemma"
    (lv / "config.json").write_text(json.dumps(cfg))
    trio["lvlm"] = lv
    with pytest.raises((UnknownFamilyError, MergeError), match="unsupported LVLM family.*paligemma.*llava.*mllama.*qwen2_vl"):
        build(recipe(trio), tmp_path / "out", progress=False)


def test_output_exists_is_not_overwritten(zoo, tmp_path):
    trio = zoo("llava")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        build(recipe(trio), out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    build(recipe(trio), out, force=True, progress=False)
    assert (out / "config.json").is_file() and not (out / "precious.txt").exists()


def test_pickle_refused_unless_allowed(zoo, tmp_path):
    trio = dict(zoo("llava"))
    rm = copy_model(trio["rm"], tmp_path / "rm")
    sd = load_file(rm / "model.safetensors")
    torch.save(sd, rm / "pytorch_model.bin")
    (rm / "model.safetensors").unlink()
    trio["rm"] = rm
    with pytest.raises(MergeError, match="pickle.*--allow-pickle"):
        build(recipe(trio), tmp_path / "out", progress=False)
    out = build(recipe(trio), tmp_path / "out", allow_pickle=True, progress=False)
    assert (out / "model.safetensors").is_file()


def test_killed_mid_write_leaves_nothing_complete_and_rerun_succeeds(zoo, tmp_path):
    trio = zoo("llava")
    r = tmp_path / "r.yaml"
    import yaml

    r.write_text(yaml.safe_dump(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 0.5})))
    out = tmp_path / "out"
    # a child that merges with a hook sleeping inside the shard loop, so we can kill it mid-write
    progress = tmp_path / "progress"
    code = (
        "import time, vlrm_rlhf.merge.writer as w\n"
        "orig = w.ShardWriter.write\n"
        "def slow(self, n, t):\n"
        f"    orig(self, n, t); open({str(progress)!r}, 'a').write('x'); time.sleep(0.2)\n"
        "w.ShardWriter.write = slow\n"
        "from vlrm_rlhf.merge import build\n"
        f"build({str(r)!r}, {str(out)!r}, max_shard_size='20KB', progress=False)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len((tmp_path / "progress").read_text() if (tmp_path / "progress").exists() else "") < 3:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists(), "a killed merge must not leave a complete-looking output"
    assert list(tmp_path.glob(".out.partial-*")), "the partial output stays hidden under a temporary name"
    build(r, out, progress=False)
    assert (out / "config.json").is_file()
    assert not list(tmp_path.glob(".out.partial-*")), "a successful rerun cleans stale partial outputs"


# ---- recipe validation ---------------------------------------------------------------------------------
def test_recipe_errors_name_key_and_fix(tmp_path):
    with pytest.raises(RecipeError, match="models\\[0\\].*has no role.*role: lvlm"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a"}]})
    with pytest.raises(RecipeError, match="exactly one model needs `role: lvlm`"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a", "role": "rm"}]})
    with pytest.raises(RecipeError, match="output: vlrm needs exactly one model with `role: rm`"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a", "role": "lvlm"}]})
    with pytest.raises(RecipeError, match="mergemethod: unknown key"):
        parse_recipe({"mergemethod": "linear", "merge_method": "linear", "models": [{"model": "a", "role": "lvlm"}],
                      "output": "lvlm"})
    with pytest.raises(RecipeError, match="slices"):
        parse_recipe({"merge_method": "linear", "slices": []})
    with pytest.raises(RecipeError, match="dtype.*float32"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a", "role": "lvlm"}], "output": "lvlm",
                      "dtype": "fp33"})
    with pytest.raises(RecipeError, match="recipe file not found"):
        parse_recipe(tmp_path / "missing.yaml")


def test_unknown_method_lists_available(zoo, tmp_path):
    with pytest.raises((ValueError, MergeError), match="frobnicate.*task_arithmetic"):
        build(recipe(zoo("llava"), "frobnicate"), tmp_path / "o", progress=False)


def test_ties_normalize_with_equal_weights_warns(zoo, tmp_path):
    r = recipe(zoo("llava"), "ties", lvlm={"weight": 0.7, "density": 0.5}, rm={"weight": 0.7, "density": 0.5},
               params={"normalize": True})
    with pytest.warns(UserWarning, match="normalize"):
        build(r, tmp_path / "o", progress=False)


def test_mergekit_config_with_roles_runs_unchanged(zoo, tmp_path):
    """A user's mergekit YAML (relative paths, top-level params, gradients) plus roles."""
    trio = zoo("llava")
    for k, v in trio.items():
        shutil.copytree(v, tmp_path / k)
    (tmp_path / "merge.yaml").write_text(
        "merge_method: ties\nbase_model: ./base\nmodels:\n"
        "  - model: ./lvlm\n    role: lvlm\n    parameters:\n      weight: [0.2, 0.8]\n      density: 0.5\n"
        "  - model: ./rm\n    role: rm\n    parameters:\n      weight: 1.0\n      density: 0.7\n"
        "parameters:\n  normalize: false\n  int8_mask: true\ndtype: float32\ntokenizer_source: base\n"
    )
    out = build(tmp_path / "merge.yaml", tmp_path / "out", progress=False)
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes" / "merge").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    r = parse_recipe(path)
    assert r.model_of("lvlm") is not None and all(Path(m.model).is_absolute() for m in r.models)


# ---- outputs that would replace inputs, and faults while writing ---------------------------------------------
def _cli(*args: str):
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    return CliRunner().invoke(app, list(args))


def _one_error_line(res) -> str:
    """The CLI printed exactly one ``error:`` line (no traceback) and exited 2."""
    import re

    assert res.exit_code == 2, res.output
    lines = [ln for ln in re.split(r"[\r\n]+", res.output) if ln.strip() and not ln.startswith("merge (")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    return lines[0]


def test_out_over_an_input_is_refused_even_with_force(zoo, tmp_path):
    import yaml

    models = tmp_path / "models"
    for k, v in zoo("llava").items():
        shutil.copytree(v, models / k)
    (tmp_path / "lvlm-link").symlink_to(models / "lvlm")
    r = models / "r.yaml"
    r.write_text(yaml.safe_dump(recipe({k: models / k for k in ("base", "lvlm", "rm", "llm")}, "task_arithmetic",
                                       lvlm={"weight": 0.5}, rm={"weight": 0.5})))
    before = sorted(str(p) for p in models.rglob("*"))
    for out, how in ((models / "rm", "is the rm model folder"), (models, "contains the lvlm model folder"),
                     (models / "lvlm" / "sub", "lies inside the lvlm model folder"),
                     (tmp_path / "lvlm-link", "is the lvlm model folder")):
        line = _one_error_line(_cli("merge", str(r), "--out", str(out), "--force"))
        assert f"--out {out} {how}" in line and "inputs are never replaced" in line
    assert sorted(str(p) for p in models.rglob("*")) == before  # nothing moved, nothing deleted
    other = tmp_path / "recipes"
    other.mkdir()
    shutil.copy(r, other / "r.yaml")
    line = _one_error_line(_cli("merge", str(other / "r.yaml"), "--out", str(other), "--force"))
    assert "contains the recipe file" in line


def test_unknown_method_is_one_line_with_a_suggestion(zoo, tmp_path):
    import yaml

    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe(zoo("llava"), "tie")))
    line = _one_error_line(_cli("merge", str(r), "--out", str(tmp_path / "o")))
    assert "unknown merge method 'tie'; did you mean 'ties'?" in line and "task_arithmetic" in line


def test_unwritable_out_and_out_that_is_a_file(zoo, tmp_path):
    import yaml

    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe(zoo("llava"))))
    if Path("/sys").is_dir():  # read-only even for root
        assert "cannot write into folder /sys" in _one_error_line(_cli("merge", str(r), "--out", "/sys/vlrm-out"))
    f = tmp_path / "taken"
    f.write_text("precious")
    for extra in ([], ["--force"]):
        line = _one_error_line(_cli("merge", str(r), "--out", str(f), *extra))
        assert "is an existing file, not a folder; it is never replaced" in line and "--force" not in line
    assert f.read_text() == "precious"


def test_disk_full_while_merging_names_the_output(zoo, tmp_path, monkeypatch):
    import errno

    import yaml

    import vlrm_rlhf.merge.writer as w

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(w.ShardWriter, "write", full)
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe(zoo("llava"))))
    line = _one_error_line(_cli("merge", str(r), "--out", str(tmp_path / "out")))
    assert f"no space left on device while writing {tmp_path / 'out'} (file model.safetensors)" in line
    assert no_output_left(tmp_path / "out")


# ---- checkpoints that reach outside their folder or hold more than tensors -------------------------------------
def test_index_pointing_outside_the_model_folder_is_refused(zoo, tmp_path):
    trio = dict(zoo("llava"))
    rm = copy_model(trio["rm"], tmp_path / "rm")
    (tmp_path / "elsewhere").mkdir()
    shutil.move(rm / "model.safetensors", tmp_path / "elsewhere" / "model.safetensors")
    keys = list(load_file(tmp_path / "elsewhere" / "model.safetensors"))
    for target in ("../elsewhere/model.safetensors", str(tmp_path / "elsewhere" / "model.safetensors")):
        (rm / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: target for k in keys}}))
        trio["rm"] = rm
        with pytest.raises(MergeError, match=r"model\.safetensors\.index\.json .*points outside the model folder"):
            build(recipe(trio), tmp_path / "out", progress=False)
    (rm / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(MergeError, match=r"model\.safetensors\.index\.json is not a valid index"):
        build(recipe(trio), tmp_path / "out", progress=False)


def test_pickle_with_objects_is_refused_without_suggesting_unsafe_loading(zoo, tmp_path):
    import argparse

    trio = dict(zoo("llava"))
    rm = copy_model(trio["rm"], tmp_path / "rm")
    sd = load_file(rm / "model.safetensors")
    torch.save({**sd, "args": argparse.Namespace(lr=1.0)}, rm / "pytorch_model.bin")
    (rm / "model.safetensors").unlink()
    trio["rm"] = rm
    with pytest.raises(MergeError) as e:
        build(recipe(trio), tmp_path / "out", progress=False, allow_pickle=True)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "weights_only=False" not in msg and "\n" not in msg
    assert "not only tensors" in msg


# ---- every parameter key is checked ------------------------------------------------------------------------------
@pytest.mark.parametrize(("where", "params", "match"), [
    ("top", {"normalise": True}, r"parameters\.normalise: unknown parameter 'normalise' for ties; did you mean 'normalize'\?"),
    ("model", {"weight": 1.0, "densty": 0.5}, r"models\[0\]\.parameters\.densty: unknown parameter .*did you mean 'density'\?"),
    ("model", {"weight": 1.0, "foo": 1}, r"models\[0\]\.parameters\.foo: unknown parameter 'foo' for ties \(known: "),
    ("model", {"weight": 1.0, "normalize": False},
     r"models\[0\]\.parameters\.normalize: 'normalize' is a recipe-wide parameter of ties; put it under the top-level"),
    ("model", {"weight": [{"filter": "mlp", "value": 1.0, "fitler": "x"}, {"value": 0.5}]},
     r"models\[0\]\.parameters\.weight\[0\]: unknown key 'fitler' in a filter entry; did you mean 'filter'\?"),
    ("model", {"weight": {"schedule": "linear", "start": 0.0, "ned": 1.0}},
     r"models\[0\]\.parameters\.weight: unknown key 'ned' in a linear schedule; did you mean 'end'\?"),
    ("model", {"weight": [{"filter": "mlp", "value": {"schedule": "step", "valeus": [1.0]}}, {"value": 0.5}]},
     r"models\[0\]\.parameters\.weight\[0\]\.value: unknown key 'valeus' in a step schedule; did you mean 'values'\?"),
])
def test_unknown_parameter_keys_are_refused(where, params, match):
    models = [{"model": "a", "role": "lvlm", "parameters": params if where == "model" else {"weight": 1.0}},
              {"model": "b", "role": "rm", "parameters": {"weight": 1.0}}]
    with pytest.raises(RecipeError, match=match) as e:
        parse_recipe({"merge_method": "ties", "base_model": "c", "models": models,
                      "parameters": params if where == "top" else {}})
    assert "\n" not in str(e.value)


def test_demo_recipes_parse():
    from vlrm_rlhf.worlds.merges import METHOD_PARAMS, method_recipe

    for m in METHOD_PARAMS:
        parse_recipe(method_recipe(m, {"lvlm": "l", "rm": "r", "base": "b"}, 0))
