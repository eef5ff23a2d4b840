"""Statistics stores: folders the engine opens like checkpoints, cached by what made them.

A store is `config.json` ({"mergesmith_statistics": 1, "model": ..., "kinds": [...], "settings":
{...}, ...}) plus `model.safetensors` (or numbered shards and `model.safetensors.index.json`),
with tensors named "<checkpoint tensor>::<kind>", so `io.Checkpoint` reads any one statistic by
byte range. A store is written in a temporary folder beside its place and renamed into it when
complete: a collection that is killed never leaves a store that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from mergesmith.calibrate.collect import KINDS, collect_groups
from mergesmith.calibrate.data import fingerprint, load_examples
from mergesmith.calibrate.forward import CalibrationModel
from mergesmith.errors import CalibrationError
from mergesmith.io.checkpoint import Checkpoint
from mergesmith.recipe import Calibration

FORMAT = 1
SHARD_BYTES = 2 << 30  # write_store splits larger dicts; collections write one shard per group


def default_cache(cal: Calibration, root: Path) -> Path:
    """`cal.cache` (relative to the recipe), else $MERGESMITH_CACHE/statistics, else
    ~/.cache/mergesmith/statistics."""
    if cal.cache:
        return (Path(root) / cal.cache).resolve()
    if os.environ.get("MERGESMITH_CACHE"):
        return Path(os.environ["MERGESMITH_CACHE"]) / "statistics"
    return Path.home() / ".cache" / "mergesmith" / "statistics"


def model_fingerprint(folder: str | Path) -> str:
    """sha256 over the (name, size, mtime) of the folder's files: weights, config, tokenizer."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def store_path(cache_root: str | Path, folder: str | Path, cal: Calibration, root: Path,
               kinds, dtype: torch.dtype = torch.float32) -> Path:
    """Where the statistics of this model, data, settings, kinds and compute dtype live."""
    from mergesmith import __version__

    key = json.dumps([__version__, FORMAT, model_fingerprint(folder), fingerprint(cal, root),
                      sorted(set(kinds)), str(dtype)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache_root) / f"{Path(folder).resolve().name}-{digest}"


def is_store(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def ensure_statistics(folder: str | Path, cal: Calibration, root: Path, kinds, *,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      cache: str | Path | None = None, progress: bool = False,
                      max_stats_bytes: int = 1 << 30) -> Path:
    """The store of `folder`'s statistics: the cached one, or a new one collected now."""
    kinds = sorted(set(kinds), key=KINDS.index) if set(kinds) <= set(KINDS) else list(kinds)
    root = Path(root)
    cache = cache if cache is not None else default_cache(cal, root)
    path = store_path(cache, folder, cal, root, kinds, dtype)
    if is_store(path):
        return path
    started = time.perf_counter()
    examples = load_examples(cal, root)
    model = CalibrationModel.load(folder, cal, root, device, dtype)
    tokens = sum(len(ids) for ids in model.encode(examples))
    with StoreWriter(path) as writer:
        for group in collect_groups(model, examples, kinds=kinds, max_stats_bytes=max_stats_bytes,
                                    progress=progress):
            writer.add(group)
        info = _info(folder, cal, root, kinds, dtype, len(examples), tokens)
        writer.finish(dict(info, seconds=time.perf_counter() - started))  # reported, not keyed
    return path


def write_store(path: str | Path, tensors: dict[str, torch.Tensor], info: dict) -> Path:
    """Write statistics computed elsewhere as a store (shards of at most 2 GiB)."""
    with StoreWriter(Path(path)) as writer:
        group: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if group and sum(t.nbytes for t in group.values()) + tensor.nbytes > SHARD_BYTES:
                writer.add(group)
                group = {}
            group[name] = tensor
        writer.add(group)
        writer.finish(info)
    return Path(path)


def read_statistics(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a store, as stored."""
    store = Checkpoint(Path(path), label=f"statistics {path}")
    if store.config.get("mergesmith_statistics") != FORMAT:
        raise CalibrationError(f"{path}: not a mergesmith statistics store",
                               hint="its config.json has no \"mergesmith_statistics\": 1")
    return {name: store.read(name) for name in store.tensors}


def read_info(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


class StoreWriter:
    """Groups of tensors written as they finish, in a temporary folder beside `path` that is
    renamed into place by `finish`; on any failure the temporary folder is removed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.partial = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        self.files: list[tuple[Path, list[str], int]] = []

    def __enter__(self) -> "StoreWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(self.path)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        file = self.partial / f"group-{len(self.files) + 1:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
        self.files.append((file, list(tensors), sum(t.nbytes for t in tensors.values())))

    def finish(self, info: dict) -> None:
        """Name the shards as transformers does, write the index and config, move into place."""
        if not self.files:
            raise CalibrationError(f"{self.path}: no statistics were gathered")
        count = len(self.files)
        weight_map, total = {}, 0
        for number, (file, names, nbytes) in enumerate(self.files, 1):
            name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            file.rename(self.partial / name)
            weight_map.update(dict.fromkeys(names, name))
            total += nbytes
        if count > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = {"mergesmith_statistics": FORMAT, **info}
        (self.partial / "config.json").write_text(json.dumps(config, indent=2, default=str))
        try:
            os.rename(self.partial, self.path)
        except OSError:
            if not is_store(self.path):  # else another process finished the same store first
                raise


def _remove_abandoned(path: Path) -> None:
    """Temporary folders of this store left by processes that no longer run."""
    for partial in path.parent.glob(f".{path.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _info(folder, cal: Calibration, root: Path, kinds, dtype: torch.dtype, examples: int,
          tokens: int) -> dict:
    from mergesmith import __version__

    return {
        "model": str(Path(folder).resolve()),
        "model_fingerprint": model_fingerprint(folder),
        "kinds": list(kinds),
        "settings": cal.model_dump(exclude={"cache"}),
        "data_fingerprint": fingerprint(cal, root),
        "examples": examples,
        "tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "mergesmith_version": __version__,
    }
