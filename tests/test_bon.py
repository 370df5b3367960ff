"""Best-of-N: the paper's metrics (incl. ties), offline reranking of the published best-of-8 file, the
``rerank``/``score`` CLI end to end on a tiny merged VLRM, and online ``best_of_n`` with a tiny LLaVA policy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import recipe
from PIL import Image

from vlrm_rlhf.bon import RecordError, bon_metrics, rerank_records
from vlrm_rlhf.files import write_jsonl_atomic
from vlrm_rlhf.merge import build

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "textvqa_val_bon8_first300.jsonl"
METRIC_KEYS = ("pass@1", "pass@n", "random", "rm_accuracy")


@pytest.fixture(scope="module")
def fixture_rows() -> list[dict]:
    if not FIXTURE.is_file():
        pytest.skip(f"shared best-of-8 fixture not found at {FIXTURE} (written outside this repo, in ../shared)")
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def vlrm(zoo, tmp_path_factory):
    """(trio, merged llava VLRM dir): task arithmetic λ_L = 0.5, λ_R = 1."""
    trio = zoo("llava")
    out = tmp_path_factory.mktemp("bon_vlrm") / "vlrm"
    build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), out, progress=False)
    return trio, out


def _run(args: list[str]):
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _png(path: Path, seed: int, size=(40, 48)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_hand_made_rows_with_ties():
    corr = [[1, 0, 0.5], [0, 1, 1], [0.3, 0.6, 0.9]]
    scores = [[0.1, 0.5, 0.5], [2, 2, 2], [0, 1, -1]]
    m = bon_metrics(corr, scores)
    assert m["n"] == 3 and m["count"] == 3
    assert m["pass@1"] == pytest.approx(100 * (1 + 0 + 0.3) / 3)
    assert m["pass@n"] == pytest.approx(100 * (1 + 1 + 0.9) / 3)
    assert m["random"] == pytest.approx(100 * (1.5 / 3 + 2 / 3 + 1.8 / 3) / 3)
    # ties count as the expected correctness over the tied set: row 0 -> mean(0, .5), row 1 -> mean(0, 1, 1)
    assert m["rm_accuracy"] == pytest.approx(100 * (0.25 + 2 / 3 + 0.6) / 3)
    assert m["rm_accuracy_first"] == pytest.approx(100 * (0 + 0 + 0.6) / 3)  # the paper's np.argmax
    assert m["tie_rate"] == pytest.approx(100 * 2 / 3)
    no_ties = bon_metrics([[0, 1]], [[0.0, 1e-9]])
    assert no_ties["rm_accuracy"] == 100 and no_ties["tie_rate"] == 0


@pytest.mark.parametrize("corr, scores, match", [
    ([[1, 0]], [[0.5]], "correctness values"),
    ([[1, 0]], [[0.5, math.nan]], "NaN score"),
    ([[1, 0], [1, 0, 0]], [[0, 1], [0, 1, 2]], "different numbers of candidates"),
    ([], [], "no rows"),
])
def test_metrics_bad_rows(corr, scores, match):
    with pytest.raises(RecordError, match=match):
        bon_metrics(corr, scores)


def test_rerank_fixture_stand_in_scorers(fixture_rows):
    rows = fixture_rows
    assert len(rows) == 300 and all(len(r["responses"]) == len(r["correctness"]) == 8 for r in rows)
    pass1 = 100 * sum(r["correctness"][0] for r in rows) / len(rows)  # computed independently of vlrm_rlhf
    pass8 = 100 * sum(max(r["correctness"]) for r in rows) / len(rows)
    rand = 100 * sum(sum(r["correctness"]) / 8 for r in rows) / len(rows)

    out, m = rerank_records(rows, lambda rec, resp: [-i for i in range(len(resp))])
    assert (m["n"], m["count"], m["tie_rate"]) == (8, 300, 0)
    assert m["pass@1"] == pytest.approx(pass1) and m["pass@n"] == pytest.approx(pass8)
    assert m["random"] == pytest.approx(rand)
    assert m["rm_accuracy"] == pytest.approx(pass1), "scores = -index must pick the first response"
    assert out[0]["scores"] == [0, -1, -2, -3, -4, -5, -6, -7] and out[0]["responses"] == rows[0]["responses"]
    assert "scores" not in rows[0], "records are copied, not modified"

    _, m = rerank_records(rows, lambda rec, resp: rec["correctness"][: len(resp)])
    assert m["rm_accuracy"] == pytest.approx(pass8), "scores = correctness is the oracle"
    assert m["rm_accuracy_first"] == pytest.approx(pass8) and m["tie_rate"] > 0

    _, m4 = rerank_records(rows, lambda rec, resp: rec["correctness"][: len(resp)], n=4)
    assert m4["n"] == 4 and m4["pass@n"] == pytest.approx(100 * sum(max(r["correctness"][:4]) for r in rows) / 300)
    with pytest.raises(RecordError, match=r"row 0 \(id 34602\): the scorer returned 2 scores for 8"):
        rerank_records(rows[:1], lambda rec, resp: [0.0, 1.0])
    with pytest.raises(RecordError, match="fewer than n=9"):
        rerank_records(rows[:1], lambda rec, resp: [0.0] * 8, n=9)


def test_write_jsonl_atomic_refuses_overwrite(tmp_path):
    out = write_jsonl_atomic([{"a": 1}], tmp_path / "o.jsonl")
    with pytest.raises(FileExistsError, match="already exists"):
        write_jsonl_atomic([{"a": 2}], out)
    write_jsonl_atomic([{"a": 3}], out, force=True)
    assert json.loads(out.read_text()) == {"a": 3} and [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_score_end_to_end_and_errors(vlrm, tmp_path):
    from vlrm_rlhf.reward.scorer import VLRewardScorer

    _, model = vlrm
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png", 0)
    rows = [{"image": "img/a.png", "prompt": "what color is the car ?", "response": "the car is red ."},
            {"image": None, "prompt": "what color is the car ?", "response": "the car is red ."},
            {"images": ["img/a.png", "img/a.png"], "prompt": "which is red ?", "response": "the one on the left ."}]
    inp = tmp_path / "rows.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    res = _run(["score", "--input", inp, "--model", model, "--out", out])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "reward"} for g in got] == rows
    sc = VLRewardScorer.from_pretrained(model)
    im = Image.open(tmp_path / "img" / "a.png").convert("RGB")
    expect = sc.score(prompts=[r["prompt"] for r in rows], responses=[r["response"] for r in rows],
                      images=[[im], None, [im, im]])
    assert max(abs(g["reward"] - e) for g, e in zip(got, expect)) < 1e-5
    assert abs(got[0]["reward"] - got[1]["reward"]) > 1e-6, "the image must change the reward"

    res = _run(["score", "--input", inp, "--model", model, "--out", out])
    assert res.exit_code == 2 and "already exists" in res.output and "--force" in res.output
    assert _run(["score", "--input", inp, "--model", model, "--out", out, "--force"]).exit_code == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[1]) + "\n" + json.dumps({**rows[0], "image": "img/missing.png"}) + "\n")
    res = _run(["score", "--input", bad, "--model", model, "--out", tmp_path / "x.jsonl"])
    assert res.exit_code == 2, res.output
    assert "line 2" in res.output and "image file not found" in res.output and "missing.png" in res.output
    assert not (tmp_path / "x.jsonl").exists()
    res = _run(["score", "--input", inp, "--model", model, "--out", tmp_path / "y.jsonl", "--mode", "cascade"])
    assert res.exit_code == 2 and "--lvlm" in res.output


def test_cli_rerank_with_stand_in_images(vlrm, fixture_rows, tmp_path):
    from vlrm_rlhf.reward.scorer import VLRewardScorer

    _, model = vlrm
    rows = fixture_rows[:3]
    inp = tmp_path / "bon.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    images = tmp_path / "images"
    images.mkdir()
    for r in rows:
        _png(images / f"{r['id']}.png", r["id"])
    out = tmp_path / "scored.jsonl"
    res = _run(["rerank", "--input", inp, "--model", model, "--images-dir", images, "--out", out])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(METRIC_KEYS) <= set(m) and (m["n"], m["count"]) == (8, 3)
    assert m["pass@1"] == pytest.approx(100 * sum(r["correctness"][0] for r in rows) / 3, abs=1e-3)
    assert m["pass@n"] == pytest.approx(100 * sum(max(r["correctness"]) for r in rows) / 3, abs=1e-3)
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(s["scores"]) == 8 and s["responses"] == r["responses"] for s, r in zip(scored, rows))
    sc = VLRewardScorer.from_pretrained(model)
    im = Image.open(images / f"{rows[1]['id']}.png").convert("RGB")
    plain = sc.score(prompts=[rows[1]["input"]] * 8, responses=rows[1]["responses"], images=[[im]] * 8)
    assert max(abs(a - b) for a, b in zip(scored[1]["scores"], plain)) < 1e-4

    res = _run(["rerank", "--input", inp, "--model", model, "--images-dir", images, "--out", out])
    assert res.exit_code == 2 and "already exists" in res.output
    res = _run(["rerank", "--input", inp, "--model", model])
    assert res.exit_code == 2 and "--images-dir" in res.output and "line 1" in res.output
    with_paths = tmp_path / "with_paths.jsonl"  # a row's own "image", relative to the input file
    with_paths.write_text("".join(json.dumps({**r, "image": f"images/{r['id']}.png"}) + "\n" for r in rows))
    res = _run(["rerank", "--input", with_paths, "--model", model])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["rm_accuracy"] == pytest.approx(m["rm_accuracy"], abs=1e-3)
    (images / f"{rows[2]['id']}.png").unlink()
    res = _run(["rerank", "--input", inp, "--model", model, "--images-dir", images])
    assert res.exit_code == 2 and f"{rows[2]['id']}.jpg" in res.output and "image file not found" in res.output
    res = _run(["rerank", "--input", inp, "--model", model, "--mode", "no_image"])  # text only: allowed
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["count"] == 3
    assert _run(["rerank", "--input", inp, "--model", model, "--mode", "nope"]).exit_code == 2


# ------------------------------------------------------------------------------------------------- online
def test_best_of_n_with_tiny_llava_policy(vlrm, caplog):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlrm_rlhf.bon import best_of_n
    from vlrm_rlhf.reward.scorer import VLRewardScorer
    from vlrm_rlhf.testing.zoo import demo_image

    trio, model = vlrm
    policy = AutoModelForImageTextToText.from_pretrained(trio["lvlm"]).eval()
    processor = AutoProcessor.from_pretrained(trio["lvlm"])
    scorer = VLRewardScorer.from_pretrained(model)
    ims = [demo_image(trio["lvlm"], 0), demo_image(trio["lvlm"], 1)]
    prompts = ["what color is the car ?",
               [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ."}]}]]
    encoded = []
    hook = policy.model.vision_tower.register_forward_hook(lambda m, a, o: encoded.append(a[0].shape[0]))
    res = best_of_n(policy, processor, scorer, prompts, images=[[ims[0]], ims[1]], n=5, seed=0,
                    max_new_tokens=6, min_new_tokens=2)
    hook.remove()
    assert encoded == [1, 1], "the image is encoded once per prompt, not once per candidate"
    assert len(res) == 2
    for r, prompt, im in zip(res, prompts, ims):
        assert len(r.candidates) == len(r.scores) == 5 and all(isinstance(c, str) and c for c in r.candidates)
        assert r.best_index == max(range(5), key=lambda i: (r.scores[i], -i))  # argmax, first on ties
        assert r.best == r.candidates[r.best_index] and r.best_index in r.tied
        plain = scorer.score(prompts=[prompt] * 5, responses=r.candidates, images=[[im]] * 5)
        assert max(abs(a - b) for a, b in zip(r.scores, plain)) < 1e-4
    again = best_of_n(policy, processor, scorer, prompts, images=[[ims[0]], ims[1]], n=5, seed=0,
                      max_new_tokens=6, min_new_tokens=2)
    assert again == res, "deterministic for a seed"
    other = best_of_n(policy, processor, scorer, prompts[:1], images=[[ims[0]]], n=5, seed=1,
                      max_new_tokens=6, min_new_tokens=2)
    assert other[0].candidates != res[0].candidates
    state = torch.random.get_rng_state()
    best_of_n(policy, processor, scorer, prompts[:1], images=[[ims[0]]], n=2, seed=0, max_new_tokens=3)
    assert torch.equal(torch.random.get_rng_state(), state), "a seeded run leaves the global RNG alone"
    unseeded = [best_of_n(policy, processor, scorer, prompts[:1], images=[[ims[0]]], n=5, max_new_tokens=6,
                          min_new_tokens=2)[0].candidates for _ in range(2)]
    assert unseeded[0] != unseeded[1], "unseeded runs draw from (and advance) the global RNG"

    # ties: a scorer that cannot tell candidates apart -> first index, reported and logged
    class Flat:
        def score_candidates(self, prompt, responses, images=None):
            return [0.0] * len(responses)

    with caplog.at_level("WARNING", logger="vlrm_rlhf.bon"):
        flat = best_of_n(policy, processor, Flat(), prompts[:1], images=[[ims[0]]], n=3, seed=0,
                         max_new_tokens=4, min_new_tokens=2)
    assert flat[0].best_index == 0 and flat[0].tied == [0, 1, 2]
    assert "1 of 1 prompts had tied best scores" in caplog.text
    picks = {best_of_n(policy, processor, Flat(), prompts[:1], images=[[ims[0]]], n=3, seed=s, max_new_tokens=4,
                       min_new_tokens=2, tie_break="random")[0].best_index for s in range(8)}
    assert len(picks) > 1


def test_candidates_scored_once_per_text_and_empty_ones_lose():
    from vlrm_rlhf.bon import score_unique

    calls = []

    class Recording:
        def score_candidates(self, prompt, responses, images=None):
            calls.append(list(responses))
            return [float(len(r)) for r in responses]

    assert score_unique(Recording(), "q", ["ab", "", "ab", "abc"], []) == [2.0, -math.inf, 2.0, 3.0]
    assert calls == [["ab", "abc"]]
    assert score_unique(Recording(), "q", ["", ""], []) == [-math.inf, -math.inf] and len(calls) == 1
