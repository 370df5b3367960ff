"""Value-head VLRMs: a causal VLM of a supported family plus the value head of TRL's value-head models.

TRL's ``AutoModelForCausalLMWithValueHead`` (removed in TRL 1.13) stored the head as ``v_head.summary.weight``
[1, H] and ``v_head.summary.bias`` [1], either inside the model's shards or in a separate
``value_head.safetensors``. The reward is the head applied to the final hidden state at the last non-pad token:
exactly what the family's ``XForSequenceClassification`` computes with a biased ``score`` head, so such a
checkpoint loads (and converts) into that class and everything downstream scores it unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import VLRMError

__all__ = ["HEAD_BIAS", "HEAD_WEIGHT", "VALUE_HEAD_FILE", "ValueHead", "ValueHeadError", "check_width",
           "convert_value_head", "find_value_head", "load_value_head_vlrm"]

VALUE_HEAD_FILE = "value_head.safetensors"
HEAD_WEIGHT, HEAD_BIAS = "v_head.summary.weight", "v_head.summary.bias"


class ValueHeadError(VLRMError, ValueError):
    """A value head that cannot be used (wrong width, missing or malformed); the message names the file."""


@dataclass(frozen=True)
class ValueHead:
    """A TRL value head: weight [1, H], bias [1] (or None) and the file it was read from."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    file: Path


def _head_file(path: Path) -> Path | None:
    """The safetensors file holding ``v_head.summary.weight``: the separate file first, then the shards."""
    if (path / VALUE_HEAD_FILE).is_file():
        return path / VALUE_HEAD_FILE
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shard = json.loads(index.read_text())["weight_map"].get(HEAD_WEIGHT)
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueHeadError(f"{index} is not a valid index (a JSON object with a weight_map): {e}") from None
        if shard is None:
            return None
        f = (path / shard).resolve()
        if path.resolve() not in f.parents:
            raise ValueHeadError(f"{index} points outside the model folder {path}: {HEAD_WEIGHT} is in {shard!r}")
        return f
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as h:
            return single if HEAD_WEIGHT in h.keys() else None
    return None


def find_value_head(path: str | Path) -> ValueHead | None:
    """The value head of a model folder, or None when it has none (not a value-head checkpoint)."""
    path = Path(path)
    f = _head_file(path)
    if f is None:
        return None
    with safe_open(str(f), framework="pt") as h:
        keys = set(h.keys())
        if HEAD_WEIGHT not in keys:
            raise ValueHeadError(f"{f} has no {HEAD_WEIGHT} tensor (keys: {sorted(keys)[:4]})")
        weight = h.get_tensor(HEAD_WEIGHT)
        bias = h.get_tensor(HEAD_BIAS) if HEAD_BIAS in keys else None
    if weight.dim() != 2 or weight.shape[0] != 1:
        raise ValueHeadError(f"{f}: {HEAD_WEIGHT} has shape {tuple(weight.shape)}; a value head is [1, hidden_size]")
    if bias is not None and tuple(bias.shape) != (1,):
        raise ValueHeadError(f"{f}: {HEAD_BIAS} has shape {tuple(bias.shape)}; expected [1]")
    return ValueHead(weight, bias, f)


def check_width(head: ValueHead, hidden_size: int, where: str | Path) -> None:
    """A head whose width is not the model's hidden size is an error naming the file and both widths."""
    if head.weight.shape[1] != hidden_size:
        raise ValueHeadError(f"{head.file}: value head width {head.weight.shape[1]} does not match the hidden size "
                             f"{hidden_size} of the model in {where}")


def load_value_head_vlrm(path: str | Path, **kwargs):
    """The value-head checkpoint at ``path`` as its family's ``XForSequenceClassification`` (biased score head =
    the value head); ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``)."""
    from transformers import AutoConfig

    from .loading import pretrained
    from .modeling import vlrm_from_lvlm

    head = find_value_head(path)
    if head is None:
        raise ValueHeadError(f"{path} has no value head ({HEAD_WEIGHT} in {VALUE_HEAD_FILE} or in the model shards)")
    check_width(head, pretrained(AutoConfig, path).get_text_config().hidden_size, path)  # before any weight loads
    model = vlrm_from_lvlm(str(path), score_bias=head.bias is not None, **kwargs)
    with torch.no_grad():
        model.score.weight.copy_(head.weight.to(model.score.weight.dtype))
        if head.bias is not None:
            model.score.bias.copy_(head.bias.to(model.score.bias.dtype))
    return model


# files of a value-head folder that the converted folder does not copy (it writes its own weights and config)
_NOT_COPIED = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", VALUE_HEAD_FILE,
               "generation_config.json")


def convert_value_head(src: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write the value-head VLRM ``src`` to ``out`` as its family's ``XForSequenceClassification`` (biased score
    head), with its tokenizer/processor files: the same rewards, loadable by ``AutoModelForSequenceClassification``.
    ``out`` is written atomically and may not be, contain or lie inside ``src``."""
    import shutil

    from ..files import atomic_output_dir, check_not_overlapping

    src, out = Path(src), Path(out)
    check_not_overlapping(out, [("source model", src)])
    model = load_value_head_vlrm(src)
    with atomic_output_dir(out, force=force) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith((".safetensors", ".bin")):
                shutil.copy2(f, tmp / f.name)
        model.save_pretrained(tmp)
    return out
