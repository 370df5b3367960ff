"""``VLRMReward``: a VLRM as a TRL 1.16 GRPO/RLOO reward function.

Protocol (prompt/completion forms, where images come from, naming, normalisation, clipping, non-finite
policy, input errors), the lockstep padding that keeps multi-process reward forwards aligned (with a fake
2-rank accelerator), short GRPO and RLOO runs on a tiny LLaVA policy, and (slow) a real 2-process
``accelerate launch`` whose ranks must run equal numbers of reward forwards.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import recipe
from PIL import Image

import vlrm_rlhf
from vlrm_rlhf.reward.factory import reward_funcs
from vlrm_rlhf.reward.inputs import InputError
from vlrm_rlhf.reward.scorer import VLRewardScorer
from vlrm_rlhf.reward.trl import NonFiniteRewardError, VLRMReward
from vlrm_rlhf.testing.zoo import demo_image

QUESTION = "what color is the cat ?"


# ---- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(zoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The LLaVA trio and a VLRM merged from it (task arithmetic)."""
    from vlrm_rlhf.merge import build

    trio = zoo("llava")
    out = tmp_path_factory.mktemp("trl") / "tiny-vlrm"
    build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), out, progress=False)
    return {**trio, "vlrm": out}


@pytest.fixture(scope="module")
def scorer(dirs) -> VLRewardScorer:
    """One loaded scorer shared by the protocol tests (each test wraps it in its own VLRMReward)."""
    return VLRewardScorer.from_pretrained(dirs["vlrm"])


@pytest.fixture(scope="module")
def image(dirs) -> Image.Image:
    return demo_image(dirs["lvlm"], 0)


def conv(image: Any = None, text: str = QUESTION, placeholders: int | None = None) -> list[dict]:
    """A conversational prompt: image blocks (with payload, or bare placeholders) then the question."""
    n = placeholders if placeholders is not None else (1 if image is not None else 0)
    blocks = [{"type": "image", **({"image": image} if image is not None else {})} for _ in range(n)]
    return [{"role": "user", "content": [*blocks, {"type": "text", "text": text}]}]


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ---- protocol ------------------------------------------------------------------------------------------
def test_name_and_factory(dirs, scorer):
    from trl.trainer.utils import get_callable_name

    r = VLRMReward(scorer)
    assert r.__name__ == "vlrm_tiny_vlrm" == get_callable_name(r)
    assert VLRMReward(scorer, name="rm").__name__ == "rm"
    assert vlrm_rlhf.reward_funcs is reward_funcs
    fs = vlrm_rlhf.reward_funcs(dirs["vlrm"], modes=("vlrm", "no_image"))
    assert [f.__name__ for f in fs] == ["vlrm_tiny_vlrm", "vlrm_tiny_vlrm_no_image"]
    assert fs[0].scorer.model is fs[1].scorer.model  # one copy of the weights
    assert [f.mode for f in fs] == ["vlrm", "no_image"]
    with pytest.raises(ValueError, match="normalize"):
        VLRMReward(scorer, normalize="group")


def test_image_sources_agree(scorer, image, tmp_path):
    """Inline blocks, the image/images columns (PIL or path) and string prompts give the same rewards."""
    r = VLRMReward(scorer)
    expected = scorer.score(prompts=[conv(image)] * 2, responses=["red", "a blue dog"])
    path = tmp_path / "cat.png"
    image.save(path)
    completions = [answer("red"), answer("a blue dog")]
    variants = {
        "inline": r([conv(image)] * 2, completions),
        # TRL's case: inline payloads AND the same image in the column: used once
        "inline+column": r([conv(image)] * 2, completions, image=[image, image]),
        "image column": r([conv(placeholders=1)] * 2, completions, image=[image, str(path)]),
        "images column": r([conv(placeholders=1)] * 2, completions, images=[[image], [path]]),
        "string prompt": r([QUESTION] * 2, ["red", "a blue dog"], image=[image, image]),
        # Arrow gives every content block every struct field (None where unused)
        "arrow blocks": r([[{"role": "user", "content": [{"type": "image", "image": image, "text": None},
                                                        {"type": "text", "text": QUESTION, "image": None}]}]] * 2,
                          completions),
    }
    for k, v in variants.items():
        assert v == pytest.approx(expected, abs=1e-5), k
    no_image = r([conv()] * 2, completions, image=[None, None])
    assert no_image != pytest.approx(expected, abs=1e-5)  # the image matters to a VLRM
    mixed = r([QUESTION, QUESTION], ["red", "red"], image=[image, None])
    assert mixed == pytest.approx([expected[0], no_image[0]], abs=1e-5)
    assert r.forward_calls >= 7 and r.dummy_calls == 0


def test_input_errors_name_sample_and_file(scorer, image, tmp_path):
    r = VLRMReward(scorer)
    with pytest.raises(InputError, match=r"sample 1: 1 image\(s\) for 2 image placeholder\(s\).*what color"):
        r([conv(placeholders=1), conv(placeholders=2)], [answer("red")] * 2, images=[[image], [image]])
    with pytest.raises(InputError, match="sample 0: the prompt carries 1 inline image"):
        r([conv(image)], [answer("red")], images=[[image, image]])
    missing = tmp_path / "nope" / "missing.png"
    with pytest.raises(InputError, match=r"sample 1: image file not found: .*missing\.png"):
        r([conv(placeholders=1)] * 2, [answer("red")] * 2, image=[image, str(missing)])
    with pytest.raises(InputError, match="2 prompts for 1 completions"):
        r([QUESTION] * 2, ["red"])


def test_normalize_clip_and_raw_metric(scorer, image):
    prompts = [conv(image)] * 4
    completions = [answer(t) for t in ("red", "blue", "a big red dog", "no")]
    raw = VLRMReward(scorer)(prompts, completions)
    logged: dict[str, list[float]] = {}

    def log_metric(name: str, value: float) -> None:
        logged.setdefault(name, []).append(value)

    b = VLRMReward(scorer, normalize="batch", name="b")(prompts, completions, log_metric=log_metric)
    mean = sum(raw) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in raw) / 4)
    assert b == pytest.approx([(v - mean) / std for v in raw], abs=1e-4)
    assert logged == {"b/raw_mean": [pytest.approx(mean)]}

    run = VLRMReward(scorer, normalize="running")
    run(prompts[:2], completions[:2])
    second = run(prompts[2:], completions[2:])
    assert run.running_stats["count"] == 4
    assert run.running_stats["mean"] == pytest.approx(mean, abs=1e-6)
    assert run.running_stats["std"] == pytest.approx(std, abs=1e-6)
    assert second == pytest.approx([(v - mean) / std for v in raw[2:]], abs=1e-4)
    restored = VLRMReward(scorer, normalize="running")
    restored.load_state_dict(run.state_dict())
    assert restored.running_stats == run.running_stats

    clipped = VLRMReward(scorer, normalize="batch", clip=(-0.5, 0.5))(prompts, completions)
    assert clipped == pytest.approx([min(max(v, -0.5), 0.5) for v in b], abs=1e-6)
    assert max(abs(v) for v in b) > 0.5  # the clip did something


def _nan_at(reward: VLRMReward, bad: int, monkeypatch) -> None:
    """Patch the reward model's forward so the sample whose text mentions ``bad`` words gets NaN."""
    real = reward.scorer.model.forward

    def forward(*args: Any, **kw: Any):
        out = real(*args, **kw)
        ids = kw["input_ids"]
        words = reward.scorer.tokenizer.batch_decode(ids)
        for row, text in enumerate(words):
            if "dog" in text:
                out.logits[row] = float("nan")
        return out

    monkeypatch.setattr(reward.scorer.model, "forward", forward)


def test_non_finite_policy(scorer, image, monkeypatch):
    prompts = [conv(image), conv(image, text="what is this ?")]
    completions = [answer("red"), answer("a dog")]
    strict = VLRMReward(scorer)
    _nan_at(strict, 1, monkeypatch)
    with pytest.raises(NonFiniteRewardError, match=r"non-finite reward nan for sample 1 .*prompt: 'user: <image> what is this \?'"):
        strict(prompts, completions)
    logged: dict[str, float] = {}
    lenient = VLRMReward(scorer, non_finite="none", normalize="batch")
    out = lenient(prompts * 2, completions * 2, log_metric=lambda k, v: logged.__setitem__(k, v))
    assert out[1] is None and out[3] is None
    assert out[0] == pytest.approx(0.0, abs=1e-6) and out[2] == pytest.approx(0.0, abs=1e-6)  # finite ones only
    assert logged["vlrm_tiny_vlrm/non_finite"] == 2.0


class FakeAccelerator:
    """Two ranks: this one and a scripted peer whose per-collective values come from ``peer``."""

    num_processes = 2
    device = torch.device("cpu")
    state = types.SimpleNamespace(deepspeed_plugin=None)

    def __init__(self, peer: list[list[float]]):
        self.peer, self.seen = list(peer), []

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.flatten().tolist())
        return torch.cat([t, torch.tensor([self.peer.pop(0)], dtype=t.dtype)])


def test_lockstep_pads_to_peer(scorer, image, monkeypatch):
    """Fewer micro-batches than the other rank: dummy forwards of each kind, text-only ones first."""
    acc = FakeAccelerator(peer=[[3, 2, 0], [0, 0, 0, 0]])  # peer: 3 text + 2 image batches; then no NaN
    r = VLRMReward(scorer, accelerator=acc)
    kinds: list[str] = []
    real = r.scorer.forward
    monkeypatch.setattr(r.scorer, "forward", lambda plan, batch: kinds.append(
        "image" if any(plan.samples[i].images for i in batch) else "text") or real(plan, batch))
    out = r([conv(image)], [answer("red")])
    assert acc.seen[0] == [0, 1, 0]  # this rank: 0 text batches, 1 image batch, no failure
    assert kinds == ["text"] * 3 + ["image"] * 2
    assert (r.forward_calls, r.dummy_calls) == (5, 4)
    assert out == pytest.approx(scorer.score(prompts=[conv(image)], responses=["red"]), abs=1e-5)

    failing = VLRMReward(scorer, accelerator=FakeAccelerator(peer=[[1, 0, 1]]))
    with pytest.raises(RuntimeError, match="another rank failed"):
        failing([conv(image)], [answer("red")])
    assert failing.forward_calls == 0  # nobody runs a forward when one rank cannot

    nan_peer = VLRMReward(scorer, accelerator=FakeAccelerator(peer=[[0, 1, 0], [1, 0.0, 0.0, 1]]))
    with pytest.raises(NonFiniteRewardError, match="another rank"):
        nan_peer([conv(image)], [answer("red")])


# ---- training ------------------------------------------------------------------------------------------
def _dataset(lvlm: Path, n: int = 4):
    from datasets import Dataset

    rows = [{"prompt": conv(placeholders=1, text=t), "image": demo_image(lvlm, i)}
            for i, t in enumerate(["what color is the cat ?", "describe the picture .", "is there a dog ?",
                                   "what is in the sky ?"][:n])]
    return Dataset.from_list(rows)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_trains_with_images(algo, dirs, scorer, tmp_path, monkeypatch):
    """2 steps on a tiny LLaVA policy (a saved path: beta != 0 rebuilds the reference from it)."""
    import trl

    reward = VLRMReward(scorer)
    seen: list[list[list[Image.Image]]] = []
    real = reward.scorer.encode
    monkeypatch.setattr(reward.scorer, "encode", lambda texts, images: seen.append(images) or real(texts, images))
    Config, Trainer = (trl.GRPOConfig, trl.GRPOTrainer) if algo == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)
    args = Config(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_completion_length=4,
                  num_generations=2, per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                  save_strategy="no", beta=0.05, bf16=False, seed=0)
    trainer = Trainer(model=str(dirs["lvlm"]), reward_funcs=reward, args=args, train_dataset=_dataset(dirs["lvlm"]))
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "rewards/vlrm_tiny_vlrm/mean" in h]
    assert len(logs) == 2 and all(math.isfinite(h["rewards/vlrm_tiny_vlrm/mean"]) for h in logs)
    assert all(h["vlrm_tiny_vlrm/raw_mean"] == pytest.approx(h["rewards/vlrm_tiny_vlrm/mean"], abs=1e-5) for h in logs)
    batches = [imgs for imgs in seen if any(imgs)]
    assert batches and all(isinstance(im, Image.Image) for imgs in batches for ims in imgs for im in ims)
    assert reward.forward_calls >= 2 and reward.dummy_calls == 0


# ---- multi-process -------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent('''
    """GRPO with a VLRM reward on 2 CPU processes; each rank writes its reward forward counts."""
    import json, os, sys
    from pathlib import Path

    import torch
    from datasets import Dataset
    from PIL import Image
    from trl import GRPOConfig, GRPOTrainer

    from vlrm_rlhf.reward.trl import VLRMReward

    vlrm, lvlm, out, backend = sys.argv[1:5]
    rank = int(os.environ["RANK"])
    # unequal micro-batch plans: rank 0 scores one sample per forward, rank 1 a whole batch per forward
    reward = VLRMReward(vlrm, max_batch_tokens=1 if rank == 0 else 1 << 20)
    images = [Image.new("RGB", (32, 32), (40 * i, 90, 200 - 40 * i)) for i in range(4)]
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
             "image": im} for t, im in zip(["what color is the cat ?", "is there a dog ?",
                                            "describe the picture .", "what is in the sky ?"], images)]
    # DeepSpeed on CPU: no --cpu / use_cpu, gloo (see PLATFORM.md)
    device = {"use_cpu": True} if backend == "ddp" else {"use_cpu": False, "ddp_backend": "gloo"}
    args = GRPOConfig(output_dir=out, report_to="none", max_completion_length=4, num_generations=2,
                      per_device_train_batch_size=2, max_steps=2, save_strategy="no", bf16=False, seed=0,
                      logging_steps=1, **device)
    trainer = GRPOTrainer(model=lvlm, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": torch.distributed.get_world_size(), "steps": trainer.state.global_step,
        "forward_calls": reward.forward_calls, "dummy_calls": reward.dummy_calls,
        "reward_model": type(reward.scorer.model).__name__,
        "rewards": [h["rewards/vlrm_tiny_vlrm/mean"] for h in trainer.state.log_history
                    if "rewards/vlrm_tiny_vlrm/mean" in h]}))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run ``accelerate launch``; on timeout (a deadlock) kill it and the workers it started, by pid."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        workers = psutil.Process(proc.pid).children(recursive=True)  # torch elastic starts them in own sessions
        for p in [*workers, psutil.Process(proc.pid)]:
            p.kill()
        out, _ = proc.communicate()
        pytest.fail(f"2-process run did not finish in {timeout} s (deadlock?):\n{out[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    "ddp",
    pytest.param("zero3", marks=pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None and not os.environ.get("CI"),
        reason="needs the deepspeed extra (pip install -e '.[deepspeed]'); the first launch JIT-builds its CPU comm op (~65 s)")),
])
def test_accelerate_two_processes_lockstep(backend, dirs, tmp_path):
    """Ranks with unequal micro-batch plans still run equal reward forwards (ZeRO-3 would hang otherwise)."""
    script = tmp_path / "grpo_vlrm.py"
    script.write_text(SCRIPT)
    accelerate = Path(sys.executable).with_name("accelerate")
    mode = ["--multi_gpu"] if backend == "ddp" else ["--use_deepspeed", "--zero_stage", "3"]
    cmd = [str(accelerate), "launch", *mode, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(script), str(dirs["vlrm"]), str(dirs["lvlm"]), str(tmp_path / "out"), backend]
    rc, out = _launch(cmd, timeout=240)
    assert rc == 0, out[-6000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [2, 2]
    assert ranks[0]["forward_calls"] == ranks[1]["forward_calls"] > 0  # lockstep
    # rank 0 ran one forward per completion, rank 1 one per call plus padding: 2 calls x 1 dummy
    assert ranks[0]["dummy_calls"] == 0 and ranks[1]["dummy_calls"] == ranks[0]["forward_calls"] // 2
    assert ranks[0]["rewards"] == ranks[1]["rewards"] and all(math.isfinite(v) for v in ranks[0]["rewards"])
    expected = "DeepSpeedEngine" if backend == "zero3" else "LlavaForSequenceClassification"
    assert [r["reward_model"] for r in ranks] == [expected] * 2
