"""Reward models that ship their own code and a ``get_score(chat, images)`` API (IXC-2.5-Reward style).

Such a checkpoint runs Python from its folder, so it loads only with an explicit ``trust_remote_code=True``
(``--trust-remote-code`` on the command line); without it the refusal names the flag. Its model is asked for one
sample at a time: ``model.get_score(chat, images)`` with ``chat`` the conversation as ``{"role", "content": str}``
messages (image blocks removed) and ``images`` the sample's PIL images. The scorer keeps ``VLRewardScorer``'s
interface (``score``, ``score_candidates``, ``plan``/``forward``), so TRL rewards, best-of-n and eval use it as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models.loading import RemoteCodeError, pretrained, remote_code_refusal
from .inputs import Sample
from .scorer import Plan, ScorerError, VLRewardScorer

__all__ = ["RemoteCodeScorer", "chat_of"]


def chat_of(sample: Sample) -> list[dict[str, str]]:
    """A sample's conversation as role/content-string messages (the form ``get_score`` APIs take)."""
    return [{"role": m["role"], "content": "\n".join(b["text"] for b in m["content"] if b.get("type") == "text")}
            for m in sample.messages]


class RemoteCodeScorer(VLRewardScorer):
    """Scores with a trusted remote-code model's ``get_score(chat, images)``; mode ``vlrm`` only."""

    def __init__(self, model: Any, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        if not callable(getattr(model, "get_score", None)):
            raise ScorerError(f"{type(model).__name__} has no get_score(chat, images) method: vlrm-rlhf scores "
                              "remote-code reward models through that API only")
        self.mode = "vlrm"
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device, **({"dtype": dtype} if dtype else {})).eval()
        self.processor = self.tokenizer = None
        self.captioner = self.captioner_processor = None
        self.caption_max_new_tokens = 0
        self.pad_id = None
        self.max_length = None
        self.max_batch_tokens = 1
        self._prefix = None
        self._captions: dict[int, str] = {}
        self._image_extra: dict[tuple, int] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, mode: str = "vlrm", device: str | None = None,  # type: ignore[override]
                        dtype: torch.dtype | None = None, trust_remote_code: bool = False, **_: Any) -> RemoteCodeScorer:
        """Load a remote-code reward model (``AutoModel`` through its ``auto_map``) when explicitly trusted."""
        from transformers import AutoModel

        if not trust_remote_code:
            raise RemoteCodeError(remote_code_refusal(path))
        if mode != "vlrm":
            raise ScorerError(f"{path} is a remote-code reward model with its own get_score API: only mode vlrm applies")
        model = pretrained(AutoModel, path, trust_remote_code=True, **({"dtype": dtype} if dtype else {}))
        return cls(model, device=device)

    def plan(self, samples: list[Sample]) -> Plan:
        """One sample per call (text-only samples first, then those with images, as the base scorer orders them)."""
        order = sorted(range(len(samples)), key=lambda i: bool(samples[i].images))
        return Plan(list(samples), [""] * len(samples), [0] * len(samples), [[i] for i in order])

    @torch.no_grad()
    def forward(self, plan: Plan, batch: list[int]) -> list[float]:
        """``get_score`` of each sample of the batch."""
        return [float(self.model.get_score(chat_of(plan.samples[i]), list(plan.samples[i].images))) for i in batch]

    def score_candidates(self, prompt: Any, responses, images: Any = None) -> list[float]:
        """Rewards of N responses to one prompt (one ``get_score`` call each)."""
        from .inputs import make_sample

        return self.score_samples([make_sample(prompt, r, images, i) for i, r in enumerate(responses)])
