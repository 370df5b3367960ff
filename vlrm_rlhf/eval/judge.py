"""A generative LVLM as a judge: score a response by its likelihood, or by asking the LVLM "yes or no?".

Kinds:

* ``loglik_sum``: sum of the log-probabilities of the response tokens given the (images + query) prompt,
  rendered with the LVLM's chat template (the response is the assistant turn);
* ``loglik_mean``: the same divided by the number of response tokens (no bias towards short answers);
* ``yes_no``: the template (default ``DEFAULT_TEMPLATE``) shows the question and the answer and asks "yes or
  no?"; the score is ``log p(yes) - log p(no)`` for the first generated token.

Response tokens are located without assuming anything about the template: the prompt is rendered with the
generation prompt, the conversation with the response as the assistant turn, and the former must be a
prefix of the latter (text and tokens). Where it is not, the judge falls back to the prompt text followed
directly by the response text (warning once). End-of-turn tokens after the response are not scored.
Batches are right-padded, run under ``torch.no_grad`` in eval mode, and only the needed logits are kept.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import VLRMError
from ..models.loading import pretrained
from ..reward.inputs import InputError, Sample, make_sample
from ..reward.scorer import render_chat

__all__ = ["DEFAULT_TEMPLATE", "JUDGE_KINDS", "JudgeError", "LVLMJudge"]

JudgeKind = Literal["loglik_sum", "loglik_mean", "yes_no"]
JUDGE_KINDS = ("loglik_sum", "loglik_mean", "yes_no")
DEFAULT_TEMPLATE = "Question: {question}\nAnswer: {answer}\nIs the answer correct and helpful? Answer yes or no."


class JudgeError(VLRMError, ValueError):
    """A judge model, tokenizer or setting that cannot judge; the message says why."""


class LVLMJudge:
    """Scores (prompt, response) pairs with a generative LVLM; same ``score``/``score_samples`` API as
    ``VLRewardScorer``, so evaluation code treats both alike (higher = better)."""

    def __init__(
        self,
        model,
        processor,
        *,
        kind: JudgeKind = "loglik_sum",
        template: str = DEFAULT_TEMPLATE,
        answers: tuple[str, str] = ("yes", "no"),
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 8,
    ):
        if kind not in JUDGE_KINDS:
            raise JudgeError(f"unknown judge kind {kind!r}: use {', '.join(JUDGE_KINDS)}")
        if batch_size < 1:
            raise JudgeError(f"batch_size must be >= 1, got {batch_size}")
        self.kind, self.template, self.batch_size = kind, template, batch_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device, **({"dtype": dtype} if dtype else {})).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._owner = processor if getattr(processor, "chat_template", None) is not None else self.tokenizer
        if getattr(self._owner, "chat_template", None) is None:
            raise JudgeError(f"the judge's processor ({type(processor).__name__}) has no chat template")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._warned = False
        if kind == "yes_no":
            try:
                template.format(question="q", answer="a")
            except (KeyError, IndexError, ValueError) as e:
                raise JudgeError(f"judge template must use only {{question}} and {{answer}} ({e!r}): {template!r}") from None
            self.answer_ids = self._answer_ids(answers)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, kind: JudgeKind = "loglik_sum", device: str | None = None,
        dtype: torch.dtype | None = None, **kw: Any,
    ) -> LVLMJudge:
        """Load a generative LVLM directory (``AutoModelForImageTextToText`` + its processor) as a judge."""
        from transformers import AutoModelForImageTextToText

        from ..models.processing import load_processor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise JudgeError(f"no config.json in judge model directory {path}")
        cfg = json.loads((path / "config.json").read_text())
        archs = cfg.get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            raise JudgeError(f"{path} is a reward model ({archs[0]}); the judge needs a generative LVLM "
                             "(an ...ForConditionalGeneration directory)")
        if "vision_config" not in cfg and "text_config" not in cfg:
            raise JudgeError(f"{path} is a text model ({cfg.get('model_type')}); the judge needs a vision-language model")
        model = pretrained(AutoModelForImageTextToText, path, **({"dtype": dtype} if dtype else {}))
        return cls(model, load_processor(path), kind=kind, device=device, **kw)

    # ---- public API ---------------------------------------------------------------------------------------
    def score(
        self,
        conversations: Sequence[Any] | None = None,
        *,
        prompts: Sequence[Any] | None = None,
        responses: Sequence[Any] | None = None,
        images: Sequence[Any] | None = None,
    ) -> list[float]:
        """Scores of whole conversations, or of (prompt, response) pairs; ``images[i]``: sample i's images."""
        if conversations is not None:
            if prompts is not None or responses is not None:
                raise InputError("give either conversations or (prompts, responses), not both")
            pairs = [(c, None) for c in conversations]
        else:
            if prompts is None or responses is None or len(prompts) != len(responses):
                raise InputError("prompts and responses must both be given, with equal lengths")
            pairs = list(zip(prompts, responses))
        if images is not None and len(images) != len(pairs):
            raise InputError(f"{len(images)} image entries for {len(pairs)} samples")
        return self.score_samples([make_sample(p, r, images[i] if images is not None else None, i)
                                   for i, (p, r) in enumerate(pairs)])

    def score_samples(self, samples: list[Sample]) -> list[float]:
        """Judge scores of Samples (prompt messages + one assistant response each), in input order."""
        if self.kind == "yes_no":
            return self._yes_no(samples)
        lps = self.response_logprobs(samples)
        return [float(lp.sum()) / (len(lp) if self.kind == "loglik_mean" else 1) for lp in lps]

    @torch.no_grad()
    def response_logprobs(self, samples: list[Sample]) -> list[torch.Tensor]:
        """Per-token log-probabilities (float32, on CPU) of each sample's response given its prompt."""
        items = [self._response_text(*self._split(s, i), i) + (s.images,) for i, s in enumerate(samples)]
        out: list[torch.Tensor | None] = [None] * len(samples)
        for batch in self._batches(items):
            enc, ends = self._encode([items[i][0] for i in batch], [items[i][2] for i in batch])
            starts = [e - items[i][1] for i, e in zip(batch, ends)]
            logits, offset = self._logits(enc, min(starts) - 1)
            ids = enc["input_ids"]
            for row, (i, s, e) in enumerate(zip(batch, starts, ends)):
                lp = logits[row, s - 1 - offset:e - 1 - offset].float().log_softmax(-1)
                out[i] = lp.gather(-1, ids[row, s:e, None].to(lp.device)).squeeze(-1).cpu()
        return out  # type: ignore[return-value]

    # ---- internals ----------------------------------------------------------------------------------------
    def _split(self, s: Sample, i: int) -> tuple[list[dict], str]:
        """(prompt messages, response text) of a sample."""
        prompt = [m for m in s.messages if m["role"] != "assistant"]
        response = s.text_of("assistant")
        if not response.strip() or len(prompt) == len(s.messages):
            raise InputError(f"sample {i}: the judge needs a response (an assistant turn)")
        return prompt, response

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return render_chat(self._owner, messages, generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _response_text(self, prompt: list[dict], response: str, i: int = 0) -> tuple[str, int]:
        """Text of prompt + response (without the end of the turn) and the response's token count in it."""
        p = self._render(prompt, True)
        f = self._render(prompt + [{"role": "assistant", "content": [{"type": "text", "text": response}]}], False)
        k = f.find(response, len(p)) if f.startswith(p) else -1
        if k >= 0:
            cut = max(len(p), len(f[:k].rstrip()))  # whitespace before the response belongs to its tokens
            text, ids_p = f[:k + len(response)], self._ids(f[:cut])
            ids = self._ids(text)
            if ids[:len(ids_p)] == ids_p and len(ids) > len(ids_p):
                return text, len(ids) - len(ids_p)
            reason = "the response's tokens do not extend the prompt's tokens"
        else:
            reason = "the generation prompt is not a prefix of the rendered conversation"
        if not self._warned:
            warnings.warn(f"judge: {reason} under this chat template (sample {i}); scoring the prompt text "
                          "followed directly by the response text", stacklevel=3)
            self._warned = True
        text = p + response
        ids_p, ids = self._ids(p), self._ids(text)
        common = next((j for j, (a, b) in enumerate(zip(ids_p, ids)) if a != b), min(len(ids_p), len(ids)))
        if len(ids) <= common:
            raise JudgeError(f"sample {i}: the response {response[:40]!r} has no tokens of its own")
        return text, len(ids) - common

    def _answer_ids(self, answers: tuple[str, str]) -> tuple[int, int]:
        """Token ids of the yes/no answers as the first token after the generation prompt."""
        probe = [{"role": "user", "content": [{"type": "text", "text": "question"}]}]
        ids = []
        for w in answers:
            text, n = self._response_text(probe, w)
            toks = self._ids(text)[-n:]
            unk = self.tokenizer.unk_token_id
            if n != 1 or toks[0] == unk:
                pieces = self.tokenizer.convert_ids_to_tokens(toks)
                raise JudgeError(f"judge kind yes_no needs {w!r} to be one known token after the generation prompt; "
                                 f"this tokenizer gives {pieces} — choose other answers (answers=...) or use "
                                 "kind loglik_sum / loglik_mean")
            ids.append(toks[0])
        if ids[0] == ids[1]:
            raise JudgeError(f"judge answers {answers} map to the same token")
        return ids[0], ids[1]

    @torch.no_grad()
    def _yes_no(self, samples: list[Sample]) -> list[float]:
        items = []
        for i, s in enumerate(samples):
            prompt, response = self._split(s, i)
            others = [m for m in prompt if m["role"] != "user"]
            text = self.template.format(question=s.text_of("user"), answer=response)
            blocks = [{"type": "image"} for _ in s.images] + [{"type": "text", "text": text}]
            items.append((self._render(others + [{"role": "user", "content": blocks}], True), 0, s.images))
        out = [0.0] * len(samples)
        yes, no = self.answer_ids
        for batch in self._batches(items):
            enc, ends = self._encode([items[i][0] for i in batch], [items[i][2] for i in batch])
            logits, offset = self._logits(enc, min(ends) - 1)
            for row, (i, e) in enumerate(zip(batch, ends)):
                lp = logits[row, e - 1 - offset].float().log_softmax(-1)
                out[i] = float(lp[yes] - lp[no])
        return out

    def _batches(self, items: list[tuple[str, int, list]]):
        """Groups of ``batch_size`` indices of similar text length, samples with and without images apart."""
        order = sorted(range(len(items)), key=lambda i: (bool(items[i][2]), len(items[i][0])))
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size or bool(items[batch[0]][2]) != bool(items[i][2])):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _encode(self, texts: list[str], images: list[list]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Right-padded model inputs on the device and each row's end (index after its last real token)."""
        kw: dict[str, Any] = {"return_tensors": "pt", "padding": True, "add_special_tokens": False,
                              "padding_side": "right"}
        if any(images):
            enc = dict(self.processor(text=texts, images=[list(x) for x in images], **kw))
        else:
            enc = dict(self.tokenizer(texts, **kw))
        mask = enc["attention_mask"]
        ends = [int(m.nonzero().max()) + 1 for m in mask]
        if any(int(m[:e].sum()) != e for m, e in zip(mask, ends)):
            raise JudgeError("the processor padded on the left; the judge needs right padding")
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) if torch.is_tensor(v)
                else v for k, v in enc.items()}, ends

    def _logits(self, enc: dict[str, torch.Tensor], first: int) -> tuple[torch.Tensor, int]:
        """Logits from position ``first`` on (fewer kept where the model allows), and the offset of index 0."""
        t = int(enc["input_ids"].shape[1])
        kw = {"logits_to_keep": t - first} if self._keep else {}
        logits = self.model(**enc, use_cache=False, **kw).logits
        return logits, t - int(logits.shape[1])
