"""Processor loading for VLRM directories, with an image-only fallback where ``AutoProcessor`` cannot load.

Qwen2-VL, Qwen2.5-VL and SmolVLM processors need torchvision (for their *video* processors) even for images.
Without it we assemble what scoring needs — tokenizer, image processor and the family's placeholder
expansion, exactly as their processors expand it — so images still reach the model on CPU-only installs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoProcessor, BatchFeature

from ..errors import VLRMError
from .loading import RemoteCodeError, first_line, load_tokenizer, pretrained


def _qwen(inputs: Mapping[str, Any], i: int, cfg: dict) -> tuple[str, str]:
    n = int(inputs["image_grid_thw"][i].prod()) // cfg["vision_config"]["spatial_merge_size"] ** 2
    return "<|image_pad|>", "<|image_pad|>" * n


def _smolvlm(inputs: Mapping[str, Any], i: int, cfg: dict) -> tuple[str, str]:
    v = cfg["vision_config"]
    n = (v["image_size"] // v["patch_size"]) ** 2 // cfg["scale_factor"] ** 2
    return "<image>", "<fake_token_around_image><global-img>" + "<image>" * n + "<fake_token_around_image>"


# family -> (placeholder in the chat template, expansion for image i): what the real processor does
_EXPANSIONS: dict[str, Callable[[Mapping[str, Any], int, dict], tuple[str, str]]] = {
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "smolvlm": _smolvlm,
}


class ProcessorLoadError(VLRMError, ValueError):
    """A model folder whose processor cannot be loaded; the message names the folder and the loader's reason."""


class FallbackProcessor:
    """Tokenizer + image processor + placeholder expansion; the subset of a processor that scoring uses."""

    def __init__(self, path: str | Path, model_type: str):
        self.path = Path(path)
        self.model_type = model_type
        self.tokenizer = load_tokenizer(path)
        if self.tokenizer is None:
            raise ProcessorLoadError(f"{path} ships no tokenizer")
        self.image_processor = pretrained(AutoImageProcessor, path)
        self.config = json.loads((self.path / "config.json").read_text())
        self.chat_template = self.tokenizer.chat_template

    def apply_chat_template(self, conversation, **kw):
        return self.tokenizer.apply_chat_template(conversation, **kw)

    def __call__(self, *, text: Sequence[str], images: Sequence[Sequence[Any]] | None = None, **kw) -> BatchFeature:
        kw.pop("return_tensors", None)
        expand = _EXPANSIONS[self.model_type]
        flat = [im for per in (images or []) for im in per]
        img: dict[str, Any] = {}
        if flat:
            nested = self.model_type == "smolvlm"  # idefics-style processors batch per sample
            img = dict(self.image_processor(images=[list(p) for p in images] if nested else flat, return_tensors="pt"))
            rows, cols = img.pop("rows", None), img.pop("cols", None)
            if rows is not None and any(r for per in rows for r in per) or cols is not None and any(c for per in cols for c in per):
                raise NotImplementedError("image splitting needs the real SmolVLM processor (install torchvision)")
        out_text, k = [], 0
        for s, per in zip(text, images or [[]] * len(text), strict=True):
            placeholder = expand(img, k, self.config)[0] if per else None
            if per:
                pieces = s.split(placeholder)
                if len(pieces) != len(per) + 1:
                    raise ValueError(f"{len(pieces) - 1} image placeholders {placeholder!r} for {len(per)} images")
                s = pieces[0] + "".join(expand(img, k + j, self.config)[1] + p for j, p in enumerate(pieces[1:]))
                k += len(per)
            out_text.append(s)
        enc = dict(self.tokenizer(out_text, return_tensors="pt", **kw))
        if "image_grid_thw" in img:
            enc["mm_token_type_ids"] = (enc["input_ids"] == self.config["image_token_id"]).int()
        return BatchFeature({**enc, **img})


def load_processor(path: str | Path):
    """``AutoProcessor`` for a model directory, or the image-only fallback for families that need torchvision.

    A processor that fails because the folder's tokenizer fails to load raises ``TokenizerLoadError`` with the
    tokenizer loader's reason; any other failure ``ProcessorLoadError`` naming the folder."""
    path = Path(path)
    try:
        return pretrained(AutoProcessor, path)
    except RemoteCodeError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers' own errors are plain Exceptions; re-raised named below
        load_tokenizer(path)  # a broken tokenizer is the usual culprit: say so, with its reason
        mt = json.loads((path / "config.json").read_text()).get("model_type") if (path / "config.json").is_file() else None
        if mt in _EXPANSIONS:
            return FallbackProcessor(path, mt)
        raise ProcessorLoadError(f"cannot load a processor from {path}: {first_line(e)}") from e
