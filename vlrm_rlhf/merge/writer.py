"""Streaming shard output: safetensors shards written tensor by tensor (into ``files.atomic_output_dir``'s folder).

Shards are planned from shapes alone (huggingface_hub's sharding helper), each shard's header is written
first, then tensors are appended as they are produced, so memory never holds more than one output tensor.
Written bytes are handed to the disk as they accumulate (``sync_file_range``), so writeback overlaps the merge
instead of piling up gigabytes of dirty pages for the final ``sync``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory

WRITEBACK = 32 << 20  # bytes: each stretch this long is queued for writeback once written (0: leave it to the kernel)
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if os.name == "posix" else None
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


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

    def __init__(self, path: Path, names: list[str], specs: dict[str, TensorSpec], metadata: dict[str, str], *,
                 drop: bool = False):
        self.path = path
        self.drop = drop  # written stretches leave the page cache once on disk (one stretch behind the newest)
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
        self._current, self._left = "", 0  # the tensor being appended and its bytes still to come
        self._queued = 0  # bytes of the file already queued for writeback
        self._dropped = 0  # bytes of the file written back and dropped from the page cache

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor ``name`` (the next one in header order)."""
        spec = self.specs.get(name)
        if spec is not None and tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"tensor {name}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                               f"planned {spec.shape} {spec.dtype}")
        self.begin(name)
        self.append(tensor)

    def begin(self, name: str) -> None:
        """Start tensor ``name`` (the next one in header order); its bytes then come in ``append`` calls."""
        expected = self.order[self.next] if self.next < len(self.order) else None
        if name != expected or self._left:
            raise RuntimeError(f"shard {self.path.name}: expected tensor {expected}, got {name}")
        self._current, self._left = name, self.specs[name].nbytes
        self.next += 1

    def append(self, part: torch.Tensor) -> None:
        """Append the next elements (any shape, in order) of the tensor begun last."""
        spec = self.specs[self._current]
        if part.dtype != spec.dtype:
            raise RuntimeError(f"tensor {self._current}: produced {part.dtype}, planned {spec.dtype}")
        n = part.numel() * part.element_size()
        if n > self._left:
            raise RuntimeError(f"tensor {self._current}: produced more than the planned shape {spec.shape}")
        t = part.detach().contiguous()
        if t.numel():
            self.f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        self._left -= n
        if WRITEBACK and _sync_file_range is not None and self.f.tell() - self._queued >= WRITEBACK:
            self._write_back()

    def _write_back(self) -> None:
        """Queue the bytes written since the last call for writeback (asynchronous: returns at once)."""
        self.f.flush()
        end, fd = self.f.tell(), self.f.fileno()
        _sync_file_range(fd, self._queued, end - self._queued, _SYNC_FILE_RANGE_WRITE)  # a hint
        if self.drop and self._queued > self._dropped:  # the stretch before: wait until it is on disk, drop it
            _sync_file_range(fd, self._dropped, self._queued - self._dropped,
                             _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER)
            os.posix_fadvise(fd, self._dropped, self._queued - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = self._queued
        self._queued = end

    def close(self) -> None:
        if self.next != len(self.order) or self._left:
            raise RuntimeError(f"shard {self.path.name} closed after {self.next}/{len(self.order)} tensors "
                               f"({self._left} bytes of {self._current or 'none'} missing)")
        self.f.close()  # no fsync: the rename-into-place protects against killed runs, not power loss


def write_index(out_dir: Path, shards: dict[str, list[str]], specs: dict[str, TensorSpec]) -> None:
    """Write ``model.safetensors.index.json`` when there is more than one shard."""
    if len(shards) <= 1:
        return
    weight_map = {n: f for f, names in shards.items() for n in names}
    total = sum(specs[n].nbytes for n in weight_map)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
