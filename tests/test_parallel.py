"""The executors of mergesmith.parallel: serial in-process, and Ray actors (a local runtime).

Workers here are small classes of this module; Ray ships them to its actors by value, so the
actors need not import the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from functools import partial
from pathlib import Path

import pytest

from mergesmith.errors import MergesmithError, MethodError
from mergesmith.parallel import SerialExecutor, make_executor

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Squares:
    """Records each time it is built (one file per build) and which process ran each task."""

    def __init__(self, builds: Path, scale: int = 1):
        (builds / f"{os.getpid()}-{uuid.uuid4().hex}").touch()
        self.scale = scale

    def __call__(self, task):
        time.sleep(0.05)  # long enough that a second idle actor takes some of the tasks
        return task * task * self.scale, os.getpid()


class DiesOnce(Squares):
    """Kills its own process on the task "die" the first time (the marker file remembers)."""

    def __init__(self, builds: Path, marker: Path):
        super().__init__(builds)
        self.marker = marker

    def __call__(self, task):
        if task == "die":
            if not self.marker.exists():
                self.marker.touch()
                os._exit(1)
            return "survived", os.getpid()
        return super().__call__(task)


class DiesAlways:
    def __call__(self, task):
        if task == "die":
            os._exit(1)
        return task


class Fails:
    def __call__(self, task):
        if task == 3:
            raise ValueError("three is not allowed")
        if task == 4:
            raise MethodError("tensor 'w' has NaN values", hint="repair it")
        return task


@pytest.fixture(scope="module")
def runtime():
    """One local runtime for these tests (an executor joins a runtime already started, and
    leaves it running). A new local runtime turns on Ray's token authentication for the whole
    process (RAY_AUTH_MODE): taken back after, so later tests' subprocesses do not inherit it."""
    mode = os.environ.get("RAY_AUTH_MODE")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = mode


def test_one_worker_runs_here_without_ray():
    code = ("import sys\n"
            "from mergesmith.parallel import make_executor\n"
            "built = []\n"
            "class Worker:\n"
            "    def __init__(self): built.append(1)\n"
            "    def __call__(self, task): return task * task\n"
            "executor = make_executor(Worker, workers=1)\n"
            "print(type(executor).__name__, executor.run([1, 2, 3]), len(built), 'ray' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SerialExecutor [1, 4, 9] 1 False"


def test_same_results_with_one_and_two_workers(tmp_path, runtime):
    """Each actor builds its worker once; both actors take tasks; results come back in the
    order of the tasks. (tests/test_merge_ray.py runs an executor that starts and stops its own
    runtime.)"""
    tasks = list(range(10))
    serial_builds, ray_builds = tmp_path / "serial", tmp_path / "ray"
    serial_builds.mkdir(), ray_builds.mkdir()
    with make_executor(partial(Squares, serial_builds, 3), workers=1) as serial:
        one = serial.run(tasks)
    executor = make_executor(partial(Squares, ray_builds, 3), workers=2)
    try:
        assert not isinstance(executor, SerialExecutor)
        seen = []
        two = executor.run(tasks, on_result=lambda i, r: seen.append(i))
    finally:
        executor.close()
    assert [r for r, _ in one] == [r for r, _ in two] == [3 * t * t for t in tasks]
    assert sorted(seen) == tasks
    assert len({pid for _, pid in two}) == 2 and os.getpid() not in {pid for _, pid in two}
    assert len(list(ray_builds.iterdir())) == 2  # once per actor, not per task
    assert len(list(serial_builds.iterdir())) == 1


def test_killed_actor_task_is_rerun(tmp_path, runtime):
    builds, marker = tmp_path / "builds", tmp_path / "died"
    builds.mkdir()
    with make_executor(partial(DiesOnce, builds, marker), workers=2) as executor:
        results = executor.run([1, 2, "die", 3, 4])
    assert marker.exists()
    assert [r for r, _ in results] == [1, 4, "survived", 9, 16]
    assert len(list(builds.iterdir())) == 3  # two actors, and one that replaced the dead one


def test_actor_that_keeps_dying_is_reported(runtime):
    from mergesmith.parallel.ray import RayExecutor

    with RayExecutor(DiesAlways, 1, max_retries=1) as executor:
        assert executor.run([1]) == [1]
        with pytest.raises(MergesmithError, match=r"task 'die': its worker died, 2 times"):
            executor.run([1, "die"])


@pytest.mark.parametrize("workers", [1, 2])
def test_task_exception_names_the_task(workers, runtime):
    with make_executor(Fails, workers=workers) as executor:
        with pytest.raises(MergesmithError) as info:
            executor.run([1, 2, 3])
        assert type(info.value) is MergesmithError
        assert info.value.message == "task 3 failed: ValueError: three is not allowed"
        with pytest.raises(MethodError) as info:
            executor.run([4])
        assert info.value.message == "task 4: tensor 'w' has NaN values"
        assert info.value.hint == "repair it"


def test_worker_that_cannot_start_is_reported(runtime):
    with pytest.raises(MergesmithError, match=r"a Ray worker could not start: "
                                              r"ZeroDivisionError"):
        make_executor(partial(divmod, 1, 0), workers=2)
