"""Generative judges: YAML config, pairwise verdicts in both orders (stubbed generation), unparsed outputs,
pointwise parsed and expected scores, best-of-n knockout / round robin, eval mode, TRL reward and GRPO."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from vlrm_rlhf.eval.genjudge import evaluate_judge
from vlrm_rlhf.eval.records import PrefRecord
from vlrm_rlhf.reward.generative import GenerativeJudge, JudgeConfig, JudgeConfigError
from vlrm_rlhf.reward.inputs import make_sample
from vlrm_rlhf.reward.judge_reward import JudgeReward
from vlrm_rlhf.testing.zoo import demo_image

ROOT = Path(__file__).resolve().parents[1]
PAIR = "question : {question} answer one : {response_a} answer two : {response_b} which is better ?"
POINT = "question : {question} answer : {response} is it good ?"


def pairwise(**kw) -> JudgeConfig:
    return JudgeConfig(mode="pairwise", template=PAIR, parser=r"<answer>(\d)</answer>", **kw)


@pytest.fixture(scope="module")
def lvlm(zoo):
    from transformers import AutoModelForImageTextToText

    from vlrm_rlhf.models.processing import load_processor

    trio = zoo("llava")
    model = AutoModelForImageTextToText.from_pretrained(trio["lvlm"]).eval()
    return trio, model, load_processor(trio["lvlm"]), demo_image(trio["lvlm"], 0)


def first_answer(text: str) -> str:
    return re.search(r"answer one : (.*) answer two", text).group(1)


def longer_wins(text: str) -> list[str]:
    """A judge that prefers the longer answer (the first one on equal length)."""
    second = re.search(r"answer two : (.*) which is better", text).group(1)
    return ["<answer>1</answer>" if len(first_answer(text)) >= len(second) else "<answer>2</answer>"]


def stub(judge: GenerativeJudge, monkeypatch, reply, seen: list | None = None) -> None:
    """Replace the judge's sampling: ``reply(prompt_text) -> list of outputs`` (deterministic)."""
    def fake(text, images):
        if seen is not None:
            seen.append((text, len(images)))
        return reply(text)
    monkeypatch.setattr(judge, "generate", fake)


# ------------------------------------------------------------------------------------------------ config
def test_yaml_config_and_its_errors(tmp_path):
    p = tmp_path / "j.yaml"
    p.write_text("mode: pairwise\ntemplate: 'Q {question} A {response_a} B {response_b}'\n"
                 "parser: '\\[\\[(A|B|C)\\]\\]'\nchoices: [A, B]\nties: [C]\nvotes: 3\n"
                 "generation: {max_new_tokens: 8}\n")
    cfg = JudgeConfig.from_yaml(p)
    assert cfg.choices == ("A", "B") and cfg.ties == ("C",) and cfg.votes == 3
    assert cfg.parse("I think [[A]] ... no, [[B]]") == "B" and cfg.parse("A is better") is None
    assert JudgeConfig(mode="pairwise", template=PAIR, parser=r"Answer (\d) is better").parse("Answer 2 is better") == "2"
    p.write_text("mode: pairwise\ntemplate: 'Q {question}'\nparser: '(x)'\ncolour: red\n")
    with pytest.raises(JudgeConfigError, match=r"j.yaml: unknown key\(s\) \['colour'\]"):
        JudgeConfig.from_yaml(p)
    p.write_text("mode: pairwise\ntemplate: 'Q {question} {answer}'\nparser: '(x)'\n")
    with pytest.raises(JudgeConfigError, match=r"j.yaml: template: a pairwise template may use only"):
        JudgeConfig.from_yaml(p)
    with pytest.raises(JudgeConfigError, match="exactly one group"):
        JudgeConfig(mode="pairwise", template=PAIR, parser=r"\d")
    with pytest.raises(JudgeConfigError, match="score_tokens: only for a pointwise"):
        JudgeConfig(mode="pairwise", template=PAIR, score_tokens={"one": 1})
    shipped = {p.name: JudgeConfig.from_yaml(p) for p in sorted(ROOT.glob("recipes/judges/*.yaml"))}
    assert shipped["pairwise_answer_tag.yaml"].parse("... so <answer> 2 </answer>") == "2"
    assert shipped["pairwise_brackets.yaml"].parse("A is vague. [[C]]") == "C"
    assert shipped["pointwise_score.yaml"].score_tokens["10"] == 10.0


# ---------------------------------------------------------------------------------------------- pairwise
def test_pairwise_both_orders_votes_and_swap_invariance(lvlm, monkeypatch):
    trio, model, proc, im = lvlm
    judge = GenerativeJudge(model, proc, pairwise())
    seen: list = []
    # a content-aware judge: "good" answers win wherever they stand
    stub(judge, monkeypatch, lambda t: ["<answer>1</answer>" if "good" in first_answer(t) else "<answer>2</answer>"], seen)
    ab = judge.compare("what color ?", "a good answer", "bad", [im])
    ba = judge.compare("what color ?", "bad", "a good answer", [im])
    assert ab.votes == [2, 0] and ab.winner == 0 and ab.calls == 2 and ab.unparsed == 0
    assert ba.votes == ab.votes[::-1] and ba.winner == 1  # order-swap invariance
    assert [first_answer(t) for t, _ in seen[:2]] == ["a good answer", "bad"]  # both orders were asked
    assert all(n == 1 for _, n in seen)  # the image reached every prompt
    # a position-biased judge (always "answer 1") is cancelled to a tie by the two orders
    stub(judge, monkeypatch, lambda t: ["<answer>1</answer>"])
    biased = judge.compare("q", "a good answer", "bad", [im])
    assert biased.votes == [1, 1] and biased.winner is None and biased.credit(0) == 0.5
    # one order only: the bias shows
    one = GenerativeJudge(model, proc, pairwise(both_orders=False))
    stub(one, monkeypatch, lambda t: ["<answer>1</answer>"])
    assert one.compare("q", "bad", "a good answer").winner == 0


def test_unparsed_votes_and_ties_are_counted_never_a_preference(lvlm, monkeypatch):
    trio, model, proc, im = lvlm
    judge = GenerativeJudge(model, proc, pairwise(votes=3, ties=("0",)))
    stub(judge, monkeypatch, lambda t: ["<answer>1</answer>", "the first one, clearly", "<answer>0</answer>"])
    v = judge.compare("q", "x", "y", [im])
    assert v.votes == [1, 1] and v.ties == 2 and v.unparsed == 2 and len(v.outputs) == 6
    assert judge.stats == {"calls": 2, "outputs": 6, "unparsed": 2}
    stub(judge, monkeypatch, lambda t: ["no idea"] * 3)
    dead = judge.compare("q", "x", "y")
    assert dead.votes == [0, 0] and dead.unparsed == 6 and dead.winner is None and dead.credit(0) is None
    # evaluation: a pair without any verdict is a tie (0.5), reported, never a pick
    recs = [PrefRecord("r0", "q", ("a good one", "bad"), 0, "general"), PrefRecord("r1", "q", ("bad", "good too"), 1,
                                                                                   "general")]
    stub(judge, monkeypatch, lambda t: ["<answer>1</answer>" if "good" in first_answer(t) else "<answer>2</answer>"] * 3)
    ok = evaluate_judge(judge, recs, progress=False).metrics
    assert ok["overall"] == 1.0 and ok["unparsed"] == 0 and ok["judge_calls"] == 4
    stub(judge, monkeypatch, lambda t: ["?"] * 3)
    res = evaluate_judge(judge, recs, progress=False)
    assert res.metrics["overall"] == 0.5 and res.metrics["tie_rate"] == 1.0
    assert res.metrics["unparsed"] == 12 and res.metrics["unparsed_records"] == 2
    assert res.rows[0]["picked"] is None and res.rows[0]["unparsed"] == 6


def test_real_generation_counts_every_output(lvlm):
    """The tiny random judge really generates; whatever it writes is either a vote, a tie or unparsed."""
    trio, model, proc, im = lvlm
    judge = GenerativeJudge(model, proc, pairwise(votes=2, generation={"max_new_tokens": 3, "do_sample": True}))
    torch.manual_seed(0)
    v = judge.compare("what color is the car ?", "red .", "blue .", [im])
    assert len(v.outputs) == 4 and sum(v.votes) + v.ties + v.unparsed == 4
    assert v.unparsed == 4  # a word-level vocabulary cannot write "<answer>1</answer>"


# --------------------------------------------------------------------------------------------- pointwise
def test_pointwise_parsed_and_expected_scores(lvlm, monkeypatch):
    trio, model, proc, im = lvlm
    parsed = GenerativeJudge(model, proc, JudgeConfig(mode="pointwise", template=POINT, parser=r"score: (\d+)", votes=2))
    stub(parsed, monkeypatch, lambda t: ["score: 7", "score: 9"] if "a good answer" in t else ["score: 2", "hmm"])
    s = [make_sample("q ?", "a good answer", [im]), make_sample("q ?", "meh", [im])]
    assert parsed.score_samples(s) == [8.0, 2.0] and parsed.stats["unparsed"] == 1
    stub(parsed, monkeypatch, lambda t: ["nothing"] * 2)
    assert math.isnan(parsed.score_samples(s[:1])[0])

    cfg = JudgeConfig(mode="pointwise", template=POINT, score_tokens={"one": 1, "two": 2, "three": 3},
                      answer_prefix=" answer")
    exp = GenerativeJudge(model, proc, cfg)
    got = exp.score_candidates("what color is the car ?", ["red .", "blue ."], [im])
    text = POINT.format(question="what color is the car ?", response="red .")
    rendered = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                                        tokenize=False, add_generation_prompt=True) + " answer"
    with torch.no_grad():
        logits = model(**proc(text=[rendered], images=[[im]], return_tensors="pt", add_special_tokens=False)).logits[0, -1]
    ids = proc.tokenizer.convert_tokens_to_ids(["one", "two", "three"])
    p = logits[ids].softmax(-1)
    assert got[0] == pytest.approx(float(p @ torch.tensor([1.0, 2.0, 3.0])), abs=1e-5)
    assert 1 <= got[1] <= 3 and got[0] != got[1]
    with pytest.raises(JudgeConfigError, match=r"'seven' is not one known token"):
        GenerativeJudge(model, proc, JudgeConfig(mode="pointwise", template=POINT, score_tokens={"seven": 7}))


# ------------------------------------------------------------------------------------------- best-of-n
def test_select_knockout_and_round_robin_report_calls(lvlm, monkeypatch):
    trio, model, proc, im = lvlm
    judge = GenerativeJudge(model, proc, pairwise())
    stub(judge, monkeypatch, longer_wins)
    cands = ["aa", "aaaa", "a", "aaa", "aaaaa"]
    ko = judge.select("q", cands, [im], strategy="knockout")
    assert ko.best_index == 4 and ko.calls == 2 * (len(cands) - 1)  # n - 1 matches, two orders each
    rr = judge.select("q", cands, [im], strategy="round_robin")
    assert rr.best_index == 4 and rr.calls == 2 * 10 and rr.points == [1.0, 3.0, 0.0, 2.0, 4.0]


def test_best_of_n_with_a_pairwise_judge(lvlm, monkeypatch):
    from vlrm_rlhf.bon import best_of_n

    trio, model, proc, im = lvlm
    judge = GenerativeJudge(model, proc, pairwise())
    stub(judge, monkeypatch, longer_wins)
    res = best_of_n(model, proc, judge, ["what color is the car ?"], images=[[im]], n=4, seed=0, max_new_tokens=5,
                    pairwise="round_robin")
    r = res[0]
    assert r.judge_calls == 2 * 6 and len(r.scores) == 4 and r.best == r.candidates[r.best_index]
    assert r.scores[r.best_index] == max(r.scores)


# ------------------------------------------------------------------------------------------- TRL reward
def test_judge_reward_pointwise_and_against_a_reference(lvlm, monkeypatch):
    trio, model, proc, im = lvlm
    point = GenerativeJudge(model, proc, JudgeConfig(mode="pointwise", template=POINT, parser=r"score: (\d+)"))
    stub(point, monkeypatch, lambda t: ["score: 5"] if "red" in t else ["?"])
    f = JudgeReward(point, name="critic")
    prompts = [[{"role": "user", "content": [{"type": "image", "image": im, "text": None},
                                             {"type": "text", "text": "what color ?"}]}]] * 2
    logged = {}
    out = f(prompts=prompts, completions=[[{"role": "assistant", "content": "red"}], [{"role": "assistant",
                                                                                      "content": "blue"}]],
            log_metric=lambda k, v: logged.__setitem__(k, v))
    assert out == [5.0, None] and f.unparsed == 1 and logged == {"critic/unparsed": 1.0}

    pair = GenerativeJudge(model, proc, pairwise())
    stub(pair, monkeypatch, lambda t: ["<answer>1</answer>" if "red" in first_answer(t) else "<answer>2</answer>"])
    g = JudgeReward(pair, reference_column="reference")
    got = g(prompts=["what color ?"] * 2, completions=["red", "blue"], reference=["the car is red", "red"],
            image=[im, im])
    assert got == [0.5, 0.0]  # red vs "the car is red": both contain red -> one vote each; blue loses both
    with pytest.raises(JudgeConfigError, match="reference_column"):
        JudgeReward(pair)


def test_grpo_steps_with_a_pointwise_judge_reward(lvlm, tmp_path, monkeypatch):
    import trl
    from datasets import Dataset

    trio, model, proc, im = lvlm
    cfg = JudgeConfig(mode="pointwise", template=POINT, score_tokens={"one": 1, "two": 2, "three": 3})
    judge = GenerativeJudge(model, proc, cfg)
    reward = JudgeReward(judge, name="judge")
    seen: list[int] = []
    real = judge._encode
    monkeypatch.setattr(judge, "_encode", lambda text, images: seen.append(len(images)) or real(text, images))
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
             "image": demo_image(trio["lvlm"], i)} for i, t in enumerate(["what color is the cat ?", "is there a dog ?"])]
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_completion_length=4,
                          num_generations=2, per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                          save_strategy="no", beta=0.0, bf16=False, seed=0)
    trainer = trl.GRPOTrainer(model=str(trio["lvlm"]), reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list(rows))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/judge/mean" in h]
    assert trainer.state.global_step == 2 and len(logs) == 2
    assert all(1 <= h["rewards/judge/mean"] <= 3 for h in logs) and reward.calls == 4
    assert seen == [1] * 4  # every completion was judged with its prompt's image


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_eval_prefs_genjudge_reports_unparsed(lvlm, tmp_path):
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    trio, model, proc, im = lvlm
    (tmp_path / "j.yaml").write_text(f"mode: pairwise\ntemplate: '{PAIR}'\nparser: '<answer>(\\d)</answer>'\n"
                                     "generation: {max_new_tokens: 2, do_sample: false}\n")
    rows = [{"image": None, "question": "what color is the car ?", "chosen": "red .", "rejected": "blue ."}]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = CliRunner().invoke(app, ["eval", "prefs", str(data), "--mode", "genjudge", "--model", str(trio["lvlm"]),
                                 "--judge-config", str(tmp_path / "j.yaml"), "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o.json").read_text())["metrics"]
    assert m["unparsed"] == 2 and m["unparsed_records"] == 1 and m["judge_calls"] == 2 and m["overall"] == 0.5
    assert "2 unparsed outputs" in r.output and "| n | unparsed |" in r.output
    bad = CliRunner().invoke(app, ["eval", "prefs", str(data), "--mode", "genjudge", "--model", str(trio["lvlm"])])
    assert bad.exit_code != 0 and "--judge-config" in bad.output
    assert Path(tmp_path / "o.md").is_file()


def test_ppo_updates_with_a_pointwise_judge_reward(lvlm, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText

    from vlrm_rlhf.merge import build
    from vlrm_rlhf.testing.zoo import write_quick_recipe
    from vlrm_rlhf.trainers import VLPPOConfig, VLPPOTrainer

    trio, model, proc, im = lvlm
    value = build(write_quick_recipe(trio, tmp_path / "recipe.yaml"), tmp_path / "vlrm", progress=False)
    cfg = JudgeConfig(mode="pointwise", template=POINT, score_tokens={"one": 1, "two": 2, "three": 3})
    reward = JudgeReward(GenerativeJudge(model, proc, cfg), name="judge")
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
             "image": demo_image(trio["lvlm"], i)} for i, t in enumerate(["what color is the cat ?", "is the dog big ?",
                                                                         "which car is red ?", "what is this ?"])]
    args = VLPPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                       num_mini_batches=2, num_ppo_epochs=1, total_episodes=4, response_length=4, stop_token="eos",
                       learning_rate=1e-3, local_rollout_forward_batch_size=2, use_cpu=True, logging_steps=1,
                       report_to="none", save_strategy="no", seed=1, disable_tqdm=True,
                       value_model_path=str(value))
    trainer = VLPPOTrainer(model=AutoModelForImageTextToText.from_pretrained(trio["lvlm"]), reward_funcs=reward,
                           args=args, train_dataset=Dataset.from_list(rows), processing_class=proc)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    assert len(logs) == 1 and 1 <= logs[0]["objective/scores"] <= 3 and reward.calls == 4
