"""Normalising scoring inputs: TRL conversational messages or plain strings, with zero or more images.

Everything downstream sees a ``Sample``: chat messages whose content is a list of typed blocks (image
blocks carry no payload) and the sample's images, in placeholder order, as PIL images.

Image paths read from a data file are confined (``confine_image_path``): after following symlinks they must lie
inside an allowed folder (the data file's, ``--images-dir``, or an explicit ``--images-root``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import VLRMError

Message = dict[str, Any]


class InputError(VLRMError, ValueError):
    """A scoring input that cannot be scored; the message names the sample."""


@dataclass
class Sample:
    """One conversation to score: messages (typed content blocks) and its images in placeholder order."""

    messages: list[Message]
    images: list[Image.Image] = field(default_factory=list)

    def without_images(self) -> Sample:
        """The same conversation with every image block removed (the no-image ablation)."""
        msgs = [{**m, "content": [b for b in m["content"] if b.get("type") != "image"]} for m in self.messages]
        return Sample(msgs, [])

    def text_of(self, role: str) -> str:
        """Concatenated text of all messages with this role."""
        return " ".join(b["text"] for m in self.messages if m["role"] == role for b in m["content"] if b.get("type") == "text")


def image_roots(*folders: str | Path | None, extra: Sequence[str | Path] = ()) -> list[Path]:
    """The folders (symlinks resolved) that image paths from a data file may point into: the given ones
    (the data file's folder, ``--images-dir``; None skipped) and ``extra`` (``--images-root``)."""
    return [Path(f).resolve() for f in (*folders, *extra) if f is not None]


def inside_roots(p: str | Path, roots: Sequence[Path]) -> bool:
    """Whether ``p`` resolves (after symlinks) inside one of ``roots`` (resolved folders)."""
    real = Path(p).resolve()
    return any(real.is_relative_to(r) for r in roots)


def confine_image_path(p: Path, shown: Any, roots: Sequence[Path], where: str = "") -> Path:
    """``p`` if it resolves (after symlinks) inside one of ``roots``, else an ``InputError`` naming the path
    as the data file gave it (``shown``). Checked before the file is even looked at."""
    if inside_roots(p, roots):
        return p
    raise InputError(f"{where}image path {str(shown)!r} resolves to {Path(p).resolve()}, outside the allowed image folders "
                     f"({', '.join(map(str, roots))}); pass --images-root DIR to allow another folder")


def open_image(src: Any, shown: str, where: str = "") -> Image.Image:
    """Decode ``src`` (a path or a file object) to RGB; unreadable and oversized images are ``InputError``s."""
    try:
        with Image.open(src) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise InputError(f"{where}{shown} is too large to decode safely ({e})") from None
    except OSError as e:
        raise InputError(f"{where}cannot read {shown}: {e}") from e


def load_image(x: Any, base_dir: Path | None = None, where: str = "") -> Image.Image:
    """A PIL image from a PIL image, a path (relative to ``base_dir``) or raw bytes; errors name the file."""
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, dict) and ("path" in x or "bytes" in x):  # datasets' Image feature, decode=False
        x = x.get("path") or x.get("bytes")
    if isinstance(x, bytes | bytearray):
        import io

        return open_image(io.BytesIO(x), "image bytes", where)
    if isinstance(x, str | Path):
        p = Path(x)
        if base_dir is not None and not p.is_absolute():
            p = base_dir / p
        if not p.is_file():
            raise InputError(f"{where}image file not found: {p}")
        return open_image(p, f"image file {p}", where)
    raise InputError(f"{where}unsupported image value of type {type(x).__name__}")


def _blocks(content: Any) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    out = []
    for b in content:
        if isinstance(b, str):
            out.append({"type": "text", "text": b})
            continue
        b = {k: v for k, v in b.items() if v is not None}  # Arrow fills absent fields of mixed blocks with None
        if b.get("type") in ("image", "image_url") or ("type" not in b and "image" in b):
            out.append({"type": "image", **({"image": b["image"]} if "image" in b else {})})
        else:
            out.append(b)
    return out


def _messages(x: Any, role: str) -> list[Message]:
    if isinstance(x, str):
        return [{"role": role, "content": _blocks(x)}]
    if isinstance(x, dict):
        return [{"role": x.get("role", role), "content": _blocks(x.get("content"))}]
    return [{"role": m.get("role", role), "content": _blocks(m.get("content"))} for m in x]


def make_sample(
    prompt: Any,
    response: Any | None,
    images: Sequence[Any] | Any | None,
    index: int = 0,
    base_dir: Path | None = None,
) -> Sample:
    """Build a Sample from a conversation (``response=None``) or a (prompt, response) pair, plus images.

    Images come from image blocks that carry an ``image`` payload, else from ``images`` in order. A plain
    string prompt with images gets one image block per image at its start, as TRL does.
    """
    where = f"sample {index}: "
    msgs = _messages(prompt, "user")
    if response is not None:
        resp = _messages(response, "assistant")
        if not any(b.get("text", "").strip() for m in resp for b in m["content"] if b.get("type") == "text"):
            raise InputError(f"{where}empty response")
        msgs += resp
    if images is not None and not isinstance(images, list | tuple):
        images = [images]
    given = list(images or [])
    blocks = [b for m in msgs for b in m["content"] if b.get("type") == "image"]
    if not blocks and given:
        first_user = next((m for m in msgs if m["role"] == "user"), msgs[0])
        first_user["content"] = [{"type": "image"} for _ in given] + first_user["content"]
        blocks = first_user["content"][: len(given)]
    payload = [b.pop("image") for b in blocks if "image" in b]
    if payload and given:
        raise InputError(f"{where}images given both inline and as a separate list")
    pics = payload or given
    if len(pics) != len(blocks):
        raise InputError(f"{where}{len(pics)} image(s) for {len(blocks)} image placeholder(s)")
    return Sample(msgs, [load_image(x, base_dir, where) for x in pics])
