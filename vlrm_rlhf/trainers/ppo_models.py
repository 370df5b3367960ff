"""The models of a PPO run: policy + value as one module, the value head applied per token, the frozen
reference, and the policy, reward and value models loaded from paths.

Split from :mod:`~vlrm_rlhf.trainers.ppo` so the trainer file holds the algorithm's control flow only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from ..models.loading import pretrained
from .ppo_config import VLPPOConfig

__all__ = ["PolicyAndValue", "default_value_model", "load_policy", "reference_copy", "reward_from_path",
           "special_media_ids", "token_values"]


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so one ``accelerator.prepare`` / optimizer covers both.

    ``forward(**inputs)`` returns ``(policy_logits, values)``, values being the value model's score head on
    every position of its backbone's last hidden state.
    """

    def __init__(self, policy: nn.Module, value_model: PreTrainedModel):
        super().__init__()
        self.policy, self.value_model = policy, value_model
        self.config = policy.config

    @property
    def is_gradient_checkpointing(self) -> bool:
        """What TRL's ``unwrap_model_for_generation`` checks (to turn checkpointing off while generating)."""
        return bool(getattr(self.policy, "is_activation_checkpointing", False))

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.policy.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.policy.gradient_checkpointing_disable()

    def forward(self, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy(**inputs, use_cache=False).logits, token_values(self.value_model, inputs)


def token_values(model: PreTrainedModel, inputs: dict[str, Any]) -> torch.Tensor:
    """Scalar head on every position: ``model.score(backbone(**inputs).last_hidden_state)[..., 0]``."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(**inputs, use_cache=False, return_dict=True).last_hidden_state
    return model.score(hidden)[..., 0]


def special_media_ids(config: Any) -> list[int]:
    """Multimodal placeholder/marker token ids of a VLM config (image, video, vision start/end, BOI/EOI)."""
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index", "vision_start_token_id",
             "vision_end_token_id", "boi_token_index", "eoi_token_index", "boi_token_id", "eoi_token_id")
    ids = {getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)}
    return sorted(i for i in ids if i >= 0)


def reference_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen copy of the policy. Under ZeRO-3 (parameters partitioned at load by ``zero3_init_flag``) a
    ``deepcopy`` would duplicate DeepSpeed's partition bookkeeping (the copy's parameters are never gathered),
    so the reference is re-loaded from the policy's checkpoint instead, as TRL's GRPO does."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    if not (partitioned or is_deepspeed_zero3_enabled()):
        return copy.deepcopy(model)
    path = getattr(model.config, "_name_or_path", "")
    if not path or not Path(path).exists():
        raise ValueError("under DeepSpeed ZeRO-3 the reference model is re-loaded from the policy's checkpoint: "
                         "pass the policy as a saved path (or pass ref_model=)")
    return load_policy(path)


def load_policy(path: str) -> PreTrainedModel:
    """A policy from a checkpoint: ``AutoModelForImageTextToText`` for VLM configs, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForImageTextToText

    cfg = pretrained(AutoConfig, path)
    auto = AutoModelForImageTextToText if hasattr(cfg, "vision_config") else AutoModelForCausalLM
    return pretrained(auto, path)


def reward_from_path(path: str | Path) -> Callable[..., list]:
    """A GRPO-protocol reward callable scoring with the VLRM saved at ``path``, or served at a URL."""
    from ..reward.remote import RemoteReward, is_url
    from ..reward.trl import VLRMReward

    if is_url(path):
        return RemoteReward(str(path))
    return VLRMReward(path)


def default_value_model(args: VLPPOConfig, funcs: list) -> PreTrainedModel:
    """The value model: ``args.value_model_path``, else the first VLRM reward's (or RM module's) checkpoint."""
    path = args.value_model_path
    for f in funcs if path is None else []:
        model = f if isinstance(f, nn.Module) else getattr(getattr(f, "scorer", None), "model", None)
        if model is not None and getattr(model.config, "_name_or_path", ""):
            path = model.config._name_or_path
            break
    if not path:
        raise ValueError("no value model: pass value_model=, set value_model_path, or use a VLRM reward")
    import vlrm_rlhf.models.modeling  # noqa: F401  (registers the VLRM classes with the Auto API)

    from ..models.value_head import find_value_head, load_value_head_vlrm

    cfg = pretrained(AutoConfig, path)
    if not any(a.endswith("ForSequenceClassification") for a in cfg.architectures or []) and find_value_head(path):
        return load_value_head_vlrm(path)  # a value-head VLRM: the value model starts from its head too
    return pretrained(AutoModelForSequenceClassification, path, num_labels=1)
