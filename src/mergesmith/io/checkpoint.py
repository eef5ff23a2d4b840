"""Open a Hugging Face model folder for lazy reads: headers now, tensor bytes only when asked.

Safetensors files are read by byte range (seek + readinto), never mapped whole, so a tensor (or a
few rows of it) costs exactly its own bytes. Pickled `.bin` files are loaded only with
`torch.load(weights_only=True)`, memory-mapped, so no code in a checkpoint ever runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mergesmith.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. `offset` is absolute in `file`; None for pickled checkpoints."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else self.nbytes


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header against the file's real size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (declares {header_len} bytes, "
                f"file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except KeyError as exc:
            raise CheckpointError(
                f"{path}: tensor {name!r} has an unsupported or missing field ({exc})"
            ) from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        info = TensorInfo(name, dtype, shape, path, data_start + begin)
        if begin < 0 or end < begin:
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data offsets "
                                  f"[{begin}, {end}]", hint="the file is corrupt")
        if end - begin != info.nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} declares shape {list(shape)} ({info.nbytes} bytes) "
                f"but spans {end - begin} bytes"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, "
                f"the file has {size}",
                hint="the download or copy of this file is incomplete",
            )
        tensors[name] = info
    _check_disjoint(path, tensors)
    return tensors


def _check_disjoint(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """Two tensors sharing bytes would each read the other's values (the safetensors library
    refuses such a file too)."""
    spans = sorted((info.offset, info.offset + info.nbytes, name) for name, info in tensors.items()
                   if info.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap in the file",
                                  hint="the file is corrupt")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object, as UTF-8 (what transformers reads)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {exc.start})",
                              hint=f"the {what} is corrupt") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})", hint=f"the {what} is corrupt") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the {what} must be a JSON object, got a "
                              f"{type(data).__name__}")
    return data


class Checkpoint:
    """One model folder: its config and a lazy view of its tensors."""

    note = ""  # what `check` says of this input besides its name (an adapter view says more)

    @property
    def sources(self) -> list[Path]:
        """The folders whose files this input reads."""
        return [self.path]

    def __init__(self, path: Path, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        self.config = self._read_config()
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._scan()

    @classmethod
    def of_file(cls, file: Path, label: str, config: dict) -> Checkpoint:
        """One weights file read the same lazy way, without a model folder's config.json (a PEFT
        adapter's adapter_model.safetensors)."""
        self = cls.__new__(cls)
        self.path, self.label, self.config = Path(file).parent, label, config
        self.tensors, self._pickled, self._lock = {}, {}, threading.Lock()
        self._add_file(Path(file))
        return self

    def _read_config(self) -> dict:
        config = self.path / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{self.label}: no config.json in {self.path}")
        return read_json_object(config, "model config")

    def _scan(self) -> None:
        for index_name, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            index = self.path / index_name
            if index.is_file():
                for file in self._index_files(index):
                    self._add_file(file)
                return
            if (self.path / single).is_file():
                self._add_file(self.path / single)
                return
        raise CheckpointError(
            f"{self.label}: no weights in {self.path}",
            hint="expected model.safetensors, a safetensors index, or pytorch_model.bin",
        )

    def _index_files(self, index: Path) -> list[Path]:
        weight_map = read_json_object(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a valid weight index ('weight_map' must map "
                                  f"tensor names to files, got {type(weight_map).__name__})")
        odd = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
        if odd is not None:
            raise CheckpointError(f"{index}: not a valid weight index (tensor {odd!r} maps to "
                                  f"{weight_map[odd]!r}, not a file name)")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (self.path / name).is_file():
                raise CheckpointError(f"{index}: lists shard {name!r}, which is missing")
        return [self.path / name for name in files]

    def _add_file(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            found = read_safetensors_header(file)
        else:
            found = self._load_pickled(file)
        for name in found:
            if name in self.tensors:
                raise CheckpointError(f"{self.label}: tensor {name!r} appears in two shards")
        self.tensors.update(found)

    def _load_pickled(self, file: Path) -> dict[str, TensorInfo]:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for a bad or unsafe pickle
            raise CheckpointError(
                f"{file}: cannot be loaded safely ({type(exc).__name__}: {_first_reason(exc)})",
                hint="only plain tensor checkpoints load (mergesmith never runs code from a "
                     "pickle); convert the file to safetensors where you trust it",
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict")
        self._pickled[file] = state
        return {
            name: TensorInfo(name, t.dtype, tuple(t.shape), file, None)
            for name, t in state.items()
            if isinstance(t, torch.Tensor)
        }

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or rows [start, stop) of its first dimension, in its stored dtype."""
        info = self.tensors[name]
        start, stop = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        if info.offset is None:
            tensor = self._pickled[info.file][name]
            return (tensor[start:stop] if rows is not None else tensor).clone()
        out = torch.empty(shape, dtype=info.dtype)
        buffer = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if buffer is None:
            return out
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset + start * info.row_bytes)
            got = f.readinto(buffer)
        if got != buffer.nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        return out


def _first_reason(exc: Exception) -> str:
    """torch's weights_only refusal without its advice to load with weights_only=False, which
    would run the pickle's code."""
    text = str(exc)
    reason = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    line = reason.group(1) if reason else next((l for l in text.splitlines() if l.strip()), "")
    line = line.split(". ")[0]  # its next sentences say how to allow the object anyway
    if "weights_only" in line:
        line = "the pickle holds objects other than tensors"
    return line.strip()[:200]


def weight_files(path: Path) -> list[Path]:
    """The files that hold a folder's weights (for sizing and I/O accounting)."""
    return sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin"))


def available_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize
