"""``merge --dry-run`` at real size: a Llama-3.2-11B-Vision trio whose safetensors hold headers only.

1. Writes, under ``<work-dir>``, a hub-layout trio with the real shapes: ``lvlm`` (MllamaForConditionalGeneration,
   11B: 40 text layers with cross-attention at 3, 8, ..., 38, 32 + 8 vision layers), ``base`` (Llama-3.1-8B shapes:
   LlamaForCausalLM, 32 layers, vocab 128256) and ``rm`` (LlamaForSequenceClassification on the same shapes), bf16,
   in ~5 GB shards with an index. Each shard's header declares every tensor, and the file is then extended with
   ``truncate`` to its full length: sparse, so about 50 GB of apparent size take no disk and no time. Tokenizers are
   128256-token word-level stand-ins (the LVLM adds ``<|image|>``, the RM a ``<pad>`` of its own).
2. Times ``dry_run`` in-process (the merge's own work: configs, meta-device models, tokenizers, headers, the plan)
   and ``vlrm-rlhf merge --dry-run`` as a fresh process (adding Python, torch and transformers imports).

Run: ``python benchmarks/dryrun_scale.py [--work-dir /tmp/dryrun11b] [--repeats 3]`` (target: ≤ 5 s in-process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers as tf
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from vlrm_rlhf.testing.zoo import hub_key_map

SHARD = 5 * 10**9
VOCAB = 128256
LLAMA = dict(vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
             eos_token_id=128001, tie_word_embeddings=False,
             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def write_headers(model: torch.nn.Module, out: Path, names: dict[str, str] | None = None) -> None:
    """Sharded safetensors of ``model``'s state dict (meta tensors) in bf16: headers, then sparse data."""
    sd = model.state_dict()
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for k, t in sd.items():
        nbytes = t.numel() * 2
        if size + nbytes > SHARD and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((k, t))
        size += nbytes
    weight_map = {}
    for i, items in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for k, t in items:
            n = t.numel() * 2
            key = names[k] if names else k
            header[key] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [off, off + n]}
            weight_map[key] = fname
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + off)  # sparse: the data is never written
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in sd.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def tokenizer(extra: tuple[str, ...], pad: str) -> tf.PreTrainedTokenizerFast:
    vocab = {f"tok{i}": i for i in range(VOCAB - 2)} | {"<|begin_of_text|>": VOCAB - 2, "<|end_of_text|>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="tok0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in extra])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                      pad_token=pad, unk_token="tok0")


def build(root: Path) -> dict[str, Path]:
    dirs = {r: root / r for r in ("base", "lvlm", "rm")}
    if all((d / "config.json").is_file() for d in dirs.values()):
        return dirs
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    text = tf.LlamaConfig(**LLAMA, pad_token_id=None)
    with torch.device("meta"):
        base = tf.LlamaForCausalLM(text)
    write_headers(base, dirs["base"])
    text.save_pretrained(dirs["base"])
    tokenizer((), "<|end_of_text|>").save_pretrained(dirs["base"])
    rm_tok = tokenizer(("<pad>",), "<pad>")
    rm_cfg = tf.LlamaConfig(**{**LLAMA, "vocab_size": VOCAB + 1}, pad_token_id=VOCAB, num_labels=1,
                            architectures=["LlamaForSequenceClassification"])
    with torch.device("meta"):
        rm = tf.LlamaForSequenceClassification(rm_cfg)
    write_headers(rm, dirs["rm"])
    rm_cfg.save_pretrained(dirs["rm"])
    rm_tok.save_pretrained(dirs["rm"])
    cross = [3, 8, 13, 18, 23, 28, 33, 38]
    mcfg = tf.MllamaConfig(
        text_config=tf.MllamaTextConfig(**{**LLAMA, "num_hidden_layers": 40}, cross_attention_layers=cross),
        vision_config=tf.MllamaVisionConfig(image_size=560, patch_size=14), image_token_index=VOCAB,
        architectures=["MllamaForConditionalGeneration"])
    with torch.device("meta"):
        lvlm = tf.MllamaForConditionalGeneration(mcfg)
    write_headers(lvlm, dirs["lvlm"], hub_key_map(lvlm))
    mcfg.save_pretrained(dirs["lvlm"])
    tokenizer(("<|image|>",), "<|end_of_text|>").save_pretrained(dirs["lvlm"])
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/dryrun11b"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    dirs = build(args.work_dir)
    print(f"trio ready in {time.perf_counter() - t0:.1f} s at {args.work_dir}")
    recipe = args.work_dir / "recipe.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {json.dumps(str(dirs['base']))}\nmodels:\n"
        f"  - {{model: {json.dumps(str(dirs['lvlm']))}, role: lvlm, parameters: {{weight: 1.0}}}}\n"
        f"  - {{model: {json.dumps(str(dirs['rm']))}, role: rm, parameters: {{weight: 1.0}}}}\n"
        "parameters: {normalize: false}\ndtype: float32\nout_dtype: bfloat16\noutput: vlrm\nseed: 0\n")
    from vlrm_rlhf.merge.dryrun import dry_run

    out = args.work_dir / "out"
    times, cpu = [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        report = dry_run(recipe, out)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    print(report.text())
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "vlrm_rlhf.cli", "merge", str(recipe), "--out", str(out), "--dry-run"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    cli = time.perf_counter() - t
    assert res.returncode == 0, res.stderr[-2000:]
    best = min(times)
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"dry_run in-process: best {best:.2f} s wall ({min(cpu):.2f} s CPU) of {', '.join(f'{x:.2f}' for x in times)}; "
          f"CLI (fresh process, imports included): {cli:.2f} s; target ≤ 5 s in-process: {'PASS' if best <= 5 else 'FAIL'}")


if __name__ == "__main__":
    main()
