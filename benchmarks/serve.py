"""Served rewards (Ray Serve) vs in-process scoring: rewards/s and latency under concurrent callers.

One run, one machine, everything measured side by side:

0. Builds the zoo's tiny LLaVA VLRM (Llama text model, CLIP tower at 32 px) and merges it (task arithmetic).
1. In process: ``VLRMReward`` called by one caller, request after request (the baseline), and the same samples
   in one call (the in-process batching bound).
2. Served by 1 and by 2 replicas (``vlrm-rlhf serve`` machinery, local Ray): ``--callers`` concurrent callers
   (asyncio tasks over ``RemoteReward``, one loop in this process), each sending ``--requests`` requests of
   ``--group`` samples (a GRPO group: one prompt and image, ``group`` completions). Batching ``exact`` (default:
   rewards bit-identical to in-process), ``throughput`` (one plan over callers) and ``off`` (max batch size 1).
   Reported: rewards/s, p50/p99 request latency, and the gain from batching across callers (vs ``off``).
3. Checks that every ``exact`` reward equals the in-process reward bit for bit.

Every replica and this process pin torch to one thread. The clients, the HTTP proxy, the Serve controller and the
replicas all share this machine's cores, so on a 2-core machine 2 replicas cannot beat 1 by much: the numbers show
the overhead of serving and the gain of batching, not the scaling a cluster of GPU nodes gives.
Run: ``python benchmarks/serve.py [--work-dir runs/bench_serve] [--callers 1,4,16] [--requests 48] [--group 4]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import torch  # noqa: E402

from vlrm_rlhf.merge import build  # noqa: E402
from vlrm_rlhf.reward.remote import RemoteReward  # noqa: E402
from vlrm_rlhf.reward.scorer import VLRewardScorer  # noqa: E402
from vlrm_rlhf.reward.trl import VLRMReward  # noqa: E402
from vlrm_rlhf.testing.zoo import build_trio, demo_image  # noqa: E402

QUESTIONS = ["what color is the cat ?", "describe the picture .", "is there a dog ?", "what is in the sky ?"]
ANSWERS = ["red .", "a blue square on the left", "no", "the sun and a cloud", "maybe a red circle on the right ."]


def tiny_vlrm(work: Path) -> tuple[Path, Path]:
    """The zoo's LLaVA trio and a task-arithmetic VLRM from it (built once per work dir)."""
    out = work / "vlrm"
    if not (out / "config.json").is_file():
        trio = build_trio("llava", work / "trio")
        base, lv, rm = (str(trio[k]) for k in ("base", "lvlm", "rm"))
        rec = work / "recipe.yaml"
        rec.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       f"  - {{model: {lv}, role: lvlm, parameters: {{weight: 0.5}}}}\n"
                       f"  - {{model: {rm}, role: rm, parameters: {{weight: 1.0}}}}\noutput: vlrm\n")
        build(rec, out, progress=False)
    return out, work / "trio" / "lvlm"


def requests_for(lvlm: Path, n: int, group: int) -> list[tuple[list, list]]:
    """n GRPO-group requests: one prompt with its image, ``group`` completions each."""
    out = []
    for k in range(n):
        im = demo_image(lvlm, k % 8)
        p = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": QUESTIONS[k % 4]}]}]
        out.append(([p] * group, [[{"role": "assistant", "content": ANSWERS[(k + j) % 5]}] for j in range(group)]))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def ms(x: float) -> str:
    """Seconds as milliseconds for the table ("-" for NaN)."""
    return "-" if x != x else f"{x * 1000:.1f}"


async def drive(reward: RemoteReward, reqs: list[tuple[list, list]], callers: int) -> tuple[float, list[float], list]:
    """``callers`` tasks share the requests round-robin; each sends its own one after another."""
    lat: list[float] = []
    got: list = [None] * len(reqs)

    async def caller(c: int) -> None:
        for k in range(c, len(reqs), callers):
            t = time.perf_counter()
            got[k] = await reward(prompts=reqs[k][0], completions=reqs[k][1])
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    return time.perf_counter() - t0, lat, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", type=Path, default=Path("runs/bench_serve"))
    ap.add_argument("--callers", default="1,4,16")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--port", type=int, default=8765)
    a = ap.parse_args()
    torch.set_num_threads(1)
    a.work_dir.mkdir(parents=True, exist_ok=True)
    vlrm, lvlm = tiny_vlrm(a.work_dir)
    reqs = requests_for(lvlm, a.requests, a.group)
    n_samples = a.requests * a.group
    callers = [int(x) for x in a.callers.split(",")]
    others0 = psutil.cpu_times()
    rows: list[tuple[str, str, str, float, float, float]] = []

    scorer = VLRewardScorer.from_pretrained(vlrm)
    local = VLRMReward(scorer)
    local(prompts=reqs[0][0], completions=reqs[0][1])  # warm-up
    lat, t0 = [], time.perf_counter()
    ref = []
    for p, c in reqs:
        t = time.perf_counter()
        ref.append(local(prompts=p, completions=c))
        lat.append(time.perf_counter() - t)
    base = n_samples / (time.perf_counter() - t0)
    rows.append(("in process", "-", "1", base, pct(lat, 0.5), pct(lat, 0.99)))
    t0 = time.perf_counter()
    local(prompts=[x for p, _ in reqs for x in p], completions=[x for _, c in reqs for x in c])
    rows.append(("in process, one call", "-", "all", n_samples / (time.perf_counter() - t0), float("nan"), float("nan")))

    from vlrm_rlhf.serve.app import ServeConfig
    from vlrm_rlhf.serve.run import start_server, stop_server

    exact_ok = True
    rates: dict[tuple[int, str, int], float] = {}
    try:
        for replicas in (1, 2):
            for batching in ("off", "exact", "throughput"):
                cfg = ServeConfig(model=str(vlrm), batching="exact" if batching == "off" else batching,
                                  max_batch_size=1 if batching == "off" else 16, batch_wait_s=0.002)
                url = start_server(cfg, replicas=replicas, cpus_per_replica=0.5, port=a.port,
                                   ray_init={"num_cpus": 4, "object_store_memory": 100 << 20,
                                             "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}})
                remote = RemoteReward(url, timeout=120)
                asyncio.run(drive(remote, reqs[:4], 4))  # warm-up: every replica has seen a request
                for c in callers:
                    dt, lat, got = asyncio.run(drive(remote, reqs, c))
                    rate = n_samples / dt
                    rates[(replicas, batching, c)] = rate
                    rows.append((f"served, {replicas} replica(s)", batching, str(c), rate, pct(lat, 0.5), pct(lat, 0.99)))
                    if batching != "throughput":
                        exact_ok &= got == ref
                    print(f"  {rows[-1]}", flush=True)
    finally:
        stop_server()
    others1 = psutil.cpu_times()

    print(f"\nmachine: {psutil.cpu_count()} cores, torch threads 1 per process; {n_samples} rewards per row "
          f"({a.requests} requests of {a.group} samples); tiny LLaVA VLRM (zoo), fp32 CPU")
    print("\n| path | batching | callers | rewards/s | vs in process | p50 latency ms | p99 latency ms |")
    print("|---|---|---|---|---|---|---|")
    for name, b, c, rate, p50, p99 in rows:
        print(f"| {name} | {b} | {c} | {rate:.0f} | {rate / base:.2f}x | {ms(p50)} | {ms(p99)} |")
    print("\ngain from batching across callers (rewards/s, exact or throughput vs off, same replicas and callers):")
    for r in (1, 2):
        for c in callers:
            off = rates.get((r, "off", c))
            if off:
                print(f"  {r} replica(s), {c:>2} callers: exact {rates[(r, 'exact', c)] / off:.2f}x, "
                      f"throughput {rates[(r, 'throughput', c)] / off:.2f}x")
    print(f"\nexact batching equals in-process rewards bit for bit: {exact_ok}")
    busy = sum(getattr(others1, k) - getattr(others0, k) for k in ("user", "system", "nice"))
    print(f"CPU seconds used on the machine during the run (this benchmark's processes included): {busy:.0f}")


if __name__ == "__main__":
    main()
