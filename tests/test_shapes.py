"""ShapesWorld: deterministic world, token layouts that match the chat template, benchmark files the
evaluation harness reads, and the quick demo end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vlrm_rlhf.worlds.gold import grade
from vlrm_rlhf.worlds.shapes import (
    CATEGORY_OF_KIND,
    STYLES,
    World,
    answer,
    parse_answer,
    questions,
)
from vlrm_rlhf.worlds.text import N_IMAGE_TOKENS, build_processor, build_tokenizer, messages, text_seq


def test_world_is_deterministic_per_seed():
    a, b, c = World(3, n_train=50, n_val=10, n_test=10, n_unseen=5), World(3, n_train=50, n_val=10, n_test=10,
                                                                        n_unseen=5), World(4, n_train=50)
    assert a.train.scenes == b.train.scenes and a.test_unseen.scenes == b.test_unseen.scenes
    assert a.train.image(7).tobytes() == b.train.image(7).tobytes()
    assert a.pairs(a.test, 5, 0) == b.pairs(b.test, 5, 0)
    assert a.train.scenes != c.train.scenes


def test_unseen_combinations_are_held_out_of_training():
    w = World(0, n_train=2000, n_val=50, n_test=50, n_unseen=50)
    assert len(w.unseen) == 3
    for split in (w.train, w.val, w.test):
        assert not any(s.combos & w.unseen for s in split.scenes)
    assert all(s.combos & w.unseen for s in w.test_unseen.scenes)


def test_pairs_are_balanced_and_styles_equal_length():
    w = World(1, n_train=10, n_val=10, n_test=60, n_unseen=5)
    tok = build_tokenizer()
    pairs = w.pairs(w.test, 20, 0)
    assert [p.category for p in pairs].count("general") == 20
    for p in pairs:
        a, b = tok(p.chosen)["input_ids"], tok(p.rejected)["input_ids"]
        assert len(a) == len(b) and p.chosen != p.rejected
        assert tok.unk_token_id not in a + b
        if p.category != "general":
            assert CATEGORY_OF_KIND[p.kind] == p.category
            assert parse_answer(p.chosen)[0] == parse_answer(p.rejected)[0]  # same style: only correctness differs
        scene = w.test.scenes[p.scene_index]
        gold = {q.question: q for q in questions(scene)}[p.question]
        assert grade(gold, p.chosen) > 0 and (p.category == "general" or grade(gold, p.rejected) == 0)


def test_grade_and_parse():
    qa = questions(World(0, n_train=5).train.scenes[0])[0]
    assert grade(qa, answer(qa.gold, "good")) == 1.0
    assert grade(qa, answer(qa.gold, "bad")) == 0.5
    assert grade(qa, answer(qa.wrong[0], "good")) == 0.0
    assert grade(qa, "the answer is") == 0.0
    assert len(STYLES["good"]) == len(STYLES["bad"])


def test_chat_template_renders_the_training_layouts():
    tok = build_tokenizer()
    proc = build_processor(tok)
    q, a, d = "what colour is the circle ?", answer("red", "good"), "red circle none none"
    for desc in (d, None):
        rendered = tok.apply_chat_template(messages(q, a, description=desc), tokenize=False)
        assert tok(rendered)["input_ids"] == tok(text_seq(q, a, desc))["input_ids"]
    from PIL import Image

    text = proc.apply_chat_template(messages(q, a, image=True), tokenize=False)
    enc = proc(text=[text], images=[[Image.new("RGB", (32, 32))]], return_tensors="pt")
    assert enc["input_ids"][0].tolist() == tok(text_seq(q, a, image=True))["input_ids"]
    assert int((enc["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == N_IMAGE_TOKENS
    # the cascade scorer's caption prompt and description prefix map onto the world's words and <ctx> slot
    cascade = tok.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": f"Image description: {d}"}, {"type": "text", "text": "Describe the image."}]}],
        tokenize=False)
    assert tok.convert_ids_to_tokens(tok(cascade)["input_ids"])[1:7] == ["<ctx>", "red", "circle", "none", "none",
                                                                         "</ctx>"]
    assert tok.unk_token_id not in tok(cascade)["input_ids"]
    # a text RM renders blocks as lines of one string (scorer modes text_rm / cascade): same layout
    from vlrm_rlhf.reward.scorer import render

    plain = render(tok, messages(q, a, description=d), plain_text=True)
    assert tok(plain)["input_ids"] == tok(text_seq(q, a, d))["input_ids"]
    assert tok(render(tok, messages(q, a), plain_text=True))["input_ids"] == tok(text_seq(q, a))["input_ids"]
    # one block holding description and question (text task files for the reasoning LLM)
    one = [{"role": "user", "content": [{"type": "text", "text": f"Image description: {d}\n{q}"}]},
           {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    assert tok(tok.apply_chat_template(one, tokenize=False))["input_ids"] == tok(text_seq(q, a, d))["input_ids"]


def test_benchmark_files_read_by_the_harness(tmp_path: Path):
    from vlrm_rlhf.eval.records import load_pref_records
    from vlrm_rlhf.worlds.bench import write_benchmark

    w = World(2, n_train=10, n_val=20, n_test=20, n_unseen=10)
    paths = write_benchmark(w, tmp_path / "bench", {"val": 4, "test": 5, "test_unseen": 3}, seed=0)
    recs = load_pref_records(paths["test"])
    assert len(recs) == 15 and {r.category for r in recs} == {"hallucination", "general", "reasoning"}
    assert {r.preferred for r in recs} == {0, 1}  # the chosen answer's position is shuffled
    rows = [json.loads(x) for x in paths["test_unseen"].read_text().splitlines()]
    assert all(r["unseen_combo"] for r in rows)
    assert not list(tmp_path.glob(".*partial*"))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    work = tmp_path_factory.mktemp("demo")
    res = CliRunner().invoke(app, ["demo", "--quick", "--with-reasoning", "--work-dir", str(work), "--seed", "1"])
    assert res.exit_code == 0, res.output
    return work


def test_quick_demo_writes_a_finite_report(quick_demo: Path):
    rep = json.loads((quick_demo / "report.json").read_text())
    from vlrm_rlhf.worlds.merges import METHOD_PARAMS

    need = {*METHOD_PARAMS, "text_rm", "lvlm_judge", "cascade", "no_image"}
    assert need <= set(rep["accuracy"])
    assert rep["best_merge"] in rep["accuracy"]
    for name, acc in rep["accuracy"].items():
        for k in ("overall", "hallucination", "general", "reasoning"):
            assert math.isfinite(acc[k]) and 0 <= acc[k] <= 1, (name, k)

    def finite(x) -> None:
        if isinstance(x, dict):
            [finite(v) for v in x.values()]
        elif isinstance(x, list):
            [finite(v) for v in x]
        elif isinstance(x, float):
            assert math.isfinite(x)

    finite({k: v for k, v in rep.items() if k != "bon"})
    finite({k: v for k, v in rep["bon"].items() if k != "examples"})  # candidates' scores may be -inf (empty)
    for f in ("report.md", "accuracy.png", "sweep.png", "reward_curve.png", "sweep/sweep.csv"):
        assert (quick_demo / f).stat().st_size > 0, f
    assert "Best merge (chosen on validation)" in (quick_demo / "report.md").read_text()
    r = rep["reasoning"]
    assert {"lvlm", "llm (text, gold description)"} <= set(r["accuracy"])
    assert r["finding"]["merged_ta"] and r["finding"]["llm"]
    for sub in ("params/params.csv", "ablate_lvlm/ablate.csv", "ablate_llm/ablate.csv", "ablate_merged_ta/ablate.csv",
                "swap/swap.png", "tasks/tasks_text.jsonl"):
        assert (quick_demo / "reasoning" / sub).stat().st_size > 0, sub


def test_quick_demo_rerun_reuses_the_trained_models(quick_demo: Path):
    from vlrm_rlhf.worlds.train import TrainConfig, train_all

    before = {p: p.stat().st_mtime_ns for p in (quick_demo / "models").rglob("*.safetensors")}
    out = train_all(quick_demo / "models", 1, TrainConfig.quick(), progress=False)
    assert out["cached"] and before == {p: p.stat().st_mtime_ns for p in (quick_demo / "models").rglob("*.safetensors")}
