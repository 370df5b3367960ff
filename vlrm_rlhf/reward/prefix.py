"""Shared-prefix reuse: score N responses to one (images, prompt) with one pass over the images and prompt.

The first candidate is encoded with the processor (images expanded); the others only need their text
tokenized. The longest common token prefix runs once through the multimodal backbone with a KV cache; the
cache is repeated N times and only each candidate's remaining tokens run, then the score head reads the
last real token. Rewards equal plain batched scoring to float tolerance (tested per family).
"""

from __future__ import annotations

import torch

# per-token inputs some families need beside input_ids (sliced to the suffix for the continuation)
_PER_TOKEN = ("token_type_ids", "mm_token_type_ids", "cross_attention_mask")


class PrefixScorer:
    """Prefix-KV-cache scoring for one ``VLRewardScorer`` (mode vlrm)."""

    def __init__(self, scorer):
        self.s = scorer

    @torch.no_grad()
    def score(self, samples) -> list[float] | None:
        """Rewards for samples sharing images and prompt; None when they do not share a usable prefix."""
        s = self.s
        if any(x.images != samples[0].images for x in samples[1:]):
            return None
        texts = [s._render(x, i) for i, x in enumerate(samples)]
        tok = s.tokenizer
        raw = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # image placeholders unexpanded
        p0 = _common_prefix(raw)
        p0 = min(p0, min(len(r) for r in raw) - 1)  # every candidate keeps at least one token of its own
        if p0 <= 0:
            return None
        full0 = s.encode([texts[0]], [samples[0].images])
        n_full0 = int(full0["input_ids"].shape[1])
        prefix_len = n_full0 - (len(raw[0]) - p0)  # the same split in the expanded sequence
        if s.max_length is not None and any(prefix_len + len(r) - p0 > s.max_length for r in raw):
            return None  # needs truncation: let the plain path handle (and warn about) it
        backbone = getattr(s.model, s.model.base_model_prefix)
        prefix_inputs = {k: (v[:, :prefix_len] if k in ("input_ids", "attention_mask", *_PER_TOKEN) else v)
                         for k, v in full0.items()}
        out = backbone(**prefix_inputs, use_cache=True)
        cache = out.past_key_values
        suffixes = [r[p0:] for r in raw]
        rewards: list[float] = []
        budget = max(1, s.max_batch_tokens // max(1, max(len(x) for x in suffixes) + prefix_len))
        for start in range(0, len(suffixes), budget):
            chunk = suffixes[start:start + budget]
            rewards += self._continue(backbone, cache, full0, prefix_len, chunk)
        return rewards

    def _continue(self, backbone, cache, full0, prefix_len: int, suffixes: list[list[int]]) -> list[float]:
        s = self.s
        n, width = len(suffixes), max(len(x) for x in suffixes)
        dev = s.device
        ids = torch.full((n, width), s.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((n, prefix_len + width), dtype=torch.long, device=dev)
        mask[:, :prefix_len] = full0["attention_mask"][:, :prefix_len]
        for i, x in enumerate(suffixes):
            ids[i, : len(x)] = torch.tensor(x, device=dev)
            mask[i, prefix_len : prefix_len + len(x)] = 1
        extra = {}
        for k in _PER_TOKEN:
            if k in full0:
                v = full0[k]
                shape = (n, width, *v.shape[2:])
                last = v[:, -1:].expand(n, 1, *v.shape[2:]) if k == "cross_attention_mask" else None
                extra[k] = last.expand(shape).contiguous() if last is not None else torch.zeros(shape, dtype=v.dtype, device=dev)
        c = _repeat_cache(cache, n)
        positions = torch.arange(prefix_len, prefix_len + width, device=dev)
        deltas = getattr(backbone, "rope_deltas", None)
        if deltas is not None:  # M-RoPE (Qwen-VL): text after the prompt continues at position + rope delta
            extra["position_ids"] = positions.view(1, 1, -1).expand(3, n, -1) + deltas.to(dev).view(1, -1, 1)
        h = backbone(input_ids=ids, attention_mask=mask, past_key_values=c, use_cache=True,
                     cache_position=positions, **extra).last_hidden_state
        # the generic head reads the rightmost non-pad token: the same rule here
        last = torch.tensor([max((j for j, t in enumerate(x) if t != s.pad_id), default=0) for x in suffixes], device=dev)
        logits = s.model.score(h[torch.arange(n, device=dev), last]).float()[:, 0]
        return logits.tolist()


def _common_prefix(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for i in range(n):
        t = first[i]
        if any(x[i] != t for x in seqs[1:]):
            return i
    return n


def _repeat_cache(cache, n: int):
    """A copy of the prefix cache repeated for n candidates (the original stays reusable for later chunks)."""
    import copy

    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(n)
    return c
