"""Merge throughput and memory: vlrm_rlhf's streaming merge vs mergekit 0.1.5 vs a raw read, on ≥ 1 GB fp32 models.

1. Builds, or reuses when ``<work-dir>/models/trio.json`` records the same size, an fp32 trio written tensor by tensor
   (never a whole model in RAM): ``base`` (LlamaForCausalLM, TinyLlama-shaped: hidden 2048, intermediate 5632,
   32 heads / 4 KV heads, vocab 32000, as many layers as make each model ≥ ``--size-gb``), ``lvlm``
   (LlavaForConditionalGeneration: LM = base + 2 % noise, tiny CLIP tower) and ``rm`` (LlamaForSequenceClassification,
   num_labels=1, pad 0: base + other noise). All share one 32000-token tokenizer, so rows align by token.
   For mergekit (text LMs only) it also writes ``lvlm_text`` (the LVLM's LM as a LlamaForCausalLM) and ``rm_text``
   (the RM's body + the base's lm_head): the same arithmetic on the same bytes.
2. Times each contender in a fresh subprocess (peak memory is per run), after a warm-up read of that contender's
   inputs, so every timing is *page-cache warm* (a cold read is disk-bound, ~1.6 GB/s here, and would hide the merge):
   raw read of all input bytes; raw copy (the same read + writing as many bytes as our output has: the I/O
   floor of any merge); ``vlrm_rlhf.merge.build`` (output: vlrm, 500 MB shards); mergekit's ``run_merge``
   (same method/params, 500 MB shards). Import time is measured separately and excluded. GB/s counts the input
   bytes each contender must read: ours skips the two lm_heads a VLRM does not keep, mergekit reads everything.
   Peak anonymous RSS (``RssAnon``: heap, not the file-backed mmap of the inputs) is sampled every 10 ms.
3. Prints a table and PASS/FAIL targets. ``OMP_NUM_THREADS`` is unset for all runs (torch's default threads).
   Co-tenants skew timings: each run waits for an idle machine and reports the CPU others used meanwhile.

Run:  ``/work/venv/bin/python benchmarks/merge_throughput.py [--size-gb 1.0] [--repeats 1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers

from vlrm_rlhf.merge.writer import ShardWriter, TensorSpec, plan_shards, write_index
from vlrm_rlhf.testing.zoo import lm_key_map

ROOT = Path(__file__).resolve().parents[1]
H, INTER, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4
SHARD = "500MB"
GB = 1e9
DRIVER_PRELUDE = (
    "import json,sys,time\nt0=time.perf_counter()\n"
    "def anon():\n return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('RssAnon')))\n"
)
RAW = DRIVER_PRELUDE + (  # read every input file; with 'out', also write the first 'write' bytes read (a copy)
    "a=json.loads(sys.argv[1]);buf=bytearray(64<<20);n=0;left=a.get('write',0);t1=time.perf_counter();m1=anon()\n"
    "o=open(a['out'],'wb') if left else None\nfor f in a['files']:\n with open(f,'rb',buffering=0) as h:\n"
    "  while k:=h.readinto(buf):\n   n+=k;w=min(k,left);left-=w\n   if w: o.write(memoryview(buf)[:w])\n"
    "o and o.close()\n"
)
OURS = DRIVER_PRELUDE + (
    "import torch,transformers\nfrom vlrm_rlhf.merge import build\nimport vlrm_rlhf.merge.output\n"
    "a=json.loads(sys.argv[1]);t1=time.perf_counter();m1=anon()\n"
    "build(a['recipe'],a['out'],force=True,progress=False,max_shard_size=a['shard'])\n"
)
MERGEKIT = DRIVER_PRELUDE + (
    "import torch,yaml\nfrom mergekit.config import MergeConfiguration\nfrom mergekit.merge import run_merge\n"
    "from mergekit.options import MergeOptions\na=json.loads(sys.argv[1]);t1=time.perf_counter();m1=anon()\n"
    "run_merge(MergeConfiguration.model_validate(yaml.safe_load(a['config'])),a['out'],"
    "options=MergeOptions(out_shard_size=a['shard_params'],quiet=True),config_source=a['config'])\n"
)
DRIVER_END = (
    "t2=time.perf_counter()\nth=sys.modules['torch'].get_num_threads() if 'torch' in sys.modules else None\n"
    "print(json.dumps({'import_s':t1-t0,'run_s':t2-t1,'anon_after_import_kb':m1,'threads':th}))\n"
)


# ------------------------------------------------------------------------------------------------ models
def text_kwargs(layers: int) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=layers,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                dtype="float32")


def layers_for(size_gb: float) -> int:
    """Fewest layers that make the smallest model (the RM: no lm_head) at least ``size_gb``."""
    layer = 4 * (2 * H * H + 2 * H * (H // HEADS * KV_HEADS) + 3 * H * INTER + 2 * H)
    return max(1, math.ceil((size_gb * GB - 4 * (VOCAB * H + 2 * H)) / layer))


def save_tokenizer(d: Path) -> None:
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "<image>"])}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                               pad_token="<pad>").save_pretrained(d)


class StreamOut:
    """One checkpoint directory whose tensors arrive one at a time, in a fixed order, into planned shards."""

    def __init__(self, d: Path, specs: dict[str, TensorSpec], config: Any):
        d.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(d)
        save_tokenizer(d)
        self.dir, self.specs, self.shards = d, specs, plan_shards(specs, SHARD)
        self.order = [(f, n) for f, names in self.shards.items() for n in names]
        self.i, self.w = 0, None

    def put(self, name: str, t: torch.Tensor) -> None:
        f, expected = self.order[self.i]
        assert name == expected, (name, expected)
        if self.w is None or self.w.path.name != f:  # ShardWriter checks order and shapes
            if self.w is not None:
                self.w.close()
            self.w = ShardWriter(self.dir / f, self.shards[f], self.specs, {"format": "pt"})
        self.w.write(name, t)
        self.i += 1
        if self.i == len(self.order):
            self.w.close()
            write_index(self.dir, self.shards, self.specs)


def _meta(cls: type, cfg: Any) -> tuple[Any, dict[str, TensorSpec]]:
    cfg.architectures = [cls.__name__]
    with torch.device("meta"):
        m = cls(cfg)
    return m, {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}


def _randn(shape: tuple[int, ...], scale: float, tag: str) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(tag.encode()))).mul_(scale)


def build_models(mdir: Path, size_gb: float) -> dict[str, Path]:
    """Write base/lvlm/rm (+ lvlm_text/rm_text) tensor by tensor, unless trio.json already records this size."""
    layers = layers_for(size_gb)
    marker = mdir / "trio.json"
    dirs = {r: mdir / r for r in ("base", "lvlm", "rm", "lvlm_text", "rm_text")}
    want = {"size_gb": size_gb, "layers": layers, "format": 1}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return dirs
    shutil.rmtree(mdir, ignore_errors=True)
    kw = text_kwargs(layers)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=8)
    base_m, base_s = _meta(tf.LlamaForCausalLM, tf.LlamaConfig(**kw))
    lv_cfg = tf.LlavaConfig(text_config=tf.LlamaConfig(**kw), vision_config=vision, image_token_index=4,
                            image_seq_length=16, pad_token_id=0, dtype="float32")
    lv_m, lv_s = _meta(tf.LlavaForConditionalGeneration, lv_cfg)
    rm_m, rm_s = _meta(tf.LlamaForSequenceClassification, tf.LlamaConfig(**kw, num_labels=1))
    lv_of = {b: k for k, b in lm_key_map(base_m, lv_m).items()}
    lv_extra, rm_extra = [k for k in lv_s if k not in lv_of.values()], [k for k in rm_s if k not in base_s]
    lv_order, rm_order = [lv_of[k] for k in base_s] + lv_extra, [k for k in base_s if k in rm_s] + rm_extra
    plan = {"base": (base_s, base_m), "lvlm": ({k: lv_s[k] for k in lv_order}, lv_m),
            "rm": ({k: rm_s[k] for k in rm_order}, rm_m), "lvlm_text": (base_s, base_m), "rm_text": (base_s, base_m)}
    outs = {r: StreamOut(dirs[r], specs, m.config) for r, (specs, m) in plan.items()}
    with torch.no_grad():
        for k, spec in base_s.items():  # the largest live set: base + 2 fine-tunes of one tensor
            norm = k.endswith("norm.weight")
            b = torch.ones(spec.shape) if norm else _randn(spec.shape, 0.02, k)
            rel = 0.02 * (1.0 if norm else 0.02)  # delta RMS = 2 % of the tensor's RMS
            lv, rm = b + _randn(spec.shape, rel, "lvlm/" + k), b + _randn(spec.shape, rel, "rm/" + k)
            for r, key, x in (("base", k, b), ("lvlm", lv_of[k], lv), ("lvlm_text", k, lv), ("rm", k, rm),
                              ("rm_text", k, rm if k in rm_s else b)):
                if r != "rm" or k in rm_s:
                    outs[r].put(key, x)
            del b, lv, rm
        for k in lv_extra:
            outs["lvlm"].put(k, _randn(lv_s[k].shape, 0.02, "vision/" + k))
        for k in rm_extra:
            outs["rm"].put(k, _randn(rm_s[k].shape, 0.02, "score/" + k))
    marker.write_text(json.dumps(want))
    return dirs


# ----------------------------------------------------------------------------------------------- timing
def tensor_bytes(d: Path, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    """(bytes of tensors not in ``skip``, largest tensor) over a directory's safetensors files."""
    total = largest = 0
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as h:
            head = json.loads(h.read(int.from_bytes(h.read(8), "little")))
        for k, v in head.items():
            if k != "__metadata__" and k not in skip:
                n = v["data_offsets"][1] - v["data_offsets"][0]
                total, largest = total + n, max(largest, n)
    return total, largest


def busy_s() -> float:
    """CPU seconds the whole machine has spent busy (user+nice+system+irq+softirq), from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float, max_cores: float = 0.25) -> float:
    """Wait (up to limit_s) until other processes use < max_cores; return the last 1 s measurement."""
    t_end = time.monotonic() + limit_s
    while True:
        b0 = busy_s()
        time.sleep(1.0)
        if (bg := busy_s() - b0) < max_cores or time.monotonic() > t_end:
            return bg
        time.sleep(4.0)


def run_sampled(python: str, code: str, args: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run a driver in a fresh process; sample its RssAnon every ~10 ms; return its JSON result, the peak
    and the CPU (in cores) that *other* processes used meanwhile (a co-tenant makes timings unreliable)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with open(log, "w") as err, open(log.with_suffix(".out"), "w+") as out:
        b0, t0, self0 = busy_s(), time.monotonic(), sum(os.times()[:2])
        p = subprocess.Popen([python, "-c", code + DRIVER_END, json.dumps(args)], stdout=out, stderr=err,
                             env=env, cwd=ROOT)
        peak, status = 0, Path(f"/proc/{p.pid}/status")
        while True:
            pid, rc, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            try:
                line = next(x for x in status.read_text().splitlines() if x.startswith("RssAnon"))
                peak = max(peak, int(line.split()[1]))
            except (OSError, StopIteration):
                pass
            time.sleep(0.01)
        p.returncode = rc = os.waitstatus_to_exitcode(rc)  # reaped by wait4
        others = busy_s() - b0 - (ru.ru_utime + ru.ru_stime) - (sum(os.times()[:2]) - self0)
        bg, text = max(0.0, others / (time.monotonic() - t0)), Path(out.name).read_text()
    if rc != 0:
        sys.exit(f"{log.name} failed ({rc}):\n{log.read_text()[-3000:]}")
    return {**json.loads(text.strip().splitlines()[-1]), "peak_anon_mb": peak / 1024, "bg_cores": bg}


def same_tensor(ours: Path, mk: Path, key: str) -> float:
    """max |ours - mergekit| for one LM tensor (ours uses the LVLM's key names): both must do the same arithmetic."""

    def get(d: Path, k: str) -> torch.Tensor:
        idx = d / "model.safetensors.index.json"
        f = json.loads(idx.read_text())["weight_map"][k] if idx.is_file() else "model.safetensors"
        with safe_open(str(d / f), framework="pt") as h:
            return h.get_tensor(k)

    return float((get(ours, "model.language_model." + key) - get(mk, "model." + key)).abs().max())


def rm(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def engine_hash() -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted((ROOT / "vlrm_rlhf/merge").glob("*.py")))).hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("runs/bench_merge"))
    ap.add_argument("--size-gb", type=float, default=1.0, help="minimum size of each fp32 model (1 GB = 1e9 B)")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per contender; the fastest is reported")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--mergekit-python", default=str(ROOT / ".mergekit-venv/bin/python"))
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="max seconds to wait for an idle machine per run")
    a = ap.parse_args()
    wd, t, code_hash = a.work_dir.resolve(), time.perf_counter(), engine_hash()
    d = build_models(wd / "models", a.size_gb)
    print(f"models ready in {time.perf_counter() - t:.0f} s under {wd / 'models'}")
    sizes = {r: tensor_bytes(p) for r, p in d.items()}
    largest = max(x[1] for x in sizes.values())
    no_head = ("lm_head.weight",)  # a VLRM keeps neither lm_head: ours never reads them
    ours_in = tensor_bytes(d["base"], no_head)[0] + tensor_bytes(d["lvlm"], no_head)[0] + sizes["rm"][0]
    mk_in = sizes["base"][0] + sizes["lvlm_text"][0] + sizes["rm_text"][0]
    print("sizes: " + ", ".join(f"{r} {s / GB:.3f} GB" for r, (s, _) in sizes.items())
          + f"; {layers_for(a.size_gb)} layers; largest tensor {largest / 1e6:.0f} MB (embed/lm_head 32000x2048 fp32)")
    ours_files, mk_files = [[str(f) for r in rs for f in sorted(d[r].glob("*.safetensors"))]
                            for rs in (("base", "lvlm", "rm"), ("base", "lvlm_text", "rm_text"))]
    logs = wd / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def timed(name: str, method: str, python: str, code: str, args: dict, warm: list[str], nbytes: int) -> dict:
        runs = []
        for i in range(a.repeats):
            if "out" in args:
                rm(Path(args["out"]))
                os.sync()  # flush what the last run left dirty so it cannot slow this one
            run_sampled(sys.executable, RAW, {"files": warm}, logs / "warmup.log")  # page cache warm, equally
            bg0 = wait_quiet(a.quiet_wait)
            runs.append({**run_sampled(python, code, args, logs / f"{name}_{method}_{i}.log"), "bg_before": bg0})
        best = min(runs, key=lambda r: r["run_s"])  # contention only ever slows a run down
        row = {"contender": name, "method": method, **best, "gb": nbytes / GB, "gb_s": nbytes / GB / best["run_s"],
               "all_run_s": [r["run_s"] for r in runs], "peak_anon_mb": max(r["peak_anon_mb"] for r in runs)}
        print(f"  {name:9s} {method:16s} {best['run_s']:7.2f} s  {row['gb_s']:6.2f} GB/s  "
              f"peak RssAnon {row['peak_anon_mb']:6.0f} MB  others {best['bg_cores']:.2f} cores", flush=True)
        return row

    print(f"timing (warm page cache; OMP_NUM_THREADS unset; {os.cpu_count()} cores; best of {a.repeats}):")
    raw_in = sum(map(os.path.getsize, ours_files))
    rows = [timed("raw-read", "-", sys.executable, RAW, {"files": ours_files}, ours_files, raw_in),
            timed("raw-copy", "-", sys.executable, RAW, {"files": ours_files, "out": str(wd / "out_copy"),
                                                          "write": tensor_bytes(d["lvlm"], no_head)[0]}, ours_files, raw_in)]
    rm(wd / "out_copy")
    diffs = {}
    for m in a.methods.split(","):
        p = {"weight": 0.7} if m == "task_arithmetic" else {"weight": 0.7, "density": 0.5}
        top = {"normalize": False} if m == "task_arithmetic" else {}
        recipe = {"merge_method": m, "base_model": str(d["base"]), "dtype": "float32", "output": "vlrm", "seed": 0,
                  "parameters": top, "models": [{"model": str(d["lvlm"]), "role": "lvlm", "parameters": p},
                                                {"model": str(d["rm"]), "role": "rm", "parameters": p}]}
        mk_cfg = {"merge_method": m, "base_model": str(d["base"]), "dtype": "float32", "parameters": top, "models": [
            {"model": str(d["lvlm_text"]), "parameters": p}, {"model": str(d["rm_text"]), "parameters": p}]}
        (wd / f"mergekit_{m}.yaml").write_text(json.dumps(mk_cfg, indent=1))  # JSON is YAML: usable with the CLI
        outs = wd / "out_ours", wd / "out_mergekit"
        rows.append(timed("ours", m, sys.executable, OURS, {"recipe": recipe, "out": str(outs[0]), "shard": SHARD},
                          ours_files, ours_in))
        rows.append(timed("mergekit", m, a.mergekit_python, MERGEKIT,
                          {"config": json.dumps(mk_cfg), "out": str(outs[1]), "shard_params": 125_000_000},
                          mk_files, mk_in))
        diffs[m] = max(same_tensor(*outs, k) for k in ("embed_tokens.weight", "layers.0.mlp.down_proj.weight"))
        for o in outs:
            rm(o)

    print(f"\n{'contender':9s} {'method':16s} {'import s':>8s} {'merge s':>8s} {'GB in':>6s} {'GB/s':>6s} "
          f"{'peak RssAnon MB':>15s} {'after import MB':>15s} {'threads':>7s} {'others cores':>12s}")
    for r in rows:
        print(f"{r['contender']:9s} {r['method']:16s} {r['import_s']:8.2f} {r['run_s']:8.2f} {r['gb']:6.2f} "
              f"{r['gb_s']:6.2f} {r['peak_anon_mb']:15.0f} {r['anon_after_import_kb'] / 1024:15.0f} "
              f"{r['threads']!s:>7s} {r['bg_cores']:12.2f}")
    get = {(r["contender"], r["method"]): r for r in rows}
    targets, budget = [], (3 * largest + 300e6) / 2**20
    for m in a.methods.split(","):
        ours, mk = get[("ours", m)], get[("mergekit", m)]
        goal, ratio = (1.0 if m == "task_arithmetic" else 10.0), ours["gb_s"] / mk["gb_s"]
        targets.append((f"{m}: ours/mergekit GB/s (wall-time ratio {mk['run_s'] / ours['run_s']:.2f}x)", ratio,
                        f">= {goal:g}", ratio >= goal))
        if m == "task_arithmetic":
            ratio = ours["gb_s"] / get[("raw-read", "-")]["gb_s"]
            targets.append((f"{m}: ours/raw-read GB/s (ours/raw-copy, info: "
                            f"{ours['gb_s'] / get[('raw-copy', '-')]['gb_s']:.2f})", ratio, ">= 0.5", ratio >= 0.5))
        targets.append((f"{m}: ours peak RssAnon MB vs 3 x largest tensor + 300 MB", ours["peak_anon_mb"],
                        f"<= {budget:.0f}", ours["peak_anon_mb"] <= budget))
    print("\ntargets:")
    for name, val, goal, ok in targets:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {val:.2f} (target {goal})")
    print("checks: max |ours - mergekit| on embed_tokens + layers.0.mlp.down_proj: "
          + ", ".join(f"{m} {v:.2e}" for m, v in diffs.items()))
    print("notes: page-cache-warm timings (inputs re-read just before each run; a cold run is disk-bound); import "
          f"time excluded from 'merge s'; ours = vlrm_rlhf.merge.build, mergekit = mergekit.merge.run_merge; engine "
          f"source sha256 {code_hash}")
    if engine_hash() != code_hash:
        print("WARNING: vlrm_rlhf/merge/*.py changed during the run: rows may mix engine versions.")
    if max(r["bg_cores"] for r in rows) > 0.25:
        print("WARNING: other processes used CPU during some runs ('others cores'): those timings are inflated.")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "engine_sha256": code_hash, "largest_tensor_bytes": largest,
                                      "sizes_bytes": sizes, "max_abs_diff_vs_mergekit": diffs, "targets": [
                                          dict(zip(("name", "value", "target", "pass"), t)) for t in targets]}, indent=1))


if __name__ == "__main__":
    main()
