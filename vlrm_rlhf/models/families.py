"""LVLM families described as data: which classes a family uses and how its text layers map to the base LM.

The one table of supported families: the VLRM classes (``modeling.py``) and the test zoo derive from it.

Everything about *where* tensors live (key prefixes) is derived at run time from the model tree and the
loader's own renaming rules (see ``checkpoint.py``); this module only records what cannot be derived.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from ..errors import VLRMError


@dataclass(frozen=True)
class Family:
    """One LVLM family: its ``model_type``, transformers classes, and text-layer layout quirks."""

    model_type: str
    lvlm_class: str  # transformers class that generates (output: lvlm)
    pretrained_class: str  # transformers ``PreTrainedModel`` base of the family (the VLRM class derives from it)
    config_class: str  # transformers config class of the LVLM
    display: str
    # text_config attribute listing interleaved cross-attention layers (Mllama); None if the LM is plain.
    cross_attention_attr: str | None = None
    # transformers' own VLM sequence classifier, when it ships one (Gemma3); else vlrm_rlhf defines one.
    native_seq_cls: str | None = None
    # text-model model_types an LVLM of this family pairs with, when its text_config has a private type
    # (``mllama_text_model`` is a Llama); empty: the text_config's own model_type.
    text_backbones: tuple[str, ...] = field(default=())

    def backbones(self, text_model_type: str) -> tuple[str, ...]:
        """Model types a base/RM/LLM may have to pair with this LVLM's language model."""
        return self.text_backbones or (text_model_type,)

    @property
    def seq_cls(self) -> str:
        """Class name of the family's VLRM (``...ForSequenceClassification``)."""
        return self.native_seq_cls or self.lvlm_class.replace("ForConditionalGeneration", "ForSequenceClassification")

    def text_layer_to_base(self, text_config: object, layer: int) -> int | None:
        """Map the LVLM's text layer index to the base LM's layer index (None: layer has no counterpart)."""
        if self.cross_attention_attr is None:
            return layer
        cross = sorted(getattr(text_config, self.cross_attention_attr, None) or [])
        if layer in cross:
            return None
        return layer - bisect_left(cross, layer)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llava", "LlavaForConditionalGeneration", "LlavaPreTrainedModel", "LlavaConfig", "LLaVA"),
        Family("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextPreTrainedModel", "LlavaNextConfig",
               "LLaVA-NeXT"),
        Family("mllama", "MllamaForConditionalGeneration", "MllamaPreTrainedModel", "MllamaConfig",
               "Mllama (Llama 3.2 Vision)", cross_attention_attr="cross_attention_layers", text_backbones=("llama",)),
        Family("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLPreTrainedModel", "Qwen2VLConfig", "Qwen2-VL",
               text_backbones=("qwen2",)),
        Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLPreTrainedModel", "Qwen2_5_VLConfig",
               "Qwen2.5-VL", text_backbones=("qwen2",)),
        Family("idefics3", "Idefics3ForConditionalGeneration", "Idefics3PreTrainedModel", "Idefics3Config",
               "Idefics3"),
        Family("smolvlm", "SmolVLMForConditionalGeneration", "SmolVLMPreTrainedModel", "SmolVLMConfig", "SmolVLM"),
        Family("gemma3", "Gemma3ForConditionalGeneration", "Gemma3PreTrainedModel", "Gemma3Config", "Gemma3",
               native_seq_cls="Gemma3ForSequenceClassification"),
    )
}


class UnknownFamilyError(VLRMError, ValueError):
    """Raised for an LVLM whose ``model_type`` has no family description."""


def get_family(model_type: str, where: str = "") -> Family:
    """Look up a family by ``model_type``; the error lists every supported family."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(f"{k} ({f.display})" for k, f in FAMILIES.items())
    loc = f" in {where}" if where else ""
    raise UnknownFamilyError(
        f"unsupported LVLM family model_type={model_type!r}{loc}. Supported families: {supported}."
    )
