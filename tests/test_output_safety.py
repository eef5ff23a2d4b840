"""Output safety and hostile recipes (issue 15, section 5): an output that overlaps an input, two
merges into one folder, Ctrl-C and SIGTERM, a full disk, and YAML resource bombs."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mergesmith
from conftest import read_tensors
from mergesmith.errors import OutputError, RecipeError
from mergesmith.io import output as output_module
from mergesmith.io.output import MANIFEST

MERGESMITH = Path(sys.executable).parent / "mergesmith"
SMALL_SHARDS = "20KB"  # several shards from the tiny llama zoo

# the real CLI, each tensor write slowed so that a signal lands mid-merge, and held while the
# file $GATE exists so that other processes can be tried against it
THROTTLED_CLI = """
import os, sys, time
from mergesmith.io.writer import ShardWriter
_write = ShardWriter.write
def slow(self, tensor):
    time.sleep(0.03)
    while os.path.exists(os.environ.get("GATE", "/nonexistent")):
        time.sleep(0.01)
    _write(self, tensor)
ShardWriter.write = slow
from mergesmith.cli import main
sys.argv = ["mergesmith"] + sys.argv[1:]
main()
"""


def linear_yaml(*models: Path) -> str:
    lines = ["merge_method: linear", "models:"]
    for model in models:
        lines += [f"  - model: {model}", "    parameters:", "      weight: 1.0"]
    return "\n".join(lines) + "\n"


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def partial_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def lock_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@pytest.fixture
def models(zoo, tmp_path):
    """Copies of two zoo models in tmp_path (the tests may put outputs inside them)."""
    import shutil

    m = zoo("llama")
    return {name: Path(shutil.copytree(m[name], tmp_path / name)) for name in ("base", "e1")}


@pytest.fixture(scope="module")
def reference(zoo, tmp_path_factory):
    """A recipe and its uninterrupted merge, in several shards."""
    m = zoo("llama")
    root = tmp_path_factory.mktemp("reference")
    recipe = root / "r.yaml"
    recipe.write_text(linear_yaml(m["base"], m["e1"], m["e2"]))
    clean = mergesmith.merge(recipe, root / "clean", shard_size=SMALL_SHARDS)
    return recipe, clean


def start_throttled(*args: str, gate: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({"GATE": str(gate)} if gate else {}))
    return subprocess.Popen([sys.executable, "-c", THROTTLED_CLI, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_first_shard(proc: subprocess.Popen, out: Path) -> None:
    manifest = partial_of(out) / MANIFEST
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(manifest.read_text()).get("done"):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"the merge ended before it was caught mid-way: {proc.communicate()}")


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(MERGESMITH), *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=timeout)


# ---------------------------------------------------------------------------------------------
# an output that is, contains or lies inside an input


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["is", "contains", "lies inside", "via symlink"])
def test_output_overlapping_an_input_is_refused(models, tmp_path, where, overwrite):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(linear_yaml(models["base"], models["e1"]))
    out = {"is": models["e1"], "contains": tmp_path, "lies inside": models["e1"] / "merged",
           "via symlink": tmp_path / "link"}[where]
    if where == "via symlink":
        out.symlink_to(models["e1"], target_is_directory=True)
    before = {name: folder_bytes(path) for name, path in models.items()}
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OutputError) as info:
        mergesmith.merge(recipe, out, overwrite=overwrite)
    message = str(info.value)
    assert f"output {out.absolute()}" in message
    assert "input" in message and (str(models["e1"]) in message or str(tmp_path) in message), message
    assert {name: folder_bytes(path) for name, path in models.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "something was created"


def test_output_containing_the_recipe_is_refused(models, tmp_path):
    (tmp_path / "out").mkdir()
    recipe = tmp_path / "out" / "r.yaml"
    recipe.write_text(linear_yaml(models["base"], models["e1"]))
    with pytest.raises(OutputError, match="contains the input"):
        mergesmith.merge(recipe, tmp_path / "out", overwrite=True)
    assert recipe.is_file()


def test_cli_refuses_overlap_in_one_line(models, tmp_path, monkeypatch, capsys):
    from conftest import run_cli as run_in_process

    recipe = tmp_path / "r.yaml"
    recipe.write_text(linear_yaml(models["base"], models["e1"]))
    code, _, err = run_in_process(monkeypatch, capsys, "merge", recipe, models["base"],
                                  "--overwrite", "--quiet")
    assert code == 1
    assert err.startswith(f"error: output {models['base']} is the input {models['base']}\nhint: ")
    assert len(err.splitlines()) == 2
    assert (models["base"] / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# one merge at a time per output folder


def test_second_merge_and_resume_are_refused_while_one_runs(reference, zoo, tmp_path):
    recipe, clean = reference
    other = tmp_path / "other.yaml"
    m = zoo("llama")
    other.write_text(linear_yaml(m["base"], m["e2"]))
    out = tmp_path / "out"
    gate = tmp_path / "gate"
    gate.touch()
    first = start_throttled("merge", recipe, out, "--shard-size", SMALL_SHARDS, "--quiet", gate=gate)
    try:
        deadline = time.monotonic() + 60
        while not (partial_of(out) / MANIFEST).exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first merge did not start"
            time.sleep(0.01)
        second = run_cli("merge", other, out, "--shard-size", SMALL_SHARDS, "--overwrite", "--quiet")
        with pytest.raises(OutputError) as resumed:  # this process is the third
            mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS, resume=True)
        assert first.poll() is None, "the first merge ended before the others were tried"
    finally:
        gate.unlink()
        stdout, stderr = first.communicate(timeout=120)
    holder = f"another merge (pid {first.pid}) is writing {out}"
    assert second.returncode == 1, second.stderr
    assert second.stderr.startswith(f"error: {holder}"), second.stderr
    assert str(resumed.value).startswith(holder)
    assert first.returncode == 0, stderr
    assert folder_bytes(out) == folder_bytes(clean), "the output mixes two merges"
    assert not lock_of(out).exists() and not partial_of(out).exists()


def test_lock_held_by_another_process_is_named(models, tmp_path):
    """The lock is the kernel's (flock): whoever holds it, a merge is refused before any change."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(linear_yaml(models["base"], models["e1"]))
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(lock_of(out))!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
         "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"another merge \\(pid {holder.pid}\\)"):
            mergesmith.merge(recipe, out, overwrite=True)
        assert not out.exists() and not partial_of(out).exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock went with it, and the file it left blocks no one
    assert lock_of(out).exists()
    mergesmith.merge(recipe, out)
    assert (out / "model.safetensors").is_file()
    assert not lock_of(out).exists()


def test_lock_is_released_after_a_failure(models, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(linear_yaml(models["base"], models["e1"]))
    out = tmp_path / "out"

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output_module, "write_json", full)
    with pytest.raises(OutputError):
        mergesmith.merge(recipe, out)
    monkeypatch.undo()
    assert not lock_of(out).exists()
    mergesmith.merge(recipe, out, resume=True)  # the failed run let go (same process)
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_merge_exits_nonzero_then_resume_is_bit_identical(reference, tmp_path,
                                                                     signum, code):
    recipe, clean = reference
    out = tmp_path / "out"
    args = ["merge", recipe, out, "--shard-size", SMALL_SHARDS, "--quiet"]
    proc = start_throttled(*args)
    try:
        wait_for_first_shard(proc, out)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert "--resume" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists() and partial_of(out).is_dir()
    assert not lock_of(out).exists()
    mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS, resume=True)
    assert folder_bytes(out) == folder_bytes(clean)


def test_cli_resume_with_nothing_to_resume_merges(reference, tmp_path, monkeypatch, capsys):
    from conftest import run_cli as run_in_process

    recipe, clean = reference
    out = tmp_path / "out"
    code, _, err = run_in_process(monkeypatch, capsys, "merge", recipe, out, "--shard-size",
                                  SMALL_SHARDS, "--resume", "--quiet")
    assert code == 0, err
    assert folder_bytes(out) == folder_bytes(clean)


# ---------------------------------------------------------------------------------------------
# a full disk


def test_full_disk_while_writing_the_manifest(reference, tmp_path, monkeypatch):
    recipe, clean = reference
    out = tmp_path / "out"
    calls = {"n": 0}
    original = output_module.write_json

    def write_json(path, data):
        calls["n"] += 1
        if calls["n"] == 3:  # after the first shard: the file is half written, then the disk fills
            path.write_text('{"fingerp')
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, data)

    monkeypatch.setattr(output_module, "write_json", write_json)
    with pytest.raises(OutputError) as info:
        mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS)
    assert str(info.value).startswith(f"writing {partial_of(out) / MANIFEST} failed: "
                                      "No space left on device")
    assert "--resume" in str(info.value)
    assert not (partial_of(out) / (MANIFEST + ".tmp")).exists()
    monkeypatch.undo()
    mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS, resume=True)
    assert folder_bytes(out) == folder_bytes(clean)


def test_full_disk_while_copying_names_the_destination(models, tmp_path, monkeypatch):
    """shutil's copy names the source file in its OSError; a full disk is the destination's."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(linear_yaml(models["base"], models["e1"]))
    out = tmp_path / "out"

    def sendfile(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "sendfile", sendfile)
    monkeypatch.setattr("shutil._USE_CP_SENDFILE", True)
    with pytest.raises(OutputError) as info:
        mergesmith.merge(recipe, out)
    message = str(info.value)
    assert message.startswith(f"writing {partial_of(out)}/") and "No space left" in message
    assert str(models["base"]) not in message and str(models["e1"]) not in message


# ---------------------------------------------------------------------------------------------
# resource bombs in recipes


def refuse_quickly(source) -> str:
    with pytest.raises(RecipeError):  # the first call imports what planning needs: not timed
        mergesmith.plan("merge_method: linear\n")
    started = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        mergesmith.plan(source)
    assert time.perf_counter() - started < 5
    return str(info.value)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    lines += ["merge_method: linear", "models:", "  - model: m", "    parameters: {weight: *a9}"]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    assert "aliases that expand to more than" in refuse_quickly(recipe)


def test_small_alias_reuse_still_loads(tmp_path, zoo):
    m = zoo("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {m['base']}\n"
                      "    parameters: &p {weight: 1.0}\n"
                      f"  - model: {m['e1']}\n    parameters: *p\n")
    assert len(mergesmith.plan(recipe).models) == 2


def test_huge_recipe_is_refused_quickly(tmp_path):
    recipe = tmp_path / "huge.yaml"
    with open(recipe, "w") as f:
        f.write("merge_method: linear\nmodels:\n")
        for i in range(110_000):
            f.write(f"  - model: org/model-{i:06d}\n    parameters:\n      weight: 1.0\n")
    assert recipe.stat().st_size > 5_000_000
    assert "larger than 1 MiB" in refuse_quickly(recipe)


def test_too_many_models_or_nodes_refused_quickly(tmp_path):
    many = "merge_method: linear\nmodels:\n" + "".join(f"  - model: m{i}\n" for i in range(1001))
    assert "1001 entries, more than 1000" in refuse_quickly(many)
    assert "1001 entries" in refuse_quickly(
        {"merge_method": "linear", "models": [{"model": f"m{i}"} for i in range(1001)]})
    wide = "merge_method: linear\nmodels:\n  - model: m\n    parameters: {weight: [" + \
        ", ".join(["1"] * 30_000) + "]}\n"
    assert "more than 20000 YAML nodes" in refuse_quickly(wide)
    deep = "merge_method: linear\nx: " + "[" * 10_000 + "]" * 10_000 + "\n"
    assert "nested more than 64 levels" in refuse_quickly(deep)
