"""Bad input: each failure is a clear MergesmithError and nothing that looks complete is left behind.

Covers missing models, broken safetensors, recipe typos, out-of-range parameters, shape and
vocabulary mismatches, a write failure mid-merge, a SIGKILL mid-merge followed by --resume
(bit-identical to an uninterrupted run), resume guards, and the CLI's one-line errors.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mergesmith
from conftest import build_model, default_tokens, read_tensors, save_tokenizer, tiny_config
from mergesmith.errors import (
    CheckpointError,
    MergesmithError,
    MethodError,
    ModelNotFoundError,
    OutputError,
    PlanError,
    RecipeError,
)
from mergesmith.io.output import MANIFEST
from mergesmith.io.writer import ShardWriter

MERGESMITH = Path(sys.executable).parent / "mergesmith"
SMALL_SHARDS = "20KB"  # several shards from the tiny llama zoo


# ---------------------------------------------------------------------------------------------
# helpers


def partial_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def assert_nothing_left(target: Path, *, partial_allowed: bool = False) -> None:
    """No target folder (nothing that looks complete); a hidden .partial only when allowed."""
    assert not target.exists(), f"{target} exists after a failed merge"
    if not partial_allowed:
        assert not partial_of(target).exists(), f"{partial_of(target)} left behind by a plan-time error"


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def linear_yaml(base: Path, *experts: Path, weights=None) -> str:
    models = (base, *experts)
    weights = weights or [1.0] * len(models)
    lines = ["merge_method: linear", "models:"]
    for model, weight in zip(models, weights):
        lines += [f"  - model: {model}", "    parameters:", f"      weight: {weight}"]
    return "\n".join(lines) + "\n"


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_files(got: Path, want: Path) -> None:
    a, b = folder_bytes(got), folder_bytes(want)
    assert sorted(a) == sorted(b), f"file lists differ: {sorted(a)} vs {sorted(b)}"
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, f"files differ byte-for-byte: {differ}"


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([str(MERGESMITH), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def fail_writes_after(monkeypatch, n: int) -> dict:
    """Make ShardWriter.write raise ENOSPC after n successful calls."""
    calls = {"n": 0}
    original = ShardWriter.write

    def write(self, tensor):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, tensor)

    monkeypatch.setattr(ShardWriter, "write", write)
    return calls


def interrupt(monkeypatch, recipe: Path, out: Path, after: int = 6) -> None:
    """Leave an interrupted merge of `recipe` in out's .partial folder."""
    fail_writes_after(monkeypatch, after)
    with pytest.raises(OutputError):
        mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS)
    monkeypatch.undo()
    assert partial_of(out).is_dir()


# ---------------------------------------------------------------------------------------------
# 1. missing model


def test_missing_local_model_folder(zoo, tmp_path):
    m = zoo("llama")
    missing = tmp_path / "no-such-model"
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], missing))
    out = tmp_path / "out"
    with pytest.raises(ModelNotFoundError) as info:
        mergesmith.merge(recipe, out)
    assert str(missing) in str(info.value)
    assert "not found" in str(info.value)
    assert_nothing_left(out)


def test_hub_id_offline_not_cached(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    m = zoo("llama")
    hub_id = "mergesmith-tests/definitely-not-cached"
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], hub_id))
    out = tmp_path / "out"
    with pytest.raises(ModelNotFoundError) as info:
        mergesmith.merge(recipe, out)
    message = str(info.value)
    assert hub_id in message
    assert "HF_HUB_OFFLINE" in message or "offline" in message.lower()
    assert_nothing_left(out)


# ---------------------------------------------------------------------------------------------
# 2. truncated or corrupt safetensors


def test_truncated_safetensors(zoo, tmp_path):
    m = zoo("llama")
    broken = copy_model(m["e1"], tmp_path / "e1-cut")
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], broken))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        mergesmith.merge(recipe, out)
    assert str(file) in str(info.value)
    assert "truncated" in str(info.value)
    assert_nothing_left(out)


def test_safetensors_header_length_corrupt(zoo, tmp_path):
    m = zoo("llama")
    broken = copy_model(m["e1"], tmp_path / "e1-bad-len")
    file = broken / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    file.write_bytes(bytes(data))
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], broken))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        mergesmith.merge(recipe, out)
    assert str(file) in str(info.value)
    assert "header" in str(info.value)
    assert_nothing_left(out)


def test_safetensors_header_json_garbled(zoo, tmp_path):
    m = zoo("llama")
    broken = copy_model(m["e1"], tmp_path / "e1-bad-json")
    file = broken / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:24] = b"\x00{{garbage!!}}\xff\xfe"
    file.write_bytes(bytes(data))
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], broken))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        mergesmith.merge(recipe, out)
    assert str(file) in str(info.value)
    assert "corrupt" in str(info.value)
    assert_nothing_left(out)


def test_sharded_input_with_missing_shard(reference, tmp_path):
    """A sharded model (mergesmith's own output) whose index lists a shard that is gone."""
    _, clean = reference
    broken = copy_model(clean, tmp_path / "sharded")
    gone = sorted(broken.glob("model-*.safetensors"))[1]
    gone.unlink()
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(broken, broken))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        mergesmith.merge(recipe, out)
    assert gone.name in str(info.value)
    assert "model.safetensors.index.json" in str(info.value)
    assert "missing" in str(info.value)
    assert_nothing_left(out)


@pytest.mark.parametrize("damage", ["no-config", "no-weights", "bad-config", "is-a-file"])
def test_broken_model_folder(zoo, tmp_path, damage):
    m = zoo("llama")
    broken = copy_model(m["e1"], tmp_path / "e1")
    if damage == "no-config":
        (broken / "config.json").unlink()
        expect, words = CheckpointError, ("config.json", str(broken))
    elif damage == "no-weights":
        (broken / "model.safetensors").unlink()
        expect, words = CheckpointError, ("no weights", str(broken))
    elif damage == "bad-config":
        (broken / "config.json").write_text('{"model_type": "llama",')
        expect, words = CheckpointError, (str(broken / "config.json"), "JSON")
    else:
        broken = broken / "model.safetensors"
        expect, words = ModelNotFoundError, (str(broken), "folder")
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], broken))
    out = tmp_path / "out"
    with pytest.raises(expect) as info:
        mergesmith.merge(recipe, out)
    for word in words:
        assert word in str(info.value)
    assert_nothing_left(out)


# ---------------------------------------------------------------------------------------------
# 3-5. recipe mistakes


def test_unknown_method_suggests_linear(zoo, tmp_path):
    m = zoo("llama")
    text = linear_yaml(m["base"], m["e1"]).replace("merge_method: linear", "merge_method: linaer")
    recipe = write_text(tmp_path / "r.yaml", "# a comment\n" + text)  # merge_method on line 2
    out = tmp_path / "out"
    with pytest.raises((RecipeError, MethodError)) as info:
        mergesmith.merge(recipe, out)
    message = str(info.value)
    assert f"{recipe}:2" in message
    assert "linaer" in message
    assert "linear" in message.replace("linaer", "")
    assert_nothing_left(out)


def test_misspelled_top_level_field(zoo, tmp_path):
    m = zoo("llama")
    text = linear_yaml(m["base"], m["e1"]).replace("models:", "modles:")
    recipe = write_text(tmp_path / "r.yaml", text)  # modles on line 2
    out = tmp_path / "out"
    with pytest.raises(RecipeError) as info:
        mergesmith.merge(recipe, out)
    message = str(info.value)
    assert f"{recipe}:2" in message
    assert "modles" in message
    assert "did you mean 'models'" in message
    assert_nothing_left(out)


def test_misspelled_field_in_model_entry(zoo, tmp_path):
    m = zoo("llama")
    text = (f"merge_method: linear\n"
            f"models:\n"
            f"  - model: {m['base']}\n"
            f"    parameters:\n"
            f"      weight: 1.0\n"
            f"  - model: {m['e1']}\n"
            f"    parameter:\n"          # line 7
            f"      weight: 1.0\n")
    recipe = write_text(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    with pytest.raises(RecipeError) as info:
        mergesmith.merge(recipe, out)
    message = str(info.value)
    assert f"{recipe}:7" in message
    assert "models[1].parameter" in message
    assert "did you mean 'parameters'" in message
    assert_nothing_left(out)


def test_slerp_t_out_of_range(zoo, tmp_path):
    m = zoo("llama")
    text = (f"merge_method: slerp\n"
            f"base_model: {m['base']}\n"
            f"models:\n"
            f"  - model: {m['base']}\n"
            f"  - model: {m['e1']}\n"
            f"parameters:\n"
            f"  t: 1.5\n")                  # line 7
    recipe = write_text(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    with pytest.raises(PlanError) as info:
        mergesmith.merge(recipe, out)
    message = str(info.value)
    assert f"{recipe}:7" in message
    assert "parameters.t" in message
    assert "1.5" in message
    assert re.search(r"<=\s*1(\.0)?\b|\[0(\.0)?,\s*1(\.0)?\]|between 0(\.0)? and 1", message), message
    assert_nothing_left(out)


def test_string_weight(zoo, tmp_path):
    m = zoo("llama")
    text = (f"merge_method: linear\n"
            f"models:\n"
            f"  - model: {m['base']}\n"
            f"    parameters:\n"
            f"      weight: 1.0\n"
            f"  - model: {m['e1']}\n"
            f"    parameters:\n"
            f"      weight: heavy\n")     # line 8
    recipe = write_text(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    with pytest.raises(PlanError) as info:
        mergesmith.merge(recipe, out)
    message = str(info.value)
    assert f"{recipe}:8" in message
    assert "models[1].parameters.weight" in message
    assert "heavy" in message and "number" in message
    assert_nothing_left(out)


# ---------------------------------------------------------------------------------------------
# 6. mismatched shapes


def build_llama(folder: Path, *, seed: int, **overrides) -> Path:
    import transformers as tf

    config = tiny_config("llama")
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    save_tokenizer(folder, default_tokens())
    return folder


def test_mismatched_shapes(zoo, tmp_path):
    m = zoo("llama")
    odd = build_llama(tmp_path / "wide-mlp", seed=3, intermediate_size=48)
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], odd))
    out = tmp_path / "out"
    with pytest.raises(PlanError) as info:
        mergesmith.merge(recipe, out)
    message = str(info.value)
    assert str(m["base"]) in message and str(odd) in message
    assert "intermediate_size 64 against 48" in message, message
    # with allow_crimes the config difference is a warning, and the shapes still cannot merge
    with pytest.raises(PlanError) as info:
        mergesmith.merge(recipe, out, allow_crimes=True)
    message = str(info.value)
    assert str(m["base"]) in message and str(odd) in message
    assert re.search(r"model\.layers\.\d+\.mlp\.(down|up|gate)_proj\.weight", message), message
    assert "64" in message and "48" in message
    assert_nothing_left(out)


def test_mismatched_layer_counts(zoo, tmp_path):
    m = zoo("llama")
    short = build_model(tmp_path / "two-layers", "llama", seed=4, layers=2)
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], short))
    out = tmp_path / "out"
    with pytest.raises(PlanError) as info:
        mergesmith.merge(recipe, out)
    message = str(info.value)
    assert str(m["base"]) in message and str(short) in message
    assert "layers" in message and "4" in message and "2" in message
    assert_nothing_left(out)


# ---------------------------------------------------------------------------------------------
# 7. vocabulary mismatch


@pytest.fixture(scope="module")
def vocab_pair(zoo, tmp_path_factory):
    """The zoo base (96 tokens) and an expert with the same tokens in another order plus 4 new."""
    base = zoo("llama")["base"]
    tokens = default_tokens(96)
    shuffled = tokens[:]
    random.Random(0).shuffle(shuffled)
    extra = ["zeta", "eta", "theta", "iota"]
    expert_tokens = shuffled[:10] + extra[:2] + shuffled[10:50] + extra[2:] + shuffled[50:]
    assert len(expert_tokens) == 100
    expert = build_model(tmp_path_factory.mktemp("vocab") / "e100", "llama", seed=11, vocab=100,
                         tokens=expert_tokens)
    return base, expert, extra


def vocab_recipe(path: Path, base: Path, expert: Path, source: str | None) -> Path:
    text = (f"merge_method: linear\n"
            f"base_model: {base}\n"
            f"models:\n"
            f"  - model: {base}\n"
            f"    parameters:\n"
            f"      weight: 0.25\n"
            f"  - model: {expert}\n"
            f"    parameters:\n"
            f"      weight: 0.75\n")
    if source:
        text += f"tokenizer_source: {source}\n"
    return write_text(path, text)


def vocab_of(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def test_vocabulary_mismatch_is_an_error(vocab_pair, tmp_path):
    base, expert, _ = vocab_pair
    recipe = vocab_recipe(tmp_path / "r.yaml", base, expert, None)
    out = tmp_path / "out"
    with pytest.raises(PlanError) as info:
        mergesmith.merge(recipe, out)
    message = str(info.value)
    assert "vocabulary sizes differ" in message
    assert "96" in message and "100" in message
    assert str(base) in message and str(expert) in message
    assert "tokenizer_source" in message
    assert_nothing_left(out)


def check_rows_by_token(out: Path, base: Path, expert: Path, expect_rows: int) -> dict[str, int]:
    got = read_tensors(out)
    b, e = read_tensors(base), read_tensors(expert)
    vb, ve, vo = vocab_of(base), vocab_of(expert), vocab_of(out)
    assert len(vo) == expect_rows
    assert sorted(vo.values()) == list(range(expect_rows))
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == expect_rows
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == (expect_rows, 32), name
        for token, row in vo.items():
            if token in vb and token in ve:
                want = 0.25 * b[name][vb[token]] + 0.75 * e[name][ve[token]]
            elif token in ve:  # only the expert has it: its own row, not averaged with zeros
                want = e[name][ve[token]]
            else:
                want = b[name][vb[token]]
            torch.testing.assert_close(got[name][row], want, atol=1e-6, rtol=1e-5,
                                       msg=f"{name} row {row} (token {token!r})")
    return vo


def test_vocabulary_union(vocab_pair, tmp_path):
    base, expert, extra = vocab_pair
    recipe = vocab_recipe(tmp_path / "r.yaml", base, expert, "union")
    out = tmp_path / "out"
    mergesmith.merge(recipe, out)
    vo = check_rows_by_token(out, base, expert, 100)
    assert set(extra) <= set(vo)
    # a shared layer tensor is a plain weighted average
    got, b, e = read_tensors(out), read_tensors(base), read_tensors(expert)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[name], 0.25 * b[name] + 0.75 * e[name], atol=1e-6, rtol=1e-5)


def test_vocabulary_base(vocab_pair, tmp_path):
    base, expert, extra = vocab_pair
    recipe = vocab_recipe(tmp_path / "r.yaml", base, expert, "base")
    out = tmp_path / "out"
    mergesmith.merge(recipe, out)
    vo = check_rows_by_token(out, base, expert, 96)
    assert not set(extra) & set(vo)
    assert vo == vocab_of(base)


# ---------------------------------------------------------------------------------------------
# 8. write failure mid-merge, then --resume


@pytest.fixture(scope="module")
def reference(zoo, tmp_path_factory):
    """(recipe, folder): a clean, uninterrupted linear merge of the llama zoo in small shards."""
    m = zoo("llama")
    root = tmp_path_factory.mktemp("reference")
    recipe = write_text(root / "r.yaml", linear_yaml(m["base"], m["e1"], m["e2"], weights=[0.2, 0.5, 0.3]))
    assert len(mergesmith.plan(recipe, shard_size=SMALL_SHARDS).shards) >= 4
    return recipe, mergesmith.merge(recipe, root / "clean", shard_size=SMALL_SHARDS)


def test_write_failure_then_resume_is_bit_identical(reference, tmp_path, monkeypatch):
    recipe, clean = reference
    out = tmp_path / "out"

    fail_writes_after(monkeypatch, 8)
    with pytest.raises(OutputError) as info:
        mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS)
    message = str(info.value)
    shard = re.search(r"model-\d{5}-of-\d{5}\.safetensors", message)
    assert shard, message
    assert str(partial_of(out) / shard.group(0)) in message
    assert "No space left on device" in message
    assert "--resume" in message
    assert_nothing_left(out, partial_allowed=True)
    manifest = json.loads((partial_of(out) / MANIFEST).read_text())
    assert manifest["done"], "shards finished before the failure should be recorded"
    assert shard.group(0) not in manifest["done"]

    monkeypatch.undo()
    assert mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS, resume=True) == out.absolute()
    assert not partial_of(out).exists()
    assert_same_files(out, clean)
    assert MANIFEST not in folder_bytes(out)


@pytest.mark.parametrize("where", ["open", "close"])
def test_shard_open_or_close_failure_then_resume(reference, tmp_path, monkeypatch, where):
    """ENOSPC when a later shard is created, or when a shard is flushed and closed."""
    recipe, clean = reference
    out = tmp_path / "out"
    calls = {"n": 0}
    original = getattr(ShardWriter, "__init__" if where == "open" else "close")

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args)

    monkeypatch.setattr(ShardWriter, "__init__" if where == "open" else "close", failing)
    with pytest.raises(OutputError) as info:
        mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS)
    message = str(info.value)
    assert str(partial_of(out) / "model-00003-of-") in message, message
    assert "No space left on device" in message
    assert "--resume" in message, f"no hint that the merge can be resumed: {message}"
    assert_nothing_left(out, partial_allowed=True)

    monkeypatch.undo()
    mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS, resume=True)
    assert_same_files(out, clean)


def test_metadata_write_failure_then_resume(reference, tmp_path, monkeypatch):
    """ENOSPC after the last shard, while writing config/index/tokenizer: still an OutputError."""
    import mergesmith.engine.finalize as finalize

    recipe, clean = reference
    out = tmp_path / "out"

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(finalize, "_json", full)
    with pytest.raises(OutputError) as info:
        mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS)
    message = str(info.value)
    assert "No space left on device" in message
    assert str(partial_of(out)) in message
    assert_nothing_left(out, partial_allowed=True)

    monkeypatch.undo()
    mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS, resume=True)
    assert_same_files(out, clean)


# ---------------------------------------------------------------------------------------------
# 9. kill mid-merge, then --resume; resume guards

THROTTLED_CLI = """
import sys, time
from mergesmith.io.writer import ShardWriter
_write = ShardWriter.write
def slow(self, tensor):
    time.sleep(0.03)
    _write(self, tensor)
ShardWriter.write = slow
from mergesmith.cli import main
sys.argv = ["mergesmith"] + sys.argv[1:]
main()
"""


def test_sigkill_mid_merge_then_resume_is_bit_identical(reference, tmp_path):
    recipe, clean = reference
    out = tmp_path / "out"
    manifest = partial_of(out) / MANIFEST
    args = ["merge", str(recipe), str(out), "--shard-size", SMALL_SHARDS, "--quiet"]
    # the real CLI, with each tensor write slowed a little so the kill lands mid-merge
    proc = subprocess.Popen([sys.executable, "-c", THROTTLED_CLI, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(manifest.read_text()).get("done"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        assert proc.poll() is None, f"merge ended before it could be killed: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert_nothing_left(out, partial_allowed=True)
    done = json.loads(manifest.read_text())["done"]
    assert done and len(done) < len(mergesmith.plan(recipe, shard_size=SMALL_SHARDS).shards)

    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert not partial_of(out).exists()

    assert (clean / "model.safetensors.index.json").is_file()
    assert_same_files(out, clean)


def test_partial_without_resume_is_refused(zoo, tmp_path, monkeypatch):
    m = zoo("llama")
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], m["e1"]))
    out = tmp_path / "out"
    interrupt(monkeypatch, recipe, out)
    before = folder_bytes(partial_of(out))
    with pytest.raises(OutputError) as info:
        mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS)
    assert "--resume" in str(info.value)
    assert str(partial_of(out)) in str(info.value) or str(out) in str(info.value)
    assert_nothing_left(out, partial_allowed=True)
    assert folder_bytes(partial_of(out)) == before, "a refused run must not touch the partial"


def test_resume_after_recipe_change_is_refused(zoo, tmp_path, monkeypatch):
    m = zoo("llama")
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], m["e1"]))
    out = tmp_path / "out"
    interrupt(monkeypatch, recipe, out)
    write_text(recipe, linear_yaml(m["base"], m["e1"], weights=[1.0, 2.0]))
    with pytest.raises(OutputError) as info:
        mergesmith.merge(recipe, out, shard_size=SMALL_SHARDS, resume=True)
    message = str(info.value)
    assert "changed" in message
    assert str(out) in message
    assert "--overwrite" in message
    assert_nothing_left(out, partial_allowed=True)


def test_resume_with_nothing_to_resume_starts_the_merge(zoo, tmp_path):
    """A blind retry with --resume works whether or not the first run got to write anything."""
    m = zoo("llama")
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], m["e1"]))
    out = tmp_path / "out"
    assert mergesmith.merge(recipe, out, resume=True) == out.absolute()
    mergesmith.merge(recipe, tmp_path / "plain")
    assert_same_files(out, tmp_path / "plain")


def test_existing_target_needs_overwrite(zoo, tmp_path):
    m = zoo("llama")
    recipe = write_text(tmp_path / "r.yaml", linear_yaml(m["base"], m["e1"]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError) as info:
        mergesmith.merge(recipe, out)
    assert str(out) in str(info.value)
    assert "already exists" in str(info.value)
    assert "--overwrite" in str(info.value)
    assert (out / "keep.txt").read_text() == "precious"
    assert not partial_of(out).exists()
    mergesmith.merge(recipe, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# 10. CLI


def test_cli_bad_recipe_one_line_no_traceback(zoo, tmp_path):
    m = zoo("llama")
    text = linear_yaml(m["base"], m["e1"]).replace("merge_method: linear", "merge_method: linaer")
    recipe = write_text(tmp_path / "bad.yaml", text)
    out = tmp_path / "out"

    result = run_cli("merge", str(recipe), str(out), "--quiet")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert f"{recipe}:1" in errors[0] and "linaer" in errors[0]
    assert all(line.startswith(("error:", "hint:")) for line in lines), result.stderr
    assert "linear" in result.stderr.replace("linaer", "")
    assert_nothing_left(out)

    debug = run_cli("--debug", "merge", str(recipe), str(out), "--quiet")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr
    assert "linaer" in debug.stderr
    assert_nothing_left(out)


def test_cli_check_good_recipe(zoo, tmp_path):
    m = zoo("llama")
    recipe = write_text(tmp_path / "good.yaml", linear_yaml(m["base"], m["e1"], m["e2"]))
    result = run_cli("check", str(recipe))
    assert result.returncode == 0, result.stderr
    the_plan = mergesmith.plan(recipe)
    text = result.stdout
    assert re.search(rf"output tensors\s+{len(the_plan.jobs)}\b", text), text
    assert re.search(r"output size\s+[\d.]+ [KMG]?B", text), text
    assert re.search(r"peak memory\s+[\d.]+ [KMG]?B", text), text
    assert "ok" in text
    assert not any(tmp_path.glob(".*partial"))


@pytest.fixture(scope="module")
def methods_output():
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_methods_lists_methods(methods_output):
    for name in ("linear", "slerp", "task_arithmetic", "passthrough"):
        assert re.search(rf"\b{name}\b", methods_output), name


def test_cli_methods_shows_optional_base(methods_output):
    """multislerp takes an optional base; its 'needs' cell must say so, not start with ' + '."""
    row = next(line for line in methods_output.splitlines() if "multislerp" in line)
    needs = row.split("│")[2]
    assert "base" in needs, f"multislerp row: {row!r}"


def test_errors_are_mergesmith_errors():
    for cls in (RecipeError, ModelNotFoundError, CheckpointError, PlanError, MethodError, OutputError):
        assert issubclass(cls, MergesmithError)
