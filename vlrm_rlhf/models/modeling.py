"""Vision-language reward model classes: ``XForSequenceClassification`` for every supported LVLM family.

Each class is transformers' ``GenericForSequenceClassification`` over the family's multimodal base model
(vision tower + projector + language model) with a scalar ``score`` head read at the last non-pad token,
exactly like a text RM. A config with ``score_bias: true`` gives the head a bias (value-head VLRMs converted from
TRL's ``v_head.summary``, see ``value_head.py``); without it the head is transformers' own, bias-free. Importing this module registers them with ``AutoModelForSequenceClassification``
(``exist_ok=True``: plain ``register`` is silently ignored for built-in configs) and gives them the
family's checkpoint renaming rules, so hub-layout checkpoints load instead of silently random-initialising.
"""

from __future__ import annotations

import transformers
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_layers import GenericForSequenceClassification

from ..errors import VLRMError
from .families import FAMILIES, Family

VLRM_CLASSES: dict[str, type] = {}


class BiasedScoreMixin:
    """A ``score`` head with a bias when ``config.score_bias`` is true (TRL value heads carry one)."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "score_bias", False):
            self.score = nn.Linear(config.get_text_config().hidden_size, self.num_labels, bias=True)
            self.post_init()


def _conversion_rules(family: Family) -> list:
    """The LVLM's own renaming rules (by class name first, then model_type), minus the ``lm_head`` rule."""
    rules = get_checkpoint_conversion_mapping(family.lvlm_class) or get_checkpoint_conversion_mapping(family.model_type)
    return [r for r in (rules or []) if not any("lm_head" in p for p in r.source_patterns)]


def _make(family: Family) -> type:
    """The family's VLRM class (transformers' own where it ships one), registered with the Auto API."""
    config_cls = getattr(transformers, family.config_class)
    name = family.seq_cls
    doc = f"{family.display} vision-language reward model: multimodal backbone + scalar score head."
    if family.native_seq_cls:  # transformers' own class, unchanged unless the config asks for a biased head
        cls = type(name, (BiasedScoreMixin, getattr(transformers, family.native_seq_cls)),
                   {"__module__": __name__, "__doc__": doc})
    else:
        pre = getattr(transformers, family.pretrained_class)
        cls = type(name, (BiasedScoreMixin, GenericForSequenceClassification, pre),
                   {"__module__": __name__, "__doc__": doc})
        rules = _conversion_rules(family)
        if rules:
            register_checkpoint_conversion_mapping(name, rules, overwrite=True)
    AutoModelForSequenceClassification.register(config_cls, cls, exist_ok=True)
    return cls


for _fam in FAMILIES.values():
    VLRM_CLASSES[_fam.model_type] = _make(_fam)
    globals()[VLRM_CLASSES[_fam.model_type].__name__] = VLRM_CLASSES[_fam.model_type]

__all__ = ["VLRM_CLASSES", *[c.__name__ for c in VLRM_CLASSES.values()]]


class LoadingError(VLRMError, RuntimeError):
    """A checkpoint whose weights would not all reach the model (instead of a silent random init)."""


def vlrm_from_lvlm(path: str, *, num_labels: int = 1, score_bias: bool = False, **kwargs):
    """Wrap an LVLM checkpoint (hub or transformers layout) in its family's VLRM class with a new score head
    (with a bias when ``score_bias``).

    Guards the trap of classes defined outside transformers: if the family's renaming rules did not apply,
    the language model would load randomly initialised with only a warning. Here the only key allowed to be
    missing is ``score.weight``.
    """
    from transformers import AutoConfig

    from .families import get_family
    from .loading import pretrained

    config = pretrained(AutoConfig, path, trust_remote_code=kwargs.pop("trust_remote_code", False))
    family = get_family(config.model_type, where=str(path))
    config.num_labels = num_labels
    config.architectures = [family.seq_cls]
    if score_bias:
        config.score_bias = True
    cls = VLRM_CLASSES[family.model_type]
    model, info = pretrained(cls, path, config=config, output_loading_info=True, **kwargs)
    missing = sorted(set(info["missing_keys"]) - {"score.weight", "score.bias"})
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise LoadingError(
            f"{path}: {len(missing)} weight(s) of {cls.__name__} were not found in the checkpoint "
            f"(e.g. {missing[:3]}; shape mismatches: {mismatched[:3]}); they would be randomly initialised"
        )
    return model
