"""Prompt datasets for the online-RL recipes (``launch/*.py``): load, validate and normalise them.

A prompt dataset is a local JSON / JSONL / parquet file or a ``datasets.save_to_disk`` directory whose rows
hold a ``prompt`` (a string, or TRL conversational messages) and an ``image`` (one per row) or ``images`` (a
list) column. Image paths are relative to the dataset file (or directory). ``load_prompt_dataset`` validates
every row *before* training (missing images, files that do not exist, placeholder counts; errors name the
row; every image is decoded, so a truncated or non-image file is named with its row), turns string prompts into conversational prompts with bare ``{"type": "image"}`` placeholders (the
form TRL's GRPO/RLOO/SFT trainers expect for a VLM policy) and casts the image column to ``datasets.Image``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .errors import VLRMError

__all__ = ["DataError", "load_prompt_dataset", "to_conversation"]

IMAGE_COLUMNS = ("images", "image")


class DataError(VLRMError, ValueError):
    """A training dataset or setup that cannot be trained on; the message names the row or the setting."""


def _read(path: Path, split: str) -> Any:
    """The raw ``datasets.Dataset`` of a local file or ``save_to_disk`` directory (``split`` of a DatasetDict)."""
    import datasets

    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
    else:
        kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unsupported dataset file (use .json, .jsonl, .parquet or a save_to_disk dir)")
        ds = datasets.load_dataset(kind, data_files={split: str(path)})
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    return ds


def _images_of(value: Any, where: str, base: Path) -> list[Any]:
    """A row's image entries (paths resolved against ``base``, each checked to exist); ``[]`` for none."""
    items = value if isinstance(value, list | tuple) else [value]
    out = []
    for x in items:
        if x is None:
            continue
        if isinstance(x, dict) and x.get("bytes") is not None:  # datasets.Image storage with the bytes inline
            _decode(io.BytesIO(x["bytes"]), where, f"the inline image{' ' + x['path'] if x.get('path') else ''}")
            out.append(x)
            continue
        p = x.get("path") if isinstance(x, dict) else x
        if not isinstance(p, str) or not p:
            raise DataError(f"{where}: an image entry must be a path, got {x!r}")
        resolved = Path(p) if Path(p).is_absolute() else base / p
        if not resolved.is_file():
            raise DataError(f"{where}: image file not found: {resolved} (paths are relative to {base})")
        _decode(resolved, where, f"image file {resolved}")
        out.append(str(resolved))
    return out


def _decode(source: Path | io.BytesIO, where: str, what: str) -> None:
    """Decode an image fully (``PIL.Image.load``): a truncated, corrupt, non-image or decompression-bomb file
    raises a ``DataError`` naming the row and the file now, not after the first training step."""
    from PIL import Image

    try:
        with Image.open(source) as im:
            im.load()
    except Image.DecompressionBombError as e:
        raise DataError(f"{where}: {what} is too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"{where}: {what} is not a readable image ({type(e).__name__}: {e})") from None


def to_conversation(prompt: Any, n_images: int, where: str = "row") -> list[dict[str, Any]]:
    """A prompt as TRL conversational messages with exactly ``n_images`` bare ``{"type": "image"}`` blocks.

    Strings become one user message; string contents become text blocks. A prompt without image blocks gets
    ``n_images`` placeholders at the start of its first user message; one with blocks must have ``n_images``.
    """
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
        raise DataError(f"{where}: 'prompt' must be a string or a list of chat messages, got {prompt!r:.120}")
    messages = []
    for m in prompt:
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else [
            {"type": "image"} if b.get("type") == "image" else {"type": "text", "text": b.get("text") or ""}
            for b in content or [] if isinstance(b, dict)]
        messages.append({"role": m.get("role") or "user", "content": blocks})
    found = sum(b["type"] == "image" for m in messages for b in m["content"])
    if found == 0 and n_images:
        first = next((m for m in messages if m["role"] == "user"), messages[0])
        first["content"] = [{"type": "image"} for _ in range(n_images)] + first["content"]
    elif found != n_images:
        raise DataError(f"{where}: the prompt has {found} image placeholder(s) but the row has {n_images} image(s)")
    return messages


def load_prompt_dataset(name: str | Path, split: str = "train", *, require_images: bool = True) -> Any:
    """Load, validate and normalise a prompt dataset (see the module docstring).

    ``require_images``: every row must have at least one image (a VLM policy needs one); the error names the
    first row without. Returns a ``datasets.Dataset`` with a conversational ``prompt`` and an ``image``
    (``datasets.Image``) or ``images`` (list of ``datasets.Image``) column; other columns are kept.
    """
    import datasets

    path = Path(name).expanduser().resolve()
    ds = _read(path, split)
    base = path if path.is_dir() else path.parent
    if "prompt" not in ds.column_names:
        raise DataError(f"{path}: no 'prompt' column (columns: {ds.column_names})")
    col = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
    if col is None and require_images:
        raise DataError(f"{path}: no 'image' or 'images' column, but the policy is a vision-language model "
                        "and needs an image per row")
    raw = ds.data.column(col).to_pylist() if col else [None] * len(ds)  # undecoded: paths or {bytes, path}
    # prompts decoded through the features: datasets stores mixed content blocks as JSON strings
    prompts, images = [], []
    for i, (prompt, value) in enumerate(zip(list(ds["prompt"]), raw, strict=True)):
        where = f"{path.name} row {i}"
        imgs = _images_of(value, where, base)
        if require_images and not imgs:
            raise DataError(f"{where}: no image, but the policy is a vision-language model and needs one "
                            f"(prompt: {str(prompt)[:80]!r})")
        prompts.append(to_conversation(prompt, len(imgs), where))
        images.append(imgs)
    # add the new columns under temporary names first: a table with no column left has no rows
    ds = ds.add_column("__prompt", prompts)
    if col == "image" and all(len(x) <= 1 for x in images):
        new, feature = "image", datasets.Image()
        ds = ds.add_column("__image", [x[0] if x else None for x in images])
    elif col is not None:
        new, feature = "images", datasets.List(datasets.Image())
        ds = ds.add_column("__images", images)
    ds = ds.remove_columns([c for c in ("prompt", col) if c]).rename_column("__prompt", "prompt")
    if col is not None:
        ds = ds.rename_column(f"__{new}", new).cast_column(new, feature)
    return ds

