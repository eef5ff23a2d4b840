"""EMR-merging's side outputs: per-task masks and rescalers beside the unified model, and `apply`.

A merge with `merge_method: emr` writes a normal model folder, the unified model θ0 + τ_uni,
plus an `emr/` folder beside its weights:

    emr/masks*.safetensors   one per output shard, named like it ("model" -> "masks"); for each
                             merged tensor N of n entries, "masks.N": uint8 (T, ⌈n/8⌉), row i the
                             mask M_i of N's entries in row-major order, 8 to a byte
                             (numpy.packbits, big-endian bit order); and "sums.N": float64 (2, T),
                             N's share of Σ|τi| and Σ|M_i ⊙ τ_uni|
    emr/emr.json             the tasks (the experts as the recipe names them, in its order), the
                             base model's folder, the model-wide sums and the rescalers λ_i

Both are written inside the partial output folder, so they appear with the model or not at all.
A shard's masks file is renamed into place before the shard is marked done: a resumed merge
keeps both or redoes both. emr.json is written at the end from the sums in the masks files, so
no state lives only in memory across a resume. Memory: besides the streamed rows, the packed
masks of one tensor (T bits per entry) until the tensor is complete.

`apply_emr` rebuilds task i's model θ0 + λ_i·M_i ⊙ τ_uni, τ_uni read back as (merged − θ0), into
a normal folder with the merge's shard layout, written atomically like a merge.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mergesmith.engine.side_outputs import store as side
from mergesmith.engine.plan import DTYPES, Plan, TensorJob
from mergesmith.engine.side_outputs.store import read_tensor, task_index
from mergesmith.errors import CheckpointError
from mergesmith.io import Checkpoint, OutTensor, Shard
from mergesmith.io.checkpoint import read_safetensors_header, weight_files
from mergesmith.io.output import write_json
from mergesmith.methods.emr import EMR_PAPER, rescalers, task_model

SIDE_FOLDER = "emr"
INDEX = "emr.json"
FORMAT = "mergesmith-emr/1"
APPLY_CHUNK_BYTES = 16 * 1024**2


def masks_filename(shard: Shard) -> str:
    return shard.filename.replace("model", "masks", 1)


def packed_bytes(numel: int) -> int:
    return (numel + 7) // 8


class PackedRows:
    """T rows of bits filled left to right, in pieces of any length, packed 8 to a byte."""

    def __init__(self, rows: int, bits: int):
        self.packed = np.zeros((rows, packed_bytes(bits)), dtype=np.uint8)
        self.bits = bits
        self.done = 0  # bits packed so far, a multiple of 8 until the last piece
        self.carry = np.zeros((rows, 0), dtype=bool)

    def add(self, piece: np.ndarray) -> None:
        bits = np.concatenate([self.carry, piece], axis=1)
        whole = bits.shape[1] // 8 * 8
        first = self.done // 8
        self.packed[:, first:first + whole // 8] = np.packbits(bits[:, :whole], axis=1)
        self.done += whole
        self.carry = bits[:, whole:]
        if self.done + self.carry.shape[1] == self.bits and self.carry.shape[1]:
            self.packed[:, -1] = np.packbits(self.carry, axis=1)[:, 0]
            self.done, self.carry = self.bits, self.carry[:, :0]

    @property
    def complete(self) -> bool:
        return self.done == self.bits


class MaskWriter(side.SideWriter):
    """Receives each merged unit's masks and sums and writes one masks file per output shard."""

    folder = SIDE_FOLDER

    def filename(self, shard: Shard) -> str:
        return masks_filename(shard)

    def tensors(self, out: OutTensor, job: TensorJob) -> list[OutTensor]:
        tasks = len(job.inputs) - 1
        return [OutTensor(f"masks.{out.name}", torch.uint8,
                          (tasks, packed_bytes(math.prod(out.shape)))),
                OutTensor(f"sums.{out.name}", torch.float64, (2, tasks))]

    def open(self, shard: Shard) -> None:
        super().open(shard)
        self.name, self.bits, self.sums = None, None, None

    def add(self, job: TensorJob, outputs: tuple[list[torch.Tensor], torch.Tensor]) -> None:
        masks, sums = outputs
        if job.out.name != self.name:
            self.name = job.out.name
            self.bits = PackedRows(len(masks), math.prod(job.out.shape))
            self.sums = torch.zeros_like(sums)
        self.bits.add(np.stack([m.reshape(-1).cpu().numpy() for m in masks]))
        self.sums += sums
        if self.bits.complete:
            self.write(torch.from_numpy(self.bits.packed), self.sums)


def write_index(plan: Plan, folder: Path) -> Path:
    """emr/emr.json: tasks, base, model-wide sums and rescalers, from the masks files' sums."""
    merged = [job for job in plan.jobs if not job.copy]
    tasks = [ck.label for ck, _ in merged[0].inputs[1:]]
    totals = torch.zeros(2, len(tasks), dtype=torch.float64)
    for shard in plan.shards:
        path = folder / SIDE_FOLDER / masks_filename(shard)
        for name, info in read_safetensors_header(path).items():
            if name.startswith("sums."):
                totals += read_tensor(info)
    base = merged[0].inputs[0][0]
    jobs = {job.out.name: job for job in plan.jobs}
    index = {
        "format": FORMAT,
        "method": f"EMR-merging: {EMR_PAPER}",
        "tasks": tasks,
        "base_model": base.label,
        "base_path": str(base.path.resolve()),
        "load_dtype": plan.recipe.dtype,
        "rescalers": rescalers(totals),
        "sum_abs_task_vector": totals[0].tolist(),
        "sum_abs_masked_unified": totals[1].tolist(),
        "masks": {out.name: f"{SIDE_FOLDER}/{masks_filename(shard)}"
                  for shard in plan.shards for out in shard.tensors if not jobs[out.name].copy},
        # output name -> the base's name, where they differ (slices that move layers)
        "base_tensors": {job.out.name: job.inputs[0][1] for job in merged
                         if job.inputs[0][1] != job.out.name},
    }
    path = folder / SIDE_FOLDER / INDEX
    write_json(path, index)
    return path


# ------------------------------------------------------------------------------------------
# apply: rebuild one task's model


def read_index(merged: Path) -> dict:
    return side.read_index(merged, SIDE_FOLDER, INDEX, FORMAT, "emr")


def apply_emr(merged: str | Path, task: str | int, out: str | Path, *, base: str | Path | None = None,
              resume: bool = False, overwrite: bool = False,
              chunk_bytes: int = APPLY_CHUNK_BYTES) -> Path:
    """Write task `task`'s model θ0 + λ_i·M_i ⊙ τ_uni from the EMR merge in `merged` to `out`."""
    merged = Path(merged)
    index = read_index(merged)
    i = task_index(index["tasks"], task)
    unified = Checkpoint(merged)
    origin = _open_base(Path(base or index["base_path"]), base is None)
    load_dtype = DTYPES.get(index.get("load_dtype") or "")
    files: dict[Path, side.SideFile] = {}

    def pieces(tensor: OutTensor):
        if tensor.name not in index["masks"]:
            return [unified.read(tensor.name)]
        path = merged / index["masks"][tensor.name]
        if path not in files:
            files[path] = side.SideFile(path, f"the EMR masks of {tensor.name!r}")
        if f"masks.{tensor.name}" not in files[path].tensors:
            raise CheckpointError(f"{path}: has no masks for {tensor.name!r}")
        mask_row = files[path].read(f"masks.{tensor.name}")[i].numpy()
        base_name = index["base_tensors"].get(tensor.name, tensor.name)
        return _task_rows(unified, origin, tensor, base_name, mask_row, index["rescalers"][i],
                          load_dtype, chunk_bytes)

    base_files = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(origin.path)]
    note = (f"\n## EMR task model\n\nThis folder holds task `{index['tasks'][i]}` rebuilt from the "
            f"EMR merge in `{merged}` (`mergesmith emr apply`): θ0 + λ·M ⊙ τ_uni with "
            f"λ = {index['rescalers'][i]:.6g}.\n")
    return side.rebuild(merged, Path(out), [index, i, base_files], pieces, note,
                        resume=resume, overwrite=overwrite, reads=[origin.path])


def _open_base(path: Path, from_index: bool) -> Checkpoint:
    try:
        return Checkpoint(path)
    except CheckpointError as exc:
        where = "recorded in emr/emr.json" if from_index else "given"
        raise CheckpointError(f"cannot open the base model {where}: {exc.message}",
                              hint="pass --base with the base model's folder") from None


def unpack_bits(packed: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """Bits [start, stop) of a packed row, as bools."""
    first, skip = divmod(start, 8)
    bits = np.unpackbits(packed[first:packed_bytes(stop)])[skip:skip + stop - start]
    return torch.from_numpy(bits.view(np.bool_))


def _task_rows(unified: Checkpoint, origin: Checkpoint, tensor: OutTensor, base_name: str,
               mask_row: np.ndarray, rescaler: float, load_dtype, chunk_bytes: int):
    """θ0 + λ_i·M_i ⊙ (merged − θ0), block of rows by block of rows, in the merge's dtype."""
    info = origin.tensors.get(base_name)
    if info is None or info.shape != tensor.shape:
        found = "has no such tensor" if info is None else f"has shape {list(info.shape)}"
        raise CheckpointError(f"{origin.label}: the base model {found} for {base_name!r}, but the "
                              f"merge has {list(tensor.shape)}", hint="pass --base with the "
                              "base model the merge was made from")
    rows = tensor.shape[0] if tensor.shape else 1
    row_elems = math.prod(tensor.shape[1:]) if tensor.shape else 1
    step = max(1, chunk_bytes // (4 * max(row_elems, 1)))
    for start in range(0, rows, step):
        block = (start, min(start + step, rows)) if tensor.shape else None
        theta0 = origin.read(base_name, block)
        if load_dtype is not None:
            theta0 = theta0.to(load_dtype)  # as the merge read it
        merged = unified.read(tensor.name, block).float()
        first = start * row_elems
        mask = unpack_bits(mask_row, first, first + merged.numel()).view(merged.shape)
        yield task_model(theta0.float(), merged, mask, rescaler).to(tensor.dtype)
