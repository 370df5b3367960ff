"""Tiny, related checkpoints ("trios") for every supported LVLM family.

A VLRM is built by merging a text reward model (RM) into a vision-language model (LVLM) whose
language model shares the RM's backbone.  Tests, benchmarks and the README demo need such a
family of checkpoints without hub access, so :func:`build_trio` fabricates one from configs:

* ``base``: the family's text ``*ForCausalLM`` (the common ancestor, random init);
* ``lvlm``: the family's ``*ForConditionalGeneration``: LM = base + small seeded delta (a
  "fine-tune"), random vision tower/projector, image tokens appended at the END of the vocab;
* ``rm``: a text ``*ForSequenceClassification`` (``num_labels=1``) = base + another delta;
* ``llm``: a text ``*ForCausalLM`` = base + a third delta.

Everything is deterministic for a seed (byte-identical safetensors) and takes well under a
second per family.  With ``layout="hub"`` the LVLM's safetensors use the original hub key names,
obtained by *reversing transformers' own checkpoint conversion rules* for the model class, so the
loader's renaming path is exercised exactly as with real checkpoints; ``layout="transformers"``
writes loaded-module names (``model.language_model.*``).  Note that a plain ``save_pretrained``
of a VLM built from config writes neither: it reverts the renames except ``PrefixChange`` ones
(e.g. ``language_model.model.*`` but ``vision_tower.embeddings.*``).  Qwen families use a
byte-level BPE tokenizer instead of WordLevel, see :func:`_backend_json`.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tokenizers as tk
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerFast
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from ..merge.schedules import split_layer
from ..models.families import FAMILIES as FAMILY_TABLE

__all__ = ["FAMILIES", "SPECS", "FamilySpec", "build_trio", "demo_image", "hub_key_map", "lm_key_map",
           "lvlm_inputs", "write_quick_recipe", "write_value_head"]

FAMILIES: tuple[str, ...] = tuple(FAMILY_TABLE)  # every supported family, in the package's own order

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
WORDS = (
    "user", "assistant", "system", ":", ".", ",", "?", "!", "the", "a", "an", "is", "are", "was",
    "of", "to", "and", "in", "on", "with", "for", "this", "that", "it", "what", "how", "why",
    "image", "picture", "photo", "shows", "cat", "dog", "red", "blue", "green", "big", "small",
    "good", "bad", "yes", "no", "answer", "question", "describe", "please", "which", "color",
    "one", "two", "three", "there", "here", "man", "woman", "car", "tree", "sky", "helpful", "safe",
)
VISION_HIDDEN = 32  # every vision tower is 2 layers x 32 wide: a forward with an image takes ms
_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] }} :"
    "{%- if message['content'] is string %} {{ message['content'] }}"
    "{%- else %}{% for part in message['content'] %}"
    "{%- if part['type'] == 'image' %} @IMAGE@"
    "{%- elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{%- endfor %}{% endif %} {{ eos_token }}\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}assistant :{% endif -%}"
)


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """How one LVLM family is fabricated (all names checked against transformers 5.23).

    ``make_config(text_kwargs, token_ids)`` returns the LVLM config; ``text_kwargs`` are
    the base text model's config kwargs with ``vocab_size`` already set to ``vocab_rows``.
    The LVLM's own class names come from the package's family table (``models/families.py``).
    """

    model_type: str  # key of the family in ``vlrm_rlhf.models.families.FAMILIES``
    text_config_cls: str  # config of the base text LM (what the VLM's LM corresponds to)
    causal_lm_cls: str
    seq_cls: str
    mm_tokens: tuple[str, ...]  # appended to the base vocab in this order
    image_placeholder: str  # what the chat template writes for one image
    tokenizer: Literal["wordlevel", "bytelevel_bpe"] = "wordlevel"
    make_config: Callable[[dict[str, Any], dict[str, int]], Any]
    image_processor: Callable[[], Any]
    processor_cls: str | None  # None: processor not constructible here (see notes)
    processor_kwargs: Mapping[str, Any] = field(default_factory=dict)
    named_tokens: Mapping[str, str] = field(default_factory=dict)  # tokenizer attributes
    text_extra: Mapping[str, Any] = field(default_factory=dict)  # base text config extras
    vocab_rows: Callable[[int, int], int] = lambda n_base, n_tok: n_tok  # text_config.vocab_size
    image_size: tuple[int, int] = (32, 32)
    # processor_cls None: text of image ``i`` replacing one placeholder, from image inputs + config.json
    randomize: str | None = None  # regex of zero-initialised params that would make images irrelevant
    notes: str = ""

    @property
    def lvlm_cls(self) -> str:
        """The family's generation class (``...ForConditionalGeneration``), from the family table."""
        return FAMILY_TABLE[self.model_type].lvlm_class


def _config_cls(model_type: str) -> Any:
    """The transformers config class of an LVLM family, from the family table."""
    return getattr(tf, FAMILY_TABLE[model_type].config_class)


def _clip_vision(**kw: Any) -> dict[str, Any]:
    return dict(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=2,
                num_attention_heads=4, image_size=32, patch_size=8, **kw)


def _mrope(text: dict[str, Any]) -> dict[str, Any]:
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    return {**text, "rope_parameters": {**text["rope_parameters"], "mrope_section": section}}


def _cross_layers(n_base_layers: int) -> list[int]:
    """Mllama cross-attention layer indices for a base with ``n_base_layers`` (e.g. 2 -> [1])."""
    return [1 + 2 * i for i in range(max(1, n_base_layers // 2))]


_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _llava_cfg(model_type: str, **extra: Any) -> Callable[[dict, dict[str, int]], Any]:
    def make(t: dict, ids: dict[str, int]) -> Any:
        return _config_cls(model_type)(text_config=tf.LlamaConfig(**t), vision_config=tf.CLIPVisionConfig(**_clip_vision()),
                                image_token_index=ids["<image>"], image_seq_length=16, pad_token_id=t["pad_token_id"],
                                **extra)
    return make


def _mllama_cfg(t: dict, ids: dict[str, int]) -> Any:
    cross = _cross_layers(t["num_hidden_layers"])
    text = tf.MllamaTextConfig(**{**t, "num_hidden_layers": t["num_hidden_layers"] + len(cross)},
                               cross_attention_layers=cross)
    vision = tf.MllamaVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
                                   num_hidden_layers=2, num_global_layers=1, attention_heads=4, image_size=32,
                                   patch_size=8, max_num_tiles=4, intermediate_layers_indices=[0],
                                   vision_output_dim=2 * VISION_HIDDEN)
    return _config_cls("mllama")(text_config=text, vision_config=vision, image_token_index=ids["<|image|>"])


def _qwen_cfg(model_type: str, vision: Callable[[int], dict[str, Any]]) -> Callable[[dict, dict[str, int]], Any]:
    def make(t: dict, ids: dict[str, int]) -> Any:
        return _config_cls(model_type)(text_config=_mrope(t), vision_config=vision(t["hidden_size"]),
                                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return make


def _idefics_cfg(model_type: str, vcls: str) -> Callable[[dict, dict[str, int]], Any]:
    def make(t: dict, ids: dict[str, int]) -> Any:
        vision = getattr(tf, vcls)(**_clip_vision())
        return _config_cls(model_type)(text_config=tf.LlamaConfig(**t), vision_config=vision,
                                image_token_id=ids["<image>"], scale_factor=2, pad_token_id=t["pad_token_id"])
    return make


def _gemma3_cfg(t: dict, ids: dict[str, int]) -> Any:
    return _config_cls("gemma3")(text_config=tf.Gemma3TextConfig(**t), vision_config=tf.SiglipVisionConfig(**_clip_vision(vision_use_head=False)),
                           mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"],
                           eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"])


_IDEFICS_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
_IDEFICS_IMAGE = dict(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
_QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _qwen_image() -> Any:
    return tf.Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})


_LLAMA = dict(text_config_cls="LlamaConfig", causal_lm_cls="LlamaForCausalLM", seq_cls="LlamaForSequenceClassification")
_QWEN: dict[str, Any] = dict(  # shared by Qwen2-VL and Qwen2.5-VL
    text_config_cls="Qwen2Config", causal_lm_cls="Qwen2ForCausalLM", seq_cls="Qwen2ForSequenceClassification",
    mm_tokens=_QWEN_TOKENS, image_placeholder="<|vision_start|><|image_pad|><|vision_end|>", tokenizer="bytelevel_bpe",
    image_processor=_qwen_image, processor_cls=None, image_size=(56, 56),
    named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                  "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    notes="AutoProcessor needs torchvision (video processor): tokenizer + image processor saved separately; "
          "byte-level BPE tokenizer because AutoTokenizer forces Qwen2Tokenizer for model_type qwen2")

SPECS: dict[str, FamilySpec] = {
    "llava": FamilySpec(
        model_type="llava", **_LLAMA, mm_tokens=("<image>",), image_placeholder="<image>",
        make_config=_llava_cfg("llava"), processor_cls="LlavaProcessor", named_tokens={"image_token": "<image>"},
        image_processor=lambda: tf.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                         crop_size={"height": 32, "width": 32}),
        processor_kwargs=dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1),
        vocab_rows=lambda n_base, n_tok: -(-n_tok // 16) * 16,  # LLaVA-1.5 style padding rows (32064 vs 32002)
        notes="embed/lm_head padded to a multiple of 16 rows beyond the tokenizer length"),
    "llava_next": FamilySpec(
        model_type="llava_next", **_LLAMA, mm_tokens=("<image>",), image_placeholder="<image>",
        make_config=_llava_cfg("llava_next", image_grid_pinpoints=_PINPOINTS), processor_cls="LlavaNextProcessor", named_tokens={"image_token": "<image>"},
        image_processor=lambda: tf.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, image_grid_pinpoints=_PINPOINTS,
                                                              crop_size={"height": 32, "width": 32}),
        processor_kwargs=dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1),
        image_size=(40, 56)),
    "mllama": FamilySpec(
        model_type="mllama", **_LLAMA, mm_tokens=("<|image|>",), image_placeholder="<|image|>",
        make_config=_mllama_cfg, processor_cls="MllamaProcessor", randomize=r"cross_attn_(attn|mlp)_gate$",
        image_processor=lambda: tf.MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=4),
        vocab_rows=lambda n_base, n_tok: n_base,  # embed_tokens gets vocab+8 rows, lm_head vocab rows
        notes="embed_tokens has vocab+8 rows (<|image|> = first extra row), lm_head vocab rows; "
              "cross-attention layers interleaved at text_config.cross_attention_layers; their zero-init "
              "gates set to random so images matter"),
    "qwen2_vl": FamilySpec(model_type="qwen2_vl", **_QWEN, make_config=_qwen_cfg(
        "qwen2_vl", lambda h: dict(depth=2, embed_dim=VISION_HIDDEN, hidden_size=h, num_heads=4, mlp_ratio=2))),
    "qwen2_5_vl": FamilySpec(model_type="qwen2_5_vl", **_QWEN, make_config=_qwen_cfg(
        "qwen2_5_vl", lambda h: dict(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
                                           num_heads=4, out_hidden_size=h, fullatt_block_indexes=[1], window_size=56))),
    "idefics3": FamilySpec(
        model_type="idefics3", **_LLAMA, mm_tokens=_IDEFICS_TOKENS, image_placeholder="<image>",
        make_config=_idefics_cfg("idefics3", "Idefics3VisionConfig"), processor_cls="Idefics3Processor",
        image_processor=lambda: tf.Idefics3ImageProcessorPil(**_IDEFICS_IMAGE), processor_kwargs={"image_seq_len": 4}),
    "smolvlm": FamilySpec(
        model_type="smolvlm", **_LLAMA, mm_tokens=_IDEFICS_TOKENS, image_placeholder="<image>",
        make_config=_idefics_cfg("smolvlm", "SmolVLMVisionConfig"), processor_cls=None,
        image_processor=lambda: tf.SmolVLMImageProcessorPil(**_IDEFICS_IMAGE),
        named_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                      "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"},
        notes="SmolVLMProcessor needs num2words and a torchvision video processor: tokenizer + image "
              "processor saved separately; prompt = <fake_token_around_image><global-img><image>*4<fake_...>"),
    "gemma3": FamilySpec(
        model_type="gemma3", text_config_cls="Gemma3TextConfig", causal_lm_cls="Gemma3ForCausalLM",
        seq_cls="Gemma3TextForSequenceClassification",
        mm_tokens=("<start_of_image>", "<end_of_image>", "<image_soft_token>"), image_placeholder="<start_of_image>",
        make_config=_gemma3_cfg, processor_cls="Gemma3Processor", processor_kwargs={"image_seq_length": 4},
        randomize=r"mm_input_projection_weight$",
        image_processor=lambda: tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        named_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                      "image_token": "<image_soft_token>"},
        text_extra={"tie_word_embeddings": True, "sliding_window": 16},
        notes="lm_head tied to embed_tokens; mm_input_projection_weight (zero-init) set to random"),
}
if set(SPECS) != set(FAMILIES) or any(k != s.model_type for k, s in SPECS.items()):  # the zoo must not drift
    raise RuntimeError(f"zoo specs {sorted(SPECS)} do not match the supported families {sorted(FAMILIES)}")


# ----------------------------------------------------------------------------------------- tokenizer
_QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@functools.cache
def _backend_json(kind: str) -> str:
    """Serialized backend tokenizer: ``wordlevel`` (specials + WORDS) or ``bytelevel_bpe``.

    The byte-level BPE (Qwen families) is laid out exactly as ``Qwen2Tokenizer`` rebuilds it
    (NFC, split regex + ByteLevel, no post-processor), because ``AutoTokenizer`` forces that
    class for ``model_type == "qwen2"`` whatever ``tokenizer_class`` says; a WordLevel
    tokenizer would silently be turned into garbage there.  Trained on WORDS: every word is one
    token, any other text still tokenizes (full byte alphabet); deterministic.
    """
    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    if kind == "wordlevel":
        tok = Tokenizer(tk.models.WordLevel({t: i for i, t in enumerate(SPECIAL_TOKENS + WORDS)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.add_special_tokens(specials)
        tok.post_processor = tk.processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", 1)])
        return tok.to_str()
    tok = Tokenizer(tk.models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = tk.normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(tk.Regex(_QWEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=4096, min_frequency=0, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*WORDS, " ".join(WORDS)], trainer)
    return tok.to_str()


def _tokenizer(kind: str, extra: tuple[str, ...], named: Mapping[str, str], pad: str,
               placeholder: str) -> PreTrainedTokenizerFast:
    """Tokenizer of ``kind`` with ``extra`` special tokens appended at the end of the vocab, in order."""
    tok = Tokenizer.from_str(_backend_json(kind))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token=pad,
        extra_special_tokens=dict(named) or None, model_input_names=["input_ids", "attention_mask"],
        chat_template=_TEMPLATE.replace("@IMAGE@", placeholder), padding_side="left",
    )


# ------------------------------------------------------------------------------------------- weights
def _seed(seed: int, tag: str) -> int:
    return zlib.crc32(f"{seed}:{tag}".encode()) & 0x7FFFFFFF


def _delta(t: torch.Tensor, scale: float, seed: int, tag: str) -> torch.Tensor:
    """Seeded noise of RMS ``scale * rms(t)`` (``scale`` alone for all-zero tensors like Gemma norms)."""
    g = torch.Generator().manual_seed(_seed(seed, tag))
    rms = t.float().pow(2).mean().sqrt().item()
    return torch.randn(t.shape, generator=g) * (scale * (rms if rms > 0 else 1.0))


def _built(cls_name: str, config: Any, seed: int, tag: str) -> PreTrainedModel:
    """Instantiate a model class from config with a private, seeded RNG (caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(seed, tag))
        return getattr(tf, cls_name)(config).float().eval()


def _module_path(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def lm_key_map(base: PreTrainedModel, target: PreTrainedModel) -> dict[str, str]:
    """Map ``target`` parameter names to the ``base`` parameter they derive from.

    The LM is located through the module tree (``get_decoder()``), never a hard-coded prefix;
    layers listed in ``cross_attention_layers`` (Mllama) have no counterpart and text layer ``j``
    maps to base layer ``j - bisect_left(C, j)``.
    """
    bp = _module_path(base, base.get_decoder())
    tp = _module_path(target, target.get_decoder())
    cross = sorted(getattr(target.config.get_text_config(), "cross_attention_layers", None) or [])
    base_names = dict(base.named_parameters())
    out: dict[str, str] = {}
    for name, _ in target.named_parameters():
        if name.startswith(tp + "."):
            rest = name[len(tp) + 1:]
            split = split_layer(rest)
            if split:
                j = split[0]
                if j in cross:
                    continue
                rest = f"layers.{j - bisect.bisect_left(cross, j)}.{split[1]}"
            cand = f"{bp}.{rest}"
        else:
            cand = name  # lm_head.weight (score etc. simply have no counterpart)
        if cand in base_names:
            out[name] = cand
    return out


def _derive(base: PreTrainedModel, target: PreTrainedModel, scale: float, seed: int, tag: str) -> None:
    """Overwrite ``target``'s LM with base + seeded delta (only the base's rows of embeddings)."""
    base_params = dict(base.named_parameters())
    mapping = lm_key_map(base, target)
    missing = set(base_params) - set(mapping.values())
    if target.get_output_embeddings() is None:  # sequence classifier: no lm_head, a `score` instead
        missing.discard(_module_path(base, base.get_output_embeddings()) + ".weight")
    if missing:
        raise RuntimeError(f"{tag}: base tensors without counterpart: {sorted(missing)}")
    with torch.no_grad():
        for name, param in target.named_parameters():
            if name in mapping:
                src = base_params[mapping[name]].detach()
                rows = src.shape[0]
                param[:rows].copy_(src + _delta(src, scale, seed, f"{tag}/{mapping[name]}"))


# -------------------------------------------------------------------------------------------- layout
def hub_key_map(model: PreTrainedModel, keys: list[str] | None = None) -> dict[str, str]:
    """Map loaded-module keys to the original hub checkpoint names.

    Reverses the loader's own conversion rules for the model's class
    (``get_model_conversion_mapping``), in reverse order and with ``PrefixChange`` rules kept
    (``revert_weight_conversion`` drops them for models built from config, which is why a
    fresh model's ``save_pretrained`` writes ``vision_tower.embeddings`` instead of the hub's
    ``vision_tower.vision_model.embeddings``).  Tensor-reshaping converters are not supported.
    """
    rules = [t.reverse_transform() for t in get_model_conversion_mapping(model, add_legacy=False)[::-1]]
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    out = {}
    for key in keys if keys is not None else list(model.state_dict()):
        new, pattern = rename_source_key(key, renamings, converters, reverse=True)
        if pattern is not None:
            raise NotImplementedError(f"{key}: converter {pattern} reshapes tensors")
        out[key] = new
    return out


def _save(model: PreTrainedModel, out: Path, dtype: torch.dtype, hub: bool = False) -> None:
    """Save with loaded-module names; for ``hub`` rewrite the safetensors with hub key names."""
    model.to(dtype).save_pretrained(out, save_original_format=False)
    if hub:
        path = out / "model.safetensors"
        sd = load_file(path)
        names = hub_key_map(model, list(sd))
        save_file({names[k]: v for k, v in sd.items()}, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------- main
def _text_kwargs(spec: FamilySpec, hidden_size: int, num_layers: int, vocab: int) -> dict[str, Any]:
    if hidden_size % 8:
        raise ValueError("hidden_size must be a multiple of 8 (4 heads with an even head_dim)")
    kw = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
              num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if spec.text_config_cls == "Gemma3TextConfig":  # per-layer-type rope; same class on both sides
        kw.update(head_dim=hidden_size // 4, query_pre_attn_scalar=hidden_size // 4)
        del kw["rope_parameters"]
    return {**kw, **spec.text_extra}


def build_trio(
    family: str,
    out_dir: str | Path,
    *,
    layout: Literal["transformers", "hub"] = "transformers",
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    delta_scale: float = 0.02,
    rm_extra_pad_token: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """Write base/lvlm/rm/llm checkpoints of ``family`` under ``out_dir`` and return their dirs.

    ``delta_scale`` is the RMS of each delta relative to the tensor's RMS.  With
    ``rm_extra_pad_token`` the RM's tokenizer gets ``<rm_pad>`` appended (one extra embedding
    row) as its pad token, so merging must align vocabularies by token string.
    """
    if family not in SPECS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if layout not in ("transformers", "hub"):
        raise ValueError(f"layout must be 'transformers' or 'hub', not {layout!r}")
    spec, out = SPECS[family], Path(out_dir)
    dirs = {role: out / role for role in ("base", "lvlm", "rm", "llm")}
    base_tok = _tokenizer(spec.tokenizer, (), {}, "<pad>", "")
    n_base = len(base_tok)
    text = _text_kwargs(spec, hidden_size, num_layers, n_base)
    text_cfg_cls = getattr(tf, spec.text_config_cls)

    def text_model(cls: str, cfg: Any, tokenizer: PreTrainedTokenizerFast, role: str) -> PreTrainedModel:
        model = _built(cls, cfg, seed, role)
        if role != "base":
            _derive(base, model, delta_scale, seed, role)
        model.to(dtype).save_pretrained(dirs[role])
        tokenizer.save_pretrained(dirs[role])
        return model.float()  # derived models start from the base exactly as saved (e.g. rounded to bf16)

    base = text_model(spec.causal_lm_cls, text_cfg_cls(**text), base_tok, "base")
    text_model(spec.causal_lm_cls, text_cfg_cls(**text), base_tok, "llm")
    rm_extra = ("<rm_pad>",) if rm_extra_pad_token else ()
    rm_tok = _tokenizer(spec.tokenizer, rm_extra, {}, "<rm_pad>" if rm_extra else "<pad>", "")
    rm_cfg = text_cfg_cls(**{**text, "vocab_size": len(rm_tok), "pad_token_id": rm_tok.pad_token_id}, num_labels=1)
    text_model(spec.seq_cls, rm_cfg, rm_tok, "rm")

    tok = _tokenizer(spec.tokenizer, spec.mm_tokens, spec.named_tokens, "<pad>", spec.image_placeholder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in spec.mm_tokens}
    cfg = spec.make_config({**text, "vocab_size": spec.vocab_rows(n_base, len(tok))}, ids)
    lvlm = _built(spec.lvlm_cls, cfg, seed, "lvlm")
    _derive(base, lvlm, delta_scale, seed, "lvlm")
    for name, w in lvlm.named_parameters():  # Gemma3 projection / Mllama gates: zero when built from config
        if spec.randomize and re.search(spec.randomize, name):
            g = torch.Generator().manual_seed(_seed(seed, f"lvlm/{name}"))
            with torch.no_grad():
                w.copy_(torch.randn(w.shape, generator=g) * (w.shape[0] ** -0.5 if w.dim() > 1 else 0.5))
    _save(lvlm, dirs["lvlm"], dtype, hub=layout == "hub")
    image_processor = spec.image_processor()
    if spec.processor_cls is not None:
        processor = getattr(tf, spec.processor_cls)(image_processor=image_processor, tokenizer=tok,
                                                    chat_template=tok.chat_template, **spec.processor_kwargs)
        processor.save_pretrained(dirs["lvlm"])
    else:
        tok.save_pretrained(dirs["lvlm"])
        image_processor.save_pretrained(dirs["lvlm"])
    (dirs["lvlm"] / "zoo.json").write_text(json.dumps(
        {"family": family, "layout": layout, "seed": seed, "delta_scale": delta_scale, "image_tokens": ids,
         "image_size": list(spec.image_size), "notes": spec.notes}, indent=1, sort_keys=True) + "\n")
    return dirs


def write_quick_recipe(trio: Mapping[str, str | Path], path: str | Path, method: str = "task_arithmetic",
                       output: str = "vlrm") -> Path:
    """Write a mergekit-style YAML recipe merging ``trio``'s RM into its LVLM over its base.

    Paths are written absolute, as double-quoted (JSON) strings, which YAML reads verbatim.
    """
    path, q = Path(path), {k: json.dumps(str(Path(v).resolve())) for k, v in trio.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"merge_method: {method}\n"
        f"base_model: {q['base']}\n"
        "models:\n"
        f"  - {{model: {q['lvlm']}, role: lvlm, parameters: {{weight: 0.7}}}}\n"
        f"  - {{model: {q['rm']}, role: rm, parameters: {{weight: 0.7}}}}\n"
        "parameters: {normalize: false}\n"
        "dtype: float32\n"
        f"output: {output}\n"
        "seed: 0\n"
    )
    return path


def write_value_head(lvlm_dir: str | Path, out_dir: str | Path, *, storage: Literal["file", "shards"] = "file",
                     seed: int = 0, width: int | None = None, bias: float | None = 0.25) -> Path:
    """A TRL-style value-head VLRM: a copy of the LVLM ``lvlm_dir`` plus ``v_head.summary.weight`` [1, H] (random)
    and ``v_head.summary.bias`` [1] (``bias``; None: no bias), in ``value_head.safetensors`` (``storage="file"``)
    or inside the model shards (``"shards"``). ``width`` overrides H (to build a mismatched head)."""
    import shutil

    from ..models.loading import pretrained

    src, out = Path(lvlm_dir), Path(out_dir)
    shutil.copytree(src, out)
    h = width or pretrained(tf.AutoConfig, src).get_text_config().hidden_size
    g = torch.Generator().manual_seed(_seed(seed, "v_head"))
    head = {"v_head.summary.weight": torch.randn(1, h, generator=g) * h ** -0.5}
    if bias is not None:
        head["v_head.summary.bias"] = torch.tensor([float(bias)])
    if storage == "file":
        save_file(head, out / "value_head.safetensors", metadata={"format": "pt"})
        return out
    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        shard = sorted(set(data["weight_map"].values()))[0]
        data["weight_map"].update({k: shard for k in head})
        index.write_text(json.dumps(data, indent=2))
    else:
        shard = "model.safetensors"
    sd = load_file(out / shard)
    save_file({**sd, **head}, out / shard, metadata={"format": "pt"})
    return out


# ------------------------------------------------------------------------------------------- inputs
def demo_image(lvlm_dir: str | Path, seed: int = 0) -> Image.Image:
    """A deterministic random RGB image of the size the LVLM's image processor is set up for."""
    h, w = json.loads((Path(lvlm_dir) / "zoo.json").read_text())["image_size"]
    g = torch.Generator().manual_seed(_seed(seed, "image"))
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def lvlm_inputs(lvlm_dir: str | Path, prompt: str | list[dict[str, Any]], images: Sequence[Image.Image]) -> BatchFeature:
    """Model inputs (torch tensors) for one prompt (text with placeholders, or chat messages).

    Uses the same processor loading as the scorer: ``AutoProcessor`` where it loads, else the image-only
    fallback for Qwen2-VL/2.5-VL and SmolVLM (whose processors need torchvision)."""
    from ..models.processing import load_processor

    proc = load_processor(lvlm_dir)
    text = prompt if isinstance(prompt, str) else proc.apply_chat_template(prompt, tokenize=False,
                                                                            add_generation_prompt=True)
    return proc(text=[text], images=[list(images)] if images else None, return_tensors="pt")
