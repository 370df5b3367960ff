"""The JSON wire format of served rewards: samples out (client side), Samples back in (server side).

A request to ``POST <url>/score`` is ``{"samples": [{"prompt", "response", "images"}, ...]}``: ``prompt`` and
``response`` are strings or chat messages (TRL's conversational form; image blocks are bare ``{"type": "image"}``
placeholders) and ``images`` lists the sample's images in placeholder order, each ``{"base64": "<PNG/JPEG bytes>"}``
or ``{"path": "/file"}`` (read by the server only inside its ``--allowed-root``). The answer is
``{"rewards": [float | null], "non_finite": [i, ...], "model": NAME, "mode": MODE}``, rewards in request order; a
reward is ``null`` exactly when it was NaN/inf (its index is in ``non_finite``), so the client applies the same
non-finite policy as in-process scoring. Pure functions, no HTTP and no Ray: both sides import them.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import VLRMError
from .inputs import InputError, Sample, confine_image_path, make_sample, open_image
from .trl import as_messages, column_images

__all__ = ["Limits", "WireError", "decode_sample", "encode_image", "trl_wire_samples", "wire_sample"]


class WireError(VLRMError, ValueError):
    """A request or answer that does not follow the served-reward protocol; the message names the sample."""


@dataclass(frozen=True)
class Limits:
    """What a server accepts: image bytes and pixels per image, images per sample, samples per request, and the
    folder that ``{"path": ...}`` images must lie in (``None``: paths refused)."""

    max_image_bytes: int = 16 << 20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 16
    max_samples: int = 4096
    allowed_root: Path | None = None


# ---- client side ----------------------------------------------------------------------------------------
def encode_image(x: Any, *, send_paths: bool = False) -> dict[str, str]:
    """One image for the wire: a PIL image as lossless PNG, bytes as they are, a path read here (or, with
    ``send_paths``, sent as a path for a server that shares the file system)."""
    if isinstance(x, dict) and ("path" in x or "bytes" in x):  # datasets' Image feature, decode=False
        x = x.get("bytes") or x.get("path")
    if isinstance(x, Image.Image):
        buf = io.BytesIO()
        x.save(buf, format="PNG")
        data = buf.getvalue()
    elif isinstance(x, bytes | bytearray):
        data = bytes(x)
    elif isinstance(x, str | Path):
        if send_paths:
            return {"path": str(x)}
        try:
            data = Path(x).read_bytes()
        except OSError as e:
            raise InputError(f"cannot read image file {x}: {e}") from e
    else:
        raise InputError(f"unsupported image value of type {type(x).__name__}")
    return {"base64": base64.b64encode(data).decode("ascii")}


def _is_image_block(b: Any) -> bool:
    return isinstance(b, dict) and (b.get("type") in ("image", "image_url") or ("type" not in b and "image" in b))


def wire_sample(prompt: Any, response: Any, images: Sequence[Any] = (), *, send_paths: bool = False,
                memo: dict[int, dict[str, str]] | None = None) -> dict[str, Any]:
    """One sample for the wire: inline image payloads move to ``images`` (in placeholder order) and their blocks
    become bare placeholders; ``images`` fills in when there are no inline payloads. Mirrors ``make_sample``.
    ``memo`` (by object id, for one request) encodes an image shared by several samples once (a GRPO group)."""
    inline: list[Any] = []

    def strip(msgs: Any) -> Any:
        if isinstance(msgs, str) or msgs is None:
            return msgs
        out = []
        for m in [msgs] if isinstance(msgs, dict) else msgs:
            content = m.get("content")
            if isinstance(content, list):
                blocks = []
                for b in content:
                    if _is_image_block(b):
                        b = {k: v for k, v in b.items() if v is not None}
                        if b.get("image") is not None:
                            inline.append(b["image"])
                        b = {"type": "image"}
                    blocks.append(b)
                content = blocks
            out.append({**m, "content": content})
        return out

    p, r = strip(prompt), strip(response)
    pics = inline or list(images)
    memo = {} if memo is None else memo
    out = []
    for x in pics:
        if id(x) not in memo:
            memo[id(x)] = encode_image(x, send_paths=send_paths)
        out.append(memo[id(x)])
    return {"prompt": p, "response": r, "images": out}


def trl_wire_samples(prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, Any],
                     *, send_paths: bool = False) -> list[dict[str, Any]]:
    """TRL's reward-function arguments as wire samples, with images taken as ``VLRMReward`` takes them: inline
    image blocks first, else the ``image``/``images`` column (both: counts must agree, and inline ones win)."""
    if len(prompts) != len(completions):
        raise InputError(f"{len(prompts)} prompts for {len(completions)} completions")
    out, memo = [], {}  # memo: the request's images by object id (its lifetime keeps the ids unique)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        msgs = as_messages(p, "user")
        n_inline = sum(1 for m in msgs if isinstance(m.get("content"), list) for b in m["content"]
                       if _is_image_block(b) and b.get("image") is not None)
        given = column_images(columns, i)
        if n_inline and given and len(given) != n_inline:
            raise InputError(f"sample {i}: the prompt carries {n_inline} inline image(s) but the image column "
                             f"gives {len(given)}")
        out.append(wire_sample(msgs, as_messages(c, "assistant"), [] if n_inline else given, send_paths=send_paths,
                               memo=memo))
    return out


# ---- server side ----------------------------------------------------------------------------------------
def _decode_image(d: Any, where: str, limits: Limits) -> Image.Image:
    """A wire image as an RGB PIL image, within the limits (bytes, pixels, allowed root); errors name it."""
    if not isinstance(d, dict) or len(d) != 1 or not ({"base64", "path"} & d.keys()):
        raise WireError(f"{where}an image must be {{\"base64\": ...}} or {{\"path\": ...}}, got {str(d)[:80]!r}")
    if "path" in d:
        if limits.allowed_root is None:
            raise WireError(f"{where}image path {d['path']!r} refused: this server reads no image paths "
                            "(start it with --allowed-root DIR, or send the image as base64)")
        p = Path(str(d["path"]))
        p = p if p.is_absolute() else limits.allowed_root / p
        confine_image_path(p, d["path"], [limits.allowed_root.resolve()], where)
        if not p.is_file():
            raise WireError(f"{where}image file not found: {d['path']!r}")
        size = p.stat().st_size
        if size > limits.max_image_bytes:
            raise WireError(f"{where}image {d['path']!r} has {size} bytes, over the limit of "
                            f"{limits.max_image_bytes} (--max-image-bytes)")
        src: Any = p
    else:
        text = d["base64"]
        if not isinstance(text, str):
            raise WireError(f"{where}base64 image must be a string")
        if len(text) * 3 // 4 > limits.max_image_bytes + 3:
            raise WireError(f"{where}image of about {len(text) * 3 // 4} bytes is over the limit of "
                            f"{limits.max_image_bytes} (--max-image-bytes)")
        try:
            src = io.BytesIO(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as e:
            raise WireError(f"{where}image is not valid base64: {e}") from None
    try:
        with Image.open(src) as im:
            w, h = im.size
    except (OSError, Image.DecompressionBombError) as e:
        raise WireError(f"{where}cannot read image: {e}") from None
    if w * h > limits.max_image_pixels:
        raise WireError(f"{where}image of {w}x{h} = {w * h} pixels is over the limit of {limits.max_image_pixels} "
                        "(--max-image-pixels)")
    if hasattr(src, "seek"):
        src.seek(0)
    return open_image(src, "image", where)


def decode_sample(d: Any, i: int, limits: Limits, memo: dict[str, Image.Image] | None = None) -> Sample:
    """Wire sample ``i`` as a ``Sample``, built exactly as ``VLRMReward`` builds it in process; ``memo`` (for one
    request) decodes an image sent several times once."""
    where = f"sample {i}: "
    if not isinstance(d, dict) or "prompt" not in d or "response" not in d:
        raise WireError(f"{where}a sample is an object with 'prompt', 'response' and optional 'images'")
    extra = set(d) - {"prompt", "response", "images"}
    if extra:
        raise WireError(f"{where}unknown field(s) {sorted(extra)}")
    images = d.get("images") or []
    if not isinstance(images, list):
        raise WireError(f"{where}'images' must be a list")
    if len(images) > limits.max_images:
        raise WireError(f"{where}{len(images)} images, over the limit of {limits.max_images} per sample")
    for key in ("prompt", "response"):
        v = d[key]
        if not isinstance(v, str | list | dict):
            raise WireError(f"{where}{key!r} must be a string or chat messages, not {type(v).__name__}")
        for m in [v] if isinstance(v, dict) else v if isinstance(v, list) else []:
            if not isinstance(m, dict):
                raise WireError(f"{where}{key!r} messages must be objects with 'role' and 'content'")
            for b in m.get("content") if isinstance(m.get("content"), list) else []:
                if _is_image_block(b) and b.get("image") is not None:
                    raise WireError(f"{where}image blocks carry no payload on the wire: put the image in 'images'")
    pics = []
    for k, x in enumerate(images):
        key = x.get("base64") if isinstance(x, dict) and isinstance(x.get("base64"), str) else None
        if key is None or memo is None or key not in memo:
            im = _decode_image(x, f"{where}image {k}: ", limits)
            if key is not None and memo is not None:
                memo[key] = im
        pics.append(im if key is None or memo is None else memo[key])
    messages = as_messages(d["prompt"], "user") + as_messages(d["response"], "assistant")
    return make_sample(messages, None, pics or None, i)


def decode_request(body: Any, limits: Limits) -> list[Sample]:
    """The Samples of a ``/score`` request body (``{"samples": [...]}``)."""
    if not isinstance(body, dict) or not isinstance(body.get("samples"), list):
        raise WireError("the request must be a JSON object {\"samples\": [...]}")
    samples = body["samples"]
    if not samples:
        raise WireError("the request has no samples")
    if len(samples) > limits.max_samples:
        raise WireError(f"{len(samples)} samples in one request, over the limit of {limits.max_samples}")
    memo: dict[str, Image.Image] = {}
    return [decode_sample(s, i, limits, memo) for i, s in enumerate(samples)]
