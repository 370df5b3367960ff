"""Served rewards without Ray: the wire format, request limits, batching across callers, and the HTTP client
against a scripted stdlib server (unreachable, 5xx then success, slow, malformed, wrong length, non-finite)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from _helpers import recipe
from PIL import Image

import vlrm_rlhf
from vlrm_rlhf.errors import VLRMError
from vlrm_rlhf.reward.remote import RemoteReward, RemoteRewardError, call_reward
from vlrm_rlhf.reward.scorer import VLRewardScorer
from vlrm_rlhf.reward.trl import NonFiniteRewardError, NonFiniteRewardWarning, VLRMReward
from vlrm_rlhf.reward.wire import Limits, WireError, decode_request, encode_image, trl_wire_samples
from vlrm_rlhf.serve.batching import score_jobs
from vlrm_rlhf.testing.zoo import demo_image

QUESTIONS = ["what color is the cat ?", "describe the picture .", "is there a dog ?", "what is in the sky ?"]
ANSWERS = ["red .", "a blue square on the left", "no", "the sun and a cloud"]


@pytest.fixture(scope="module")
def dirs(zoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from vlrm_rlhf.merge import build

    trio = zoo("llava")
    out = tmp_path_factory.mktemp("serve") / "tiny-vlrm"
    build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), out, progress=False)
    return {**trio, "vlrm": out}


@pytest.fixture(scope="module")
def scorer(dirs) -> VLRewardScorer:
    return VLRewardScorer.from_pretrained(dirs["vlrm"])


def trl_batch(lvlm: Path, n: int = 4, inline: bool = True) -> tuple[list, list, dict[str, Any]]:
    """TRL-style reward arguments: conversational prompts (inline images or a column), completions."""
    prompts, cols = [], {"image": []}
    for i in range(n):
        im = demo_image(lvlm, i)
        block = {"type": "image", "image": im} if inline else {"type": "image"}
        prompts.append([{"role": "user", "content": [block, {"type": "text", "text": QUESTIONS[i % 4]}]}])
        cols["image"].append(im)
    completions = [[{"role": "assistant", "content": ANSWERS[i % 4]}] for i in range(n)]
    return prompts, completions, cols


# ---- wire ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inline", [True, False])
def test_wire_round_trip_scores_exactly_as_in_process(dirs, scorer, inline):
    prompts, completions, cols = trl_batch(dirs["lvlm"], inline=inline)
    expected = VLRMReward(scorer)(prompts=prompts, completions=completions, **cols)
    wire = json.loads(json.dumps({"samples": trl_wire_samples(prompts, completions, cols)}))
    assert all(len(s["images"]) == 1 and "base64" in s["images"][0] for s in wire["samples"])
    samples = decode_request(wire, Limits())
    assert scorer.score_samples(samples) == expected  # bit for bit


def test_wire_text_only_and_mismatched_images(dirs, scorer):
    got = decode_request({"samples": [{"prompt": QUESTIONS[0], "response": ANSWERS[0]}]}, Limits())
    assert scorer.score_samples(got) == scorer.score(prompts=[QUESTIONS[0]], responses=[ANSWERS[0]])
    prompts, completions, cols = trl_batch(dirs["lvlm"], n=2)
    cols["image"] = [[cols["image"][0], cols["image"][0]], cols["image"][1]]
    with pytest.raises(VLRMError, match="sample 0: the prompt carries 1 inline image"):
        trl_wire_samples(prompts, completions, cols)


def _png(size: tuple[int, int]) -> dict[str, str]:
    return encode_image(Image.new("RGB", size, (200, 10, 10)))


def test_limits_name_the_culprit(tmp_path):
    ok = {"prompt": "q", "response": "a"}
    with pytest.raises(WireError, match=r"sample 1: image 0: image of 64x64 = 4096 pixels is over the limit of 1000"):
        decode_request({"samples": [ok, {**ok, "images": [_png((64, 64))]}]}, Limits(max_image_pixels=1000))
    with pytest.raises(WireError, match=r"sample 0: image 0: image of about \d+ bytes is over the limit of 10 "
                                        r"\(--max-image-bytes\)"):
        decode_request({"samples": [{**ok, "images": [_png((64, 64))]}]}, Limits(max_image_bytes=10))
    with pytest.raises(WireError, match="not valid base64"):
        decode_request({"samples": [{**ok, "images": [{"base64": "%%%"}]}]}, Limits())
    with pytest.raises(WireError, match="over the limit of 2 per sample"):
        decode_request({"samples": [{**ok, "images": [_png((4, 4))] * 3}]}, Limits(max_images=2))
    with pytest.raises(WireError, match="no samples"):
        decode_request({"samples": []}, Limits())
    with pytest.raises(WireError, match=r"unknown field\(s\) \['reward'\]"):
        decode_request({"samples": [{**ok, "reward": 1}]}, Limits())
    with pytest.raises(WireError, match="carry no payload on the wire"):
        decode_request({"samples": [{"prompt": [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}],
                                     "response": "a"}]}, Limits())


def test_image_paths_only_inside_the_allowed_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    Image.new("RGB", (8, 8)).save(outside / "b.png")
    (root / "link.png").symlink_to(outside / "b.png")
    ok = {"prompt": "q", "response": "a"}
    got = decode_request({"samples": [{**ok, "images": [{"path": "a.png"}]}]}, Limits(allowed_root=root))
    assert got[0].images[0].size == (8, 8)
    for p in (str(outside / "b.png"), "../secret/b.png", "link.png"):
        with pytest.raises(VLRMError, match="outside the allowed image folders"):
            decode_request({"samples": [{**ok, "images": [{"path": p}]}]}, Limits(allowed_root=root))
    with pytest.raises(WireError, match="refused: this server reads no image paths"):
        decode_request({"samples": [{**ok, "images": [{"path": str(root / "a.png")}]}]}, Limits())
    with pytest.raises(WireError, match="has .* bytes, over the limit of 5"):
        decode_request({"samples": [{**ok, "images": [{"path": "a.png"}]}]}, Limits(allowed_root=root, max_image_bytes=5))


# ---- batching across callers ------------------------------------------------------------------------------
def test_batching_exact_and_throughput(dirs, scorer):
    jobs = []
    for j in range(5):
        prompts, completions, cols = trl_batch(dirs["lvlm"], n=1 + j % 3, inline=j % 2 == 0)
        if j == 3:  # a text-only caller between image callers
            prompts, cols = [QUESTIONS[k] for k in range(len(prompts))], {}
        jobs.append(decode_request({"samples": trl_wire_samples(prompts, completions, cols)}, Limits()))
    ref = [scorer.score_samples(job) for job in jobs]
    stats: dict[str, int] = {}
    assert score_jobs(scorer, jobs, "exact", stats) == ref
    assert stats["samples"] == sum(map(len, jobs))
    stats = {}
    got = score_jobs(scorer, jobs, "throughput", stats)
    assert stats["forwards"] <= 2  # one plan: image and text micro-batches only
    assert all(g == pytest.approx(r, rel=1e-5, abs=1e-6) for g, r in zip(got, ref))
    # a failing caller fails alone
    bad = decode_request({"samples": [{"prompt": "q", "response": "a " * 5000}]}, Limits())
    out = score_jobs(scorer, [jobs[0], bad, jobs[1]], "throughput")
    assert out[0] == ref[0] and out[2] == ref[1] and isinstance(out[1], VLRMError)


# ---- client against a scripted server ---------------------------------------------------------------------
class Script:
    """What the fake server answers: a list of (status, body or callable(request json), delay_s), last repeats."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, Any, float]] = [(200, {"status": "ready", "model": "m", "mode": "vlrm"}, 0.0)]
        self.calls: list[tuple[str, Any]] = []


@pytest.fixture
def fake():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _answer(self, body: Any) -> None:
            script.calls.append((self.path, body))
            status, out, delay = script.steps.pop(0) if len(script.steps) > 1 else script.steps[0]
            time.sleep(delay)
            out = out(body) if callable(out) else out
            data = out if isinstance(out, bytes) else json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._answer(None)

        def do_POST(self):
            self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/vlrm", script
    srv.shutdown()
    srv.server_close()


def rewards_of(values: list[float | None], bad: list[int] | None = None):
    return lambda body: {"rewards": values, "non_finite": bad or [], "model": "m", "mode": "vlrm"}


def test_unreachable_server_fails_before_training():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    url = f"http://127.0.0.1:{port}/vlrm"
    t0 = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=rf"reward server {url} failed readiness check after 2 attempt\(s\): "
                                                r"unreachable .*Is `vlrm-rlhf serve` running"):
        vlrm_rlhf.reward_funcs(url, retries=1, backoff=0.01)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(RemoteRewardError, match="not an http"):
        RemoteReward("ftp://x")


def test_client_protocol_name_and_retries(fake):
    url, script = fake
    [r] = vlrm_rlhf.reward_funcs(url, backoff=0.01)
    from trl.trainer.utils import get_callable_name, is_async_callable

    assert isinstance(r, RemoteReward) and is_async_callable(r) and get_callable_name(r) == "remote_m"
    script.steps = [(503, {"error": "busy"}, 0.0), (500, b"boom", 0.0), (200, rewards_of([0.5, -1.0]), 0.0)]
    metrics: dict[str, float] = {}
    out = asyncio.run(r(prompts=["a", "b"], completions=["x", "y"], log_metric=metrics.__setitem__))
    assert out == [0.5, -1.0] and metrics["remote_m/raw_mean"] == -0.25
    assert [p for p, _ in script.calls[-3:]] == ["/vlrm/score"] * 3
    assert script.calls[-1][1] == {"samples": [{"prompt": [{"role": "user", "content": "a"}],
                                                "response": [{"role": "assistant", "content": "x"}], "images": []},
                                               {"prompt": [{"role": "user", "content": "b"}],
                                                "response": [{"role": "assistant", "content": "y"}], "images": []}]}
    # sync callers (VLPPOTrainer, best_of_n) get the same
    script.steps = [(200, rewards_of([1.0, 2.0]), 0.0)]
    assert call_reward(r, prompts=["a", "b"], completions=["x", "y"]) == [1.0, 2.0]
    assert r.score_candidates("q", ["x", "y"]) == [1.0, 2.0]


def test_client_gives_up_with_the_url_and_drops_nothing(fake):
    url, script = fake
    r = RemoteReward(url, retries=2, backoff=0.01)
    script.steps = [(503, {"error": "replica died"}, 0.0)]
    n = len(script.calls)
    with pytest.raises(RemoteRewardError, match=rf"reward server {url} failed scoring 1 sample\(s\) after 3 "
                                                r"attempt\(s\): HTTP 503: replica died"):
        asyncio.run(r(prompts=["a"], completions=["x"]))
    assert len(script.calls) - n == 3


def test_client_timeout_is_named(fake):
    url, script = fake
    r = RemoteReward(url, timeout=0.2, retries=1, backoff=0.01)
    script.steps = [(200, rewards_of([1.0]), 1.0)]
    with pytest.raises(RemoteRewardError, match=r"no answer within the timeout of 0.2 s"):
        asyncio.run(r(prompts=["a"], completions=["x"]))


@pytest.mark.parametrize("answer, match", [
    (b"<html>oops", "answered scoring 1 sample\\(s\\) with non-JSON"),
    ({"scores": [1.0]}, "outside the protocol \\(no 'rewards' list\\)"),
    (rewards_of([1.0, 2.0]), "returned 2 rewards for 1 samples"),
    (rewards_of(["1.0"]), "returned '1.0' as the reward of sample 0"),
    (rewards_of([None]), "returned None as the reward of sample 0"),
    (rewards_of([None], [3]), "malformed 'non_finite'"),
])
def test_client_refuses_malformed_answers(fake, answer, match):
    url, script = fake
    r = RemoteReward(url)
    script.steps = [(200, answer, 0.0)]
    with pytest.raises(RemoteRewardError, match=match):
        asyncio.run(r(prompts=["a"], completions=["x"]))


def test_client_bad_input_is_not_retried(fake):
    url, script = fake
    r = RemoteReward(url)
    script.steps = [(400, {"error": "sample 0: image 0: image path '/etc/x.png' refused"}, 0.0)]
    n = len(script.calls)
    with pytest.raises(RemoteRewardError, match=r"refused scoring 1 sample\(s\) \(HTTP 400\): sample 0: image 0"):
        asyncio.run(r(prompts=["a"], completions=["x"]))
    assert len(script.calls) - n == 1


def test_non_finite_policy_as_in_process(fake):
    url, script = fake
    script.steps = [(200, rewards_of([1.0, None], [1]), 0.0)]
    with pytest.raises(NonFiniteRewardError, match="remote_m: non-finite reward nan for sample 1"):
        asyncio.run(RemoteReward(url)(prompts=["a", "b"], completions=["x", "y"]))
    with pytest.warns(NonFiniteRewardWarning, match="sample 1"):
        out = asyncio.run(RemoteReward(url, non_finite="none")(prompts=["a", "b"], completions=["x", "y"]))
    assert out == [1.0, None]
    assert math.isnan(RemoteReward(url).score(prompts=["a", "b"], responses=["x", "y"])[1])


def test_served_reward_in_ppo_and_scripts(fake):
    url, script = fake
    from vlrm_rlhf.scripts import checked_reward, load_reward_funcs
    from vlrm_rlhf.trainers.ppo_models import reward_from_path

    assert isinstance(reward_from_path(url), RemoteReward)
    [f] = load_reward_funcs(url)
    from trl.trainer.utils import is_async_callable

    assert is_async_callable(f) and f.__name__ == "remote_m"
    script.steps = [(200, rewards_of([1.0, 2.0, 3.0]), 0.0)]
    with pytest.raises(Exception, match="returned 3 rewards for 2 samples"):
        call_reward(checked_reward(RemoteReward(url)), prompts=["a", "b"], completions=["x", "y"])
    with pytest.raises(VLRMError, match="served reward: \\['dtype'\\] are set on the server"):
        load_reward_funcs(url, dtype="bfloat16")


def test_pil_images_travel_losslessly():
    im = Image.new("RGB", (5, 3))
    im.putpixel((1, 2), (1, 2, 3))
    d = encode_image(im)
    back = Image.open(io.BytesIO(base64.b64decode(d["base64"])))
    assert back.mode == im.mode and back.tobytes() == im.tobytes()


def test_serve_command_refuses_bad_options_before_starting_ray(tmp_path, dirs):
    pytest.importorskip("ray")
    from typer.testing import CliRunner

    from vlrm_rlhf.cli import app

    run = CliRunner().invoke
    res = run(app, ["serve", "--model", str(tmp_path)])
    assert res.exit_code == 2 and "no reward model at --model" in res.output
    res = run(app, ["serve", "--model", str(dirs["vlrm"]), "--batching", "fast"])
    assert res.exit_code == 2 and "unknown --batching 'fast'" in res.output
    res = run(app, ["serve", "--model", str(dirs["vlrm"]), "--allowed-root", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "is not a folder" in res.output
    res = run(app, ["serve", "--model", str(dirs["vlrm"]), "--mode", "cascade"])
    assert res.exit_code == 2 and "--lvlm" in res.output


def test_client_needs_no_ray_and_nothing_below_imports_serve():
    """The client side (reward_funcs with a URL, the launch-script helpers) imports without Ray; only serve/ and the
    CLI's serve command import serve/ or ray."""
    import ast
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['ray'] = None\n"
            "import vlrm_rlhf.reward.remote, vlrm_rlhf.reward.factory, vlrm_rlhf.scripts, vlrm_rlhf.bon\n"
            "assert 'ray' not in [m for m in sys.modules if sys.modules[m] is not None]\nprint('ok')")
    root = Path(vlrm_rlhf.__file__).parent
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root.parent)})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    bad = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).as_posix()
        if rel.startswith("serve/") or rel == "cli.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "ray" or n.startswith("ray.") or "serve" in n.split(".") for n in names):
                bad.append(f"{rel}:{node.lineno}")
    assert not bad, bad


def test_an_image_shared_by_a_group_is_encoded_and_decoded_once(dirs, scorer):
    im = demo_image(dirs["lvlm"], 0)
    prompts = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": QUESTIONS[0]}]}]] * 4
    completions = [[{"role": "assistant", "content": a}] for a in ANSWERS]
    wire = trl_wire_samples(prompts, completions, {})
    assert all(s["images"][0] is wire[0]["images"][0] for s in wire)
    samples = decode_request(json.loads(json.dumps({"samples": wire})), Limits())
    assert all(s.images[0] is samples[0].images[0] for s in samples)
    assert scorer.score_samples(samples) == VLRMReward(scorer)(prompts=prompts, completions=completions)
