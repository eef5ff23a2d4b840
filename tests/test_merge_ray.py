"""`mergesmith merge --ray`: shards written by Ray workers give a local merge's bytes, on a local
runtime and on a two-node cluster started on this machine; a worker killed mid-shard leaves no
output, and --resume finishes it with the same bytes, skipping the shards already done."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pytest

from conftest import run_cli, write_recipe

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # DiesMidShard, for the actors

SHARDS = "40KB"  # the toy llama's ~170 KB of float32 weights in five shards


@pytest.fixture(scope="module")
def merged(zoo, tmp_path_factory):
    """A DARE-TIES recipe (random drops, seeded per tensor) and its local merge."""
    models = zoo("llama")
    root = tmp_path_factory.mktemp("merge-ray")
    recipe = write_recipe(root / "dare.yaml", {
        "merge_method": "dare_ties", "base_model": str(models["base"]), "seed": 7,
        "models": [{"model": str(models["e1"]), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(models["e2"]), "parameters": {"weight": 0.5, "density": 0.7}}]})
    from mergesmith import merge

    local = merge(recipe, root / "local", shard_size=SHARDS)
    assert len(list(local.glob("*.safetensors"))) == 5
    return recipe, local


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """`ray start --block` stops its node's processes when it is terminated; what is left of
    its session (it runs them in its own process group) is killed."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_two_node_cluster_gives_the_local_bytes(merged, tmp_path):
    """Two nodes of one CPU each, so the two workers run on different nodes. Not `ray stop`,
    which would stop every Ray node on the machine: only the nodes started here are stopped."""
    recipe, local = merged
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="ms-ray-", dir="/tmp")  # Ray's socket paths must stay short
    address = f"127.0.0.1:{_free_port()}"
    # token authentication (`ray start`'s default) would need RAY_AUTH_MODE=token in the driver
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    start = [ray_bin, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
             "--disable-usage-stats"]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                 start_new_session=True)
    nodes = [subprocess.Popen([*start, "--head", f"--port={address.split(':')[1]}",
                               f"--temp-dir={temp}", "--include-dashboard=false"], **quiet)]
    try:
        deadline = time.monotonic() + 60
        while not (Path(temp) / "ray_current_cluster").exists():
            assert time.monotonic() < deadline and nodes[0].poll() is None, "no head node"
            time.sleep(0.2)
        nodes.append(subprocess.Popen([*start, f"--address={address}"], **quiet))
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        try:
            while sum(n["Alive"] for n in ray.nodes()) < 2:
                assert time.monotonic() < deadline and nodes[1].poll() is None, "no second node"
                time.sleep(0.2)
        finally:
            ray.shutdown()  # the merge connects on its own
        # in a process of its own: one whose Ray started a local runtime before (another
        # test's) has taken on token authentication, which this cluster's workers lack
        out = tmp_path / "out"
        done = subprocess.run([str(Path(sys.executable).parent / "mergesmith"), "merge", recipe,
                               out, "--ray", "--workers", "2", "--ray-address", address,
                               "--shard-size", SHARDS, "-q"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        same_files(local, out)
    finally:
        for node in reversed(nodes):
            _stop(node)
        left = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout
        for pid in left.split():  # our session's processes only (their command lines name it)
            os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


def test_merge_ray_gives_the_local_bytes(merged, tmp_path, monkeypatch, capsys):
    """A local runtime of two workers, started for the merge and stopped after it."""
    recipe, local = merged
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, out, "--ray", "--workers", "2",
                           "--shard-size", SHARDS, "-q")
    assert code == 0, err
    same_files(local, out)
    assert not ray.is_initialized()
    assert not list(tmp_path.glob(".out*"))  # no partial folder or lock left


class DiesMidShard:
    """A shard worker whose process exits after writing the first tensor of `shard`."""

    def __init__(self, factory, shard: str):
        self.worker, self.shard = factory(), shard

    def __call__(self, filename: str):
        if filename == self.shard:
            from mergesmith.engine import run

            write = run._write

            def write_then_die(writer, tensor):
                write(writer, tensor)
                os._exit(1)

            run._write = write_then_die
        return self.worker(filename)


def test_killed_worker_then_resume(merged, tmp_path, monkeypatch, capsys):
    from mergesmith.engine import distributed
    from mergesmith.parallel import SerialExecutor
    from mergesmith.parallel.ray import RayExecutor

    recipe, local = merged
    out = tmp_path / "out"
    victim = "model-00003-of-00005.safetensors"

    def dying_executor(factory, workers, address):
        return RayExecutor(partial(DiesMidShard, factory, victim), workers, address,
                           max_retries=0)

    with monkeypatch.context() as patch:
        patch.setattr(distributed, "make_executor", dying_executor)
        code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, out, "--ray", "--workers",
                               "2", "--shard-size", SHARDS, "-q")
    assert code == 1
    assert f"error: task {victim!r}: its worker died" in err
    assert not out.exists()  # nothing complete-looking
    partial_dir = tmp_path / ".out.partial"
    done = json.loads((partial_dir / "mergesmith-manifest.json").read_text())["done"]
    assert done and victim not in done  # shard 3 went out once shard 1 or 2 was done
    assert (partial_dir / victim).exists()  # begun, not finished
    stamps = {name: (partial_dir / name).stat().st_mtime_ns for name in done}

    # the resume's shards run in this process (a serial executor of the same shard workers),
    # to see which shards it is given
    given = []

    def serial_executor(factory, workers, address):
        executor = SerialExecutor(factory)
        run = executor.run
        executor.run = lambda tasks, on_result=None: given.extend(tasks) or run(tasks, on_result)
        return executor

    with monkeypatch.context() as patch:
        patch.setattr(distributed, "make_executor", serial_executor)
        code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, out, "--ray", "--workers",
                               "2", "--shard-size", SHARDS, "--resume", "-q")
    assert code == 0, err
    same_files(local, out)
    assert victim in given and not set(given) & set(done)
    assert {name: (out / name).stat().st_mtime_ns for name in done} == stamps  # not rewritten


def test_side_outputs_and_stray_workers_are_refused(zoo, tmp_path, monkeypatch, capsys):
    models = zoo("llama")
    recipe = write_recipe(tmp_path / "emr.yaml", {
        "merge_method": "emr", "base_model": str(models["base"]),
        "models": [{"model": str(models["e1"])}, {"model": str(models["e2"])}]})
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out", "--ray",
                           "--workers", "2")
    assert code == 1
    assert "error: merge --ray: emr writes side outputs" in err
    assert not (tmp_path / ".out.partial").exists() and not ray.is_initialized()
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out", "--workers",
                           "2")
    assert code == 1 and "--workers sets the number of Ray workers: it goes with --ray" in err


def test_data_aware_merge_on_workers(zoo, tmp_path, monkeypatch):
    """RegMean's statistics stores, collected by the driver, are what the shard workers read
    (here in this process: a serial executor of the same workers, no Ray)."""
    from mergesmith import merge
    from mergesmith.engine import distributed
    from mergesmith.parallel import SerialExecutor

    models = zoo("llama")
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": f"the {name} cat sat on mat {i}"}) + "\n" for i in range(8)))
    recipe = write_recipe(tmp_path / "regmean.yaml", {
        "merge_method": "regmean", "base_model": str(models["base"]), "dtype": "float32",
        "models": [{"model": str(models["e1"]), "calibration": {"data": "a.jsonl"}},
                   {"model": str(models["e2"]), "calibration": {"data": "b.jsonl"}}],
        "calibration": {"samples": 8, "max_length": 16, "batch_size": 4,
                        "cache": str(tmp_path / "cache")},
        "parameters": {"alpha": 0.9}})
    local = merge(recipe, tmp_path / "local", shard_size=SHARDS)
    given = []

    def serial_executor(factory, workers, address):
        given.append(workers)
        return SerialExecutor(factory)

    monkeypatch.setattr(distributed, "make_executor", serial_executor)
    spread = merge(recipe, tmp_path / "spread", shard_size=SHARDS, workers=2)
    assert given == [2]
    same_files(local, spread)
