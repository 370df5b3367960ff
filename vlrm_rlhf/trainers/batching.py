"""Batching for the PPO trainer: prompt rows, per-sample multimodal slicing, data order and PPO micro-batches.

Prompts are encoded one sample at a time and the image tensors of any subset of samples (a rollout chunk, a PPO
micro-batch) are re-assembled with :func:`collate_visual`; :class:`EpochSampler` and :func:`ppo_micro_batches`
fix the data order and the minibatch permutations exactly as TRL 1.12's PPO drew them. Also TRL 1.12's
``truncate_response`` (TRL 1.16 no longer ships it) as :func:`truncate_after`. The PPO maths is in
:mod:`~vlrm_rlhf.trainers.ppo_math`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

with warnings.catch_warnings():  # TRL warns on any trl.experimental import
    warnings.simplefilter("ignore")
    from trl.experimental.utils import first_true_indices

__all__ = ["TEXT_KEYS", "EpochSampler", "MicroBatch", "collate_visual", "columns", "count_image_blocks",
           "ppo_micro_batches", "repeat", "row_images", "strip_images", "truncate_after", "uses_own_positions"]

# Per-token keys that are padded with the prompt (everything else a processor returns is image data)
TEXT_KEYS = ("input_ids", "attention_mask")


def truncate_after(responses: torch.Tensor, stop_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Replace every token after the first ``stop_token_id`` of each row by ``pad_token_id``."""
    stop = first_true_indices(responses == stop_token_id).unsqueeze(-1)
    positions = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0)
    return responses.masked_fill(positions > stop, pad_token_id)


def _pad_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad the trailing dims of ``t`` (batch dim excluded) up to ``shape``."""
    pads: list[int] = []
    for have, want in zip(reversed(t.shape[1:]), reversed(shape), strict=True):
        pads += [0, want - have]
    return F.pad(t, pads) if any(pads) else t


def collate_visual(samples: Sequence[dict[str, Any]], indices: Sequence[int]) -> dict[str, Any]:
    """Assemble the image inputs of ``samples[i] for i in indices`` into one batch.

    Each sample holds what the processor returned for that sample alone. Two layouts exist and both are
    handled by concatenating along dim 0: *flat* keys whose first dim counts images or patches
    (LLaVA ``pixel_values`` ``(n_img, C, H, W)``, Qwen-VL ``pixel_values`` ``(n_patches, D)`` with
    ``image_grid_thw`` ``(n_img, 3)``, LLaVA-NeXT ``image_sizes``) and *batch-first* keys of a batch of one
    (Idefics3 ``(1, n_img, C, H, W)``, ``pixel_attention_mask``), whose trailing dims are zero-padded to the
    largest sample (zero images are how those models mark padding). Keys absent from some samples (a text-only
    row in a mixed batch) are concatenated over the samples that have them.
    """
    keys: list[str] = []
    for i in indices:
        keys += [k for k in samples[i]["visual"] if k not in keys]
    out: dict[str, Any] = {}
    for key in keys:
        parts = [samples[i]["visual"][key] for i in indices if key in samples[i]["visual"]]
        if not isinstance(parts[0], torch.Tensor):
            out[key] = [x for p in parts for x in (p if isinstance(p, list) else [p])]
            continue
        if parts[0].dim() == 0:
            out[key] = parts[0]
            continue
        shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
        out[key] = torch.cat([_pad_to(p, shape) for p in parts], 0)
    return out


def uses_own_positions(model: torch.nn.Module) -> bool:
    """True for models that derive their own position ids from the inputs (Qwen-VL's M-RoPE ``get_rope_index``).

    Those must not receive position ids computed from the attention mask (TRL 1.12 forced them, which broke
    Qwen-VL); every other model gets exclusive-cumsum positions, the ones ``generate`` used for left padding.
    """
    seen = model
    for _ in range(4):
        if hasattr(seen, "get_rope_index"):
            return True
        rope = getattr(getattr(seen, "config", None), "rope_parameters", None) or {}
        text_rope = getattr(getattr(getattr(seen, "config", None), "text_config", None), "rope_parameters", None) or {}
        if "mrope_section" in rope or "mrope_section" in text_rope:
            return True
        nxt = getattr(seen, "base_model", None)
        nxt = getattr(seen, "model", None) if nxt is None or nxt is seen else nxt
        if nxt is None or nxt is seen:
            break
        seen = nxt
    return False


class EpochSampler(torch.utils.data.Sampler):
    """A shuffling sampler whose per-epoch seeds are recorded (and can be replayed when resuming).

    Single process it consumes the global torch RNG exactly like ``torch.utils.data.RandomSampler`` under a
    plain ``Accelerator`` (one int64 draw per epoch, then ``randperm``), which keeps rollouts sample-identical
    to TRL 1.12's PPO for the same seed. Multi-process it draws from its own generator seeded with ``seed`` so
    every rank shuffles alike. It is deliberately not a ``RandomSampler``: accelerate would swap that out.
    """

    def __init__(self, n: int, seed: int, own_generator: bool):
        self.n, self.seeds, self.replay = n, [], []
        self.generator = torch.Generator().manual_seed(seed) if own_generator else None

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self.replay:
            seed = self.replay.pop(0)
        else:
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
        self.seeds.append(seed)
        yield from torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()


def row_images(row: dict[str, Any], i: int) -> list[Any]:
    """The images of dataset row ``i`` (``images`` list or single ``image``; paths opened as RGB)."""
    images = row.get("images")
    if images is None:
        images = [] if row.get("image") is None else [row["image"]]
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    for img in images:
        if isinstance(img, (str, Path)) and not Path(img).exists():
            raise FileNotFoundError(f"row {i}: image path {img!r} does not exist")
    from PIL import Image

    return [Image.open(x).convert("RGB") if isinstance(x, (str, Path)) else x for x in images]


def count_image_blocks(prompt: Any) -> int:
    """Number of ``{"type": "image"}`` blocks in a conversational prompt (0 for plain text)."""
    if isinstance(prompt, str):
        return 0
    return sum(1 for m in prompt if isinstance(m.get("content"), list)
               for b in m["content"] if isinstance(b, dict) and b.get("type") == "image")


def strip_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop inline PIL objects from image blocks (templates only need the placeholder)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [{"type": "image"} if isinstance(b, dict) and b.get("type") == "image" else b for b in content]
        out.append({**m, "content": content})
    return out


def columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    """Every dataset column but ``prompt``/``input_ids`` as lists, the keyword arguments of reward callables."""
    keys = [k for k in rows[0] if k not in ("prompt", "input_ids")]
    return {k: [r.get(k) for r in rows] for k in keys}


def repeat(loader: Any):
    """Iterate over ``loader`` forever (a new epoch, hence a new shuffle, each time it is exhausted)."""
    while True:
        yield from loader


class MicroBatch(NamedTuple):
    """One PPO micro-batch: where it sits in the (epoch, minibatch, micro-batch) grid, its rows, and whether it is
    the last of its minibatch (the optimizer steps after it)."""

    epoch: int
    minibatch: int
    micro: int
    indices: np.ndarray
    last: bool


def ppo_micro_batches(num_epochs: int, batch_size: int, mini_batch_size: int, micro_batch_size: int
                      ) -> Iterator[MicroBatch]:
    """The micro-batches of ``num_epochs`` PPO epochs over a rollout of ``batch_size`` rows, in training order.

    Each epoch draws one ``np.random.permutation(batch_size)`` (numpy's global RNG, as TRL 1.12 did), lazily, when
    its first micro-batch is requested; minibatches are consecutive slices of it, micro-batches slices of those.
    """
    for epoch in range(num_epochs):
        order = np.random.permutation(batch_size)
        for mb, start in enumerate(range(0, batch_size, mini_batch_size)):
            mini = order[start:start + mini_batch_size]
            for ga, mstart in enumerate(range(0, mini_batch_size, micro_batch_size)):
                yield MicroBatch(epoch, mb, ga, mini[mstart:mstart + micro_batch_size],
                                 mstart + micro_batch_size >= mini_batch_size)
