"""Preference evaluation: metrics (ties, micro/macro), record loading and errors, the LVLM judge, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlrm_rlhf.eval.prefs import PrefResult, evaluate_prefs, pick, pref_metrics
from vlrm_rlhf.eval.records import (
    PrefDataError,
    PrefRecord,
    category_of_id,
    load_pref_data,
    load_pref_records,
)
from vlrm_rlhf.eval.report import markdown_table
from vlrm_rlhf.files import write_json_atomic
from vlrm_rlhf.reward.inputs import make_sample


def _png(path: Path, seed: int, size=(24, 20)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _row(i: int, rid: str, ranking=(0, 1), image=None, **kw) -> dict:
    return {"id": rid, "query": f"what is in picture {i} ?", "response": [f"good answer {i}", f"bad {i}"],
            "human_ranking": list(ranking), **({"image": image} if image is not None else {}), **kw}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(args: list) -> object:
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


class LengthScorer:
    """A pair scorer for tests: reward = length of the response (+ 100 per image), ties when equal."""

    def __init__(self):
        self.calls = 0

    def score_samples(self, samples):
        self.calls += 1
        return [float(len(s.text_of("assistant")) + 100 * len(s.images)) for s in samples]


# ------------------------------------------------------------------------------------------------- metrics
def test_ties_in_model_scores_get_half_credit_and_are_counted():
    m = pref_metrics([(1.0, 0.0), (2.0, 2.0), (0.0, 1.0), (3.0, 3.0 + 1e-9)], [0, 0, 0, 1], ["general"] * 4)
    assert m["overall"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert m["tie_rate"] == pytest.approx(1 / 4)
    tol = pref_metrics([(1.0, 0.0), (2.0, 2.0), (0.0, 1.0), (3.0, 3.0 + 1e-9)], [0, 0, 0, 1], ["general"] * 4, tol=1e-6)
    assert tol["overall"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4) and tol["tie_rate"] == pytest.approx(0.5)
    assert pick(1.0, 1.0) is None and pick(2.0, 1.0) == 0 and pick(1.0, 2.0) == 1
    with pytest.raises(ValueError, match="record 1: NaN"):
        pref_metrics([(1.0, 0.0), (math.nan, 0.0)], [0, 0], ["a", "a"])


def test_micro_and_macro_differ_on_unequal_categories():
    # hallucination: 4 records all right; reasoning: 1 record wrong
    scores = [(1.0, 0.0)] * 4 + [(0.0, 1.0)]
    m = pref_metrics(scores, [0] * 5, ["hallucination"] * 4 + ["reasoning"])
    assert m["overall"] == pytest.approx(4 / 5)
    assert m["macro"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["categories"]["hallucination"] == {"accuracy": 1.0, "n": 4, "tie_rate": 0.0}
    assert m["categories"]["reasoning"]["n"] == 1 and m["n"] == 5
    assert list(m["categories"]) == ["hallucination", "reasoning"]  # VL-RewardBench's order
    table = markdown_table({"rm": m})
    assert "| rm | 80.0 | 50.0 | 100.0 | 0.0 | 0.0 | 5 |" in table


@pytest.mark.parametrize("rid,cat", [
    ("RLAIF-V-Dataset_123", "hallucination"), ("rlaif-v_7", "hallucination"), ("RLHF-V-Dataset_3", "hallucination"),
    ("hallucination_pair-12", "hallucination"), ("povid_1", "hallucination"), ("mathverse_55", "reasoning"),
    ("MathVerse-1", "reasoning"), ("mmmu_pro_9", "reasoning"), ("MMMU-Pro_3", "reasoning"),
    ("wildvision-battle_4", "general"), ("17", "general"),
])
def test_category_rules_from_ids(rid, cat):
    assert category_of_id(rid) == cat


# ------------------------------------------------------------------------------------------------- loading
def test_jsonl_records_images_rankings_categories_and_human_ties(tmp_path):
    _png(tmp_path / "a.png", 0)
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "b.png", 1)
    rows = [_row(0, "RLAIF-V-Dataset_1", image="a.png"),
            _row(1, "mathverse_2", (1, 0), image="b.png"),                      # found in --images-dir
            _row(2, "mmmu_pro_3", image=["a.png", "b.png"], category="Custom"),  # explicit column wins
            _row(3, "wildvision_4"),                                             # text only
            _row(4, "wildvision_5", (1, 1))]                                     # human tie: skipped
    data = load_pref_data(_write_jsonl(tmp_path / "d.jsonl", rows), images_dir=tmp_path / "imgs")
    recs = data.records
    assert data.skipped == ["wildvision_5"]
    assert [r.preferred for r in recs] == [0, 1, 0, 0]
    assert [r.category for r in recs] == ["hallucination", "reasoning", "custom", "general"]
    assert [len(r.images) for r in recs] == [1, 1, 2, 0]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for r in recs for im in r.images)
    with pytest.raises(PrefDataError, match=r"d.jsonl line 5 \(id wildvision_5\): field 'human_ranking'"):
        load_pref_data(tmp_path / "d.jsonl", images_dir=tmp_path / "imgs", ties="error")
    assert len(load_pref_records(tmp_path / "d.jsonl", images_dir=tmp_path / "imgs", limit=2)) == 2


def test_parquet_and_save_to_disk_match_jsonl(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    p0, p1 = _png(tmp_path / "x0.png", 0), _png(tmp_path / "x1.png", 1)
    rows = [_row(0, "RLHF-V_0", image="x0.png"), _row(1, "mmmu_pro_1", (1, 0), image="x1.png")]
    ref = load_pref_records(_write_jsonl(tmp_path / "d.jsonl", rows))
    # parquet as the hub stores an Image feature: {bytes, path} with a path that does not exist here
    prow = [{**r, "image": {"bytes": p.read_bytes(), "path": "nowhere/x.png"}} for r, p in zip(rows, (p0, p1))]
    pq.write_table(pa.Table.from_pylist(prow), tmp_path / "d.parquet")
    ds = datasets.Dataset.from_list([{**r, "image": str(p)} for r, p in zip(rows, (p0, p1))])
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"test": ds.cast_column("image", datasets.Image())}).save_to_disk(str(tmp_path / "dd"))
    for src in ("d.parquet", "ds", "dd"):
        got = load_pref_records(tmp_path / src)
        assert [(r.id, r.preferred, r.category, r.responses) for r in got] == \
               [(r.id, r.preferred, r.category, r.responses) for r in ref], src
        assert all(np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0])) for a, b in zip(got, ref)), src


@pytest.mark.parametrize("change,match", [
    ({"image": "missing.png"}, r"line 1 \(id h_1\): field 'image': image file not found: .*missing.png"),
    ({"response": ["only one"]}, r"line 1 \(id h_1\): field 'response': expected a list of 2 responses, got 1"),
    ({"response": ["a", ""]}, r"field 'response': response 1 is empty"),
    ({"human_ranking": [0]}, r"field 'human_ranking': expected 2 integer ranks"),
    ({"query": None}, r"field 'query': expected a string"),
    ({"category": "overall"}, r"field 'category': 'overall' is reserved"),
])
def test_bad_records_name_file_row_and_field(tmp_path, change, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{**_row(0, "h_1"), **change}])
    with pytest.raises(PrefDataError, match=match):
        load_pref_records(path)
    with pytest.raises(PrefDataError, match="data not found"):
        load_pref_records(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------- evaluation
def test_evaluate_prefs_rows_metrics_and_images_decoded_once(tmp_path):
    _png(tmp_path / "a.png", 0)
    rows = [_row(0, "RLAIF-V_0", image="a.png"), _row(1, "mathverse_1", (1, 0)),
            {**_row(2, "general_2"), "response": ["same", "same"]}]
    recs = load_pref_records(_write_jsonl(tmp_path / "d.jsonl", rows))
    (tmp_path / "a.png").unlink()  # evaluation must never go back to the files
    sc = LengthScorer()
    res = evaluate_prefs(sc, recs, progress=False, batch_size=2)
    again = evaluate_prefs(sc, recs, progress=False)
    assert isinstance(res, PrefResult) and res.metrics == again.metrics and sc.calls == 3
    # longer response wins: record 0 right, record 1 ([1, 0]: second preferred) wrong, record 2 a tie
    assert [r["correct"] for r in res.rows] == [1.0, 0.0, 0.5]
    assert res.rows[0] == {"id": "RLAIF-V_0", "category": "hallucination", "scores": [113.0, 105.0],
                           "preferred": 0, "picked": 0, "correct": 1.0}
    assert res.rows[2]["picked"] is None
    assert res.accuracy_by_category() == {"overall": pytest.approx(1.5 / 3), "macro": pytest.approx(0.5),
                                          "general": 0.5, "hallucination": 1.0, "reasoning": 0.0}
    assert res.metrics["tie_rate"] == pytest.approx(1 / 3)


def test_evaluate_prefs_names_the_record_on_non_finite_scores():
    recs = [PrefRecord("r0", "q", ("a", "b"), 0, "general", where="f line 1 (id r0)")]

    class Bad:
        def score_samples(self, samples):
            return [float("nan"), 0.0]

    with pytest.raises(PrefDataError, match=r"f line 1 \(id r0\): non-finite score"):
        evaluate_prefs(Bad(), recs, progress=False)


def test_write_json_atomic_refuses_to_overwrite(tmp_path):
    p = write_json_atomic({"a": 1}, tmp_path / "r.json")
    with pytest.raises(FileExistsError, match="--force"):
        write_json_atomic({"a": 2}, p)
    write_json_atomic({"a": 2}, p, force=True)
    assert json.loads(p.read_text()) == {"a": 2}


# --------------------------------------------------------------------------------------------------- judge
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the car ?"}]}]


@pytest.fixture(scope="module")
def lvlm(zoo):
    from transformers import AutoModelForImageTextToText

    from vlrm_rlhf.models.processing import load_processor
    from vlrm_rlhf.testing.zoo import demo_image

    trio = zoo("llava")
    model = AutoModelForImageTextToText.from_pretrained(trio["lvlm"]).eval()
    return trio, model, load_processor(trio["lvlm"]), demo_image(trio["lvlm"], 0)


def test_judge_loglik_equals_manual_response_likelihood(lvlm):
    from vlrm_rlhf.eval.judge import LVLMJudge

    trio, model, proc, im = lvlm
    response = "the car is red ."
    p = proc.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    full = proc.apply_chat_template(PROMPT + [{"role": "assistant", "content": [{"type": "text", "text": response}]}],
                                    tokenize=False)
    assert full.startswith(p + " " + response)  # the zoo template: "... assistant : RESPONSE <eos>"
    enc_p = proc(text=[p], images=[[im]], return_tensors="pt", add_special_tokens=False)
    enc = proc(text=[p + " " + response], images=[[im]], return_tensors="pt", add_special_tokens=False)
    n_p, ids = enc_p["input_ids"].shape[1], enc["input_ids"][0]
    assert torch.equal(ids[:n_p], enc_p["input_ids"][0])
    with torch.no_grad():
        lp = model(**enc).logits[0].log_softmax(-1)
    manual = [float(lp[t - 1, ids[t]]) for t in range(n_p, len(ids))]

    judge = LVLMJudge(model, proc, kind="loglik_sum", batch_size=3)
    mean = LVLMJudge(model, proc, kind="loglik_mean")
    prompts, responses, images = [PROMPT, PROMPT, "is it a dog ?"], [response, "blue", "yes"], [[im], [im], None]
    s = judge.score(prompts=prompts, responses=responses, images=images)
    assert s[0] == pytest.approx(sum(manual), abs=1e-4)
    assert mean.score(prompts=prompts, responses=responses, images=images)[0] == pytest.approx(sum(manual) / len(manual),
                                                                                               abs=1e-5)
    single = [judge.score(prompts=[p_], responses=[r], images=[i])[0] for p_, r, i in zip(prompts, responses, images)]
    assert s == pytest.approx(single, abs=1e-4)  # padding and batching do not change scores
    assert all(math.isfinite(x) and x < 0 for x in s)


def test_judge_yes_no_reads_the_next_token(lvlm):
    from vlrm_rlhf.eval.judge import DEFAULT_TEMPLATE, LVLMJudge

    trio, model, proc, im = lvlm
    judge = LVLMJudge(model, proc, kind="yes_no")
    got = judge.score(prompts=[PROMPT, "is it a dog ?"], responses=["red .", "yes ."], images=[[im], None])
    assert all(math.isfinite(x) for x in got)
    text = DEFAULT_TEMPLATE.format(question="what color is the car ?", answer="red .")
    p = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                                 tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        lp = model(**proc(text=[p], images=[[im]], return_tensors="pt", add_special_tokens=False)).logits[0, -1].log_softmax(-1)
    tok = proc.tokenizer
    assert got[0] == pytest.approx(float(lp[tok.convert_tokens_to_ids("yes")] - lp[tok.convert_tokens_to_ids("no")]),
                                   abs=1e-5)


def test_judge_errors_and_template_fallback(lvlm, tmp_path):
    from vlrm_rlhf.eval.judge import JudgeError, LVLMJudge

    trio, model, proc, im = lvlm
    # the zoo's word-level vocabulary has "yes"/"no" as single tokens; other answers are refused clearly
    with pytest.raises(JudgeError, match=r"'yes please' to be one known token.*\['yes', 'please'\]"):
        LVLMJudge(model, proc, kind="yes_no", answers=("yes please", "no"))
    with pytest.raises(JudgeError, match=r"'affirmative'.*<unk>"):
        LVLMJudge(model, proc, kind="yes_no", answers=("affirmative", "no"))
    with pytest.raises(JudgeError, match="unknown judge kind"):
        LVLMJudge(model, proc, kind="vibes")
    with pytest.raises(JudgeError, match="is a reward model"):
        LVLMJudge.from_pretrained(trio["rm"])
    # a template whose generation prompt is not a prefix of the conversation: falls back with a warning
    from vlrm_rlhf.models.processing import load_processor

    odd = load_processor(trio["lvlm"])
    odd.chat_template = proc.chat_template.replace("{{ message['role'] }} :", "{{ message['role'] }}:")
    args = dict(prompts=[PROMPT], responses=["the car is red ."], images=[[im]])
    with pytest.warns(UserWarning, match="not a prefix"):
        fallback = LVLMJudge(model, odd).score(**args)
    assert fallback == pytest.approx(LVLMJudge(model, proc).score(**args), abs=1e-5)  # same tokens here


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def vlrm_dir(zoo, tmp_path_factory):
    from vlrm_rlhf.merge import build
    from vlrm_rlhf.testing.zoo import write_quick_recipe

    trio = zoo("llava")
    root = tmp_path_factory.mktemp("eval_vlrm")
    return trio, build(write_quick_recipe(trio, root / "recipe.yaml"), root / "vlrm", progress=False)


def test_cli_eval_prefs_writes_json_md_records_and_refuses_overwrite(vlrm_dir, tmp_path):
    from vlrm_rlhf.reward.scorer import VLRewardScorer

    trio, vlrm = vlrm_dir
    _png(tmp_path / "a.png", 0)
    _png(tmp_path / "b.png", 1)
    rows = [_row(0, "RLAIF-V_0", image="a.png"), _row(1, "mathverse_1", (1, 0), image="b.png"),
            _row(2, "wildvision_2", image="a.png"), _row(3, "RLHF-V_3", (0, 0), image="b.png")]
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "res.json"
    r = _run(["eval", "prefs", data, "--model", vlrm, "--out", out])
    assert r.exit_code == 0, r.output
    assert "| scorer | overall % | macro % | general % | hallucination % | reasoning % | ties % | n |" in r.output
    summary = json.loads(out.read_text())
    assert summary["metrics"]["n"] == 3 and summary["skipped_human_ties"] == ["RLHF-V_3"]
    assert set(summary["metrics"]["categories"]) == {"general", "hallucination", "reasoning"}
    assert (tmp_path / "res.md").read_text().count("| vlrm (vlrm) |") == 1
    per = [json.loads(x) for x in (tmp_path / "res.records.jsonl").read_text().splitlines()]
    assert [p["id"] for p in per] == ["RLAIF-V_0", "mathverse_1", "wildvision_2"]
    assert summary["metrics"]["overall"] == pytest.approx(sum(p["correct"] for p in per) / 3)
    # same numbers as the API on the same scorer
    api = evaluate_prefs(VLRewardScorer.from_pretrained(vlrm), load_pref_records(data), progress=False)
    assert [x for p in per for x in p["scores"]] == pytest.approx([x for r in api.rows for x in r["scores"]], abs=1e-5)

    again = _run(["eval", "prefs", data, "--model", vlrm, "--out", out])
    assert again.exit_code == 2 and "already exists (use --force" in again.output
    assert json.loads(out.read_text()) == summary
    assert _run(["eval", "prefs", data, "--model", vlrm, "--out", out, "--force", "--mode", "no_image"]).exit_code == 0
    assert json.loads(out.read_text())["mode"] == "no_image"


@pytest.mark.parametrize("args,match", [
    (["--mode", "vibes"], "unknown --mode 'vibes'"),
    (["--mode", "judge", "--judge-kind", "vibes"], "unknown --judge-kind"),
    (["--mode", "vlrm", "--judge-template", "x"], "only used with --mode judge"),
    (["--mode", "judge"], "cannot load judge model .*is a reward model"),
    (["--mode", "text_rm"], "cannot load reward model"),
])
def test_cli_eval_prefs_bad_settings_exit_2(vlrm_dir, tmp_path, args, match):
    import re

    trio, vlrm = vlrm_dir
    data = _write_jsonl(tmp_path / "p.jsonl", [_row(0, "a")])
    r = _run(["eval", "prefs", data, "--model", vlrm, *args])
    assert r.exit_code == 2 and re.search(match, r.output), r.output
    missing = _run(["eval", "prefs", tmp_path / "nope.jsonl", "--model", vlrm])
    assert missing.exit_code == 2 and "data not found" in missing.output


def test_cli_eval_prefs_judge_mode(zoo, tmp_path):
    trio = zoo("llava")
    _png(tmp_path / "a.png", 0)
    data = _write_jsonl(tmp_path / "p.jsonl", [_row(0, "RLAIF-V_0", image="a.png"), _row(1, "x_1")])
    r = _run(["eval", "prefs", data, "--mode", "judge", "--model", trio["lvlm"], "--judge-kind", "yes_no"])
    assert r.exit_code == 0, r.output
    assert "| judge:yes_no (lvlm) |" in r.output


def test_cli_eval_bon_matches_rerank(zoo, tmp_path):
    trio = zoo("llava")
    rows = [{"id": i, "input": "what color is the car ?", "responses": ["red .", "the car is blue .", "green"],
             "correctness": [1, 0, i % 2]} for i in range(3)]
    data = _write_jsonl(tmp_path / "bon.jsonl", rows)
    common = ["--model", trio["rm"], "--mode", "text_rm"]
    ev = _run(["eval", "bon", data, *common, "--out", tmp_path / "bon.json"])
    rr = _run(["rerank", "--input", data, *common])
    assert ev.exit_code == 0 and rr.exit_code == 0, ev.output + rr.output
    assert ev.output.strip().splitlines()[-1] == rr.output.strip().splitlines()[-1]  # the same metrics JSON
    assert "| scorer | Pass@1 % | Pass@N % | Random % | RM accuracy %" in ev.output
    saved = json.loads((tmp_path / "bon.json").read_text())["metrics"]
    assert saved["count"] == 3 and saved["n"] == 3 and (tmp_path / "bon.md").is_file()


def test_record_samples_match_scorer_prompt_forms():
    from vlrm_rlhf.eval.prefs import record_samples

    im = Image.new("RGB", (8, 8))
    rec = PrefRecord("r", "q ?", ("a .", "b ."), 1, "general", [im, im])
    s = record_samples(rec)
    ref = make_sample("q ?", "a .", [im, im])  # a string prompt with images gets image blocks first
    assert s[0].messages == ref.messages and len(s[1].images) == 2
