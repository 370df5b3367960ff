"""Other preference benchmarks read unchanged: Multimodal RewardBench, MM-RLHF-RewardBench (ACC+), RLAIF-V pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlrm_rlhf.eval.prefs import acc_plus, evaluate_prefs
from vlrm_rlhf.eval.records import PrefDataError, load_pref_data
from vlrm_rlhf.eval.report import markdown_table


def _png(path: Path, seed: int) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class LengthScorer:
    """Reward = response length: the longer response wins."""

    def score_samples(self, samples):
        return [float(len(s.text_of("assistant"))) for s in samples]


def test_multimodal_rewardbench_rows_better_and_meta_category(tmp_path):
    _png(tmp_path / "a.png", 0)
    rows = [{"ID": "m0", "Image": "a.png", "Text": "what ?", "Output1": "long answer", "Output2": "short",
             "Better": "Output1", "Meta": {"Category": "Safety"}},
            {"ID": "m1", "Image": "a.png", "Text": "why ?", "Output1": "no", "Output2": "because so",
             "Better": "Output2", "Meta": json.dumps({"Category": "reasoning"})},
            {"ID": "m2", "Image": None, "Text": "how ?", "Output1": "x", "Output2": "yyyy", "Better": "Output1",
             "Meta": None}]
    data = load_pref_data(_jsonl(tmp_path / "mmrb.jsonl", rows))
    assert data.format == "multimodal-rewardbench"
    assert [r.preferred for r in data.records] == [0, 1, 0]
    assert [r.category for r in data.records] == ["safety", "reasoning", "general"]
    assert [len(r.images) for r in data.records] == [1, 1, 0]
    m = evaluate_prefs(LengthScorer(), data.records, progress=False).metrics
    assert m["overall"] == pytest.approx(2 / 3) and "acc_plus" not in m
    rows[0]["Better"] = "Output3"
    with pytest.raises(PrefDataError, match=r"mmrb2.jsonl line 1 \(id m0\)|mmrb2.jsonl line 1.*'Better'"):
        load_pref_data(_jsonl(tmp_path / "mmrb2.jsonl", rows))


def test_mm_rlhf_accuracy_and_acc_plus_hand_computed(tmp_path):
    # groups: g1 = 3 pairs all right; g2 = 2 pairs, one wrong; g3 = 1 pair, a tie (not right); g4 = 1 pair right
    def row(g, chosen, rejected):
        return {"id": g, "image": None, "prompt": f"q {g}", "chosen": chosen, "rejected": rejected}

    rows = [row("g1", "aaaa", "b"), row("g1", "aaa", "bb"), row("g1", "aaaaa", "b"),
            row("g2", "aaaa", "b"), row("g2", "a", "bbbb"),
            row("g3", "aa", "bb"),
            row("g4", "aaa", "b")]
    data = load_pref_data(_jsonl(tmp_path / "mmrlhf.jsonl", rows))
    assert data.format == "mm-rlhf" and [r.group for r in data.records] == ["g1"] * 3 + ["g2"] * 2 + ["g3", "g4"]
    res = evaluate_prefs(LengthScorer(), data.records, progress=False)
    m = res.metrics
    assert m["overall"] == pytest.approx((3 + 1 + 0.5 + 1) / 7)  # accuracy: 5.5 of 7
    assert m["acc_plus"] == pytest.approx(2 / 4) and m["groups"] == 4  # g1 and g4 right
    assert res.rows[0]["group"] == "g1"
    table = markdown_table({"len": m})
    assert "ACC+ %" in table and "| 50.0 | 4 |" in table
    assert acc_plus([1.0, 0.5], ["a", "b"]) == {"acc_plus": 0.5, "groups": 2}


def test_rlaif_v_pairs_and_explicit_format(tmp_path):
    _png(tmp_path / "a.png", 1)
    rows = [{"image": "a.png", "question": "what ?", "chosen": "a good answer", "rejected": "bad", "idx": 7},
            {"image": "a.png", "question": "who ?", "chosen": "c", "rejected": "rejected one"}]
    data = load_pref_data(_jsonl(tmp_path / "rlaif.jsonl", rows))
    assert data.format == "rlaif-v"
    assert [r.id for r in data.records] == ["7", "1"] and all(r.preferred == 0 for r in data.records)
    assert all(len(r.images) == 1 and r.category == "general" for r in data.records)
    same = load_pref_data(tmp_path / "rlaif.jsonl", fmt="rlaif-v")
    assert [r.responses for r in same.records] == [r.responses for r in data.records]


def test_parquet_of_another_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "g", "prompt": "q", "chosen": "aa", "rejected": "b"}, {"id": "g", "prompt": "q", "chosen": "a",
                                                                           "rejected": "bb"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    data = load_pref_data(tmp_path / "p.parquet")
    m = evaluate_prefs(LengthScorer(), data.records, progress=False).metrics
    assert data.format == "mm-rlhf" and m["overall"] == 0.5 and m["acc_plus"] == 0.0


def test_missing_columns_name_the_column_and_the_file(tmp_path):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"ID": "m0", "Text": "q", "Output1": "a", "Output2": "b"}])
    with pytest.raises(PrefDataError, match=r"bad.jsonl: unknown preference format.*multimodal-rewardbench.*'Better'"):
        load_pref_data(bad)
    two = _jsonl(tmp_path / "two.jsonl", [{"id": 1, "prompt": "q", "chosen": "a", "rejected": "b"},
                                          {"id": 2, "prompt": "q", "chosen": "a"}])
    with pytest.raises(PrefDataError, match=r"two.jsonl line 2: missing column 'rejected' \(format mm-rlhf\)"):
        load_pref_data(two)
    with pytest.raises(PrefDataError, match=r"bad.jsonl line 1: missing column 'question' \(format rlaif-v\)"):
        load_pref_data(bad, fmt="rlaif-v")
    with pytest.raises(PrefDataError, match="unknown format 'nope'"):
        load_pref_data(bad, fmt="nope")


def test_cli_eval_prefs_reads_mm_rlhf_and_reports_acc_plus(zoo, tmp_path):
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    trio = zoo("llava")
    rows = [{"id": "g", "prompt": "what color is the car ?", "chosen": "red .", "rejected": "blue ."},
            {"id": "g", "prompt": "what color is the car ?", "chosen": "the car is red .", "rejected": "green"}]
    data = _jsonl(tmp_path / "mm.jsonl", rows)
    r = CliRunner().invoke(app, ["eval", "prefs", str(data), "--model", str(trio["rm"]), "--mode", "text_rm",
                                 "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "o.json").read_text())
    assert saved["format"] == "mm-rlhf" and saved["metrics"]["groups"] == 1 and "ACC+ %" in r.output
    bad = CliRunner().invoke(app, ["eval", "prefs", str(data), "--model", str(trio["rm"]), "--mode", "text_rm",
                                   "--format", "rlaif-v"])
    assert bad.exit_code != 0 and "missing column 'question'" in bad.output
