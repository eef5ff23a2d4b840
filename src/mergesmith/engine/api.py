"""The engine's public entry points: `plan` (check a recipe, write nothing) and `merge`."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from mergesmith import __version__
from mergesmith.engine.adapters import adapter_method, merge_adapters
from mergesmith.engine.side_outputs import emr, twin
from mergesmith.engine.finalize import write_metadata
from mergesmith.engine.plan import Plan, build_plan
from mergesmith.engine.run import DEFAULT_CHUNK_BYTES, RESUME_HINT, stream
from mergesmith.errors import MergesmithError, OutputError
from mergesmith.io import OutputFolder
from mergesmith.io.checkpoint import weight_files
from mergesmith.recipe import Recipe

# Where each method with side outputs stores them, and writes their index at the end.
SIDE_STORES = {"emr": (emr.MaskWriter, emr.write_index), "twin": (twin.PartWriter, twin.write_index)}

UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3,
         "GB": 1000**3, "T": 1000**4, "TB": 1000**4, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str | int) -> int:
    """'5GB', '250M', '1.5GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in UNITS:
        raise MergesmithError(f"bad size {text!r}", hint="write it like 5GB, 250MB or 1GiB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def _stderr(line: str) -> None:
    """A progress line of planning work, on stderr beside the progress bar that follows it."""
    print(line, file=sys.stderr, flush=True)


def plan(recipe: Recipe | str | Path | dict, *, seed: int | None = None,
         shard_size: str | int = "5GB", statistics: dict[str, str | Path] | None = None,
         compat: str | None = None, allow_crimes: bool = False,
         log: Callable[[str], None] | None = None) -> Plan:
    """Validate a recipe against its models' headers and return the merge plan (reads no weights).

    `statistics` maps model references to statistics stores (calibrate/) for methods that read them.
    `compat="mergekit"` overrides the recipe's `compat:`: mergekit 0.1.5's arithmetic.
    `allow_crimes` merges models of different architectures or configs (a warning, not an error).
    `log` gets the lines of long planning work (an `align:` section's weight matching)."""
    return build_plan(recipe, seed=seed, shard_bytes=parse_size(shard_size), statistics=statistics,
                      compat=compat, allow_crimes=allow_crimes, log=log)


def merge(recipe: Recipe | str | Path | dict, out: str | Path, *, shard_size: str | int = "5GB",
          device: str = "cpu", seed: int | None = None, resume: bool = False,
          overwrite: bool = False, chunk_size: str | int = DEFAULT_CHUNK_BYTES,
          progress: bool = False, statistics: dict[str, str | Path] | None = None,
          notes: dict[str, str] | None = None,
          finish: Callable[[Path], None] | None = None, compat: str | None = None,
          allow_crimes: bool = False, copy_tokenizer: bool = True,
          write_model_card: bool = True, workers: int = 1,
          ray_address: str | None = None) -> Path:
    """Merge as the recipe says and write a Hugging Face model folder at `out`; return its path.

    The folder appears only when complete. After an interruption, the same call with
    `resume=True` finishes the job and gives the same bytes as an uninterrupted run.
    `notes` are text files written into the folder beside the weights (what a learned merge learned).
    `finish(folder)` runs on the complete folder before it is put in place (Twin-Merging trains
    its router on the merged model there).
    `copy_tokenizer=False` leaves out the tokenizer files copied from an input (a tokenizer the
    merge built is always written); `write_model_card=False` leaves out README.md and
    mergekit_config.yml, as mergekit's flags of the same names do.
    `workers > 1` or a `ray_address` writes the shards on Ray workers (engine/distributed.py):
    the same bytes; the models and OUT must be on a filesystem every node shares.
    """
    if adapter_method(recipe):  # LoRA adapters merged into one adapter folder
        return merge_adapters(recipe, out, seed=seed, device=device, resume=resume,
                              overwrite=overwrite).path
    the_plan = plan(recipe, seed=seed, shard_size=shard_size, statistics=statistics,
                    compat=compat, allow_crimes=allow_crimes, log=_stderr if progress else None)
    return write_plan(the_plan, out, device=device, resume=resume, overwrite=overwrite,
                      chunk_size=chunk_size, progress=progress, notes=notes, finish=finish,
                      copy_tokenizer=copy_tokenizer, write_model_card=write_model_card,
                      workers=workers, ray_address=ray_address, rebuild=dict(
                          shard_bytes=parse_size(shard_size), statistics=statistics,
                          compat=compat, allow_crimes=allow_crimes))


def write_plan(the_plan: Plan, out: str | Path, *, device: str = "cpu", resume: bool = False,
               overwrite: bool = False, chunk_size: str | int = DEFAULT_CHUNK_BYTES,
               progress: bool = False, notes: dict[str, str] | None = None,
               finish: Callable[[Path], None] | None = None, copy_tokenizer: bool = True,
               write_model_card: bool = True, workers: int = 1, ray_address: str | None = None,
               rebuild: dict | None = None) -> Path:
    """Stream a plan into a model folder at `out` (see `merge`). `rebuild` holds the options
    Ray workers need to plan the same recipe again."""
    compute = _device(device)
    chunk_bytes = parse_size(chunk_size)
    spread = workers > 1 or ray_address is not None
    if spread:
        from mergesmith.engine import distributed

        distributed.refuse(the_plan, SIDE_STORES, compute)
    output = OutputFolder(Path(out), fingerprint(the_plan, chunk_bytes, compute),
                          resume=resume, overwrite=overwrite, inputs=_inputs(the_plan))
    writes = stream
    if spread:
        job = distributed.shard_job(the_plan, output, rebuild or {}, compute, chunk_bytes)
        writes = partial(distributed.stream_on_workers, job=job, workers=workers,
                         address=ray_address)
    try:
        return _write(the_plan, output, compute, chunk_bytes, progress, notes, finish,
                      writes=writes, copy_tokenizer=copy_tokenizer,
                      write_model_card=write_model_card)
    finally:
        output.release()  # on success finalize has let go already


def _write(the_plan: Plan, output: OutputFolder, compute: torch.device, chunk_bytes: int,
           progress: bool, notes: dict[str, str] | None, finish: Callable[[Path], None] | None,
           writes: Callable[..., None] = stream, **metadata: bool) -> Path:
    bar = ProgressBar(the_plan) if progress else None
    store, write_index = SIDE_STORES.get(the_plan.method.name, (None, None))
    side = store(the_plan, output) if store is not None else None
    try:
        if bar:
            bar.start()
        writes(the_plan, output, device=compute, chunk_bytes=chunk_bytes, progress=bar, side=side)
    finally:
        if bar:
            bar.stop()
    try:
        write_metadata(the_plan, output.partial, **metadata)
        for name, text in (notes or {}).items():
            (output.partial / name).write_text(text)
        if side is not None:
            write_index(the_plan, output.partial)
        if finish is not None:
            finish(output.partial)
        return output.finalize()
    except OSError as exc:
        # a failed copy names its source first (shutil sets filename = src, filename2 = dst):
        # a full disk is the destination's
        where = exc.filename2 or exc.filename or output.partial
        raise OutputError(f"writing {where} failed: {exc.strerror or exc}",
                          hint=RESUME_HINT) from None


def _inputs(the_plan: Plan) -> list[Path]:
    """What the merge reads, which its output must keep clear of: the models' folders, the
    statistics stores, the recipe file and its calibration data files."""
    recipe = the_plan.recipe
    paths = [p for ck in [*the_plan.models.values(), *the_plan.statistics.values()] for p in ck.sources]
    source = Path(recipe.source)
    root = source.parent if source.is_file() else Path.cwd()  # as calibrate/ resolves data paths
    if source.is_file():
        paths.append(source)
    sections = [recipe.calibration, *(m.calibration for m in recipe.models or [])]
    paths += [root / s.data for s in sections if s is not None and s.data]
    return paths


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MergesmithError(f"unknown device {name!r}", hint="use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergesmithError("--device cuda asked for, but no CUDA device is available")
    return device


def fingerprint(the_plan: Plan, chunk_bytes: int, device: torch.device) -> str:
    """What must match for a resumed merge to give the same bytes: recipe, options, inputs."""
    inputs = sorted({
        (str(f), f.stat().st_size, f.stat().st_mtime_ns)
        for ck in [*the_plan.models.values(), *the_plan.statistics.values()]
        for folder in ck.sources for f in weight_files(folder)
    })
    recipe = the_plan.program.key() if the_plan.program is not None else the_plan.recipe.fingerprint()
    blob = json.dumps([__version__, recipe, the_plan.seed, chunk_bytes,
                       device.type, [s.filename for s in the_plan.shards], inputs])
    return hashlib.sha256(blob.encode()).hexdigest()


class ProgressBar:
    """Tensors, bytes and time left, on stderr."""

    def __init__(self, the_plan: Plan, title: str | None = None):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        self.total_tensors = len(the_plan.jobs)
        self.tensors = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.fields[count]} tensors"), DownloadColumn(),
            TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        )
        what = title or (the_plan.program.title if the_plan.program is not None
                         else f"merging ({the_plan.method.name})")
        self.task = self.progress.add_task(what,
                                           total=the_plan.total_bytes, name="",
                                           count=f"0/{self.total_tensors}")

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def advance(self, nbytes: int, tensors: int, name: str | None = None) -> None:
        self.tensors += tensors
        fields = {"count": f"{self.tensors}/{self.total_tensors}"}
        if name is not None:
            fields["name"] = name
        self.progress.update(self.task, advance=nbytes, **fields)

