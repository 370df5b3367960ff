"""Loading and input handling that must never run, read or ignore what it should not.

A checkpoint's own Python is never run (and never asked about), a broken tokenizer is a failure, the context
length holds without ``model_max_length``, non-finite rewards and decompression bombs name the row, and image
paths from data files stay inside the allowed folders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from _helpers import recipe
from PIL import Image

from vlrm_rlhf.merge import build

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vlrm(zoo, tmp_path_factory):
    """(trio, merged llava VLRM dir): task arithmetic λ_L = 0.5, λ_R = 1."""
    trio = zoo("llava")
    out = tmp_path_factory.mktemp("safety_vlrm") / "vlrm"
    build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), out, progress=False)
    return trio, out


def _run(args: list) -> object:
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _png(path: Path, seed: int = 0, size=(40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ remote code
def _custom_code_model(d: Path, marker: Path) -> Path:
    """A model folder whose config maps to its own Python file, which writes ``marker`` when imported."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "my_custom", "architectures": ["MyModelForSequenceClassification"], "num_labels": 1,
        "auto_map": {"AutoConfig": "custom.MyConfig", "AutoModel": "custom.MyModel",
                     "AutoModelForSequenceClassification": "custom.MyModelForSequenceClassification",
                     "AutoModelForCausalLM": "custom.MyModel"}}))
    (d / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class MyConfig(PretrainedConfig):\n    model_type = 'my_custom'\n"
        "class MyModel:\n    pass\n"
        "class MyModelForSequenceClassification:\n    pass\n")
    return d


def _answer_yes(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess whose stdin answers "y" to any question."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "vlrm_rlhf.cli", *map(str, args)], input="y\n" * 20,
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def test_remote_code_is_never_run_in_score_or_merge(zoo, tmp_path):
    marker = tmp_path / "MARKER"
    custom = _custom_code_model(tmp_path / "custom", marker)
    rows = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "what ?", "response": "red ."}])
    res = _answer_yes(["score", "--input", rows, "--model", custom, "--mode", "text_rm", "--out",
                       tmp_path / "o.jsonl"], tmp_path)
    assert not marker.exists(), "the checkpoint's own code ran"
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Do you wish" not in res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(custom) in err[0] and "own Python code" in err[0]

    trio = zoo("llava")
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe({**trio, "rm": custom}, "task_arithmetic")))
    res = _answer_yes(["merge", r, "--out", tmp_path / "out"], tmp_path)
    assert not marker.exists(), "the checkpoint's own code ran"
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Do you wish" not in res.stdout + res.stderr
    err = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and str(custom) in err[0] and "own Python code" in err[0], res.stderr
    assert not (tmp_path / "out").exists()


def test_every_loader_call_goes_through_the_helper():
    """No ``X.from_pretrained(...)`` call in the package or the launch scripts bypasses ``models.loading.pretrained``
    (which always passes ``trust_remote_code``), except the package's own loaders that call it themselves."""
    import ast

    own = {"VLRewardScorer", "LVLMJudge", "GenerativeJudge", "loader", "PeftModel"}  # ours; the helper's own call; adapters
    calls = []
    for f in [*(REPO / "vlrm_rlhf").rglob("*.py"), *(REPO / "launch").rglob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "from_pretrained" \
                    and not (isinstance(node.func.value, ast.Name) and node.func.value.id in own) \
                    and not any(k.arg == "trust_remote_code" for k in node.keywords):
                calls.append(f"{f.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert not calls, "\n".join(calls)


# ------------------------------------------------------------------------------------- broken tokenizer
def test_tokenizer_that_fails_to_load_is_a_failure(zoo, tmp_path):
    from vlrm_rlhf.merge import MergeError
    from vlrm_rlhf.merge.checkpoint import Checkpoint, CheckpointError

    trio = dict(zoo("llava"))
    rm = shutil.copytree(trio["rm"], tmp_path / "rm")
    (rm / "tokenizer.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"rm model .*rm: its tokenizer failed to load"):
        Checkpoint(rm, "rm").tokenizer()
    with pytest.raises(MergeError, match=r"rm model .*rm: its tokenizer failed to load"):
        build(recipe({**trio, "rm": rm}, "task_arithmetic"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    bare = shutil.copytree(trio["rm"], tmp_path / "bare")  # no tokenizer files at all: still "none"
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / f).unlink()
    assert Checkpoint(bare, "rm").tokenizer() is None


def test_scorer_reports_a_broken_tokenizer(vlrm, tmp_path):
    trio, model = vlrm
    bad = shutil.copytree(model, tmp_path / "vlrm")
    (bad / "tokenizer.json").write_text("{ not json")
    rows = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "what ?", "response": "red ."}])
    res = _run(["score", "--input", rows, "--model", bad, "--mode", "no_image", "--out", tmp_path / "o.jsonl"])
    assert res.exit_code == 2, res.output
    assert "tokenizer" in res.output and str(bad) in res.output and "Traceback" not in res.output
    rm = shutil.copytree(trio["rm"], tmp_path / "rm")
    (rm / "tokenizer.json").write_text("{ not json")
    res = _run(["score", "--input", rows, "--model", rm, "--mode", "text_rm", "--out", tmp_path / "o.jsonl"])
    assert res.exit_code == 2 and "tokenizer failed to load" in res.output, res.output


# ----------------------------------------------------------------------------------------- context length
def test_context_falls_back_to_the_models_positions(vlrm):
    from vlrm_rlhf.reward.inputs import InputError
    from vlrm_rlhf.reward.scorer import VLRewardScorer

    _, model = vlrm
    sc = VLRewardScorer.from_pretrained(model)
    assert sc.tokenizer.model_max_length > 10**9  # the sentinel: no limit from the tokenizer
    limit = sc.model.config.get_text_config().max_position_embeddings
    assert sc.max_length == limit == 512
    long_prompt = "what is the color of the car " * 100 + "?"
    with pytest.warns(UserWarning, match="prompt truncated .* max_length=512"):
        r = sc.score(prompts=[long_prompt], responses=["the car is red ."])
    assert r[0] == r[0]
    with pytest.raises(InputError, match="sample 0: the response .* longer than the context .*512"):
        sc.score(prompts=["what ?"], responses=["the car is red . " * 150])
    sc.tokenizer.model_max_length = 4096  # a tokenizer that claims more than the model has
    assert VLRewardScorer(sc.model, sc.processor).max_length == 512


# --------------------------------------------------------------------------------- non-finite rewards
def test_score_with_non_finite_rewards_names_the_row(vlrm, tmp_path, monkeypatch):
    from vlrm_rlhf.reward.scorer import VLRewardScorer

    _, model = vlrm
    real = VLRewardScorer.score_samples

    def nan_on_second(self, samples):
        out = real(self, samples)
        return [float("nan") if s.text_of("assistant") == "blue ." else v for s, v in zip(samples, out)]

    monkeypatch.setattr(VLRewardScorer, "score_samples", nan_on_second)
    rows = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "what ?", "response": "red ."},
                                            {"prompt": "what ?", "response": "blue ."}])
    out = tmp_path / "o.jsonl"
    res = _run(["score", "--input", rows, "--model", model, "--mode", "no_image", "--out", out])
    assert res.exit_code == 2, res.output
    assert f"{rows} line 2" in res.output and "non-finite reward nan" in res.output and "Traceback" not in res.output
    assert not out.exists()


# ---------------------------------------------------------------------------------- decompression bomb
def test_decompression_bomb_names_row_and_file(vlrm, tmp_path, monkeypatch):
    _, model = vlrm
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # a 40x48 image is now over twice the limit
    _png(tmp_path / "img" / "big.png")
    rows = _jsonl(tmp_path / "rows.jsonl", [{"image": "img/big.png", "prompt": "what ?", "response": "red ."}])
    res = _run(["score", "--input", rows, "--model", model, "--out", tmp_path / "o.jsonl"])
    assert res.exit_code == 2, res.output
    assert f"{rows} line 1" in res.output and "big.png" in res.output and "too large" in res.output

    bon = _jsonl(tmp_path / "bon.jsonl", [{"id": 1, "image": "img/big.png", "input": "what ?",
                                           "responses": ["red .", "blue ."], "correctness": [1, 0]}])
    res = _run(["rerank", "--input", bon, "--model", model])
    assert res.exit_code == 2 and f"{bon} line 1" in res.output and "big.png" in res.output \
        and "too large" in res.output, res.output

    prefs = _jsonl(tmp_path / "prefs.jsonl", [{"id": "a", "query": "what ?", "image": "img/big.png",
                                               "response": ["red .", "blue ."], "human_ranking": [0, 1]}])
    res = _run(["eval", "prefs", prefs, "--model", model])
    assert res.exit_code == 2 and f"{prefs} line 1" in res.output and "big.png" in res.output \
        and "too large" in res.output, res.output


# ---------------------------------------------------------------------------------------- image roots
@pytest.fixture
def layout(tmp_path):
    """data/ (rows), data/img/ok.png, secret/x.png outside data/, and a symlink data/img/link.png -> secret."""
    _png(tmp_path / "data" / "img" / "ok.png", 0)
    _png(tmp_path / "secret" / "x.png", 1)
    (tmp_path / "data" / "img" / "link.png").symlink_to(tmp_path / "secret" / "x.png")
    return tmp_path


ESCAPES = ["../secret/x.png", "{root}/secret/x.png", "img/link.png"]


@pytest.mark.parametrize("path", ESCAPES)
def test_score_confines_image_paths(vlrm, layout, path):
    _, model = vlrm
    p = path.format(root=layout)
    rows = _jsonl(layout / "data" / "rows.jsonl", [{"image": "img/ok.png", "prompt": "what ?", "response": "red ."},
                                                    {"image": p, "prompt": "what ?", "response": "red ."}])
    out = layout / "o.jsonl"
    res = _run(["score", "--input", rows, "--model", model, "--out", out])
    assert res.exit_code == 2, res.output
    assert f"{rows} line 2" in res.output and "outside the allowed image folders" in res.output \
        and p in res.output and "--images-root" in res.output, res.output
    assert not out.exists()
    res = _run(["score", "--input", rows, "--model", model, "--out", out, "--images-root", layout / "secret"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("path", ESCAPES)
def test_rerank_and_eval_bon_confine_image_paths(vlrm, layout, path):
    _, model = vlrm
    p = path.format(root=layout)
    rows = _jsonl(layout / "data" / "bon.jsonl", [
        {"id": 1, "image": "img/ok.png", "input": "what ?", "responses": ["red .", "blue ."], "correctness": [1, 0]},
        {"id": 2, "image": p, "input": "what ?", "responses": ["red .", "blue ."], "correctness": [1, 0]}])
    for cmd in (["rerank", "--input", rows], ["eval", "bon", rows]):
        res = _run([*cmd, "--model", model])
        assert res.exit_code == 2, res.output
        assert f"{rows} line 2" in res.output and "outside the allowed image folders" in res.output \
            and p in res.output, res.output
        assert _run([*cmd, "--model", model, "--images-root", layout / "secret"]).exit_code == 0


def test_image_ids_cannot_climb_out_of_images_dir(vlrm, layout):
    _, model = vlrm
    _png(layout / "data" / "imgs" / "1.png", 0)
    rows = _jsonl(layout / "data" / "bon.jsonl", [
        {"id": "1", "input": "what ?", "responses": ["red .", "blue ."], "correctness": [1, 0]},
        {"id": "../../secret/x", "input": "what ?", "responses": ["red .", "blue ."], "correctness": [1, 0]}])
    res = _run(["rerank", "--input", rows, "--model", model, "--images-dir", layout / "data" / "imgs"])
    assert res.exit_code == 2, res.output
    assert f"{rows} line 2" in res.output and "outside the allowed image folders" in res.output \
        and "secret" in res.output, res.output
    res = _run(["rerank", "--input", rows, "--model", model, "--images-dir", layout / "data" / "imgs",
                "--images-root", layout / "secret"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("path", ESCAPES)
def test_eval_prefs_confines_image_paths(vlrm, layout, path):
    from vlrm_rlhf.eval.records import PrefDataError, load_pref_data

    _, model = vlrm
    p = path.format(root=layout)
    rows = _jsonl(layout / "data" / "prefs.jsonl", [
        {"id": "a", "query": "what ?", "image": "img/ok.png", "response": ["red .", "blue ."], "human_ranking": [0, 1]},
        {"id": "b", "query": "what ?", "image": p, "response": ["red .", "blue ."], "human_ranking": [0, 1]}])
    res = _run(["eval", "prefs", rows, "--model", model])
    assert res.exit_code == 2, res.output
    assert f"{rows} line 2" in res.output and "outside the allowed image folders" in res.output \
        and p in res.output, res.output
    assert _run(["eval", "prefs", rows, "--model", model, "--images-root", layout / "secret"]).exit_code == 0
    with pytest.raises(PrefDataError, match="outside the allowed image folders"):  # the library default is safe
        load_pref_data(rows)
    assert len(load_pref_data(rows, images_root=[layout / "secret"]).records) == 2


def test_library_defaults_confine_image_paths(layout):
    from vlrm_rlhf.bon import find_row_image
    from vlrm_rlhf.reward.records import RecordError, row_image_paths

    base = layout / "data"
    assert row_image_paths({"image": "img/ok.png"}, "r", base) == [base / "img" / "ok.png"]
    with pytest.raises(RecordError, match="r: image path '../secret/x.png' .*outside"):
        row_image_paths({"image": "../secret/x.png"}, "r", base)
    assert row_image_paths({"image": "../secret/x.png"}, "r", base, images_root=[layout / "secret"])
    with pytest.raises(RecordError, match="outside"):
        find_row_image({"image": str(layout / "secret" / "x.png")}, "r", base, None)
    with pytest.raises(RecordError, match="outside"):
        find_row_image({"id": "../../secret/x"}, "r", base, base / "img")
    assert find_row_image({"id": "ok"}, "r", base, base / "img") == base / "img" / "ok.png"
