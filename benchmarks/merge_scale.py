"""Full-size merge benchmark: a Qwen2.5-VL-3B trio with real shapes, random bf16 weights, hub layout, sharded.

1. Writes under ``<work-dir>`` (``df`` is checked first): ``lvlm`` (Qwen2_5_VLForConditionalGeneration, 3B shapes,
   tied embeddings, ~7.5 GB), ``base`` (Qwen2ForCausalLM, Qwen2.5-3B shapes, ~6.2 GB) and ``rm``
   (Qwen2ForSequenceClassification on the same shapes, num_labels=1, ~6.2 GB), bf16, 2 GB shards with an index.
   Weights are slices of a 128 MB random pool (``base``) plus slices of a second pool (fine-tune noise, ``lvlm`` and
   ``rm``), so writing is disk-bound. All three share one 151936-row word-level tokenizer with Qwen's special tokens.
   ``--scale 0.25`` keeps every shape but a quarter of the layers.
2. Measures, page cache dropped before each step: the I/O floor (a cold read of every input byte, then writing as
   many bytes as the merge writes, with fsync); the VLRM merge (``build`` + ``sync``) in a fresh process with task
   arithmetic and TIES (density 0.4), fp32 compute and bf16 output, sampling the process's ``RssAnon`` and
   ``RssFile`` every 20 ms; with ``--mem-limit 1.5G`` also task arithmetic inside a cgroup v1 memory limit (root
   only), reporting an OOM kill.
3. Prints one table with PASS/FAIL against the targets (TA ≥ 0.9× floor, TIES ≥ 0.5×, anon ≤ 1 GB, file ≤ 2 GB) and
   deletes the trio unless ``--keep``.

Run: ``python benchmarks/merge_scale.py [--work-dir /tmp/merge3b] [--scale 1] [--mem-limit 1.5G] [--keep]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import torch
import transformers as tf
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from vlrm_rlhf.merge.writer import ShardWriter, TensorSpec, plan_shards, write_index
from vlrm_rlhf.testing.zoo import hub_key_map

GB = 1e9
VOCAB, WORDS = 151936, 151643
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN = dict(vocab_size=VOCAB, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
            num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
            bos_token_id=151643, eos_token_id=151645)
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
POOL = 1 << 26  # elements per random pool (128 MB in bf16)
SHARD = "2GB"


# ------------------------------------------------------------------------------------------------ the trio
class Pools:
    """Two bf16 random pools; a tensor's values are consecutive pool elements from a name-derived offset."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.base = (torch.randn(POOL, generator=g) * 0.02).to(torch.bfloat16)
        self.noise = (torch.randn(POOL, generator=g) * 0.002).to(torch.bfloat16)

    @staticmethod
    def _take(pool: torch.Tensor, n: int, key: str) -> torch.Tensor:
        out = torch.empty(n, dtype=torch.bfloat16)
        o, i = zlib.crc32(key.encode()) % POOL, 0
        while i < n:
            k = min(n - i, POOL - o)
            out[i : i + k] = pool[o : o + k]
            i, o = i + k, 0
        return out

    def tensor(self, key: str, shape: tuple[int, ...], role: str) -> torch.Tensor:
        """The base's values of ``key`` (its on-disk name), plus role-specific noise for a fine-tune."""
        n = 1
        for s in shape:
            n *= s
        t = self._take(self.base, n, key)
        if role != "base":
            t.add_(self._take(self.noise, n, role + key))
        return t.reshape(shape)


def write_model(model: torch.nn.Module, out: Path, role: str, pools: Pools, names: dict[str, str] | None) -> int:
    """Sharded hub-layout safetensors of ``model``'s (meta) state dict, tied lm_head left out; returns bytes."""
    sd = model.state_dict()
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    specs = {(names or {}).get(k, k): TensorSpec(tuple(t.shape), torch.bfloat16) for k, t in sd.items()
             if not (tied and k.endswith("lm_head.weight"))}
    shards = plan_shards(specs, SHARD)
    for fname, keys in shards.items():
        w = ShardWriter(out / fname, keys, specs, {"format": "pt"})
        for k in keys:
            w.write(k, pools.tensor(k, specs[k].shape, role))
        w.close()
    write_index(out, shards, specs)
    return sum(s.nbytes for s in specs.values())


def tokenizer() -> tf.PreTrainedTokenizerFast:
    """A 151936-row word-level stand-in for Qwen2.5's tokenizer, with its special tokens at their real ids."""
    tok = Tokenizer(models.WordLevel({f"tok{i}": i for i in range(WORDS)}, unk_token="tok0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      unk_token="tok0")


def build_trio(root: Path, scale: float) -> tuple[dict[str, Path], int]:
    """Write (or reuse) the trio; returns the folders and the total input bytes."""
    dirs = {r: root / r for r in ("base", "lvlm", "rm")}
    done = root / "trio.json"
    if done.is_file() and json.loads(done.read_text()).get("scale") == scale:
        return dirs, json.loads(done.read_text())["bytes"]
    shutil.rmtree(root, ignore_errors=True)
    for d in dirs.values():
        d.mkdir(parents=True)
    layers = max(1, round(QWEN["num_hidden_layers"] * scale))
    depth = max(4, round(VISION["depth"] * scale))
    text = {**QWEN, "num_hidden_layers": layers}
    vision = {**VISION, "depth": depth, "fullatt_block_indexes": [i for i in VISION["fullatt_block_indexes"] if i < depth]}
    pools, total, tok = Pools(), 0, tokenizer()
    base_cfg = tf.Qwen2Config(**text, architectures=["Qwen2ForCausalLM"])
    rm_cfg = tf.Qwen2Config(**text, num_labels=1, pad_token_id=151643, architectures=["Qwen2ForSequenceClassification"])
    lv_cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                                 vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True,
                                 architectures=["Qwen2_5_VLForConditionalGeneration"])
    for role, cfg, cls in (("base", base_cfg, tf.Qwen2ForCausalLM), ("rm", rm_cfg, tf.Qwen2ForSequenceClassification),
                           ("lvlm", lv_cfg, tf.Qwen2_5_VLForConditionalGeneration)):
        with torch.device("meta"):
            model = cls(cfg)
        t = time.perf_counter()
        n = write_model(model, dirs[role], role, pools, hub_key_map(model) if role == "lvlm" else None)
        total += n
        cfg.save_pretrained(dirs[role])
        tok.save_pretrained(dirs[role])
        print(f"  wrote {role}: {n / GB:.2f} GB in {time.perf_counter() - t:.1f} s", flush=True)
    done.write_text(json.dumps({"scale": scale, "bytes": total}))
    return dirs, total


# ------------------------------------------------------------------------------------------------ measuring
def drop_caches() -> bool:
    """sync and drop the page cache (root only); False when not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def io_floor(files: list[Path], write_bytes: int, scratch: Path) -> tuple[float, float]:
    """Seconds for a cold read of ``files`` and for writing ``write_bytes`` with fsync."""
    buf = bytearray(64 << 20)
    drop_caches()
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as h:
            while h.readinto(buf):
                pass
    read_s = time.perf_counter() - t
    drop_caches()
    t = time.perf_counter()
    with open(scratch, "wb", buffering=0) as o:
        left = write_bytes
        while left > 0:
            left -= o.write(memoryview(buf)[: min(left, len(buf))])
        os.fsync(o.fileno())
    write_s = time.perf_counter() - t
    scratch.unlink()
    return read_s, write_s


MERGE = ("import os,sys,time\nimport torch\nfrom vlrm_rlhf.merge import build\nt=time.perf_counter()\n"
         "build(sys.argv[1],sys.argv[2],force=True,progress=False)\nos.sync()\n"
         "print('MERGE_S',time.perf_counter()-t,torch.get_num_threads(),flush=True)\n")


def _status(pid: int) -> tuple[int, int]:
    """RssAnon and RssFile of ``pid`` in bytes (0, 0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    v = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in text.splitlines() if ln.startswith(("RssAnon", "RssFile"))}
    return v.get("RssAnon", 0), v.get("RssFile", 0)


def run_merge(recipe: Path, out: Path, limit: int | None) -> dict:
    """One merge in a fresh process (inside a cgroup v1 memory limit when ``limit``); wall, peaks, OOM kills."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-c", MERGE, str(recipe), str(out)]
    group = None
    if limit:
        group = Path(f"/sys/fs/cgroup/memory/merge_scale_{os.getpid()}")
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    drop_caches()
    peak = [0, 0]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        while p.poll() is None:
            a, f = _status(p.pid)
            peak[0], peak[1] = max(peak[0], a), max(peak[1], f)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = p.communicate()
    wall = time.perf_counter() - t
    th.join()
    oom = 0
    if group is not None:
        oc = (group / "memory.oom_control").read_text()
        oom = int(next((ln.split()[1] for ln in oc.splitlines() if ln.startswith("oom_kill ")), "0"))
        max_usage = int((group / "memory.max_usage_in_bytes").read_text())
        group.rmdir()
    done = next((ln.split() for ln in stdout.splitlines() if ln.startswith("MERGE_S")), None)
    merge_s, threads = (float(done[1]), int(done[2])) if done else (None, None)
    if p.returncode and not (limit and p.returncode in (137, -9)):
        raise RuntimeError(f"merge failed ({p.returncode}):\n{stderr[-3000:]}")
    res = {"rc": p.returncode, "wall_s": wall, "merge_s": merge_s, "threads": threads, "anon_peak": peak[0],
           "file_peak": peak[1],
           "oom_kills": oom}
    if group is not None:
        res["cgroup_max_usage"] = max_usage
    return res


def recipe_file(root: Path, dirs: dict[str, Path], method: str) -> Path:
    """A VLRM recipe: fp32 compute, bf16 output; TIES keeps 40 % per model."""
    dens = ", density: 0.4" if method == "ties" else ""
    r = root / f"{method}.yaml"
    r.write_text(
        f"merge_method: {method}\nbase_model: {json.dumps(str(dirs['base']))}\nmodels:\n"
        f"  - {{model: {json.dumps(str(dirs['lvlm']))}, role: lvlm, parameters: {{weight: 1.0{dens}}}}}\n"
        f"  - {{model: {json.dumps(str(dirs['rm']))}, role: rm, parameters: {{weight: 1.0{dens}}}}}\n"
        f"parameters: {{normalize: false}}\ndtype: float32\nout_dtype: bfloat16\noutput: vlrm\nseed: 0\n")
    return r


def parse_size(s: str) -> int:
    """'1.5G' / '800M' / bytes -> bytes."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/merge3b"))
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the layers (shapes stay real)")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--mem-limit", default=None, help="also run task arithmetic under this cgroup limit, e.g. 1.5G")
    ap.add_argument("--keep", action="store_true", help="keep the trio (and reuse it next time)")
    args = ap.parse_args()
    need = 35 * GB * args.scale + 2 * GB
    free = shutil.disk_usage(args.work_dir.parent).free
    if free < need and not (args.work_dir / "trio.json").is_file():
        sys.exit(f"need ~{need / GB:.0f} GB free under {args.work_dir.parent}, have {free / GB:.0f} GB: use --scale")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch threads {torch.get_num_threads()}")
    t = time.perf_counter()
    dirs, in_bytes = build_trio(args.work_dir, args.scale)
    print(f"trio ready ({in_bytes / GB:.1f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    files = sorted(f for d in dirs.values() for f in d.glob("*.safetensors"))
    rows = []
    try:
        out = args.work_dir / "out"
        results = {}
        for m in args.methods.split(","):
            results[m] = run_merge(recipe_file(args.work_dir, dirs, m), out, None)
            print(f"  {m}: {json.dumps(results[m])}", flush=True)
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        if args.mem_limit:
            lim = parse_size(args.mem_limit)
            results[f"task_arithmetic @ {args.mem_limit}"] = r = run_merge(
                recipe_file(args.work_dir, dirs, "task_arithmetic"), out, lim)
            print(f"  limited: {json.dumps(r)}", flush=True)
        read_s, write_s = io_floor(files, out_bytes, args.work_dir / "floor.bin")
        floor = read_s + write_s
        print(f"\nI/O floor: cold read {in_bytes / GB:.1f} GB {read_s:.1f} s ({in_bytes / GB / read_s:.2f} GB/s), "
              f"write {out_bytes / GB:.1f} GB + fsync {write_s:.1f} s -> floor {floor:.1f} s")
        print(f"{'run':28s} {'wall s':>8s} {'build s':>8s} {'GB/s in':>8s} {'floor/wall':>10s} {'anon GB':>8s} "
              f"{'file GB':>8s} {'OOM':>4s} {'rc':>4s}")
        for name, r in results.items():
            ratio = floor / r["wall_s"]
            rows.append((name, r, ratio))
            print(f"{name:28s} {r['wall_s']:8.1f} {r['merge_s'] or float('nan'):8.1f} "
                  f"{in_bytes / GB / r['wall_s']:8.2f} {ratio:10.2f} "
                  f"{r['anon_peak'] / GB:8.2f} {r['file_peak'] / GB:8.2f} {r['oom_kills']:4d} {r['rc']:4d}")
        print("wall s: the whole merge process (interpreter start and imports from a cold page cache included); "
              "build s: build() + os.sync() inside it")
        print(f"load average now {os.getloadavg()[0]:.1f} (other processes share the {os.cpu_count()} cores)")
        for name, r, ratio in rows:
            target = 0.9 if name == "task_arithmetic" else 0.5 if name == "ties" else None
            checks = [f"anon ≤ 1 GB {'PASS' if r['anon_peak'] <= GB else 'FAIL'}",
                      f"file ≤ 2 GB {'PASS' if r['file_peak'] <= 2 * GB else 'FAIL'}"]
            if target:
                checks.insert(0, f"≥ {target}× floor {'PASS' if ratio >= target else 'FAIL'}")
            if "@" in name:
                checks.append(f"finished without OOM kill {'PASS' if r['rc'] == 0 and not r['oom_kills'] else 'FAIL'}")
            print(f"{name}: " + "; ".join(checks))
    finally:
        shutil.rmtree(args.work_dir / "out", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(args.work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
