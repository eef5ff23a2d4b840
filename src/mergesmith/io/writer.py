"""Write safetensors shards whose layout is fixed before the first byte is computed.

The plan knows every output tensor's name, dtype and shape, so the shard split, each header and
each tensor's byte offset are decided up front. A tensor can then be written in row chunks as it
is computed, and a resumed merge reproduces the same files bit for bit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergesmith.io.checkpoint import DTYPE_CODES


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Shard:
    filename: str
    tensors: list[OutTensor] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def header(self) -> bytes:
        entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in self.tensors:
            entries[t.name] = {
                "dtype": DTYPE_CODES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
        return len(raw).to_bytes(8, "little") + raw

    @property
    def size(self) -> int:
        return len(self.header()) + self.data_bytes


def layout_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[Shard]:
    """Greedy split in plan order, named like transformers' shards."""
    shards: list[Shard] = [Shard("")]
    for tensor in tensors:
        current = shards[-1]
        if current.tensors and current.data_bytes + tensor.nbytes > max_shard_bytes:
            current = Shard("")
            shards.append(current)
        current.tensors.append(tensor)
    if len(shards) == 1:
        shards[0].filename = "model.safetensors"
    else:
        for number, shard in enumerate(shards, 1):
            shard.filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
    return shards


def weight_index(shards: list[Shard]) -> dict:
    return {
        "metadata": {"total_size": sum(s.data_bytes for s in shards)},
        "weight_map": {t.name: s.filename for s in shards for t in s.tensors},
    }


class ShardWriter:
    """Appends tensor bytes, in layout order, to one shard file."""

    def __init__(self, path: Path, shard: Shard):
        self.path = path
        self.shard = shard
        self.expected = shard.size
        self._file = open(path, "wb")
        self._file.write(shard.header())

    def write(self, tensor: torch.Tensor) -> None:
        """Append a whole tensor or its next rows (already in the output dtype, contiguous)."""
        if tensor.numel():
            self._file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        written = self._file.tell()
        self._file.close()
        if written != self.expected:
            raise RuntimeError(
                f"{self.path}: wrote {written} bytes, layout says {self.expected}"
            )

    def abort(self) -> None:
        self._file.close()
