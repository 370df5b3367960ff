"""``vlrm-rlhf study rl --quick``: the reward-source study end to end at CI size (quick demo models, 2 updates,
one seed) ends with finite numbers in its table; the gold reward reads its question column."""

from __future__ import annotations

import json
import math
import re

from typer.testing import CliRunner

from vlrm_rlhf.cli import app
from vlrm_rlhf.study.rewards import GoldReward, qa_to_json
from vlrm_rlhf.worlds.shapes import QA


def test_gold_reward_reads_the_question():
    qa = qa_to_json(QA("colour", "what colour is the circle ?", "red", ("blue",)))
    r = GoldReward()(prompts=["q"] * 3, completions=["the answer is red .", "uh , maybe red ?", "the answer is blue ."],
                     qa=[qa] * 3)
    assert r == [1.0, 0.5, 0.0]


def test_study_rl_quick(tmp_path):
    res = CliRunner().invoke(app, ["study", "rl", "--quick", "--work-dir", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output[-3000:]
    table = (tmp_path / "s" / "table.md").read_text().split("\n\n")[0]  # the reward-source table
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| reward")]
    assert len(rows) == 7  # starting policy + 6 sources
    nums = [float(x) for r in rows for x in re.findall(r"-?\d+\.\d+", r)]
    assert nums and all(math.isfinite(x) for x in nums)
    out = json.loads((tmp_path / "s" / "results.json").read_text())
    assert {r["source"] for r in out["runs"]} == {"text_rm", "lvlm_judge", "cascade", "vlrm", "ensemble", "gold"}
    assert all(math.isfinite(h["gold/kl"]) and math.isfinite(h["gold/proxy_reward"]) for r in out["runs"]
               for h in r["test"])
    assert (tmp_path / "s" / "overoptimization.png").stat().st_size > 0


def _without_timing(x):
    """A run's result without its wall-clock fields."""
    if isinstance(x, dict):
        return {k: _without_timing(v) for k, v in x.items() if "second" not in k and k != "seconds"}
    if isinstance(x, list):
        return [_without_timing(v) for v in x]
    return x


def test_study_runs_in_worker_processes_equal_runs_in_the_main_process(tmp_path):
    """Worker processes (one thread each) give exactly the numbers the same runs give one after another."""
    from vlrm_rlhf.study.rl import run_study

    kw = dict(seeds=[0], algos=("ppo", "grpo"), sources=("vlrm", "ensemble"), quick=True, progress=False,
              demo_dir=str(tmp_path / "demo_s{seed}"), make_demo=__import__("vlrm_rlhf.demo.run").demo.run.run_demo)
    par = run_study(tmp_path / "par", workers=2, **kw)
    seq = run_study(tmp_path / "seq", workers=1, **kw)
    assert len(par["runs"]) == len(seq["runs"]) == 4
    assert _without_timing(par["runs"]) == _without_timing(seq["runs"])
    assert _without_timing(par["summary"]) == _without_timing(seq["summary"])
