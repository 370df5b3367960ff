"""Served rewards on a real Ray Serve deployment (CPU, loopback): 2 replicas of a tiny VLRM.

Served rewards equal in-process rewards bit for bit (single samples, concurrent callers), GRPO trains with the
served reward while a replica is killed, concurrent callers survive a replica killed mid-batch, bad input is
refused with its reason, the OpenRLHF endpoint, and a server shut down mid-run ends in a clear error. The module
starts its own Ray and leaves nothing running.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from pathlib import Path

import pytest
from _helpers import recipe

pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from vlrm_rlhf.reward.remote import RemoteReward, RemoteRewardError  # noqa: E402
from vlrm_rlhf.reward.scorer import VLRewardScorer  # noqa: E402
from vlrm_rlhf.reward.trl import VLRMReward  # noqa: E402
from vlrm_rlhf.testing.zoo import demo_image  # noqa: E402

pytestmark = pytest.mark.slow
QUESTIONS = ["what color is the cat ?", "describe the picture .", "is there a dog ?", "what is in the sky ?"]
ANSWERS = ["red .", "a blue square on the left", "no", "the sun and a cloud"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dirs(zoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from vlrm_rlhf.merge import build

    trio = zoo("llava")
    base = tmp_path_factory.mktemp("served")
    build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), base / "tiny-vlrm",
          progress=False)
    (base / "images").mkdir()
    demo_image(trio["lvlm"], 0).save(base / "images" / "ok.png")
    demo_image(trio["lvlm"], 1).save(base / "outside.png")
    return {**trio, "vlrm": base / "tiny-vlrm", "images": base / "images", "outside": base / "outside.png"}


@pytest.fixture(scope="module")
def server(dirs):
    """Ray (4 logical CPUs) + 2 replicas of the tiny VLRM; everything shut down at the end."""
    import ray

    from vlrm_rlhf.serve.app import ServeConfig
    from vlrm_rlhf.serve.run import start_server, stop_server

    cfg = ServeConfig(model=str(dirs["vlrm"]), max_batch_size=8, batch_wait_s=0.005,
                      limits={"allowed_root": str(dirs["images"]), "max_image_pixels": 256 * 256})
    try:
        url = start_server(cfg, replicas=2, cpus_per_replica=0.5, port=_free_port(),
                           ray_init={"num_cpus": 4, "object_store_memory": 80 << 20,
                                     "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1",
                                                                  "TOKENIZERS_PARALLELISM": "false"}}})
        yield url
    finally:
        stop_server()
    assert not ray.is_initialized()
    import psutil

    def alive() -> list[str]:
        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.name())
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.time() + 30
    while (left := alive()) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left running after the Ray shutdown: {left}"


@pytest.fixture(scope="module")
def scorer(dirs) -> VLRewardScorer:
    return VLRewardScorer.from_pretrained(dirs["vlrm"])


def batch(lvlm: Path, n: int, offset: int = 0):
    prompts = [[{"role": "user", "content": [{"type": "image", "image": demo_image(lvlm, (i + offset) % 6)},
                                             {"type": "text", "text": QUESTIONS[(i + offset) % 4]}]}] for i in range(n)]
    completions = [[{"role": "assistant", "content": ANSWERS[(i * 3 + offset) % 4] + " ." * (i % 3)}] for i in range(n)]
    return prompts, completions


def replica_actors():
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]


def kill_one_replica() -> str:
    import ray

    a = replica_actors()[0]
    ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    return a["name"]


def test_served_equals_in_process_exactly(server, dirs, scorer):
    r = RemoteReward(server)
    local = VLRMReward(scorer)
    assert r.__name__ == "remote_tiny_vlrm" and r.model == "tiny-vlrm" and r.mode == "vlrm"
    for i in range(3):  # single samples
        p, c = batch(dirs["lvlm"], 1, offset=i)
        assert asyncio.run(r(prompts=p, completions=c)) == local(prompts=p, completions=c)

    async def callers():  # 8 concurrent callers of different sizes, batched together by the replicas
        jobs = [batch(dirs["lvlm"], 1 + k % 4, offset=k) for k in range(8)]
        got = await asyncio.gather(*(r(prompts=p, completions=c) for p, c in jobs))
        return jobs, got

    jobs, got = asyncio.run(callers())
    assert got == [local(prompts=p, completions=c) for p, c in jobs]
    text = r.score(prompts=QUESTIONS, responses=ANSWERS)
    assert text == scorer.score(prompts=QUESTIONS, responses=ANSWERS)


def test_endpoints_and_openrlhf(server, scorer):
    import json
    import urllib.request

    for path in ("/health", "/ready"):
        with urllib.request.urlopen(server + path, timeout=30) as f:
            d = json.loads(f.read())
        assert d["model"] == "tiny-vlrm" and d["mode"] == "vlrm"
    from vlrm_rlhf.reward.scorer import render

    queries = [render(scorer.processor, [{"role": "user", "content": [{"type": "text", "text": q}]},
                                         {"role": "assistant", "content": [{"type": "text", "text": a}]}])
               for q, a in zip(QUESTIONS, ANSWERS)]
    req = urllib.request.Request(server + "/openrlhf", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"query": queries, "prompts": QUESTIONS, "labels": [""] * 4}).encode())
    with urllib.request.urlopen(req, timeout=30) as f:
        d = json.loads(f.read())
    assert d["rewards"] == d["scores"] == scorer.score(prompts=QUESTIONS, responses=ANSWERS)
    assert d["model"] == "tiny-vlrm"


def test_bad_input_is_refused_with_its_reason(server, dirs):
    from PIL import Image

    r = RemoteReward(server, send_paths=True)
    ok = r.score(prompts=[QUESTIONS[0]], responses=[ANSWERS[0]], images=[[str(dirs["images"] / "ok.png")]])
    assert len(ok) == 1 and math.isfinite(ok[0])
    with pytest.raises(RemoteRewardError, match=r"HTTP 400\): sample 0: image 0: image path .*outside\.png.* outside "
                                                r"the allowed image folders"):
        r.score(prompts=[QUESTIONS[0]], responses=[ANSWERS[0]], images=[[str(dirs["outside"])]])
    big = Image.new("RGB", (300, 300))
    with pytest.raises(RemoteRewardError, match=r"sample 1: image 0: image of 300x300 = 90000 pixels is over the "
                                                r"limit of 65536 \(--max-image-pixels\)"):
        r.score(prompts=QUESTIONS[:2], responses=ANSWERS[:2], images=[[], [big]])
    with pytest.raises(RemoteRewardError, match="longer than the context"):
        r.score(prompts=[QUESTIONS[0]], responses=["red " * 5000])


def test_grpo_trains_while_a_replica_is_killed(server, dirs, tmp_path):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import vlrm_rlhf

    [reward] = vlrm_rlhf.reward_funcs(server, retries=6, backoff=0.2)
    killed: list[str] = []

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                killed.append(kill_one_replica())

    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
             "image": demo_image(dirs["lvlm"], i)} for i, q in enumerate(QUESTIONS)]
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_completion_length=4,
                      num_generations=2, per_device_train_batch_size=2, max_steps=3, logging_steps=1,
                      save_strategy="no", beta=0.0, bf16=False, seed=0)
    trainer = GRPOTrainer(model=str(dirs["lvlm"]), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list(rows), callbacks=[Kill()])
    trainer.train()
    assert killed and trainer.state.global_step == 3
    logs = [h["rewards/remote_tiny_vlrm/mean"] for h in trainer.state.log_history if "rewards/remote_tiny_vlrm/mean" in h]
    assert len(logs) == 3 and all(math.isfinite(v) for v in logs)


def test_concurrent_callers_survive_a_replica_killed_mid_batch(server, dirs, scorer):
    r = RemoteReward(server, retries=8, backoff=0.2)
    local = VLRMReward(scorer)
    deadline = time.time() + 120
    while len(replica_actors()) < 2 and time.time() < deadline:  # the previous test's kill is being replaced
        time.sleep(1)
    jobs = [batch(dirs["lvlm"], 4, offset=k) for k in range(16)]

    async def callers():
        return await asyncio.gather(*(r(prompts=p, completions=c) for p, c in jobs))

    threading.Timer(0.05, kill_one_replica).start()
    got = asyncio.run(callers())
    assert got == [local(prompts=p, completions=c) for p, c in jobs]  # every reward, none replaced


def test_server_shut_down_mid_run_is_a_clear_error(server, dirs):
    """Last in the module: it stops Serve. No reward is made up: the call raises, naming the URL."""
    from ray import serve

    r = RemoteReward(server, retries=2, backoff=0.1, timeout=10)
    p, c = batch(dirs["lvlm"], 2)
    assert len(asyncio.run(r(prompts=p, completions=c))) == 2
    serve.shutdown()
    with pytest.raises(RemoteRewardError, match=rf"reward server {server} failed scoring 2 sample\(s\) after 3 "
                                                r"attempt\(s\)"):
        asyncio.run(r(prompts=p, completions=c))
