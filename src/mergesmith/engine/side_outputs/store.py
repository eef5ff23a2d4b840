"""What methods with side outputs share: their files beside the merge are lone safetensors
files, one per output shard, written with it; their rebuilt models keep the merge's shard
layout; and their tasks are the experts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from mergesmith.engine.run import RESUME_HINT
from mergesmith.errors import CheckpointError, MergesmithError, OutputError
from mergesmith.io import Checkpoint, OutputFolder, OutTensor, Shard, ShardWriter
from mergesmith.io.checkpoint import TensorInfo, read_safetensors_header, weight_files


class SideWriter:
    """One side file per output shard in `<partial>/<folder>/`, written to a .tmp and renamed
    into place when closed, before the engine marks the shard done: a resumed merge keeps both
    or redoes both. Subclasses give `folder`, `filename(shard)`, `tensors(out, job)` (the side
    tensors of one merged tensor) and `add(job, outputs)`."""

    folder: str

    def __init__(self, plan, output: OutputFolder):
        self.plan, self.output = plan, output
        self.jobs = {job.out.name: job for job in plan.jobs}
        (output.partial / self.folder).mkdir(exist_ok=True)
        self.writer: ShardWriter | None = None

    def filename(self, shard: Shard) -> str:
        raise NotImplementedError

    def tensors(self, out, job) -> list:
        raise NotImplementedError

    def layout(self, shard: Shard) -> Shard:
        """The side file of a shard: the side tensors of each tensor it merges (not copies)."""
        layout = Shard(self.filename(shard))
        for out in shard.tensors:
            job = self.jobs[out.name]
            if not job.copy:
                layout.tensors += self.tensors(out, job)
        return layout

    def open(self, shard: Shard) -> None:
        layout = self.layout(shard)
        self.final = self.output.path(f"{self.folder}/{layout.filename}")
        self.writer = ShardWriter(self.final.with_name(self.final.name + ".tmp"), layout)

    def write(self, *tensors: torch.Tensor) -> None:
        try:
            for tensor in tensors:
                self.writer.write(tensor)
        except OSError as exc:
            raise self._failed(exc) from None

    def close(self) -> None:
        try:
            self.writer.close()
            os.replace(self.writer.path, self.final)
        except OSError as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> OutputError:
        return OutputError(f"writing {self.writer.path} failed: {exc.strerror or exc}",
                           hint=RESUME_HINT)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor of a safetensors file without a model folder around it."""
    out = torch.empty(info.shape, dtype=info.dtype)
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        if out.numel() and f.readinto(out.view(-1).view(torch.uint8).numpy()) != info.nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading {info.name!r}")
    return out


class SideFile:
    """A side file's tensors by name, its header read once."""

    def __init__(self, path: Path, what: str):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; it holds {what}")
        self.path = path
        self.tensors = read_safetensors_header(path)

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.tensors[name])


def shard_layout(ckpt: Checkpoint) -> list[Shard]:
    """A folder's own shards: same files, same tensors, same order."""
    shards: dict[Path, list] = {}
    for info in ckpt.tensors.values():
        shards.setdefault(info.file, []).append(info)
    return [Shard(file.name, [OutTensor(i.name, i.dtype, i.shape)
                              for i in sorted(infos, key=lambda i: i.offset)])
            for file, infos in sorted(shards.items())]


def task_index(tasks: list[str], task: str | int) -> int:
    """A task by its name in the recipe, or by its position (0-based)."""
    if isinstance(task, str) and task in tasks:
        return tasks.index(task)
    if str(task).isdigit() and int(task) < len(tasks):
        return int(task)
    listed = ", ".join(f"{i}: {name}" for i, name in enumerate(tasks))
    raise MergesmithError(f"unknown task {task!r}; this merge has {listed}",
                          hint="give the task's model as the recipe names it, or its index")


def read_index(merged: Path, folder: str, name: str, fmt: str, method: str) -> dict:
    """A side folder's index (`<merged>/<folder>/<name>`), checked for its format."""
    path = Path(merged) / folder / name
    if not path.is_file():
        raise MergesmithError(f"{merged} has no {folder}/{name}: not a merge made with "
                              f"merge_method: {method}", hint=f"merge with merge_method: {method} first")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if index.get("format") != fmt:
        raise CheckpointError(f"{path}: unknown format {index.get('format')!r}, expected {fmt}")
    return index


def rebuild(merged: Path, out: Path, fingerprint: object, pieces: Callable[[OutTensor], Iterable[torch.Tensor]],
            card_note: str, *, resume: bool = False, overwrite: bool = False,
            reads: Iterable[Path] = ()) -> Path:
    """Write a model with the merge's shard layout, tensor by tensor from `pieces` (each in
    pieces of rows, in order), atomically and resumably like a merge; the merge's other files
    (config, tokenizer, card + `card_note`) come along. `out` may not overlap `merged` or any
    of the other folders it `reads`."""
    source = Checkpoint(merged)
    inputs = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(merged)]
    key = hashlib.sha256(json.dumps([fingerprint, inputs]).encode()).hexdigest()
    output = OutputFolder(Path(out), key, resume=resume, overwrite=overwrite,
                          inputs=[merged, *reads])
    for shard in shard_layout(source):
        if output.is_done(shard.filename, shard.size):
            continue
        writer = ShardWriter(output.path(shard.filename), shard)
        try:
            for tensor in shard.tensors:
                for piece in pieces(tensor):
                    writer.write(piece)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        output.mark_done(shard.filename, shard.size)
    for item in merged.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copyfile(item, output.partial / item.name)
    card = output.partial / "README.md"
    if card.is_file():
        with open(card, "a") as f:
            f.write(card_note)
    return output.finalize()
