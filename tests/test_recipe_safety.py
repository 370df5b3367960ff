"""Training recipes under kills, re-runs and bad inputs: resume picks the newest *complete* checkpoint,
``--resume_from_checkpoint true`` works from the command line, an output folder holding an earlier run is refused
(or resumed / overwritten when asked), NaN from a user's reward follows the VLRM reward's non-finite policy,
the pre-flight check decodes every image, and bad input ends in one ``error:`` line with exit status 2.
"""

from __future__ import annotations

import json
import math
import runpy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_recipes
from test_recipes import recipe_cmd, run, write_jsonl

from vlrm_rlhf import checkpoints, prompt_data, scripts
from vlrm_rlhf.reward.trl import NonFiniteRewardError, NonFiniteRewardWarning, RewardValueError

setup = test_recipes.setup  # the policy, VLRM and JSONL dataset fixture


def fake_checkpoint(folder: Path, *, state: bool = True, weights: bool = True, optimizer: bool = True) -> Path:
    """A checkpoint folder with (some of) the files the Trainer writes; ``config.json`` always."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if weights:
        (folder / "model.safetensors").write_bytes(b"x")
    if optimizer:
        (folder / "optimizer.pt").write_bytes(b"x")
        (folder / "scheduler.pt").write_bytes(b"x")
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))
    return folder


# ---- which checkpoint to resume from --------------------------------------------------------------------------
def test_newest_complete_checkpoint_is_chosen(tmp_path):
    one = fake_checkpoint(tmp_path / "checkpoint-1")
    fake_checkpoint(tmp_path / "checkpoint-2", state=False, weights=False, optimizer=False)  # killed mid-save
    fake_checkpoint(tmp_path / "checkpoint-10", state=False)  # weights and optimizer, no trainer_state.json
    for flag in (True, "true", "True", "1", "yes"):
        with pytest.warns(UserWarning, match=r"skipping incomplete checkpoint .*checkpoint-10: no trainer_state\.json"):
            assert checkpoints.resolve_resume(flag, tmp_path) == str(one)
    for flag in (None, False, "false", "0", ""):
        assert checkpoints.resolve_resume(flag, tmp_path) is None
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint-2: not a complete checkpoint: no trainer_state"
                                                          r".*the newest complete one there is .*checkpoint-1"), \
            pytest.warns(UserWarning):
        checkpoints.resolve_resume(str(tmp_path / "checkpoint-2"), tmp_path)


def test_incomplete_checkpoint_reasons(tmp_path):
    ok = fake_checkpoint(tmp_path / "checkpoint-1", optimizer=False)
    assert checkpoints.checkpoint_problem(ok, optimizer=False) is None
    assert checkpoints.checkpoint_problem(ok) == "no optimizer.pt or scheduler.pt"  # the run saves them
    sharded = fake_checkpoint(tmp_path / "checkpoint-2", weights=False)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors",
                                                                                     "b": "model-00002.safetensors"}}))
    (sharded / "model-00001.safetensors").write_bytes(b"x")
    assert checkpoints.checkpoint_problem(sharded) == "missing weight shard(s) model-00002.safetensors"
    torn = fake_checkpoint(tmp_path / "checkpoint-3")
    (torn / "trainer_state.json").write_text('{"global_st')
    assert "unreadable trainer_state.json" in checkpoints.checkpoint_problem(torn)
    ds = fake_checkpoint(tmp_path / "checkpoint-4", weights=False, optimizer=False)
    (ds / "global_step4").mkdir()
    (ds / "latest").write_text("global_step4")
    assert checkpoints.checkpoint_problem(ds) is None  # DeepSpeed: weights and optimizer under global_step4/
    with pytest.raises(checkpoints.CheckpointError, match=r"no complete checkpoint in .*empty"):
        checkpoints.resolve_resume("true", tmp_path / "empty")


def targs(out: Path, resume: str | bool | None = None) -> SimpleNamespace:
    return SimpleNamespace(output_dir=str(out), resume_from_checkpoint=resume, save_only_model=False)


def test_output_dir_in_use_is_refused_overwritten_or_resumed(tmp_path):
    """One place for all recipes (scripts.prepare_output): refuse, or resume / start over when asked."""
    out = tmp_path / "out"
    fake_checkpoint(out / "checkpoint-1")
    fake_checkpoint(out / "checkpoint-2", state=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(checkpoints.OutputInUseError, match=r"out holds an earlier run \(checkpoint-2, checkpoint-1\): "
                                                           r"pass --resume_from_checkpoint true .* --overwrite_output_dir"):
        scripts.prepare_output(SimpleNamespace(overwrite_output_dir=False), targs(out))
    args = targs(out, "True")
    with pytest.warns(UserWarning, match="checkpoint-2"):
        scripts.prepare_output(SimpleNamespace(overwrite_output_dir=False), args)
    assert args.resume_from_checkpoint == str(out / "checkpoint-1")
    lazy = targs(out, "1")
    scripts.prepare_output(SimpleNamespace(), lazy, resolve=False)  # bon_sft resolves by round itself
    assert lazy.resume_from_checkpoint is True
    scripts.prepare_output(SimpleNamespace(overwrite_output_dir=True), targs(out))
    assert checkpoints.previous_run(out) == [] and (out / "notes.txt").read_text() == "mine"
    round_ckpt = fake_checkpoint(out / "round-1" / "checkpoint-3")  # bon_sft's per-round checkpoints count too
    with pytest.raises(checkpoints.OutputInUseError, match=r"round-1/checkpoint-3"):
        scripts.prepare_output(SimpleNamespace(), targs(out))
    assert round_ckpt.is_dir()
    scripts.prepare_output(SimpleNamespace(), targs(tmp_path / "new"))  # a new folder is fine


# ---- non-finite rewards from user functions ---------------------------------------------------------------------
def nan_second(prompts, completions, **kw):
    return [math.nan if i == 1 else 0.5 for i in range(len(completions))]


def test_user_reward_non_finite_policy():
    prompts, completions = ["p0", "where is the cat ?"], ["a", "on the mat"]
    with pytest.raises(NonFiniteRewardError, match=r"nan_second: non-finite reward nan for sample 1 \(of 2; 1 "
                                                   r"non-finite\); prompt: 'where is the cat \?'; completion: 'on the mat'"):
        scripts.checked_reward(nan_second)(prompts=prompts, completions=completions)
    with pytest.warns(NonFiniteRewardWarning, match=r"nan_second: non-finite reward nan for sample 1 .*skipped"):
        assert scripts.checked_reward(nan_second, "none")(prompts=prompts, completions=completions) == [0.5, None]
    assert scripts.checked_reward(lambda **kw: [None, 1])(prompts=prompts, completions=completions) == [None, 1.0]
    with pytest.raises(RewardValueError, match=r"returned 'good' \(a str\) for sample 0"):
        scripts.checked_reward(lambda **kw: ["good", 1.0])(prompts=prompts, completions=completions)
    with pytest.raises(prompt_data.DataError, match="--reward_non_finite 'skip': use 'raise' or 'none'"):
        scripts.load_reward_funcs(None, extra=["math.sqrt"], non_finite="skip")


# ---- images are decoded before training -------------------------------------------------------------------------
def test_preflight_decodes_every_image(setup, tmp_path):
    good = setup["data"].parent / "img" / "0.png"
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "notes.png").write_text("not an image at all\n")
    rows = [{"prompt": "hi", "image": str(good)}, {"prompt": "hi", "image": "truncated.png"}]
    with pytest.raises(prompt_data.DataError, match=r"trunc\.jsonl row 1: image file .*truncated\.png is not a readable "
                                                    r"image \(OSError: .*truncated"):
        prompt_data.load_prompt_dataset(write_jsonl(tmp_path / "trunc.jsonl", rows))
    rows[1] = {"prompt": "hi", "images": ["notes.png"]}
    rows[0] = {"prompt": "hi", "images": [str(good)]}
    with pytest.raises(prompt_data.DataError, match=r"text\.jsonl row 1: image file .*notes\.png is not a readable "
                                                    r"image \(UnidentifiedImageError"):
        prompt_data.load_prompt_dataset(write_jsonl(tmp_path / "text.jsonl", rows))


def test_preflight_refuses_decompression_bombs(setup, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # the tiny demo images count as bombs now
    with pytest.raises(prompt_data.DataError, match=r"train\.jsonl row 0: image file .*0\.png is too large to decode"):
        prompt_data.load_prompt_dataset(setup["data"])


# ---- the launch scripts, as users run them ------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["grpo", "rloo", "ppo", "bon_sft"])
def test_every_recipe_refuses_an_output_dir_in_use(algo, setup, tmp_path, monkeypatch, capsys):
    """Each script's ``__main__`` (run in this process: cheap): an earlier run's checkpoints -> one error line,
    exit 2, nothing touched, before any model is loaded."""
    out = tmp_path / algo
    fake_checkpoint(out / "checkpoint-3")
    cmd = recipe_cmd(algo, setup, out)
    monkeypatch.setattr(sys, "argv", cmd[1:])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(cmd[1], run_name="__main__")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: OutputInUseError: --output_dir {out} holds an earlier run (checkpoint-3): pass " \
           "--resume_from_checkpoint true to continue it, or --overwrite_output_dir to start over" in err
    assert sorted(p.name for p in (out / "checkpoint-3").iterdir()) == \
        ["config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"]


@pytest.mark.slow
def test_grpo_resumes_from_the_newest_complete_checkpoint(setup, tmp_path):
    """A run killed while saving checkpoint-2 (only config.json written): ``--resume_from_checkpoint true`` on
    the command line resumes from checkpoint-1 and finishes."""
    out = tmp_path / "out"
    res = run(recipe_cmd("grpo", setup, out, "--save_strategy", "steps", "--save_steps", "1"), tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    for f in (out / "checkpoint-2").iterdir():
        if f.name != "config.json":
            (f.unlink() if f.is_file() else shutil.rmtree(f))
    res = run(recipe_cmd("grpo", setup, out, "--save_strategy", "steps", "--save_steps", "1", "--max_steps", "3",
                         "--resume_from_checkpoint", "true"), tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"resuming from {out / 'checkpoint-1'}" in res.stdout
    assert "skipping incomplete checkpoint" in res.stderr and "checkpoint-2: no trainer_state.json" in res.stderr
    steps = [h["step"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert steps == [1, 2, 3]  # step 1 from checkpoint-1's history, steps 2 and 3 trained now
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # re-saved complete


@pytest.mark.slow
def test_bon_sft_resumes_the_round_in_progress(setup, tmp_path):
    """Round 1 killed while saving its checkpoint-2: the resumed run skips round 0, continues round 1 from
    round-1/checkpoint-1 with round 1's saved selection, and saves the final policy."""
    out = tmp_path / "out"
    res = run(recipe_cmd("bon_sft", setup, out, "--save_strategy", "steps", "--save_steps", "1"), tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (out / "round-0" / "model.safetensors").is_file() and (out / "round-1" / "bon_data" / "stats.json").is_file()
    rounds = (out / "bon_rounds.jsonl").read_text().splitlines()
    (out / "bon_rounds.jsonl").write_text(rounds[0] + "\n")  # round 1 never finished
    (out / "model.safetensors").unlink()
    for f in (out / "round-1" / "checkpoint-2").iterdir():
        if f.name != "config.json":
            (f.unlink() if f.is_file() else shutil.rmtree(f))
    res = run(recipe_cmd("bon_sft", setup, out, "--save_strategy", "steps", "--save_steps", "1",
                         "--resume_from_checkpoint", "true"), tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "round 0:" not in res.stdout and "round 1: mean best reward" in res.stdout
    assert json.loads(rounds[1])["bon/mean_best_reward"] == json.loads(
        (out / "bon_rounds.jsonl").read_text().splitlines()[1])["bon/mean_best_reward"]  # the saved selection
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_nan_from_a_user_reward_is_one_error_line(setup, tmp_path):
    """GRPO used to drop NaN rewards silently: now one error line naming the function and sample, exit 2."""
    (tmp_path / "nan_rewards.py").write_text("def nan_reward(completions, **kw):\n"
                                             "    return [float('nan')] * len(completions)\n")
    res = run(recipe_cmd("grpo", setup, tmp_path / "out", "--reward_funcs", "nan_rewards.nan_reward"), tmp_path)
    assert res.returncode == 2, res.stderr[-4000:]
    assert "error: NonFiniteRewardError: nan_reward: non-finite reward nan for sample 0 (of 2; 2 non-finite); " \
           "prompt: " in res.stderr
    assert "Traceback" not in res.stderr
