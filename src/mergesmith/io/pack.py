"""Delta packs (GraftLLM-style "SkillPacks"): an expert stored as its base's fingerprint plus a
compressed θ_ft − θ0, read back as a model.

A pack is a folder: `pack.json` (the base's fingerprint and where the base was, the expert's
config, and per tensor how it is stored) and `pack.safetensors` (the stored parts). A tensor is
`unchanged` (θ_ft = θ0: nothing stored), `full` (θ_ft as stored), `sparse` (Δ's kept entries:
flat indices and values) or `lowrank`: Δ̂ = Σ_tiers deq(U_t) diag(S_t) deq(V_tᵀ), each tier a
consecutive run of singular triplets stored in fp32 / fp16 / bf16, or as int8..int2 codes with
one fp16 scale and one zero point per group of `group` entries along each row (the asymmetric
min–max grid of GPTQ's quantiser: x ≈ (q − z)·s). This module decodes; methods/graft.py encodes.

`PackedCheckpoint` has Checkpoint's interface, so `model: PACK` merges like a folder: a read is
base + Δ̂ in fp32, rounded once to the expert's stored dtype. Δ̂ of a low-rank tensor is formed
whole and kept until another tensor is read, so reads by rows give the same bits as one read.
"""

from __future__ import annotations

import hashlib
import math
import threading
from pathlib import Path

import torch

from mergesmith.errors import CheckpointError, PlanError
from mergesmith.io.checkpoint import SAFETENSORS_DTYPES, Checkpoint, TensorInfo, read_json_object
from mergesmith.io.resolve import resolve_model

PACK_FILE = "pack.json"
WEIGHTS_FILE = "pack.safetensors"
FORMAT = "mergesmith-delta-pack/1"
FLOAT_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INT_BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
FINGERPRINT_ROW_BYTES = 1 << 16  # of each tensor's first row hashed into the fingerprint


# ---------------------------------------------------------------- integer codes

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes below 2^bits, `bits` per value, eight values in `bits` bytes (LSB first)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)]).view(-1, 8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((flat[:, :, None] >> shifts) & 1).reshape(-1, bits, 8)  # the bits in order
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8).reshape(-1)


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of pack_bits' output."""
    if bits == 8:
        return data[:count]
    stream = (data.view(-1, bits, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
    values = (stream.reshape(-1, 8, bits) << torch.arange(bits, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return values.reshape(-1)[:count]


def packed_bytes(count: int, bits: int) -> int:
    return count if bits == 8 else -(-count // 8) * bits


def groups(columns: int, group: int) -> int:
    return -(-columns // group)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               shape: tuple[int, int], group: int) -> torch.Tensor:
    """x = (q − z)·s per group of `group` columns of each row, in fp32."""
    rows, cols = shape
    q = unpack_bits(codes, bits, rows * cols).view(rows, cols).to(torch.float32)

    def per_column(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).repeat_interleave(group, dim=1)[:, :cols]

    return (q - per_column(zero)) * per_column(scale)


# ---------------------------------------------------------------- decoding a tensor

def factor(parts: dict[str, torch.Tensor], key: str, precision: str, shape: tuple[int, int],
           group: int) -> torch.Tensor:
    """One tier's U or Vᵀ (`key` "u" / "vt") in fp32."""
    if precision in FLOAT_PRECISIONS:
        return parts[key].to(torch.float32).view(shape)
    return dequantize(parts[key], parts[f"{key}_scale"], parts[f"{key}_zero"],
                      INT_BITS[precision], shape, group)


def lowrank_delta(record: dict, shape: tuple[int, int], part) -> torch.Tensor:
    """Δ̂ = Σ_tiers U_t diag(S_t) V_tᵀ in fp32; `part(suffix)` reads one stored part."""
    m, n = shape
    delta = torch.zeros(m, n, dtype=torch.float32)
    for i, tier in enumerate(record["tiers"]):
        k = tier["rank"]
        if k == 0:
            continue
        parts = _Parts(part, f"t{i}.")
        u = factor(parts, "u", tier["precision"], (m, k), record["group_size"])
        vt = factor(parts, "vt", tier["precision"], (k, n), record["group_size"])
        delta.addmm_(u * parts["s"].to(torch.float32), vt)
    return delta


class _Parts:
    def __init__(self, part, prefix: str):
        self.part, self.prefix = part, prefix

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.part(self.prefix + key)


def sparse_delta(numel: int, part) -> torch.Tensor:
    delta = torch.zeros(numel, dtype=torch.float32)
    delta[part("index").long()] = part("value").to(torch.float32)
    return delta


# ---------------------------------------------------------------- the base's fingerprint

def tensor_digests(ck) -> dict[str, list]:
    """name -> [dtype, shape, digest]: the digest hashes the tensor's name, dtype, shape and the
    bytes of its first row (at most 64 KiB). Cheap on any model, and another model of the same
    architecture (another base, a fine-tune of this one) differs in the first rows."""
    out = {}
    for name in sorted(ck.tensors):
        info = ck.tensors[name]
        digest = hashlib.sha256(f"{name}|{info.dtype}|{list(info.shape)}\n".encode())
        row = ck.read(name, (0, 1) if info.shape else None).reshape(-1)
        row = row[:max(1, FINGERPRINT_ROW_BYTES // info.dtype.itemsize)].contiguous()
        digest.update(row.view(torch.uint8).numpy().tobytes())
        out[name] = [str(info.dtype), list(info.shape), digest.hexdigest()[:16]]
    return out


def fingerprint(digests: dict[str, list]) -> str:
    """One hash of a model's tensor_digests."""
    return hashlib.sha256(repr(sorted(digests.items())).encode()).hexdigest()


def first_difference(recorded: dict, have: dict) -> str:
    """The first tensor (by name) where the base a pack recorded and the model given differ."""
    for name in sorted(set(recorded) | set(have)):
        if name not in have:
            return f"it has no tensor {name!r}"
        if name not in recorded:
            return f"it has a tensor {name!r} the pack's base lacks"
        if recorded[name][:2] != have[name][:2]:
            return f"{name!r} is {have[name][0]} {have[name][1]}, the pack's base has " \
                   f"{recorded[name][0]} {recorded[name][1]}"
        if recorded[name] != have[name]:
            return f"{name!r} holds other values"
    return "no tensor differs"


# ---------------------------------------------------------------- opening a pack

def is_pack_folder(path: Path) -> bool:
    return (Path(path) / PACK_FILE).is_file()


def read_pack(folder: Path) -> dict:
    meta = read_json_object(Path(folder) / PACK_FILE, "pack description")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / PACK_FILE}: format {meta.get('format')!r}, this "
                              f"mergesmith reads {FORMAT!r}", hint="write the pack again with "
                              "this version's `mergesmith pack`")
    return meta


def pack_parts(ref: str, base_model: str | None) -> tuple[str, Path, str] | None:
    """(base reference, pack folder, where the base came from) when `ref` is a pack — a pack
    folder (its base: the recipe's base_model, else the one it was made on) or BASE+PACK."""
    if "+" in ref and not Path(ref).expanduser().exists():
        base, _, pack = ref.partition("+")
        folder = Path(pack).expanduser()
        return (base, folder, "") if is_pack_folder(folder) else None
    folder = Path(ref).expanduser()
    if not is_pack_folder(folder):
        return None
    if base_model and base_model != ref:
        return base_model, folder, "the recipe's base_model"
    base = read_pack(folder)["base"]
    where = base["path"] if Path(base["path"]).exists() else base["ref"]
    return where, folder, "the base it was packed on"


class PackedCheckpoint:
    """A delta pack applied to `base`, refused unless `base` is the model the pack was made on."""

    def __init__(self, base, folder: Path, label: str, base_from: str = ""):
        self.base, self.label = base, label
        self.folder = Path(folder).resolve()
        self.meta = read_pack(self.folder)
        self._check_base(base_from)
        self.path, self.config = base.path, self.meta["expert"]["config"]
        self.sources = [*base.sources, self.folder]
        file = self.folder / WEIGHTS_FILE
        if not file.is_file():
            raise CheckpointError(f"{label}: {file} is missing", hint="the pack is incomplete; "
                                  "write it again with `mergesmith pack`")
        self.stored = Checkpoint.of_file(file, label, self.config)
        self.records = self.meta["tensors"]
        self.tensors = {name: TensorInfo(name, SAFETENSORS_DTYPES[r["dtype"]], tuple(r["shape"]),
                                         file, None) for name, r in self.records.items()}
        kinds = [r["kind"] for r in self.records.values()]
        self.note = (f"delta pack {self.folder} ({kinds.count('lowrank')} low-rank, "
                     f"{kinds.count('sparse')} sparse, {kinds.count('full')} full, "
                     f"{kinds.count('unchanged')} unchanged tensors) on {base.label}"
                     f"{f' ({base_from})' if base_from else ''}")
        self._cache: tuple[str, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def _check_base(self, base_from: str) -> None:
        recorded = self.meta["base"]
        digests = tensor_digests(self.base)
        have = fingerprint(digests)
        if have != recorded["fingerprint"]:
            raise PlanError(
                f"{self.label}: the pack was made on base {recorded['ref']} ({recorded['path']}, "
                f"fingerprint {recorded['fingerprint'][:12]}), but its base here is "
                f"{self.base.label}{f' ({base_from})' if base_from else ''} (fingerprint "
                f"{have[:12]}): {first_difference(recorded['tensors'], digests)}",
                hint="a pack stores θ_ft − θ0 of one base; give that base (base_model, or "
                     "BASE+PACK), or pack the expert again on this base")

    def _part(self, name: str):
        return lambda suffix: self.stored.read(f"{name}.{suffix}")

    def delta(self, name: str) -> torch.Tensor:
        """Δ̂ of a low-rank or sparse tensor, whole, in fp32 (the last one is kept)."""
        with self._lock:
            if self._cache is None or self._cache[0] != name:
                record, shape = self.records[name], self.tensors[name].shape
                if record["kind"] == "lowrank":
                    delta = lowrank_delta(record, shape, self._part(name))
                else:
                    delta = sparse_delta(math.prod(shape), self._part(name)).view(shape)
                self._cache = (name, delta)
            return self._cache[1]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The expert's tensor (or rows of it) as the pack gives it, in its stored dtype."""
        kind, dtype = self.records[name]["kind"], self.tensors[name].dtype
        if kind == "full":
            return self.stored.read(f"{name}.full", rows)
        base = self.base.read(name, rows)
        if kind == "unchanged":
            return base.to(dtype)
        delta = self.delta(name)
        if rows is not None:
            delta = delta[rows[0]:rows[1]]
        return (base.to(torch.float32) + delta).to(dtype)


def open_pack(base, folder: Path, label: str, base_from: str) -> PackedCheckpoint:
    return PackedCheckpoint(base, resolve_model(str(folder)), label, base_from)
