"""The output folder: built beside the target, renamed into place only when complete.

While a merge runs, everything lives in `.<name>.partial/` next to the target, with a manifest
of the shards already finished and the fingerprint of what is being merged. A crash leaves only
that hidden folder; `--resume` continues from it when the fingerprint matches; the final rename
is the one step that makes the target appear.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mergesmith.errors import OutputError

MANIFEST = "mergesmith-manifest.json"


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


class OutputFolder:
    def __init__(self, target: Path, fingerprint: str, *, resume: bool = False,
                 overwrite: bool = False):
        self.target = Path(target).absolute()
        self.partial = self.target.with_name(f".{self.target.name}.partial")
        self.fingerprint = fingerprint
        self.done: dict[str, int] = {}
        if self.target.exists() and not overwrite and (
            not self.target.is_dir() or any(self.target.iterdir())
        ):
            raise OutputError(
                f"output {self.target} already exists", hint="choose a new folder or pass --overwrite"
            )
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.target.parent}: {exc.strerror}") from None
        if self.partial.exists():
            if resume:
                self._load_manifest()
            elif overwrite:
                shutil.rmtree(self.partial)
            else:
                raise OutputError(
                    f"an interrupted merge into {self.target} is in {self.partial}",
                    hint="pass --resume to continue it, or --overwrite to start over",
                )
        elif resume:
            raise OutputError(f"nothing to resume: {self.partial} does not exist")
        try:
            self.partial.mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.partial}: {exc.strerror}") from None
        self._save_manifest()

    def _load_manifest(self) -> None:
        try:
            manifest = json.loads((self.partial / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            raise OutputError(
                f"cannot resume: {self.partial} has no readable manifest",
                hint="pass --overwrite to start over",
            ) from None
        if manifest.get("fingerprint") != self.fingerprint:
            raise OutputError(
                f"cannot resume into {self.target}: the recipe, inputs or options changed since "
                "the interrupted run",
                hint="rerun with the same recipe and options, or pass --overwrite to start over",
            )
        self.done = {k: int(v) for k, v in manifest.get("done", {}).items()}

    def _save_manifest(self) -> None:
        tmp = self.partial / (MANIFEST + ".tmp")
        write_json(tmp, {"fingerprint": self.fingerprint, "done": self.done})
        os.replace(tmp, self.partial / MANIFEST)  # a crash mid-write keeps the old manifest

    def path(self, filename: str) -> Path:
        return self.partial / filename

    def is_done(self, filename: str, size: int) -> bool:
        """Finished in an earlier run, and still the size it was then."""
        file = self.path(filename)
        return self.done.get(filename) == size and file.is_file() and file.stat().st_size == size

    def mark_done(self, filename: str, size: int) -> None:
        self.done[filename] = size
        self._save_manifest()

    def finalize(self) -> Path:
        """Drop the manifest and move the finished folder into place."""
        (self.partial / MANIFEST).unlink()
        stale = None
        if self.target.exists():
            stale = self.target.with_name(f".{self.target.name}.replaced")
            if stale.exists():
                shutil.rmtree(stale)
            os.replace(self.target, stale)
        os.replace(self.partial, self.target)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        return self.target
