"""Seconds per sweep point: in-memory re-merge vs merge-to-disk + load, each followed by the same evaluation.

1. Builds (or reuses, when ``<work-dir>/trio.json`` records the same shape) a LLaVA trio with the zoo,
   ``build_trio("llava", hidden_size=1024, num_layers=14)``: about 505 MB per model in fp32. Writes ``--pairs``
   preference records in VL-RewardBench format (JSONL + one PNG per record) and loads them once, so both paths
   evaluate the very same decoded records.
2. Per grid point (default ``lambda=0.3,0.6,0.9``: the weight of LVLM and RM, task arithmetic), side by side:
   - **disk, warm**: ``build(recipe, out)`` + ``VLRewardScorer.from_pretrained(out)`` + ``evaluate_prefs``, inputs in
     the page cache (read once beforehand, untimed);
   - **disk, cold**: the same after evicting the input files from the page cache (``posix_fadvise(DONTNEED)`` on our
     files only; no root needed; residency checked with ``mincore``): what a model larger than the page cache pays;
   - **in-memory**: ``InMemoryMerger.apply(point)`` + ``evaluate_prefs(VLRewardScorer(model, processor))``;
   - **fresh process** (info): one new Python process per point that imports, merges to disk, loads and evaluates,
     as a shell loop over ``vlrm-rlhf merge`` + an evaluation would (a lower bound: one process, not two).
   The merger's one-time setup (plan, model, inputs read into RAM, first full merge) is timed separately.
3. Checks that every path gives the same scores for every record (the models are bit-identical), then prints a
   table, the ratios with the target (>= 5x), and the CPU that other processes used meanwhile (a co-tenant inflates
   timings: re-run when that column is high).

Run:  ``OMP_NUM_THREADS=1 /work/venv/bin/python benchmarks/sweep.py [--work-dir runs/bench_sweep] [--pairs 16]
[--grid lambda=0.3,0.6,0.9] [--method task_arithmetic] [--json out.json]``
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import random
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch
import transformers as tf

from vlrm_rlhf.eval.prefs import evaluate_prefs
from vlrm_rlhf.eval.records import load_pref_records
from vlrm_rlhf.merge import build, parse_recipe
from vlrm_rlhf.merge.grid import grid_points, parse_grid, point_overrides
from vlrm_rlhf.merge.inmemory import InMemoryMerger
from vlrm_rlhf.reward.scorer import VLRewardScorer
from vlrm_rlhf.testing import zoo

IDS = ("wildvision", "RLAIF-V", "mmmu-pro")  # VL-RewardBench ids of its three categories


# ------------------------------------------------------------------------------------------------- inputs
def build_inputs(work: Path, hidden: int, layers: int, method: str) -> tuple[Path, dict[str, Path]]:
    """The trio (rebuilt only when its shape changed) and a quick recipe over it."""
    marker, want = work / "trio.json", {"hidden": hidden, "layers": layers, "format": 1}
    dirs = {r: work / "trio" / r for r in ("base", "lvlm", "rm", "llm")}
    have = all((d / "config.json").is_file() for d in dirs.values())
    if not (have and marker.is_file() and json.loads(marker.read_text()) == want):
        shutil.rmtree(work / "trio", ignore_errors=True)
        t0 = time.perf_counter()
        dirs = zoo.build_trio("llava", work / "trio", hidden_size=hidden, num_layers=layers)
        marker.write_text(json.dumps(want) + "\n")
        print(f"built the trio in {time.perf_counter() - t0:.0f} s")
    return zoo.write_quick_recipe(dirs, work / f"recipe_{method}.yaml", method=method), dirs


def write_records(work: Path, lvlm: Path, n: int) -> Path:
    """``n`` preference pairs in VL-RewardBench format, one distinct image each, categories by id."""
    rng = random.Random(0)
    d = work / "prefs"
    d.mkdir(parents=True, exist_ok=True)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(zoo.WORDS[3:]) for _ in range(rng.randint(lo, hi)))

    rows = []
    for i in range(n):
        zoo.demo_image(lvlm, seed=100 + i).save(d / f"{i}.png")
        rows.append({"id": f"{IDS[i % 3]}-{i}", "query": words(4, 10) + " ?", "image": f"{i}.png",
                     "response": [words(3, 8) + " .", words(3, 8) + " ."], "human_ranking": [i % 2, 1 - i % 2]})
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "val.jsonl"


# ----------------------------------------------------------------------------------------- page cache, cpu
def weight_files(dirs) -> list[Path]:
    return sorted(f for d in dirs for f in Path(d).glob("*.safetensors"))


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (ours only; pages mapped by a process stay)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a freshly built trio) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prewarm(files: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as h:
            while h.readinto(buf):
                pass


def cached_fraction(files: list[Path]) -> float:
    """Fraction of the files' pages resident in the page cache (``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    total = resident = 0
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as h:
            mm = mmap.mmap(h.fileno(), size, access=mmap.ACCESS_COPY)
            buf = (ctypes.c_char * size).from_buffer(mm)
            n = (size + page - 1) // page
            vec = (ctypes.c_ubyte * n)()
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            resident += sum(v & 1 for v in vec)
            total += n
            del buf
            mm.close()
    return resident / max(total, 1)


def busy_s() -> float:
    """CPU seconds the whole machine has spent busy (user+nice+system+irq+softirq), from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float, max_cores: float = 0.25) -> None:
    """Wait (up to limit_s) until other processes use < max_cores (measured over 1 s)."""
    t_end = time.monotonic() + limit_s
    while True:
        b0 = busy_s()
        time.sleep(1.0)
        if busy_s() - b0 < max_cores or time.monotonic() > t_end:
            return
        time.sleep(2.0)


FRESH = """import json, sys, time
t0 = time.perf_counter()
from vlrm_rlhf.eval.prefs import evaluate_prefs
from vlrm_rlhf.eval.records import load_pref_records
from vlrm_rlhf.merge import build
from vlrm_rlhf.reward.scorer import VLRewardScorer
a = json.loads(sys.argv[1])
records = load_pref_records(a["data"])
build(a["recipe"], a["out"], force=True, progress=False)
res = evaluate_prefs(VLRewardScorer.from_pretrained(a["out"]), records, progress=False)
print(json.dumps({"scores": [r["scores"] for r in res.rows], "in_process_s": time.perf_counter() - t0}))
"""


def fresh_process(recipe: Path, data: Path, out: Path) -> tuple[float, list]:
    """Wall seconds of one fresh process that imports, merges to disk, loads and evaluates (a CLI per point)."""
    import subprocess
    import sys

    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", FRESH, json.dumps({"recipe": str(recipe), "data": str(data),
                                                                  "out": str(out)})],
                       capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, json.loads(p.stdout.strip().splitlines()[-1])["scores"]


class Clock:
    """Times calls; also accumulates the CPU that other processes used during them (in cores)."""

    def __init__(self) -> None:
        self.wall = self.other_cpu = 0.0

    def __call__(self, fn):
        b0, c0, t0 = busy_s(), time.process_time(), time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.wall += dt
        self.other_cpu += max(0.0, busy_s() - b0 - (time.process_time() - c0))
        return dt, out

    def others(self) -> float:
        return self.other_cpu / max(self.wall, 1e-9)


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", type=Path, default=Path("runs/bench_sweep"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--grid", action="append", default=None, help="as `vlrm-rlhf sweep --grid` (repeatable)")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="max seconds to wait for an idle machine per point")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT")
    ap.add_argument("--device", default=None, help="score on this device (e.g. cuda); merging stays on the CPU")
    a = ap.parse_args()
    tf.utils.logging.disable_progress_bar()
    work = a.work_dir.resolve()
    recipe_path, trio = build_inputs(work, a.hidden, a.layers, a.method)
    recipe = parse_recipe(recipe_path)
    data = write_records(work, trio["lvlm"], a.pairs)
    records = load_pref_records(data)
    points = grid_points(parse_grid(a.grid or ["lambda=0.3,0.6,0.9"]))
    inputs = weight_files([trio["base"], trio["lvlm"], trio["rm"]])
    mb = {r: sum(f.stat().st_size for f in weight_files([trio[r]])) / 1e6 for r in ("base", "lvlm", "rm")}
    threads = torch.get_num_threads()
    print(f"LLaVA trio, Llama {a.hidden}x{a.layers}: base {mb['base']:.0f} MB, lvlm {mb['lvlm']:.0f} MB, "
          f"rm {mb['rm']:.0f} MB (fp32); {a.method}; {len(records)} pairs; {len(points)} points; "
          f"torch threads {threads} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")

    def evaluate(scorer):
        return evaluate_prefs(scorer, records, progress=False)

    clock = Clock()
    prewarm(inputs)
    t_setup, merger = clock(lambda: InMemoryMerger(recipe, progress=False))
    t_first, _ = clock(lambda: evaluate(VLRewardScorer(merger.model, merger.processor, device=a.device)))  # first forward: warm-up
    print(f"in-memory setup {t_setup:.2f} s (inputs held in RAM: {merger.cache_bytes / 1e9:.2f} GB), "
          f"first evaluation {t_first:.2f} s (warm-up, not counted)")

    out = work / "disk_point"
    rows, same = [], True
    for p in points:
        ov = point_overrides(recipe, p)
        r = {"point": ", ".join(f"{k}={v:g}" for k, v in p.items())}
        scores = {}
        wait_quiet(a.quiet_wait)
        for path in ("warm", "cold"):
            gc.collect()
            if path == "warm":
                prewarm(inputs)
            else:
                evict(inputs)
                r["cached_before_cold"] = cached_fraction(inputs)
            r[f"{path}_build"], _ = clock(lambda ov=ov: build(merger.recipe_for(ov), out, force=True, progress=False))
            r[f"{path}_load"], scorer = clock(lambda: VLRewardScorer.from_pretrained(out, device=a.device))
            r[f"{path}_eval"], res = clock(lambda scorer=scorer: evaluate(scorer))
            scores[path] = [row["scores"] for row in res.rows]
            r[f"{path}_total"] = r[f"{path}_build"] + r[f"{path}_load"] + r[f"{path}_eval"]
            del scorer, res
        r["mem_apply"], _ = clock(lambda ov=ov: merger.apply(ov))
        r["mem_eval"], res = clock(lambda: evaluate(VLRewardScorer(merger.model, merger.processor, device=a.device)))
        r["mem_total"] = r["mem_apply"] + r["mem_eval"]
        r["overall"] = res.metrics["overall"]
        point_recipe = work / "point_recipe.yaml"
        point_recipe.write_text(json.dumps(merger.recipe_for(ov).model_dump(exclude_none=True)))  # JSON is YAML
        prewarm(inputs)
        _, (r["fresh_total"], scores["fresh"]) = clock(lambda pr=point_recipe: fresh_process(pr, data, out))
        same &= scores["warm"] == scores["cold"] == scores["fresh"] == [row["scores"] for row in res.rows]
        rows.append(r)
        print(f"  {r['point']}: disk warm {r['warm_total']:.2f} s, cold {r['cold_total']:.2f} s, "
              f"fresh process {r['fresh_total']:.2f} s, in-memory {r['mem_total']:.2f} s", flush=True)
    others = clock.others()
    shutil.rmtree(out, ignore_errors=True)

    print(f"\n{'point':<22} {'path':<10} {'merge/apply':>11} {'load':>6} {'eval':>6} {'total s':>8} {'x faster':>9}")
    for r in rows:
        for path, label in (("warm", "disk warm"), ("cold", "disk cold"), ("mem", "in-memory")):
            prep = r[f"{path}_apply"] if path == "mem" else r[f"{path}_build"]
            load = "" if path == "mem" else f"{r[f'{path}_load']:6.2f}"
            ratio = "" if path == "mem" else f"{r[f'{path}_total'] / r['mem_total']:8.2f}x"
            print(f"{r['point'] if path == 'warm' else '':<22} {label:<10} {prep:11.2f} {load:>6} "
                  f"{r[f'{path}_eval']:6.2f} {r[f'{path}_total']:8.2f} {ratio:>9}")
        print(f"{'':<22} {'fresh proc':<10} {'':>11} {'':>6} {'':>6} {r['fresh_total']:8.2f} "
              f"{r['fresh_total'] / r['mem_total']:8.2f}x")

    def med(k: str) -> float:
        return statistics.median(r[k] for r in rows)

    ratio_warm, ratio_cold = med("warm_total") / med("mem_total"), med("cold_total") / med("mem_total")
    prep_warm = (med("warm_build") + med("warm_load")) / med("mem_apply")
    prep_cold = (med("cold_build") + med("cold_load")) / med("mem_apply")
    results = [  # name, value, target, pass
        ("per point, disk warm / in-memory (medians)", ratio_warm, ">= 5x", ratio_warm >= 5),
        ("per point, disk cold / in-memory (medians)", ratio_cold, ">= 5x", ratio_cold >= 5),
        ("one fresh process per point / in-memory", med("fresh_total") / med("mem_total"), "(info)", None),
        ("merge+load only, warm: (build+load) / apply", prep_warm, "(info)", None),
        ("merge+load only, cold: (build+load) / apply", prep_cold, "(info)", None),
        ("evaluation share of the in-memory point", med("mem_eval") / med("mem_total"), "(info)", None),
        ("input pages cached before the cold builds", max(r["cached_before_cold"] for r in rows), "(info)", None),
        ("identical scores on every record, all paths", float(same), "== 1", same),
    ]
    print(f"\n{'measure':<48} {'value':>8}  {'target':<7} result")
    for name, v, target, ok in results:
        print(f"{name:<48} {v:8.2f}  {target:<7} {'' if ok is None else ('PASS' if ok else 'FAIL')}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\none-time in-memory setup {t_setup:.2f} s (~{t_setup / max(med('mem_apply'), 1e-9):.1f} applies); "
          f"peak RSS {peak:.1f} GB (incl. mapped file pages); other processes used {others:.2f} cores meanwhile"
          + (" -- timings inflated, re-run on a quieter machine" if others > 0.25 else ""))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({
            "hidden": a.hidden, "layers": a.layers, "model_mb": mb, "method": a.method, "pairs": len(records),
            "threads": threads, "setup_s": t_setup, "others_cores": others, "peak_rss_gb": peak, "points": rows,
            "results": [{"measure": n, "value": v, "target": t, "pass": ok} for n, v, t, ok in results],
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
