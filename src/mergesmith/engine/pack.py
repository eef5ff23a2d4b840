"""`mergesmith pack BASE EXPERT OUT`: an expert as a GraftLLM-style delta pack (io/pack.py's
format, methods/graft.py's encoding), written one tensor at a time.

Which tensor goes where (module-aware, as GraftLLM's code does it): a 2-D weight inside a
transformer block is a projection — attention when its name says attn/attention, else MLP — and
is stored low rank in its group's tiers; everything else (embeddings, LM head, norms, biases) is
stored whole (GraftLLM keeps θ_ft there), or, with `rest="sparse"` (ours), as its largest |Δ|
entries. A tensor equal to the base's is stored as nothing; one the base lacks, or of another
shape (a resized vocabulary), whole.

Memory: one tensor's Δ and its SVD (methods/lowrank.py's Gram route) at a time; the pack's one
safetensors file is appended to as tensors are encoded, its header room reserved up front at the
largest ranks (io.writer.ReservedShard), and the folder appears only when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergesmith.io import tensor_names as L
from mergesmith.errors import MergesmithError
from mergesmith.io import Checkpoint, OutputFolder, OutTensor, resolve_model
from mergesmith.io.checkpoint import DTYPE_CODES, weight_files
from mergesmith.io.pack import FORMAT, PACK_FILE, WEIGHTS_FILE, fingerprint, tensor_digests
from mergesmith.io.writer import ReservedShard
from mergesmith.methods import graft

ATTENTION = re.compile(r"attn|attention")
CHUNK_BYTES = 16 << 20  # rows compared at a time when a whole tensor is not needed


@dataclass(frozen=True)
class PackOptions:
    attention: tuple[graft.Tier, ...] = graft.ATTENTION_TIERS
    mlp: tuple[graft.Tier, ...] = graft.MLP_TIERS
    rest: str = "full"  # or "sparse" (ours)
    density: float = 0.1  # of `sparse`
    group_size: int = graft.GROUP

    def __post_init__(self):
        if self.rest not in ("full", "sparse"):
            raise MergesmithError(f"--rest {self.rest!r}: expected full or sparse")
        if not 0 < self.density <= 1:
            raise MergesmithError(f"--density {self.density}: expected a share in (0, 1]")
        if self.group_size < 1:
            raise MergesmithError(f"--group-size {self.group_size}: expected a whole number ≥ 1")


def module_of(name: str, shape: tuple[int, ...]) -> str:
    """"attention" / "mlp" for a block's 2-D projection weight, else "rest"."""
    projection = (len(shape) == 2 and min(shape) > 1 and name.endswith("weight")
                  and L.layer_of(name) is not None and not L.VOCAB_NAMES.search(name))
    if not projection:
        return "rest"
    return "attention" if ATTENTION.search(name) else "mlp"


@dataclass
class PackResult:
    path: Path
    pack_bytes: int
    expert_bytes: int
    kinds: dict[str, int] = field(default_factory=dict)
    error: float = 0.0  # the largest ‖Δ − Δ̂‖/‖Δ‖ of a low-rank tensor


def pack(base: str | Path, expert: str | Path, out: str | Path, options: PackOptions = PackOptions(),
         *, overwrite: bool = False) -> PackResult:
    """Write the delta pack of `expert` on `base` at `out` (it appears only when complete)."""
    base_ck = Checkpoint(resolve_model(str(base)), label=f"base {base}")
    ft_ck = Checkpoint(resolve_model(str(expert)), label=f"expert {expert}")
    plan = {name: _kind(name, base_ck, ft_ck, options) for name in ft_ck.tensors}
    blob = json.dumps([str(base_ck.path), str(ft_ck.path), repr(options)])
    output = OutputFolder(Path(out), hashlib.sha256(blob.encode()).hexdigest(),
                          overwrite=overwrite, inputs=[base_ck.path, ft_ck.path])
    try:
        file = ReservedShard(output.path(WEIGHTS_FILE), _largest(plan, ft_ck, options))
        records, errors = {}, [0.0]
        try:
            for name, kind in plan.items():
                records[name] = _write(name, kind, base_ck, ft_ck, options, file, errors)
        except BaseException:
            file.abort()
            raise
        file.close()
        meta = _description(base, expert, base_ck, ft_ck, options, records)
        (output.partial / PACK_FILE).write_text(json.dumps(meta, separators=(",", ":")) + "\n")
        pack_bytes = sum((output.partial / f).stat().st_size for f in (PACK_FILE, WEIGHTS_FILE))
        kinds = {k: sum(r["kind"] == k for r in records.values())
                 for k in ("lowrank", "sparse", "full", "unchanged")}
        expert_bytes = sum(f.stat().st_size for f in weight_files(ft_ck.path))
        path = output.finalize()
        return PackResult(path, pack_bytes, expert_bytes, kinds, max(errors))
    finally:
        output.release()


def _kind(name: str, base: Checkpoint, ft: Checkpoint, options: PackOptions) -> str:
    """How `name` is stored, as far as names and shapes tell (equal tensors: found when read)."""
    info = ft.tensors[name]
    if name not in base.tensors or base.tensors[name].shape != info.shape or not info.dtype.is_floating_point:
        return "full"
    if module_of(name, info.shape) != "rest":
        return "lowrank"
    return "sparse" if options.rest == "sparse" and len(info.shape) >= 2 else "full"


def _largest(plan: dict[str, str], ft: Checkpoint, options: PackOptions) -> list[OutTensor]:
    """Every part the file may hold, at its largest: the room its header may need."""
    out = []
    for name, kind in plan.items():
        info = ft.tensors[name]
        if kind == "full":
            out.append(OutTensor(f"{name}.full", info.dtype, info.shape))
        elif kind == "sparse":
            k = graft.sparse_count(math.prod(info.shape), options.density)
            index = torch.int32 if math.prod(info.shape) < 2**31 else torch.int64
            out += [OutTensor(f"{name}.index", index, (k,)), OutTensor(f"{name}.value", info.dtype, (k,))]
        else:
            tiers = getattr(options, module_of(name, info.shape))
            out += [OutTensor(f"{name}.{part}", dtype, shape)
                    for part, dtype, shape in graft.lowrank_sizes(info.shape, tiers, options.group_size)]
    return out


def _write(name: str, kind: str, base: Checkpoint, ft: Checkpoint, options: PackOptions,
           file: ReservedShard, errors: list[float]) -> dict:
    info = ft.tensors[name]
    record = {"dtype": DTYPE_CODES[info.dtype], "shape": list(info.shape),
              "module": module_of(name, info.shape)}
    if name in base.tensors and base.tensors[name].shape == info.shape and _equal(base, ft, name):
        return {**record, "kind": "unchanged"}
    if kind == "full":
        file.copy(f"{name}.full", ft, name)
        return {**record, "kind": "full"}
    delta = ft.read(name).to(torch.float32) - base.read(name).to(torch.float32)
    if kind == "sparse":
        stored, parts = graft.compress_sparse(delta, options.density, info.dtype)
    else:
        done = graft.compress_lowrank(delta, getattr(options, record["module"]), options.group_size)
        stored, parts = {**done.record, "rank": done.rank, "kept_energy": round(done.kept_energy, 6),
                         "error": round(done.error, 6)}, done.parts
        errors.append(done.error)
    for part, tensor in parts.items():
        file.write(f"{name}.{part}", tensor)
    return {**record, **stored}


def _equal(base: Checkpoint, ft: Checkpoint, name: str) -> bool:
    info = ft.tensors[name]
    if base.tensors[name].dtype != info.dtype:
        return False
    rows = info.shape[0] if info.shape else 1
    step = max(1, CHUNK_BYTES // max(info.row_bytes, 1))
    for start in range(0, rows, step):
        span = (start, min(start + step, rows)) if info.shape else None
        if not torch.equal(base.read(name, span), ft.read(name, span)):
            return False
    return True


def _description(base_ref, expert_ref, base: Checkpoint, ft: Checkpoint, options: PackOptions,
                 records: dict) -> dict:
    digests = tensor_digests(base)
    return {
        "format": FORMAT,
        "base": {"ref": str(base_ref), "path": str(base.path.resolve()), "fingerprint": fingerprint(digests),
                 "tensors": digests},
        "expert": {"ref": str(expert_ref), "path": str(ft.path.resolve()), "config": ft.config},
        "options": {"attention": [str(t) for t in options.attention], "mlp": [str(t) for t in options.mlp],
                    "rest": options.rest, "density": options.density, "group_size": options.group_size,
                    "quantizer": "round to nearest (ours; GraftLLM uses GPTQ)"},
        "tensors": records,
    }
