"""Inputs that must be refused at plan time, before any tensor is merged (issue 15, sections 1
and 5): models of different architectures, silent substitutions, corrupt headers and configs,
parameters that would fail (or poison) the merge later, and statistics that match no tensor."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith.engine.api import plan as engine_plan
from mergesmith.errors import CheckpointError, PlanError, RecipeError
from mergesmith.io.checkpoint import Checkpoint, read_safetensors_header

from conftest import read_tensors, run_cli, write_recipe


def linear(*folders, **params) -> dict:
    return {"merge_method": "linear",
            "models": [{"model": str(f), "parameters": {"weight": 1.0, **params}} for f in folders]}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(folder: Path, change) -> None:
    """Rewrite model.safetensors with `change(tensors)` applied."""
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def raw_safetensors(path: Path, entries: dict, data: bytes) -> Path:
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


# ---------------------------------------------------------------------------------------------
# 1. models of different architectures


@pytest.mark.parametrize("other", ["qwen2", "gemma"])
def test_different_architectures_are_refused_naming_both_models(zoo, tmp_path, monkeypatch,
                                                                 capsys, other):
    llama, odd = zoo("llama")["base"], zoo(other)["base"]
    recipe = write_recipe(tmp_path / "r.yaml", linear(llama, odd))
    code, _, err = run_cli(monkeypatch, capsys, "check", recipe)
    assert code != 0 and "Traceback" not in err
    message = " ".join(err.split())
    assert str(llama) in message and str(odd) in message
    assert "architectures" in message and "allow-crimes" in message
    with pytest.raises(PlanError, match="architectures"):
        mergesmith.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_allow_crimes_still_never_drops_a_tensor(zoo):
    # Qwen2 has q/k/v biases Llama lacks: merged anyway they would vanish from the output
    with pytest.raises(PlanError, match=r"k_proj\.bias") as info:
        mergesmith.plan(linear(zoo("llama")["base"], zoo("qwen2")["base"]), allow_crimes=True)
    assert str(zoo("qwen2")["base"]) in str(info.value)


def test_allow_crimes_merges_with_a_warning_and_reads_a_tied_head_from_its_embedding(zoo, tmp_path):
    llama, gemma = zoo("llama")["base"], zoo("gemma")["base"]
    the_plan = mergesmith.plan(linear(llama, gemma), allow_crimes=True)
    assert any("GemmaForCausalLM" in w and "allow_crimes" in w for w in the_plan.warnings)
    out = read_tensors(mergesmith.merge(linear(llama, gemma), tmp_path / "out", allow_crimes=True))
    a, b = read_tensors(llama), read_tensors(gemma)
    assert set(out) == set(a)
    # gemma computes its logits with its embedding: that is its head
    torch.testing.assert_close(out["lm_head.weight"],
                               (a["lm_head.weight"] + b["model.embed_tokens.weight"]) / 2)
    torch.testing.assert_close(out["model.layers.2.mlp.up_proj.weight"],
                               (a["model.layers.2.mlp.up_proj.weight"]
                                + b["model.layers.2.mlp.up_proj.weight"]) / 2)


def test_config_shapes_must_agree(zoo, tmp_path):
    m = zoo("llama")
    odd = copy_model(m["e1"], tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    config["num_key_value_heads"] = 4
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match="num_key_value_heads 2 against 4"):
        mergesmith.plan(linear(m["base"], odd))


# ---------------------------------------------------------------------------------------------
# 5. silent substitutions


def test_untied_expert_without_its_head_is_refused(zoo, tmp_path):
    m = zoo("llama")
    headless = copy_model(m["e1"], tmp_path / "headless")
    rewrite_weights(headless, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(PlanError, match=r"'lm_head\.weight'.*tie_word_embeddings: false") as info:
        mergesmith.plan(linear(m["base"], headless))
    assert str(headless) in str(info.value)


def test_overlapping_or_negative_offsets_are_refused(tmp_path):
    from safetensors import safe_open

    data = bytes(range(24))
    entry = {"dtype": "F32", "shape": [4]}
    cases = {
        "overlap": {"a": {**entry, "data_offsets": [0, 16]}, "b": {**entry, "data_offsets": [8, 24]}},
        "inside": {"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
                   "b": {**entry, "data_offsets": [4, 20]}},
        "negative": {"a": {**entry, "data_offsets": [-16, 0]}, "b": {**entry, "data_offsets": [8, 24]}},
    }
    for name, entries in cases.items():
        path = raw_safetensors(tmp_path / f"{name}.safetensors", entries, data)
        with pytest.raises(Exception):  # the reference reader refuses these files too
            with safe_open(path, "pt") as f:
                [f.get_tensor(k) for k in f.keys()]
        with pytest.raises(CheckpointError, match="overlap|invalid data offsets"):
            read_safetensors_header(path)
    # adjacent tensors and an empty one at a shared offset are fine
    fine = {"a": {**entry, "data_offsets": [0, 16]}, "e": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}
    assert set(read_safetensors_header(raw_safetensors(tmp_path / "ok.safetensors", fine, data))) == {"a", "b", "e"}


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn])
def test_a_tensor_of_another_dtype_family_is_refused(zoo, tmp_path, dtype):
    m = zoo("llama")
    odd = copy_model(m["e1"], tmp_path / "odd")
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_weights(odd, lambda t: t.__setitem__(name, t[name].to(dtype)))
    with pytest.raises(PlanError, match="dtypes differ") as info:
        mergesmith.plan(linear(m["base"], odd))
    message = str(info.value)
    assert name in message and str(odd) in message and str(dtype).removeprefix("torch.") in message


@pytest.mark.parametrize("key, value, says", [("num_hidden_layers", 6, "4 layers"),
                                             ("vocab_size", 120, "96 rows")])
def test_config_contradicting_the_weights_is_refused(zoo, tmp_path, key, value, says):
    m = zoo("llama")
    odd = copy_model(m["e1"], tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    config[key] = value
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match=f"{key}: {value}.*{says}"):
        mergesmith.plan(linear(odd))  # alone too: its config would be the output's
    with pytest.raises(PlanError, match=key):
        mergesmith.plan(linear(m["base"], odd))


@pytest.mark.parametrize("content, says", [(b"[1, 2]", "must be a JSON object"),
                                           (b'{"model_type": "llama\xff"}', "not UTF-8")])
def test_config_not_a_json_object_or_not_utf8(zoo, tmp_path, content, says):
    odd = copy_model(zoo("llama")["e1"], tmp_path / "odd")
    (odd / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=says):
        Checkpoint(odd)


@pytest.mark.parametrize("index, says", [
    (b'{"weight_map": ["model.safetensors"]}', "got list"),
    (b'{"weight_map": {"lm_head.weight": 3}}', "maps to 3"),
    (b'{"weight_map": {"lm_head.weight": "model.safetensors\xfe"}}', "not UTF-8"),
    (b'"weights"', "must be a JSON object"),
])
def test_bad_weight_index(zoo, tmp_path, index, says):
    odd = copy_model(zoo("llama")["e1"], tmp_path / "odd")
    (odd / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(CheckpointError, match=says):
        Checkpoint(odd)


def test_refused_pickle_does_not_advise_weights_only_false(zoo, tmp_path):
    odd = tmp_path / "pickled"
    odd.mkdir()
    shutil.copy(zoo("llama")["e1"] / "config.json", odd)
    torch.save({"w": torch.ones(2), "odd": Path("x")}, odd / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        Checkpoint(odd)
    assert "weights_only" not in str(info.value) and "add_safe_globals" not in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# 5. parameters validated at plan time, recipe shapes


@pytest.mark.parametrize("method, param, value", [
    ("linear", "weight", ".nan"), ("linear", "weight", "1e300"), ("linear", "weight", "-.inf"),
    ("ties", "density", ".nan"), ("ties", "weight", ".inf"), ("breadcrumbs", "gamma", ".nan"),
    ("ties", "lambda", "-.inf"), ("dare_ties", "weight", "1e39"),
])
def test_non_finite_parameters_are_refused_with_the_recipe_line(zoo, tmp_path, monkeypatch, capsys,
                                                                 method, param, value):
    m = zoo("llama")
    text = (f"merge_method: {method}\nbase_model: {m['base']}\nmodels:\n"
            f"  - model: {m['e1']}\n    parameters:\n      weight: 1.0\n      {param}: {value}\n"
            f"  - model: {m['e2']}\n    parameters: {{weight: 1.0}}\n")
    if method == "linear":
        text = text.replace(f"base_model: {m['base']}\n", "")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("      weight: 1.0\n", "") if param == "weight" else text)
    code, _, err = run_cli(monkeypatch, capsys, "check", recipe)
    assert code != 0 and "Traceback" not in err
    line = 7 - (param == "weight") - (method == "linear")
    assert f"r.yaml:{line}: models[0].parameters.{param}" in err, err
    assert "finite" in err


def test_empty_model_reference_is_one_recipe_error(zoo, tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", linear("", zoo("llama")["e1"]))
    with pytest.raises(RecipeError, match="empty model reference"):
        mergesmith.plan(recipe)
    code, _, err = run_cli(monkeypatch, capsys, "check", recipe)
    assert code != 0 and "Traceback" not in err and "r.yaml:3: models[0].model" in err


def test_same_model_twice_is_refused(zoo, tmp_path):
    m = zoo("llama")
    recipe = write_recipe(tmp_path / "r.yaml", linear(m["e1"], m["e2"], m["e1"]))
    with pytest.raises(PlanError, match=r"listed twice in models \(models\[0\] and models\[2\]\)"):
        mergesmith.plan(recipe)
    # the same folder by two spellings is the same model
    with pytest.raises(PlanError, match="listed twice"):
        mergesmith.plan(linear(m["e1"], m["e2"], f"{m['e1']}/."))


def test_layer_lists_beyond_the_model_are_refused(zoo, tmp_path):
    m = zoo("llama")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "layer_swap", "base_model": str(m["base"]),
        "models": [{"model": str(m["base"])}, {"model": str(m["e1"]), "parameters": {"layers": "2-10"}}]})
    with pytest.raises(PlanError, match=r"r.yaml:\d+: models\[1\].parameters.layers: layers '2-10' go "
                                        r"past the output, which has 4 layers"):
        mergesmith.plan(recipe)
    sliced = write_recipe(tmp_path / "s.yaml", {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(m["e1"]), "layer_range": [2, 6]}]}]})
    with pytest.raises(PlanError, match="which has 4 layers"):
        mergesmith.plan(sliced)


# ---------------------------------------------------------------------------------------------
# 5. data-aware merges whose statistics match no tensor


def fake_store(folder: Path, model: Path, kind: str, rename=lambda n: n) -> Path:
    """A statistics store of `model` holding `kind` for each 2-D weight, under rename(name)."""
    from mergesmith.calibrate.store import write_store

    stats = {}
    for name, tensor in read_tensors(model).items():
        if kind == "fisher" or tensor.dim() == 2:
            stat = torch.eye(tensor.shape[-1]) if kind == "gram" else torch.ones_like(tensor)
            stats[f"{rename(name)}::{kind}"] = stat
    return write_store(folder, stats, {"kinds": [kind]})


@pytest.mark.parametrize("method, kind", [("regmean", "gram"), ("fisher", "fisher")])
def test_statistics_that_match_no_tensor_are_refused(zoo, tmp_path, method, kind):
    m = zoo("llama")
    recipe = {"merge_method": method,
              "models": [{"model": str(m["e1"])}, {"model": str(m["e2"])}]}
    stores = {str(m[e]): fake_store(tmp_path / e, m[e], kind, rename=lambda n: "encoder." + n)
              for e in ("e1", "e2")}
    with pytest.raises(PlanError, match=rf"have no {kind} statistics, e\.g\. .*'model\.layers\.0\."):
        engine_plan(recipe, statistics=stores)
    if method == "regmean":  # the recipe may ask for the data-free merge of those tensors
        explicit = dict(recipe, parameters={"fallback": "linear"})
        assert not any(job.statistics for job in engine_plan(explicit, statistics=stores).jobs)
    good = {str(m[e]): fake_store(tmp_path / f"{e}-good", m[e], kind) for e in ("e1", "e2")}
    jobs = engine_plan(recipe, statistics=good).jobs
    assert any(job.statistics for job in jobs)


def test_data_aware_parameters_are_checked_before_any_data_is_read(zoo, tmp_path, monkeypatch, capsys):
    m = zoo("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: regmean\ncalibration: {{data: missing.txt}}\nparameters:\n"
                      f"  alpha: [0.5, .nan]\nmodels:\n  - model: {m['e1']}\n  - model: {m['e2']}\n")
    code, _, err = run_cli(monkeypatch, capsys, "check", recipe)
    assert code != 0 and "Traceback" not in err
    assert "r.yaml:4: parameters.alpha[1]: alpha must be a finite number" in " ".join(err.split()), err


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_calibration_file_is_one_error(tmp_path, suffix):
    from mergesmith.calibrate.data import load_examples
    from mergesmith.errors import CalibrationError
    from mergesmith.recipe import Calibration

    (tmp_path / f"bad{suffix}").write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(CalibrationError, match="utf-8"):
        load_examples(Calibration(data=f"bad{suffix}"), tmp_path)
