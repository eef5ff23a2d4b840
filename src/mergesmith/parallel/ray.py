"""Tasks on Ray actors: each actor builds its worker once and runs one task at a time.

The only module that imports Ray. Without an address it starts a local runtime (no cluster to
set up) and stops it on close; with one it joins that cluster. A task whose actor dies (its
process killed, its node lost) is run again on a fresh actor, up to `max_retries` times; an
exception raised by the worker itself is not retried (it would fail the same way) but raised
in the driver, naming the task.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from typing import Any, Callable

from mergesmith.errors import MergesmithError
from mergesmith.parallel import OnResult, task_error, task_name


class _Holder:
    """Runs inside an actor: the worker the factory built, kept for the actor's life."""

    def __init__(self, factory: Callable[[], Callable[[Any], Any]]):
        self.error: BaseException | None = None
        try:
            self.worker = factory()
        except Exception as exc:  # raised again by ready(), where the driver sees it
            self.error = exc

    def ready(self) -> str:
        if self.error is not None:
            raise self.error
        return socket.gethostname()

    def run(self, task: Any) -> Any:
        if self.error is not None:
            raise self.error
        return self.worker(task)


class RayExecutor:
    """`workers` actors (one CPU each) built from `factory`; see the module's docstring."""

    def __init__(self, factory: Callable[[], Callable[[Any], Any]], workers: int,
                 address: str | None = None, max_retries: int = 2):
        import ray

        self.ray = ray
        self.factory = factory
        self.max_retries = max_retries
        self.started = False
        if not ray.is_initialized():  # else the caller's runtime (or cluster) is used, and kept
            quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
            try:
                if address is None:  # "local": a new runtime, even where `ray start` runs one
                    ray.init(address="local", num_cpus=workers, include_dashboard=False, **quiet)
                else:
                    ray.init(address=address, **quiet)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise MergesmithError(
                    f"cannot start Ray{f' at {address}' if address else ''}: {exc}",
                    hint="check the address (`ray status` on the head shows it); a cluster with "
                    "token authentication (`ray start`'s default) needs RAY_AUTH_MODE=token "
                    "here") from exc
            self.started = True
        self._check_room(workers, address)
        self.actor_class = ray.remote(num_cpus=1, max_restarts=0)(_Holder)
        self.actors: list = []
        try:
            self.actors = [self._new_actor() for _ in range(workers)]
            self.hosts = ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayTaskError as exc:
            self.close()
            cause = exc.cause
            if isinstance(cause, MergesmithError):
                raise cause from exc
            raise MergesmithError(f"a Ray worker could not start: {type(cause).__name__}: "
                                  f"{cause}", hint="rerun with --debug for its traceback") from exc
        except ray.exceptions.RayActorError as exc:
            self.close()
            raise MergesmithError("a Ray worker died as it started",
                                  hint="on a cluster, the driver and the nodes must agree on "
                                  "token authentication (RAY_AUTH_MODE); the nodes' logs say "
                                  "more") from exc
        except BaseException:
            self.close()
            raise

    def _check_room(self, workers: int, address: str | None) -> None:
        """A worker takes one CPU: more workers than the cluster's CPUs would wait forever."""
        cpus = int(self.ray.cluster_resources().get("CPU", 0))
        if workers > cpus:
            if self.started:
                self.ray.shutdown()
            raise MergesmithError(f"{workers} workers asked for, but the Ray cluster"
                                  f"{f' at {address}' if address else ''} has {cpus} CPU(s)",
                                  hint=f"pass --workers {max(cpus, 1)} or fewer, or add nodes")

    def _new_actor(self):
        return self.actor_class.remote(self.factory)

    def run(self, tasks: list, on_result: OnResult = None) -> list:
        ray = self.ray
        results: list = [None] * len(tasks)
        failures = [0] * len(tasks)
        waiting = deque(range(len(tasks)))
        idle = list(self.actors)
        running: dict = {}  # object ref -> (task index, actor)
        while waiting or running:
            while waiting and idle:
                index, actor = waiting.popleft(), idle.pop()
                running[actor.run.remote(tasks[index])] = (index, actor)
            [ref], _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(ref)
            try:
                results[index] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the worker raised: same again elsewhere
                raise task_error(tasks[index], exc.cause) from exc
            except ray.exceptions.RayActorError:
                failures[index] += 1
                if failures[index] > self.max_retries:
                    times = f", {failures[index]} times" if failures[index] > 1 else ""
                    raise MergesmithError(f"task {task_name(tasks[index])}: its worker died{times}",
                                          hint="look for what kills it (out of memory, a lost node)")
                waiting.appendleft(index)
                idle.append(self._replace(actor))
                continue
            idle.append(actor)
            if on_result is not None:
                on_result(index, results[index])
        return results

    def _replace(self, dead):
        self.ray.kill(dead, no_restart=True)
        self.actors.remove(dead)
        self.actors.append(self._new_actor())
        return self.actors[-1]

    def close(self) -> None:
        """Kill the actors at once (a worker still running a task stops writing), then leave
        the runtime if this executor started it."""
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
