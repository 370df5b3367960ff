"""Small training helpers shared by ShapesWorld's model trainers (``train.py``, ``reasoning.py``, the demo).

Batch encoding, the next-token loss, the cosine schedule, one optimizer step, an atomic model save, and the
stamp file that lets a trained model directory be reused when its seed and configuration have not changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..files import atomic_output_dir
from ..threads import tick

__all__ = ["STAMP", "cached_log", "cosine_schedule", "encode_texts", "lm_loss", "mark_trained", "optimizer_step",
           "save_model_dir"]

STAMP = "shapes_train.json"  # written into every trained model directory: {"stamp": ..., "log": ...}


def encode_texts(tok: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``texts``, right-padded, without special tokens added."""
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` against ``labels`` shifted by one (``-100`` is ignored)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def cosine_schedule(opt: torch.optim.Optimizer, steps: int, warmup: int = 0) -> Any:
    """transformers' cosine schedule with warm-up (default: 5% of ``steps``, at least one step)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, warmup or max(1, steps // 20), steps)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: Any) -> float:
    """One optimizer step on ``loss``; returns its value. Between steps the active thread governor (if any)
    re-balances the thread count to the cores other processes leave free."""
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    tick()
    return loss.item()


def save_model_dir(save: Callable[[Path], None], out: Path) -> None:
    """Write a model directory through the merge engine's atomic output folder (never half-written)."""
    with atomic_output_dir(out, force=True) as tmp:
        save(tmp)


def cached_log(d: Path, stamp: str) -> dict | None:
    """The training log of a model directory trained with this exact stamp, else None."""
    m = d / STAMP
    if (d / "config.json").is_file() and m.is_file():
        data = json.loads(m.read_text())
        if data.get("stamp") == stamp:
            return data["log"]
    return None


def mark_trained(d: Path, stamp: str, log: dict) -> None:
    """Record in ``d`` that it was trained under ``stamp``, with its training ``log`` (see ``cached_log``)."""
    (d / STAMP).write_text(json.dumps({"stamp": stamp, "log": log}, indent=1))
