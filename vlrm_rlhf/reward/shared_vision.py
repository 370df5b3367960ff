"""Image features computed once for several reward models that share a vision tower and projector.

Every merge of the same LVLM keeps the LVLM's vision tower and projector bit for bit, so an ensemble of such
merges would run the same vision forward K times per batch. Here the features are computed once with one
member's own vision path and handed to every member's forward, which then only runs its language model:

- LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, Gemma3 (transformers 5): the backbone's forward
  takes ``mm_encoder_outputs={"image": get_image_features(...)}`` instead of ``pixel_values`` and scatters the
  features into the image-token positions of the text embeddings exactly as it does with pixels.
- Mllama: the vision model + projector output is the language model's ``cross_attention_states``; it is
  computed as Mllama's forward computes it and passed in place of the pixels.
- Any other architecture: ``sharing_kind`` returns None and each member runs its own vision path.

Two members share a vision path when every backbone tensor outside the language model is equal
(``torch.equal``; tensors that are the same storage, as in-memory ensembles share them, are not compared).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import torch

SharingKind = Literal["mm_encoder_outputs", "cross_attention_states"]
_LM_ATTRS = ("language_model", "text_model")  # where VLM backbones keep their language model (transformers 5)
_MLLAMA_VISION_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The multimodal backbone of a reward model (``model.model``; through a DeepSpeed engine's ``module``)."""
    raw = getattr(model, "module", model)
    return getattr(raw, raw.base_model_prefix)


def vision_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Every backbone tensor outside the language model (vision tower, projector, ...); None for text models."""
    bb = backbone(model)
    lm = next((a for a in _LM_ATTRS if isinstance(getattr(bb, a, None), torch.nn.Module)), None)
    if lm is None or bb is getattr(bb, lm):
        return None
    return {n: t for n, t in bb.state_dict(keep_vars=True).items() if not n.startswith(lm + ".")}


def same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """True when both hold the same names with equal values (shared storage counts as equal without a read)."""
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
            return False
        if x.data_ptr() == y.data_ptr() and x.stride() == y.stride():
            continue
        if not torch.equal(x.detach(), y.detach()):
            return False
    return True


def sharing_kind(model: torch.nn.Module) -> SharingKind | None:
    """How this model's backbone accepts precomputed image features; None when it cannot (separate scoring)."""
    bb = backbone(model)
    params = inspect.signature(bb.forward).parameters
    if "mm_encoder_outputs" in params and callable(getattr(bb, "get_image_features", None)):
        return "mm_encoder_outputs"
    if ("cross_attention_states" in params and isinstance(getattr(bb, "vision_model", None), torch.nn.Module)
            and isinstance(getattr(bb, "multi_modal_projector", None), torch.nn.Module)):
        return "cross_attention_states"
    return None


@torch.no_grad()
def image_features(model: torch.nn.Module, kind: SharingKind, enc: Mapping[str, Any]) -> Any:
    """The image features ``model``'s backbone would compute from ``enc`` (a processor output) in its forward."""
    bb = backbone(model)
    if kind == "mm_encoder_outputs":
        sig = inspect.signature(bb.get_image_features).parameters
        args = {k: v for k, v in enc.items() if k in sig and k not in ("kwargs", "return_dict")}
        return {"image": bb.get_image_features(**args, return_dict=True)}
    # Mllama: what MllamaModel.forward computes from pixel_values (vision model, projector, reshape)
    out = bb.vision_model(pixel_values=enc["pixel_values"], aspect_ratio_ids=enc["aspect_ratio_ids"],
                          aspect_ratio_mask=enc.get("aspect_ratio_mask"))
    states = out.last_hidden_state
    return bb.multi_modal_projector(states).reshape(-1, states.shape[-2], bb.hidden_size)


def with_features(enc: Mapping[str, Any], kind: SharingKind, features: Any) -> dict[str, Any]:
    """Forward inputs that carry precomputed ``features`` instead of the pixels (the rest unchanged)."""
    if kind == "mm_encoder_outputs":
        return {**{k: v for k, v in enc.items() if k != "pixel_values"}, "mm_encoder_outputs": dict(features)}
    return {**{k: v for k, v in enc.items() if k not in _MLLAMA_VISION_KEYS}, "cross_attention_states": features}
