"""Functional view: knock out one layer's attention, MLP or whole block and measure the drop on each task kind.

Modes: ``base`` replaces the module's weights by the base model's (the fine-tune's change is undone there);
``zero`` zeroes the module's residual contribution (``self_attn.o_proj`` / ``mlp.down_proj``; both for the whole
layer). Weights are restored exactly after every measurement: the model is bit-identical after the run.
Layers are base-model layer indices; Mllama's interleaved cross-attention layers are not ablated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..merge.checkpoint import Checkpoint
from ..merge.schedules import layer_of
from ..models.loading import pretrained
from . import AnalysisError
from .tasks import Task, TaskScorer, TaskScores

MODES = ("base", "zero")
GROUPS = ("attention", "mlp", "layer")
_PREFIX = {"attention": ("self_attn.",), "mlp": ("mlp.",), "layer": ("",)}
_ZERO = {"attention": ("self_attn.o_proj.",), "mlp": ("mlp.down_proj.",), "layer": ("self_attn.o_proj.", "mlp.down_proj.")}


def load_lvlm(path: str | Path, dtype: torch.dtype | None = None):
    """(model, processor, checkpoint view) of an LVLM or merged-LVLM directory, or of a text causal LM (then the
    processor is its tokenizer and task records need no image)."""
    import transformers

    from ..merge.checkpoint import CheckpointError
    from ..models.processing import load_processor

    cfg = Path(path) / "config.json"
    data = json.loads(cfg.read_text()) if cfg.is_file() else {}
    archs = data.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        raise AnalysisError(f"{path} is a reward model ({archs[0]}); the task analyses need a generative LVLM "
                            "(merge with `output: lvlm`) or a causal LM")
    kw = {"dtype": dtype} if dtype else {}
    if cfg.is_file() and "vision_config" not in data and "text_config" not in data:  # a text LM
        try:
            ckpt = Checkpoint(path, "llm")
        except CheckpointError as e:
            raise AnalysisError(str(e)) from e
        model = pretrained(transformers.AutoModelForCausalLM, path, **kw).eval()
        return model, pretrained(transformers.AutoTokenizer, path), ckpt
    try:
        ckpt = Checkpoint(path, "lvlm")
    except CheckpointError as e:
        raise AnalysisError(str(e)) from e
    cls = getattr(transformers, ckpt.family.lvlm_class)
    model = pretrained(cls, path, **kw).eval()
    return model, load_processor(path), ckpt


def text_parameters(model: torch.nn.Module, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Canonical text key (``layers.3.mlp.up_proj.weight``) → the model's tensor (written in place by analyses)."""
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    out = {}
    for canon, key in ckpt.text.items():
        if key not in named:
            raise AnalysisError(f"tensor {key} of {ckpt.path} is not a parameter of the loaded {type(model).__name__}")
        out[canon] = named[key]
    return out


def group_keys(keys: Sequence[str], layer: int, group: str, mode: str) -> list[str]:
    """Canonical keys a (layer, group, mode) ablation writes."""
    if group not in GROUPS:
        raise AnalysisError(f"unknown module group {group!r}; use {', '.join(GROUPS)}")
    if mode not in MODES:
        raise AnalysisError(f"unknown ablation mode {mode!r}; use {', '.join(MODES)}")
    prefixes = (_ZERO if mode == "zero" else _PREFIX)[group]
    head = f"layers.{layer}."
    out = [k for k in keys if k.startswith(head) and k[len(head):].startswith(prefixes)]
    if mode == "zero":
        for p in prefixes:
            if not any(k[len(head):].startswith(p) for k in out):
                have = sorted({re.sub(r"\.(weight|bias)$", "", k[len(head):]) for k in keys if k.startswith(head)})
                raise AnalysisError(f"mode zero needs {head}{p}weight (the module's residual output) but layer {layer} "
                                    f"has only {', '.join(have)}; use --mode base")
    if not out:
        raise AnalysisError(f"layer {layer} has no {group} tensors")
    return out


@contextmanager
def replaced(params: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily write ``new`` values into ``params`` (same keys); the old values come back bit-exactly."""
    saved = {k: params[k].detach().clone() for k in new}
    try:
        with torch.no_grad():
            for k, v in new.items():
                params[k].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)


@dataclass
class AblationRow:
    """One (layer, module group) ablation: its scores and the drop against the intact model."""

    layer: int
    module: str
    scores: TaskScores
    drop: dict[str, dict[str, float]]


def n_layers(keys: Sequence[str]) -> int:
    """Number of base layers among canonical keys."""
    idx = [i for k in keys if (i := layer_of(k)) is not None]
    return 1 + max(idx) if idx else 0


def ablate(
    scorer: TaskScorer,
    params: dict[str, torch.Tensor],
    tasks: Sequence[Task],
    *,
    mode: str = "base",
    base: Checkpoint | None = None,
    groups: Sequence[str] = GROUPS,
    layers: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[TaskScores, list[AblationRow]]:
    """Score the intact model, then every (layer, group) ablation; weights are restored after each one."""
    if mode == "base" and base is None:
        raise AnalysisError("mode base needs the base model (--base DIR)")
    keys = list(params)
    L = n_layers(keys)
    if mode == "base":
        missing = [k for k in keys if layer_of(k) is not None and k not in base.text]
        if missing:
            raise AnalysisError(f"base model {base.path} lacks {missing[0]}: is it the model's base?")
    intact = scorer.score(tasks)
    rows = []
    for layer in layers if layers is not None else range(L):
        if not 0 <= layer < L:
            raise AnalysisError(f"layer {layer} is out of range: the model has {L} base layers (0..{L - 1})")
        for g in groups:
            ks = group_keys(keys, layer, g, mode)
            new = {}
            for k in ks:
                p = params[k]
                if mode == "zero":
                    new[k] = torch.zeros_like(p)
                else:
                    b = base.get(base.text[k])
                    if tuple(b.shape) != tuple(p.shape):
                        raise AnalysisError(f"shape mismatch for {k}: model {tuple(p.shape)}, base {tuple(b.shape)}")
                    new[k] = b.to(p.dtype)
            with replaced(params, new):
                s = scorer.score(tasks)
            drop = {kind: {m: intact.metrics[kind][m] - s.metrics[kind][m] for m in ("accuracy", "logprob")}
                    for kind in intact.metrics}
            rows.append(AblationRow(layer, g, s, drop))
            if progress is not None:
                progress(f"layer {layer} {g}: " + ", ".join(f"{kind} Δacc {d['accuracy']:+.3f}" for kind, d in drop.items()))
    return intact, rows


def ablation_table(intact: TaskScores, rows: Sequence[AblationRow], mode: str) -> list[dict]:
    """CSV rows: layer, module, mode, then per kind the metric, the intact value and the drop."""
    out = []
    for r in rows:
        row: dict = {"layer": r.layer, "module": r.module, "mode": mode}
        for kind, m in r.scores.metrics.items():
            for name in ("accuracy", "logprob"):
                row[f"{kind}_{name}"] = m[name]
                row[f"{kind}_{name}_intact"] = intact.metrics[kind][name]
                row[f"{kind}_{name}_drop"] = r.drop[kind][name]
        out.append(row)
    return out


def write_ablation(out: Path, table: Sequence[dict], mode: str, model_name: str) -> list[Path]:
    """``ablate.csv`` and one heatmap PNG per (task kind, metric) drop: layers × module groups."""
    from ..files import write_csv_atomic
    from .plots import table_heatmap

    files = [write_csv_atomic(table, out / "ablate.csv")]
    what = "weights replaced by the base's" if mode == "base" else "residual output (o_proj / down_proj) zeroed"
    for col in [c for c in (table[0] if table else {}) if c.endswith("_drop")]:
        kind, metric = col.removesuffix("_drop").split("_", 1)
        label = f"{kind} {'accuracy' if metric == 'accuracy' else 'log p(correct)'} drop"
        files.append(table_heatmap(out / f"ablate_{col}.png", table, col, row_key="layer", col_key="module",
                                   col_order=[g for g in GROUPS if any(r["module"] == g for r in table)],
                                   title=f"{label} when ablated\n({what})\nmodel: {model_name}",
                                   cbar_label="drop (intact − ablated)", xlabel="ablated module group",
                                   diverging=True))
    return files
