"""mergekit-yaml's command line on `mergesmith merge` (issue 15, section 2): every flag of
mergekit 0.1.5 accepted, the ones that mean something applied, the rest noted; and the output
folder mergekit users expect (mergekit_config.yml, the card's front matter)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_tensors, run_cli

MERGESMITH = Path(sys.executable).parent / "mergesmith"


def linear_yaml(*models) -> str:
    lines = ["merge_method: linear", "models:"]
    for model in models:
        lines += [f"  - model: {model}", "    parameters:", "      weight: 1.0"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def recipe(zoo, tmp_path) -> Path:
    m = zoo("llama")
    path = tmp_path / "r.yaml"
    path.write_text("# averaged, as a test\n" + linear_yaml(m["base"], m["e1"]))
    return path


def mergekit_options() -> list:
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    return [p for p in mergekit_yaml.params if p.param_type_name == "option"]


def merge_command():
    import typer

    from mergesmith.cli import app

    return typer.main.get_command(app).commands["merge"]


def test_every_mergekit_yaml_flag_is_an_option_of_merge():
    ours = {opt for p in merge_command().params for opt in [*p.opts, *p.secondary_opts]}
    theirs = {opt for p in mergekit_options() for opt in [*p.opts, *p.secondary_opts]}
    assert len(theirs) >= 39  # the parse found mergekit 0.1.5's command (24 options)
    assert not theirs - ours, f"mergekit-yaml flags that merge refuses: {sorted(theirs - ours)}"
    # a flag that takes a value here takes one there, and a switch is a switch in both
    kinds = {opt: p.is_flag for p in merge_command().params if hasattr(p, "is_flag")
             for opt in p.opts}
    for p in mergekit_options():
        assert kinds[p.opts[0]] == p.is_flag, p.opts[0]


def test_a_mergekit_yaml_command_line_runs_unchanged(recipe, tmp_path):
    """Every mergekit-yaml flag at once (but --trust-remote-code and --cuda), as a script would."""
    values = {"--transformers-cache": str(tmp_path / "hub"), "--lora-merge-cache": str(tmp_path),
              "--lora-merge-dtype": "bfloat16", "--device": "cpu", "--out-shard-size": "20K",
              "--random-seed": "3", "--num-threads": "1", "--write-threads": "2"}
    skip = {"--trust-remote-code", "--cuda", "--gpu-rich"}
    args = []
    for p in mergekit_options():
        flag = p.opts[0]
        if flag in skip:
            continue
        args += [flag] if p.is_flag or p.count else [flag, values[flag]]
    out = tmp_path / "out"
    result = subprocess.run([str(MERGESMITH), "merge", str(recipe), str(out), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--lazy-unpickle", "--low-cpu-memory", "--clone-tensors", "--multi-gpu",
                 "--read-to-gpu", "--async-write", "--write-threads", "--lora-merge-cache",
                 "--unsafe-truncate-embeddings"):
        assert re.search(f"^note: {flag} does not apply: ", result.stderr, re.M), (flag, result.stderr)
    plain = tmp_path / "plain"
    run = subprocess.run([str(MERGESMITH), "merge", str(recipe), str(plain), "--shard-size",
                          "20000", "--seed", "3", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in plain.iterdir())
    got, want = read_tensors(out), read_tensors(plain)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_trust_remote_code_is_refused_with_the_reason(recipe, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out",
                           "--trust-remote-code")
    assert code == 1
    assert err.startswith("error: --trust-remote-code: mergesmith never runs code from a model")
    assert "config.json and the weights as data" in err
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out",
                           "--no-trust-remote-code", "--quiet")
    assert code == 0, err


def test_out_shard_size_splits_where_mergekit_does(recipe, tmp_path, monkeypatch, capsys):
    """mergekit's --out-shard-size is compared with tensor bytes (its TensorWriter), whatever its
    help says: the same tensors, written in our order through mergekit's writer, give our shards."""
    from mergekit.common import parse_kmb
    from mergekit.io.tensor_writer import TensorWriter

    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, out, "--out-shard-size", "30K",
                           "--quiet")
    assert code == 0, err
    ours = [_header_order(file) for file in sorted(out.glob("*.safetensors"))]
    order = [name for shard in ours for name in shard]
    tensors = read_tensors(out)
    writer = TensorWriter(str(tmp_path / "mk"), max_shard_size=parse_kmb("30K"))
    for name in order:
        writer.save_tensor(name, tensors[name])
    writer.finalize()
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(writer.weight_map[name], []).append(name)
    assert len(ours) > 2
    assert list(groups.values()) == ours

    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "x",
                           "--out-shard-size", "1B", "--shard-size", "5GB")
    assert code == 1 and "not both" in err


def _header_order(file: Path) -> list[str]:
    import json

    raw = file.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda n: header[n]["data_offsets"][0])


def test_copy_tokenizer_and_model_card_switches(recipe, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "a", "--quiet")
    assert code == 0, err
    assert {"tokenizer.json", "README.md", "mergekit_config.yml"} <= {p.name for p in (tmp_path / "a").iterdir()}
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "b", "--quiet",
                           "--no-copy-tokenizer", "--no-write-model-card")
    assert code == 0, err
    names = {p.name for p in (tmp_path / "b").iterdir()}
    assert not names & {"tokenizer.json", "tokenizer_config.json", "README.md", "mergekit_config.yml"}
    assert "config.json" in names and "model.safetensors" in names


def test_options_reach_the_engine(recipe, tmp_path, monkeypatch, capsys):
    """--allow-crimes, --random-seed, -j and -v do what they say."""
    from mergesmith.engine import api

    calls, threads = [], []
    build_plan = api.build_plan

    def recording(recipe, **kwargs):
        calls.append(kwargs)
        return build_plan(recipe, **kwargs)

    monkeypatch.setattr(api, "build_plan", recording)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out", "--allow-crimes",
                           "--random-seed", "7", "-j", "3", "-v", "--quiet")
    assert code == 0, err
    assert calls and all(c["allow_crimes"] is True and c["seed"] == 7 for c in calls)
    assert threads[0] == 3
    assert re.search(r"^linear: 2 model\(s\), \d+ tensors, .* seed 7, on cpu", err, re.M), err
    assert re.search(rf"^wrote {re.escape(str((tmp_path / 'out').absolute()))} in [0-9.]+ s$", err, re.M)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_flag_means_device_cuda(recipe, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out", "--cuda")
    assert code == 1 and "no CUDA device" in err


# ---------------------------------------------------------------------------------------------
# the output folder


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_output_keeps_the_recipe_runnable_by_both_tools(recipe, tmp_path, monkeypatch, capsys):
    from mergekit.config import MergeConfiguration

    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, out, "--quiet")
    assert code == 0, err
    saved = out / "mergekit_config.yml"
    assert saved.read_text() == recipe.read_text()  # as written, comment and all
    MergeConfiguration.model_validate(yaml.safe_load(saved.read_text()))
    again = tmp_path / "again"
    code, _, err = run_cli(monkeypatch, capsys, "merge", saved, again, "--quiet")
    assert code == 0, err
    got, want = read_tensors(again), read_tensors(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["tags"] == ["merge", "mergesmith"] and meta["library_name"] == "transformers"
    assert "base_model" not in meta  # local folders have no Hub page to point to
    assert "](" not in card, "the card links somewhere, with only local inputs"


def fake_hub_model(cache: Path, repo: str, source: Path) -> None:
    """`repo` in a hub cache laid out as huggingface_hub lays it out, as if downloaded."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_card_lists_every_hub_input_as_base_model(zoo, tmp_path):
    m = zoo("llama")
    cache = tmp_path / "hub"
    for name in ("base", "e1", "e2"):
        fake_hub_model(cache, f"org/{name}", m[name])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: org/base\n"
                      + linear_yaml("org/e1", "org/e2").split("\n", 1)[1]
                      + f"  - model: {m['e1']}\n    parameters:\n      weight: 0.5\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([str(MERGESMITH), "merge", str(recipe), str(tmp_path / "out"),
                             "--transformers-cache", str(cache), "--quiet"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == ["org/base", "org/e1", "org/e2"]
    assert meta["tags"] == ["merge", "mergesmith"]
    links = re.findall(r"\]\(([^)]*)\)", card)
    assert sorted(links) == [f"https://huggingface.co/org/{n}" for n in ("base", "e1", "e2")]
    assert f"`{m['e1']}`" in card  # the local input is named, not linked
