"""Twin-Merging's side outputs: each expert's compressed exclusive part beside the shared model,
and `apply`, which writes the model for fixed routing weights.

A merge with `merge_method: twin` writes a normal model folder, the shared model θ*, plus a
`twin/` folder beside its weights:

    twin/parts*.safetensors   one per output shard, named like it ("model" -> "parts"); for each
                              merged tensor N of the expert count T: a matrix (or a tensor of more
                              dimensions, seen as its first dimension by the rest) as "A.N"
                              (T, m, r) and "B.N" (T, r, n), v_t = A[t] @ B[t]; anything else
                              whole, as "D.N" (T, *shape); in the merge's output dtype
    twin/twin.json            the tasks (the experts as the recipe names them, in its order), the
                              settings, the parts files, and the router (calibrate/router.py)
    twin/router.safetensors   the router's weights

All of it is written inside the partial output folder, so it appears with the model or not at
all; a shard's parts file is renamed into place before the shard is marked done.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mergesmith.engine.side_outputs import store as side
from mergesmith.engine.plan import Plan, TensorJob
from mergesmith.errors import CheckpointError, MergesmithError
from mergesmith.io import Checkpoint, OutTensor, Shard
from mergesmith.io.output import write_json
from mergesmith.methods.twin import TWIN_PAPER, compressed_rank, expand, routed

SIDE_FOLDER = "twin"
INDEX = "twin.json"
FORMAT = "mergesmith-twin/1"


def parts_filename(shard: Shard) -> str:
    return shard.filename.replace("model", "parts", 1)


def part_tensors(name: str, shape: tuple[int, ...], tasks: int, rank_ratio: float,
                 dtype: torch.dtype) -> list[OutTensor]:
    """The side tensors holding the T compressed parts of merged tensor `name`."""
    if len(shape) < 2:
        return [OutTensor(f"D.{name}", dtype, (tasks, *shape))]
    rows, cols = shape[0], math.prod(shape[1:])
    r = compressed_rank(torch.Size(shape), rank_ratio)
    return [OutTensor(f"A.{name}", dtype, (tasks, rows, r)),
            OutTensor(f"B.{name}", dtype, (tasks, r, cols))]


class PartWriter(side.SideWriter):
    """Receives each merged tensor's parts and writes one parts file per output shard."""

    folder = SIDE_FOLDER

    def filename(self, shard: Shard) -> str:
        return parts_filename(shard)

    def tensors(self, out: OutTensor, job: TensorJob) -> list[OutTensor]:
        return part_tensors(out.name, tuple(out.shape), len(job.inputs) - 1,
                            job.params["rank_ratio"], out.dtype)

    def add(self, job: TensorJob, parts: list[tuple[torch.Tensor, ...]]) -> None:
        self.write(*(torch.stack([p[factor] for p in parts]).to(job.out.dtype)
                     for factor in range(len(parts[0]))))


def write_index(plan: Plan, folder: Path) -> Path:
    """twin/twin.json: tasks, settings and where each tensor's parts are (the router's entry
    is added when it is trained)."""
    merged = [job for job in plan.jobs if not job.copy]
    jobs = {job.out.name: job for job in plan.jobs}
    params = merged[0].params
    index = {
        "format": FORMAT,
        "method": f"Twin-Merging: {TWIN_PAPER}",
        "tasks": [ck.label for ck, _ in merged[0].inputs[1:]],
        "settings": {"lambda": params["lambda_"], "shared": params["shared"],
                     "rank_ratio": params["rank_ratio"]},
        "parts": {out.name: f"{SIDE_FOLDER}/{parts_filename(shard)}"
                  for shard in plan.shards for out in shard.tensors if not jobs[out.name].copy},
    }
    path = folder / SIDE_FOLDER / INDEX
    write_json(path, index)
    return path


# ------------------------------------------------------------------------------------------
# reading the parts back, and apply


def read_index(merged: Path) -> dict:
    return side.read_index(merged, SIDE_FOLDER, INDEX, FORMAT, "twin")


class Parts:
    """The compressed exclusive parts of a twin merge, read tensor by tensor."""

    def __init__(self, merged: Path, index: dict | None = None):
        self.merged = Path(merged)
        self.index = index if index is not None else read_index(self.merged)
        self.tasks: list[str] = self.index["tasks"]
        self._files: dict[Path, side.SideFile] = {}

    def names(self) -> list[str]:
        return list(self.index["parts"])

    def of(self, name: str) -> list[tuple[torch.Tensor, ...]]:
        """Tensor `name`'s parts, one tuple per task, in fp32."""
        path = self.merged / self.index["parts"][name]
        if path not in self._files:
            self._files[path] = side.SideFile(path, f"the Twin-Merging parts of {name!r}")
        file = self._files[path]
        keys = [k for k in (f"A.{name}", f"B.{name}", f"D.{name}") if k in file.tensors]
        if keys not in ([f"A.{name}", f"B.{name}"], [f"D.{name}"]):
            raise CheckpointError(f"{path}: has no parts for {name!r}")
        stacks = [file.read(k).float() for k in keys]
        if any(len(s) != len(self.tasks) for s in stacks):
            raise CheckpointError(f"{path}: parts of {name!r} for {len(stacks[0])} tasks, "
                                  f"the index lists {len(self.tasks)}")
        return [tuple(s[t] for s in stacks) for t in range(len(self.tasks))]

    def deltas(self, name: str, shape: torch.Size) -> list[torch.Tensor]:
        """v_t of tensor `name` for every task, as dense tensors."""
        return [expand(part, shape) for part in self.of(name)]


def routing_weights(tasks: list[str], task: str | int | None = None,
                    weights: list[float] | None = None) -> list[float]:
    """One-hot weights for a task (by name or index), or the given weights, checked."""
    if (task is None) == (weights is None):
        raise MergesmithError("give a task or routing weights (one of the two)")
    if weights is not None:
        if len(weights) != len(tasks):
            raise MergesmithError(f"{len(weights)} routing weights for {len(tasks)} tasks "
                                  f"({', '.join(tasks)})")
        return [float(w) for w in weights]
    onehot = [0.0] * len(tasks)
    onehot[side.task_index(tasks, task)] = 1.0
    return onehot


def apply_twin(merged: str | Path, out: str | Path, *, task: str | int | None = None,
               weights: list[float] | None = None, resume: bool = False,
               overwrite: bool = False) -> Path:
    """Write θ* + Σ_t w_t v_t for fixed weights (one-hot for `task`) to `out`, with the merge's
    shard layout, atomically like a merge."""
    merged = Path(merged)
    parts = Parts(merged)
    w = routing_weights(parts.tasks, task, weights)
    shared = Checkpoint(merged)

    def pieces(tensor: OutTensor):
        theta = shared.read(tensor.name)
        if tensor.name in parts.index["parts"]:
            theta = routed(theta.float(), parts.of(tensor.name), w)
        return [theta.to(tensor.dtype)]

    mix = ", ".join(f"{t}: {x:g}" for t, x in zip(parts.tasks, w))
    note = (f"\n## Twin-Merging model for fixed routing\n\nThis folder holds θ* + Σ w_t v_t from "
            f"the twin merge in `{merged}` (`mergesmith twin apply`), w = {mix}.\n")
    return side.rebuild(merged, Path(out), [parts.index, w], pieces, note,
                        resume=resume, overwrite=overwrite)
