"""Write safetensors shards whose layout is fixed before the first byte is computed.

The plan knows every output tensor's name, dtype and shape, so the shard split, each header and
each tensor's byte offset are decided up front. A tensor can then be written in row chunks as it
is computed, and a resumed merge reproduces the same files bit for bit.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergesmith.io.checkpoint import DTYPE_CODES, Checkpoint


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
    """Appends tensor bytes, in layout order, to one shard file.

    Where the filesystem allows (Linux), the bytes bypass the page cache (O_DIRECT) through one
    aligned staging buffer per writer. A merge never reads its output back, and a buffered write
    first fills page-cache pages that the kernel must find, zero and later flush: on the 1B
    benchmark's VM, writing 2 GB took 5.6 to 26 s buffered (mostly kernel time, competing with
    the merge for the cores) and 2.0 s direct; task arithmetic went from 21 to 10 s. The page
    cache also keeps the inputs, not the output, for the next merge. A filesystem that refuses
    direct I/O (tmpfs before Linux 6.6, some FUSE mounts) gets buffered writes, the same bytes.
    MERGESMITH_DIRECT_WRITES=0 asks for buffered writes everywhere.
    """

    def __init__(self, path: Path, shard: Shard):
        self.path = path
        self.shard = shard
        self.expected = shard.size
        self.written = 0  # bytes handed to the file; `fill` more wait in the staging buffer
        self.fill = 0
        self.fd = _open_direct(path)
        self.direct = self.fd is not None
        if self.fd is None:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.staging = mmap.mmap(-1, STAGING_BYTES)  # page-aligned, as O_DIRECT needs
        try:
            self._append(memoryview(shard.header()))
        except BaseException:
            self.abort()
            raise

    def write(self, tensor: torch.Tensor) -> None:
        """Append a whole tensor or its next rows (already in the output dtype, contiguous)."""
        if tensor.numel():
            self._append(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        try:
            if self.fill:
                # a direct write's length must be whole blocks: pad, then cut the file back
                length = -(-self.fill // DIRECT_ALIGN) * DIRECT_ALIGN if self.direct else self.fill
                self.staging[self.fill:length] = bytes(length - self.fill)
                self._flush(length)
                self.written += self.fill
                self.fill = 0
                os.ftruncate(self.fd, self.written)
        finally:
            self.abort()
        if self.written != self.expected:
            raise RuntimeError(
                f"{self.path}: wrote {self.written} bytes, layout says {self.expected}"
            )

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if not self.staging.closed:
            self.staging.close()

    def _append(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            take = min(len(data), STAGING_BYTES - self.fill)
            self.staging[self.fill:self.fill + take] = data[:take]
            self.fill += take
            data = data[take:]
            if self.fill == STAGING_BYTES:
                self._flush(STAGING_BYTES)
                self.written += STAGING_BYTES
                self.fill = 0

    def _flush(self, length: int) -> None:
        """Write the first `length` staged bytes at the file's end."""
        done = 0
        with memoryview(self.staging) as staged:
            while done < length:
                with staged[done:length] as rest:  # released here even if an error keeps it
                    try:
                        done += os.write(self.fd, rest)
                    except OSError as exc:
                        if not (self.direct and exc.errno == errno.EINVAL):
                            raise
                        # the filesystem took the open but not the write (larger blocks, or
                        # O_DIRECT refused only on write): go on buffered, from where it stopped
                        import fcntl  # POSIX only, as is O_DIRECT

                        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                        self.direct = False


STAGING_BYTES = 8 << 20  # a few large writes per shard; a multiple of DIRECT_ALIGN
DIRECT_ALIGN = 4096  # O_DIRECT's unit for lengths, offsets and addresses on common devices


def _open_direct(path: Path) -> int | None:
    """A new file at `path` opened for direct writes, or None where that is not to be had."""
    if not hasattr(os, "O_DIRECT") or os.environ.get("MERGESMITH_DIRECT_WRITES", "1") == "0":
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # this filesystem has no direct I/O
            return None
        raise


COPY_CHUNK_BYTES = 16 << 20  # rows of a tensor copied at a time by ReservedShard.copy


class ReservedShard:
    """One safetensors file written front to back while its tensors' shapes may still shrink:
    room for the header is reserved at its largest (`largest`: every tensor in its dtype, at its
    largest shape), the data is appended as it comes, and the true header goes into the
    room at the end, padded with spaces (as the format allows; the data stays 8-byte aligned).
    A shape that shrinks never lengthens the header; the names and dtypes must be those given."""

    def __init__(self, path: Path, largest: list[OutTensor]):
        self.room = len(Shard("", largest).header())
        self.file = open(path, "wb")
        self.file.seek(self.room)
        self.written: list[OutTensor] = []

    def write(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        self.written.append(OutTensor(name, tensor.dtype, tuple(tensor.shape)))
        if tensor.numel():
            self.file.write(tensor.view(-1).view(torch.uint8).numpy().data)

    def copy(self, name: str, ck: Checkpoint, source: str) -> None:
        """A checkpoint's tensor as stored, a few rows at a time (embeddings are large)."""
        info = ck.tensors[source]
        self.written.append(OutTensor(name, info.dtype, tuple(info.shape)))
        step = max(1, COPY_CHUNK_BYTES // max(info.row_bytes, 1))
        for start in range(0, info.shape[0] if info.shape else 1, step):
            rows = (start, min(start + step, info.shape[0])) if info.shape else None
            self.file.write(ck.read(source, rows).contiguous().view(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        with self.file:
            header = Shard("", self.written).header()[8:]
            if len(header) > self.room - 8:
                raise RuntimeError(f"{self.file.name}: the header outgrew the room reserved for it")
            header += b" " * (self.room - 8 - len(header))
            self.file.seek(0)
            self.file.write(len(header).to_bytes(8, "little") + header)

    def abort(self) -> None:
        self.file.close()
