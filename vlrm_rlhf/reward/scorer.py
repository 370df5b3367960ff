"""Batched reward scoring with a VLRM (or its ablations and baselines) on conversations with images.

``VLRewardScorer.score`` renders each sample with the model's chat template (date-independent), groups
samples into micro-batches under a token budget, pads with the RM's pad id and reads the reward at the last
real token. ``score_candidates`` scores N responses to one (images, prompt) and encodes the images and the
prompt once: the prefix KV cache is reused for every candidate. ``RemoteCodeScorer`` (end of the module) scores a
reward model that ships its own ``get_score(chat, images)`` code, only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import VLRMError
from ..models.loading import RemoteCodeError, pretrained, remote_code_refusal
from .chat import apply_template
from .inputs import InputError, Sample, make_sample
from .prefix import PrefixScorer

log = logging.getLogger(__name__)
Mode = Literal["vlrm", "no_image", "text_rm", "cascade"]
FIXED_DATE = datetime(2024, 7, 26)  # rendered wherever a chat template asks for "today"
CAPTION_PROMPT = "Describe the image."


@dataclass
class Plan:
    """Samples ready to score: rendered (and truncated) texts, token lengths, micro-batches of indices."""

    samples: list[Sample]
    texts: list[str]
    lengths: list[int]
    batches: list[list[int]]


class ScorerError(VLRMError, ValueError):
    """A model or mode that cannot score the given inputs."""


def render(owner, messages: list[dict], *, plain_text: bool = False) -> str:
    """Chat-template text of a conversation, with a fixed date so rewards never depend on the day."""
    if plain_text:
        # one string per message (text RM templates often accept nothing else); blocks become lines
        messages = [{"role": m["role"], "content": "\n".join(b["text"] for b in m["content"] if b.get("type") == "text")}
                    for m in messages]
    if getattr(owner, "chat_template", None) is None and getattr(getattr(owner, "tokenizer", None), "chat_template", None) is None:
        return "\n".join(f"{m['role']}: {m['content'] if isinstance(m['content'], str) else ' '.join(b.get('text', '') for b in m['content'])}" for m in messages)
    return render_chat(owner, messages)


def render_chat(owner, messages: list[dict], *, generation_prompt: bool = False) -> str:
    """``owner.apply_chat_template`` as text with "today" pinned (``date_kwargs``): the one rendering that the
    scorer, best-of-n generation and the LVLM judge share, so a prompt renders the same everywhere. A template's
    refusal of a system message is handled by folding it into the first user turn (``chat.apply_template``)."""
    return apply_template(owner, messages, add_generation_prompt=generation_prompt, **date_kwargs(owner))


def date_kwargs(owner) -> dict[str, Any]:
    """Pin "today" for templates that print a date (Llama 3.x): ``date_string`` is set and every
    ``strftime_now("fmt")`` call is replaced by the fixed date's literal, so rewards never depend on the day."""
    tpl = getattr(owner, "chat_template", None) or getattr(getattr(owner, "tokenizer", None), "chat_template", None)
    if not isinstance(tpl, str):
        return {}
    kw: dict[str, Any] = {}
    if "date_string" in tpl:
        kw["date_string"] = FIXED_DATE.strftime("%d %b %Y")
    if "strftime_now" in tpl:
        kw["chat_template"] = _STRFTIME.sub(lambda m: repr(FIXED_DATE.strftime(m.group(2))), tpl)
    return kw


_STRFTIME = re.compile(r"strftime_now\(\s*(['\"])(.*?)\1\s*\)")


def context_limit(tokenizer, text_config) -> int | None:
    """The longest sequence the reward model can score: the tokenizer's ``model_max_length`` (unless it is
    transformers' huge "no limit" sentinel) capped by the model's ``max_position_embeddings``; None if neither."""
    limits = [getattr(tokenizer, "model_max_length", None), getattr(text_config, "max_position_embeddings", None)]
    known = [int(x) for x in limits if isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 10_000_000]
    return min(known) if known else None


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """A torch dtype from a dtype or its name (``"bfloat16"``, ``"bf16"``, ...); ``"auto"`` (the checkpoint's own
    dtype) and None pass through; anything else is a ``ScorerError`` listing the names."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPE_NAMES:
        raise ScorerError(f"unknown dtype {dtype!r}: use auto, {', '.join(sorted(_DTYPE_NAMES))}")
    return _DTYPE_NAMES[name]


def _is_vlm(config) -> bool:
    return config.get_text_config() is not config


class VLRewardScorer:
    """Scores conversations with a VLRM; modes ``vlrm``, ``no_image``, ``text_rm`` and ``cascade``.

    ``model``/``processor`` are the reward model and its processor (a tokenizer for a text RM). ``cascade``
    needs ``captioner``/``captioner_processor``: an LVLM that describes the images for the text RM.
    """

    def __init__(
        self,
        model,
        processor,
        *,
        mode: Mode = "vlrm",
        captioner=None,
        captioner_processor=None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_length: int | None = None,
        max_batch_tokens: int = 8192,
        caption_max_new_tokens: int = 48,
    ):
        if mode not in ("vlrm", "no_image", "text_rm", "cascade"):
            raise ScorerError(f"unknown mode {mode!r}: use vlrm, no_image, text_rm or cascade")
        self.mode = mode
        dtype = resolve_dtype(dtype)
        dtype = dtype if isinstance(dtype, torch.dtype) else None  # "auto": keep what the weights were loaded as
        if len({str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}) > 1:
            # spread over devices by a device_map: inputs go where the embeddings are; never move the model
            self.device = model.get_input_embeddings().weight.device
            self.model = model.eval()
        else:
            self.device = torch.device(device) if device is not None else next(model.parameters()).device
            self.model = model.to(self.device, **({"dtype": dtype} if dtype else {})).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        vlm = _is_vlm(model.config)
        if mode in ("vlrm", "no_image") and not vlm:
            raise ScorerError(
                f"mode {mode} needs a vision-language reward model, got a text model "
                f"({type(model).__name__}); use mode='text_rm' for a text RM, or merge one with `vlrm-rlhf merge`"
            )
        if mode in ("text_rm", "cascade") and vlm:
            raise ScorerError(f"mode {mode} scores with a text RM, got {type(model).__name__}")
        if mode == "cascade" and captioner is None:
            raise ScorerError("mode cascade needs a captioner LVLM (lvlm=... in from_pretrained)")
        self.captioner, self.captioner_processor = captioner, captioner_processor
        self.caption_max_new_tokens = caption_max_new_tokens
        cfg = model.config.get_text_config()
        self.pad_id = cfg.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.pad_token_id
            warnings.warn("the reward model's config has no pad_token_id: scoring one sample per forward", stacklevel=2)
        elif self.tokenizer.pad_token_id != self.pad_id:
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(self.pad_id)
        self.max_length = max_length or context_limit(self.tokenizer, cfg)
        self.max_batch_tokens = max_batch_tokens
        self._prefix = PrefixScorer(self) if mode == "vlrm" else None
        self._captions: dict[int, str] = {}
        self._image_extra: dict[tuple, int] = {}

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, mode: Mode = "vlrm", lvlm: str | Path | None = None,
        device: str | None = None, dtype: torch.dtype | str | None = None, device_map: Any = None,
        attn_implementation: str | None = None, trust_remote_code: bool = False, **kw: Any,
    ) -> VLRewardScorer:
        """Load from a directory: a VLRM (modes vlrm/no_image) or a text RM (text_rm; cascade with ``lvlm``).

        A VLRM is a ``*ForSequenceClassification`` (merged, converted, or transformers' own such as Gemma3's) or a
        causal VLM with a TRL value head (``models/value_head.py``). A checkpoint that needs its own Python code
        (``auto_map``, e.g. a ``get_score(chat, images)`` API) loads only with ``trust_remote_code=True``.
        The weights load straight into ``dtype`` (a torch dtype or its name, e.g. ``"bfloat16"``) on ``device``, or
        spread by ``device_map`` (e.g. ``"auto"`` over several GPUs): never a full fp32 copy in CPU memory first.
        ``attn_implementation`` (``"sdpa"``, ``"flash_attention_2"``, ``"eager"``) goes to transformers as is.
        """
        import json

        from transformers import AutoModelForImageTextToText, AutoModelForSequenceClassification

        from ..models import modeling  # noqa: F401  (registers the VLRM classes)
        from ..models.families import get_family
        from ..models.loading import load_tokenizer
        from ..models.processing import load_processor
        from ..models.value_head import find_value_head, load_value_head_vlrm

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ScorerError(f"no config.json in reward model directory {path}")
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("auto_map"):
            return RemoteCodeScorer.from_pretrained(path, mode=mode, device=device, dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
        is_vlm = "text_config" in cfg or "vision_config" in cfg
        value_head = False
        if mode in ("vlrm", "no_image"):
            if not is_vlm:
                raise ScorerError(f"{path} is a text reward model ({cfg.get('model_type')}); mode {mode} needs a VLRM: "
                                  "merge one with `vlrm-rlhf merge`, or use mode='text_rm'")
            get_family(cfg.get("model_type", "?"), where=str(path))
            if not any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures", [])):
                if find_value_head(path) is None:
                    raise ScorerError(f"{path} is not a reward model (architectures={cfg.get('architectures')}, and "
                                      "no value head v_head.summary.* in value_head.safetensors or the shards)")
                value_head = True
        dtype = resolve_dtype(dtype)
        if device_map is not None and device is not None:
            raise ScorerError(f"give device ({device!r}) or device_map ({device_map!r}), not both")
        load = {k: v for k, v in {"dtype": dtype, "device_map": device_map if device_map is not None else device,
                                  "attn_implementation": attn_implementation}.items() if v is not None}
        model = (load_value_head_vlrm(path, **load) if value_head
                 else pretrained(AutoModelForSequenceClassification, path, **load))
        proc = load_processor(path) if is_vlm else load_tokenizer(path)
        if proc is None:
            raise ScorerError(f"{path} ships no tokenizer: a text reward model needs one")
        cap = cap_proc = None
        if mode == "cascade":
            if lvlm is None:
                raise ScorerError("mode cascade needs lvlm=<LVLM directory> to caption the images")
            cap = pretrained(AutoModelForImageTextToText, lvlm, **load).eval()
            cap_proc = load_processor(lvlm)
        return cls(model, proc, mode=mode, captioner=cap, captioner_processor=cap_proc, device=device, dtype=dtype, **kw)

    # ---- public API --------------------------------------------------------------------------------------
    def score(
        self,
        conversations: Sequence[Any] | None = None,
        *,
        prompts: Sequence[Any] | None = None,
        responses: Sequence[Any] | None = None,
        images: Sequence[Any] | None = None,
    ) -> list[float]:
        """Rewards for whole conversations, or for (prompt, response) pairs; ``images[i]``: sample i's images."""
        samples = self.samples(conversations, prompts=prompts, responses=responses, images=images)
        return self.score_samples(samples)

    def samples(self, conversations=None, *, prompts=None, responses=None, images=None) -> list[Sample]:
        """Normalise any accepted input form into Samples (validating images and placeholders)."""
        if conversations is not None:
            if prompts is not None or responses is not None:
                raise InputError("give either conversations or (prompts, responses), not both")
            pairs = [(c, None) for c in conversations]
        else:
            if prompts is None or responses is None or len(prompts) != len(responses):
                raise InputError("prompts and responses must both be given, with equal lengths")
            pairs = list(zip(prompts, responses, strict=True))
        if images is not None and len(images) != len(pairs):
            raise InputError(f"{len(images)} image entries for {len(pairs)} samples")
        return [make_sample(p, r, images[i] if images is not None else None, i) for i, (p, r) in enumerate(pairs)]

    def score_candidates(self, prompt: Any, responses: Sequence[Any], images: Any = None) -> list[float]:
        """Rewards of N responses to one prompt; images and prompt are encoded once (prefix KV reuse)."""
        samples = [make_sample(prompt, r, images, i) for i, r in enumerate(responses)]
        if self._prefix is not None and len(samples) > 1:
            out = self._prefix.score(samples)
            if out is not None:
                return out
        return self.score_samples(samples)

    @torch.no_grad()
    def score_samples(self, samples: list[Sample]) -> list[float]:
        """Rewards for Samples, micro-batched under the token budget, in input order."""
        plan = self.plan(samples)
        out: list[float] = [0.0] * len(plan.samples)
        for batch in plan.batches:
            for i, v in zip(batch, self.forward(plan, batch), strict=True):
                out[i] = v
        bad = [i for i, v in enumerate(out) if not math.isfinite(v)]
        if bad:  # logged, never silent: callers (VLRMReward) decide whether to raise or drop them
            warnings.warn(f"non-finite reward for sample(s) {bad[:10]}", stacklevel=2)
        return out

    def plan(self, samples: list[Sample]) -> Plan:
        """Apply the mode, render, truncate, and group into micro-batches (sorted by length, images apart)."""
        samples = [self._for_mode(s) for s in samples]
        texts, lengths = [], []
        for i, s in enumerate(samples):
            t, n = self._text_and_length(s, i)
            texts.append(t)
            lengths.append(n)
        order = sorted(range(len(samples)), key=lambda i: (bool(samples[i].images), lengths[i]))
        return Plan(samples, texts, lengths, list(self._batches(order, lengths, samples)))

    @torch.no_grad()
    def forward(self, plan: Plan, batch: list[int]) -> list[float]:
        """Rewards of one micro-batch of a plan (one reward-model forward)."""
        enc = self.encode([plan.texts[i] for i in batch], [plan.samples[i].images for i in batch])
        return self.model(**enc, use_cache=False).logits[:, 0].float().tolist()

    # ---- internals ----------------------------------------------------------------------------------------
    def _for_mode(self, s: Sample) -> Sample:
        if self.mode in ("no_image", "text_rm"):
            return s.without_images()
        if self.mode == "cascade":
            return self._caption(s)
        return s

    def _render(self, s: Sample, i: int) -> str:
        return render(self.processor, s.messages, plain_text=self.mode in ("text_rm", "cascade"))

    def encode(self, texts: list[str], images: list[list]) -> dict[str, torch.Tensor]:
        """Processor call for a micro-batch (padding with the RM's pad id), moved to the device."""
        kw: dict[str, Any] = {"return_tensors": "pt", "padding": True, "add_special_tokens": False}
        if any(images):
            enc = self.processor(text=texts, images=images, **kw)
        else:
            enc = self.tokenizer(texts, **kw)
        # floating inputs (pixels) follow the model's dtype: bf16 models, or ZeRO-3 engines in bf16
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                if torch.is_tensor(v) else v for k, v in dict(enc).items()}

    def _length(self, text: str, images: list) -> int:
        """Token count of a rendered sample. With images, the processor's expansion is measured once per image
        signature (count, sizes, modes) and added to the text's token count: image preprocessing, the costly
        part, then runs once per batch instead of once more per sample."""
        n_text = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not images:
            return n_text
        key = tuple((getattr(im, "size", None), getattr(im, "mode", None)) for im in images)
        if key not in self._image_extra:
            self._image_extra[key] = int(self.encode([text], [images])["input_ids"].shape[1]) - n_text
        return n_text + self._image_extra[key]

    def _text_and_length(self, s: Sample, i: int) -> tuple[str, int]:
        """Rendered text and token count of a sample, after truncating its prompt to ``max_length``."""
        text = self._render(s, i)
        n = self._length(text, s.images)
        if self.max_length is not None and n > self.max_length:
            n = int(self.encode([text], [s.images])["input_ids"].shape[1])  # exact, where it matters
        if self.max_length is not None and n > self.max_length:
            self._truncate(s, n - self.max_length, i)
            text = self._render(s, i)
            n = int(self.encode([text], [s.images])["input_ids"].shape[1])
        return text, n

    def _truncate(self, s: Sample, excess: int, i: int) -> None:
        """Cut ``excess`` tokens from the start of the prompt's text, never from the response or images."""
        prompt_blocks = [b for m in s.messages if m["role"] != "assistant" for b in m["content"] if b.get("type") == "text"]
        available = sum(len(self.tokenizer(b["text"], add_special_tokens=False)["input_ids"]) for b in prompt_blocks)
        if available <= excess:
            raise InputError(
                f"sample {i}: the response (with images and template) is longer than the context "
                f"(max_length={self.max_length}); it cannot be truncated without cutting the response"
            )
        warnings.warn(f"sample {i}: prompt truncated by {excess} tokens from the left to fit max_length={self.max_length}",
                      stacklevel=3)
        for b in prompt_blocks:
            ids = self.tokenizer(b["text"], add_special_tokens=False)["input_ids"]
            cut = min(excess, len(ids))
            b["text"] = self.tokenizer.decode(ids[cut:])
            excess -= cut
            if excess <= 0:
                break
        if excess > 0:  # the decode/re-encode round trip may need one more token
            self._truncate(s, excess, i)

    def _batches(self, order: list[int], lengths: list[int], samples: list[Sample]):
        """Consecutive groups (sorted by length) with batch × longest ≤ max_batch_tokens; image/no-image apart."""
        batch: list[int] = []
        longest = 0
        one = self.pad_id is None
        for i in order:
            n = max(longest, lengths[i])
            mixed = batch and bool(samples[batch[0]].images) != bool(samples[i].images)
            if batch and (one or mixed or n * (len(batch) + 1) > self.max_batch_tokens):
                yield batch
                batch, n = [], lengths[i]
            batch.append(i)
            longest = n
        if batch:
            yield batch

    @torch.no_grad()
    def _caption(self, s: Sample) -> Sample:
        """Cascade: replace each image by the captioner's greedy description of it."""
        if not s.images:
            return s
        descs = []
        for im in s.images:
            key = hash(im.tobytes()) ^ hash(im.size)
            if key not in self._captions:
                msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
                text = self.captioner_processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                enc = self.captioner_processor(text=[text], images=[[im]], return_tensors="pt")
                out = self.captioner.generate(**enc, max_new_tokens=self.caption_max_new_tokens, do_sample=False)
                tok = getattr(self.captioner_processor, "tokenizer", self.captioner_processor)
                self._captions[key] = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            descs.append(self._captions[key])
        it = iter(descs)
        msgs = []
        for m in s.messages:
            content = [{"type": "text", "text": f"Image description: {next(it)}"} if b.get("type") == "image" else b
                       for b in m["content"]]
            msgs.append({**m, "content": content})
        return Sample(msgs, [])


# ---- reward models with their own code (IXC-2.5-Reward style get_score API) ------------------------------
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
