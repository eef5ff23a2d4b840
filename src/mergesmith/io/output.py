"""The output folder: built beside the target, renamed into place only when complete.

While a merge runs, everything lives in `.<name>.partial/` next to the target, with a manifest
of the shards already finished and the fingerprint of what is being merged. A crash leaves only
that hidden folder; `--resume` continues from it when the fingerprint matches; the final rename
is the one step that makes the target appear.

One merge at a time writes a target: `.<name>.lock` beside it is held (flock) from before the
first check of the target until it is in place. The kernel drops the lock when the process ends,
however it ends, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from mergesmith.errors import OutputError

MANIFEST = "mergesmith-manifest.json"


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def refuse_overlap(target: Path, inputs: Iterable[str | Path], also: Iterable[Path] = (),
                   what: str = "the merge") -> None:
    """Refuse an output `target` (and the `also` paths written with it) that is, contains or
    lies inside an input (symlinks followed)."""
    mine = [Path(p).resolve() for p in (target, *also)]
    for item in inputs:
        given = Path(item).expanduser()
        source = given.resolve()
        for path in mine:
            relation = ("is" if path == source else "contains" if source.is_relative_to(path)
                        else "lies inside" if path.is_relative_to(source) else None)
            if relation:
                raise OutputError(
                    f"output {target} {relation} the input {given}"
                    + (f" ({source})" if source != given.absolute() else ""),
                    hint=f"write {what} to a folder outside every input; --overwrite "
                    "would replace it whole",
                )


class OutputFolder:
    """`inputs`: the files and folders the merge reads (models, statistics, the recipe); the
    target may not be, contain or lie inside any of them, since --overwrite replaces it whole."""

    def __init__(self, target: Path, fingerprint: str, *, resume: bool = False,
                 overwrite: bool = False, inputs: Iterable[str | Path] = ()):
        self._lock_fd: int | None = None
        self.target = Path(target).absolute()
        self.partial = self.target.with_name(f".{self.target.name}.partial")
        self.lock_path = self.target.with_name(f".{self.target.name}.lock")
        self.fingerprint = fingerprint
        self.done: dict[str, int] = {}
        self._check_inputs(inputs)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.target.parent}: {exc.strerror}") from None
        self._lock()
        try:
            self._open(resume, overwrite)
        except BaseException:
            self.release()
            raise

    def _open(self, resume: bool, overwrite: bool) -> None:
        if self.target.exists() and not overwrite and (
            not self.target.is_dir() or any(self.target.iterdir())
        ):
            raise OutputError(
                f"output {self.target} already exists", hint="choose a new folder or pass --overwrite"
            )
        if self.partial.exists():
            if resume and not any(self.partial.iterdir()):
                pass  # a run that failed before its first manifest: nothing to continue
            elif resume:
                self._load_manifest()
            elif overwrite:
                shutil.rmtree(self.partial)
            else:
                raise OutputError(
                    f"an interrupted merge into {self.target} is in {self.partial}",
                    hint="pass --resume to continue it, or --overwrite to start over",
                )
        # --resume with nothing to resume starts the merge: a blind retry after any failure works
        try:
            self.partial.mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.partial}: {exc.strerror}") from None
        self._save_manifest()

    def _check_inputs(self, inputs: Iterable[str | Path]) -> None:
        refuse_overlap(self.target, inputs, also=[self.partial])

    def _lock(self) -> None:
        """Hold `.<name>.lock` exclusively, or say which merge holds it."""
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create {self.lock_path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"cannot lock {self.lock_path}: {exc.strerror}") from None
                raise OutputError(
                    f"another merge{f' (pid {holder})' if holder else ''} is writing {self.target}",
                    hint="wait for it to finish, or write to another folder",
                ) from None
            # the previous holder removes the file as it lets go: a lock on a removed file
            # excludes no one, so take the one now at the path
            try:
                current = os.stat(self.lock_path)
                mine = os.fstat(fd)
                if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        """Let go of the target (removing the lock file first, so no one locks a removed file)."""
        if self._lock_fd is None:
            return
        try:
            self.lock_path.unlink()
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def __del__(self) -> None:  # for callers that drop a folder on an error without release()
        try:
            self.release()
        except Exception:  # at interpreter exit; the kernel lets go of the lock anyway
            pass

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
        try:
            write_json(tmp, {"fingerprint": self.fingerprint, "done": self.done})
            os.replace(tmp, self.partial / MANIFEST)  # a crash mid-write keeps the old manifest
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"writing {self.partial / MANIFEST} failed: {exc.strerror or exc}",
                              hint="free the space or fix the cause, then rerun with --resume") from None

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
        self.release()
        return self.target


class ShardView:
    """A worker's part of another process's `.partial` folder (merge --ray): it writes the
    shards it is given there, and reports them to the process that holds the folder, its lock
    and its manifest, which records them. The other shards count as done here."""

    def __init__(self, partial: Path, filenames: Iterable[str]):
        self.partial = Path(partial)
        self.todo = set(filenames)
        self.done: dict[str, int] = {}

    def path(self, filename: str) -> Path:
        return self.partial / filename

    def is_done(self, filename: str, size: int) -> bool:
        return filename not in self.todo or self.done.get(filename) == size

    def mark_done(self, filename: str, size: int) -> None:
        self.done[filename] = size


def _read_pid(fd: int) -> int | None:
    """The pid a lock's holder wrote into it, if it has yet."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
