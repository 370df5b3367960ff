"""Streaming, atomic output: safetensors shards written tensor by tensor into a temporary sibling directory.

Shards are planned from shapes alone (huggingface_hub's sharding helper), each shard's header is written
first, then tensors are appended as they are produced, so memory never holds more than one output tensor.
The directory is renamed into place only when complete; an existing output is never replaced silently.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from ..errors import VLRMError

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class OutputExistsError(VLRMError, FileExistsError):
    """The output directory exists and ``force`` was not given."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of an output tensor, known before it is computed."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: dict[str, TensorSpec], max_shard_size: int | str) -> dict[str, list[str]]:
    """Group tensor names into shard files (names in production order within each shard)."""
    split = split_state_dict_into_shards_factory(
        specs,
        get_storage_size=lambda s: s.nbytes,
        get_storage_id=lambda s: None,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    return {f: list(names) for f, names in split.filename_to_tensors.items()}


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front; tensors must arrive in header order."""

    def __init__(self, path: Path, names: list[str], specs: dict[str, TensorSpec], metadata: dict[str, str]):
        self.path = path
        self.order = list(names)
        self.specs = specs
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for n in self.order:
            s = specs[n]
            header[n] = {"dtype": _DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(len(raw).to_bytes(8, "little"))
        self.f.write(raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.next]
        if name != expected:
            raise RuntimeError(f"shard {self.path.name}: expected tensor {expected}, got {name}")
        spec = self.specs[name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"tensor {name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}"
            )
        t = tensor.detach().contiguous()
        if t.numel():
            self.f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise RuntimeError(f"shard {self.path.name} closed after {self.next}/{len(self.order)} tensors")
        self.f.close()  # no fsync: the rename-into-place protects against killed runs, not power loss


def write_index(out_dir: Path, shards: dict[str, list[str]], specs: dict[str, TensorSpec]) -> None:
    """Write ``model.safetensors.index.json`` when there is more than one shard."""
    if len(shards) <= 1:
        return
    weight_map = {n: f for f, names in shards.items() for n in names}
    total = sum(specs[n].nbytes for n in weight_map)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def stale_partials(out_dir: Path) -> list[Path]:
    """Temporary siblings left behind by an interrupted run for the same output."""
    return sorted(out_dir.parent.glob(f".{out_dir.name}.partial-*"))


@contextmanager
def atomic_output_dir(out_dir: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``out_dir`` only if the block completes.

    An existing ``out_dir`` raises unless ``force``; with ``force`` it is replaced only after the new output
    is complete. Leftovers of killed runs (``.NAME.partial-*``) are removed on the next successful run.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not force:
        raise OutputExistsError(f"output directory {out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output path {out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for p in stale_partials(out_dir):
        shutil.rmtree(p, ignore_errors=True)
