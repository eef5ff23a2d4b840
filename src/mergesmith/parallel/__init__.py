"""Where independent tasks run: in this process, or on Ray actors (one machine or a cluster).

A task runner is built from a `factory`, a picklable zero-argument callable that makes a
worker; a worker is called on one task at a time. Each process builds its worker once, so what
a worker loads (models, task vectors) is loaded once per process, never per task, and never in
the driver when the tasks run elsewhere. Results come back in the order of the tasks, whichever
worker ran each, so they never depend on the number of workers.

Ray is imported only by parallel/ray.py, and only when more than one worker or a cluster
address is asked for: everything runs, and is tested, without it.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Protocol

from mergesmith.errors import MergesmithError

OnResult = Optional[Callable[[int, Any], None]]


class Executor(Protocol):
    def run(self, tasks: list, on_result: OnResult = None) -> list:
        """Every task's result, in the order of `tasks`. `on_result(index, result)` is called in
        the driver as each task finishes (in completion order), e.g. to checkpoint progress."""

    def close(self) -> None:
        """Let the workers go (and the Ray runtime, if this executor started it)."""


class SerialExecutor:
    """One worker in this process, the tasks in order."""

    def __init__(self, factory: Callable[[], Callable[[Any], Any]]):
        self.worker = factory()

    def run(self, tasks: list, on_result: OnResult = None) -> list:
        results = []
        for index, task in enumerate(tasks):
            try:
                result = self.worker(task)
            except Exception as exc:
                raise task_error(task, exc) from exc
            if on_result is not None:
                on_result(index, result)
            results.append(result)
        return results

    def close(self) -> None:
        self.worker = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_executor(factory: Callable[[], Callable[[Any], Any]], workers: int = 1,
                  address: str | None = None, **options: Any) -> Executor:
    """In this process for one worker and no cluster; else on Ray (`options`: RayExecutor's)."""
    if workers <= 1 and address is None:
        return SerialExecutor(factory)
    from mergesmith.parallel.ray import RayExecutor

    return RayExecutor(factory, max(1, workers), address=address, **options)


def task_name(task: Any) -> str:
    """How an error names a task: `Candidate 7` for anything with an id, else its short repr."""
    ident = getattr(task, "id", None)
    if ident is not None:
        return f"{type(task).__name__} {ident}"
    text = repr(task)
    return text if len(text) <= 80 else text[:77] + "..."


def task_error(task: Any, exc: BaseException) -> MergesmithError:
    """`exc`, raised by a worker on `task`, as a MergesmithError that names the task: a
    MergesmithError keeps its class and hint, anything else (a bug) says what it was."""
    if isinstance(exc, MergesmithError):
        error = copy.copy(exc)
        error.message = f"task {task_name(task)}: {exc.message}"
        error.args = (error.message,)
        return error
    return MergesmithError(f"task {task_name(task)} failed: {type(exc).__name__}: {exc}",
                           hint="rerun with --debug for the worker's traceback")
