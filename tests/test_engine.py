"""The engine end to end on tiny real models: load-back, each method's definition, streaming."""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ARCHS, build_model, model_class, read_tensors, write_recipe

import mergesmith
from mergesmith.methods.passthrough import parse_layers


def merge(tmp_path, recipe: dict, name="out", **options):
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    return mergesmith.merge(path, tmp_path / name, **options)


def experts(models, weights, key="weight"):
    return [{"model": str(models[m]), "parameters": {key: w}} for m, w in weights]


@pytest.mark.parametrize("arch", ARCHS)
def test_output_loads_and_runs_in_transformers(tmp_path, zoo, arch):
    models = zoo(arch)
    out = merge(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": str(models["base"]),
        "models": experts(models, [("e1", 0.6), ("e2", 0.4)]), "dtype": "bfloat16",
    })
    model = model_class(arch).from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    logits = model(torch.tensor([[3, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()
    base_config = json.loads((models["base"] / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in base_config.items() if k not in ("dtype", "torch_dtype")}
    assert (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and mergesmith.__version__ in card and "weight: 0.6" in card
    # tied embeddings stay tied: no lm_head written when the base has none
    assert set(read_tensors(out)) == set(read_tensors(models["base"]))


def test_linear_is_the_weighted_average(tmp_path, zoo):
    models = zoo("llama")
    ins = [read_tensors(models[m]) for m in ("base", "e1", "e2")]
    w = [0.5, 0.3, 0.2]
    for normalize in (True, False):
        out = read_tensors(merge(tmp_path, {
            "merge_method": "linear", "parameters": {"normalize": normalize},
            "models": experts(models, [("base", 2.5), ("e1", 1.5), ("e2", 1.0)]),
        }, name=f"n{normalize}"))
        scale = 1.0 if normalize else 5.0
        for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"):
            expected = sum(wi * scale * t[name].double() for wi, t in zip(w, ins))
            torch.testing.assert_close(out[name].double(), expected, rtol=1e-6, atol=1e-7)


def test_task_arithmetic_adds_scaled_task_vectors_and_negates(tmp_path, zoo):
    models = zoo("llama")
    base, e1, e2 = (read_tensors(models[m]) for m in ("base", "e1", "e2"))
    out = read_tensors(merge(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": str(models["base"]),
        "parameters": {"lambda": 0.8},
        "models": experts(models, [("e1", 1.0), ("e2", -0.5)]),
    }))
    for name in base:
        expected = base[name] + 0.8 * ((e1[name] - base[name]) - 0.5 * (e2[name] - base[name]))
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The textbook formula in float64 on the flattened tensors."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64 / a64.norm(), b64 / b64.norm()).clamp(-1, 1)
    if abs(cos) > 0.9995:
        return ((1 - t) * a64 + t * b64).view(a.shape)
    omega = torch.arccos(cos)
    mixed = (torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / torch.sin(omega)
    return mixed.view(a.shape)


def test_slerp_follows_the_formula_with_a_gradient_over_layers(tmp_path, zoo):
    models = zoo("llama")
    base, e1 = read_tensors(models["base"]), read_tensors(models["e1"])
    out = read_tensors(merge(tmp_path, {
        "merge_method": "slerp", "base_model": str(models["base"]),
        "models": [{"model": str(models["base"])}, {"model": str(models["e1"])}],
        "parameters": {"t": [0.0, 1.0]},
    }))
    for layer in range(4):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        expected = slerp_reference(base[name], e1[name], layer / 3)
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-7)
    # outside the layers, t is taken at 0 (as mergekit): the base
    torch.testing.assert_close(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_slerp_of_unrelated_tensors_is_not_linear(tmp_path, zoo):
    """Two independent random tensors are nearly orthogonal: SLERP must differ from lerp there."""
    models = zoo("llama")
    other = build_model(tmp_path / "other", "llama", seed=42)
    base, far = read_tensors(models["base"]), read_tensors(other)
    out = read_tensors(merge(tmp_path, {
        "merge_method": "slerp", "base_model": str(models["base"]),
        "models": [{"model": str(models["base"])}, {"model": str(other)}], "parameters": {"t": 0.5},
    }))
    name = "model.layers.0.self_attn.k_proj.weight"
    expected = slerp_reference(base[name], far[name], 0.5)
    torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(out[name], 0.5 * (base[name] + far[name]), atol=1e-4)


def test_multislerp_and_karcher(tmp_path, zoo):
    models = zoo("llama")
    e1, e2 = read_tensors(models["e1"]), read_tensors(models["e2"])
    name = "model.layers.2.mlp.gate_proj.weight"
    a, b = e1[name].double().flatten(), e2[name].double().flatten()
    # Karcher mean of two points = the SLERP midpoint (equal weights), rescaled by the mean norm
    out = read_tensors(merge(tmp_path, {
        "merge_method": "karcher", "models": experts(models, [("e1", 1.0), ("e2", 1.0)]),
        "parameters": {"max_iter": 50, "tol": 1e-9},
    }, name="karcher"))
    ua, ub = a / a.norm(), b / b.norm()
    omega = torch.arccos(torch.dot(ua, ub))
    mid = (torch.sin(omega / 2) * (ua + ub)) / torch.sin(omega)
    expected = mid * (a.norm() + b.norm()) / 2
    torch.testing.assert_close(out[name].double().flatten(), expected, rtol=1e-4, atol=1e-6)
    # weights are honoured: all weight on e2 gives e2
    out = read_tensors(merge(tmp_path, {
        "merge_method": "karcher", "models": experts(models, [("e1", 0.0), ("e2", 1.0)]),
    }, name="karcher-weighted"))
    torch.testing.assert_close(out[name], e2[name], rtol=1e-5, atol=1e-6)
    # multislerp of two unit-norm-free points around no base: same geodesic midpoint, mean norm
    out = read_tensors(merge(tmp_path, {
        "merge_method": "multislerp", "models": experts(models, [("e1", 0.5), ("e2", 0.5)]),
    }, name="multislerp"))
    torch.testing.assert_close(out[name].double().flatten(), expected, rtol=1e-4, atol=1e-6)


def test_passthrough_slices_stack_layers_and_renumber(tmp_path, zoo):
    models = zoo("llama")
    e1, e2 = read_tensors(models["e1"]), read_tensors(models["e2"])
    out_dir = merge(tmp_path, {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(models["e1"]), "layer_range": [0, 3]}]},
                   {"sources": [{"model": str(models["e2"]), "layer_range": [1, 4]}]}],
    })
    out = read_tensors(out_dir)
    source = [(e1, 0), (e1, 1), (e1, 2), (e2, 1), (e2, 2), (e2, 3)]
    for layer, (model, src) in enumerate(source):
        for part in ("self_attn.o_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{layer}.{part}"], model[f"model.layers.{src}.{part}"])
    assert torch.equal(out["model.embed_tokens.weight"], e1["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], e2["lm_head.weight"])
    config = json.loads((out_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and len(config.get("layer_types", [0] * 6)) == 6
    model = model_class("llama").from_pretrained(out_dir)
    assert model(torch.tensor([[1, 2]])).logits.shape == (1, 2, 96)


def test_layer_swap_takes_each_layer_from_its_model(tmp_path, zoo):
    models = zoo("llama")
    base, e1, e2 = (read_tensors(models[m]) for m in ("base", "e1", "e2"))
    out = read_tensors(merge(tmp_path, {
        "merge_method": "layer_swap", "base_model": str(models["base"]),
        "models": experts(models, [("e1", "0-1"), ("e2", "3")], key="layers"),
    }))
    owners = {0: e1, 1: e1, 2: base, 3: e2}
    for layer, owner in owners.items():
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        assert torch.equal(out[name], owner[name])
    assert torch.equal(out["model.norm.weight"], base["model.norm.weight"])
    assert parse_layers("0-2, 5") == {0, 1, 2, 5}


def test_row_chunks_and_shards_do_not_change_a_bit(tmp_path, zoo):
    models = zoo("llama")
    for method in ("task_arithmetic", "slerp"):
        recipe = {"merge_method": method, "base_model": str(models["base"]),
                  "models": [{"model": str(models["e1"]), "parameters": {"weight": 0.7}}],
                  "parameters": {"t": 0.3} if method == "slerp" else {}}
        if method == "slerp":
            recipe["models"] = [{"model": str(models["base"])}, {"model": str(models["e1"])}]
        whole = read_tensors(merge(tmp_path, recipe, name=f"{method}-whole"))
        chunked_dir = merge(tmp_path, recipe, name=f"{method}-chunked", chunk_size=1024,
                            shard_size="30KB")
        index = json.loads((chunked_dir / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 3
        chunked = read_tensors(chunked_dir)
        assert chunked.keys() == whole.keys()
        for name in whole:
            assert torch.equal(chunked[name], whole[name]), (method, name)


def test_pickled_checkpoints_load_safely(tmp_path, zoo):
    models = zoo("llama")
    import shutil

    shutil.copytree(models["e1"], tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(read_tensors(models["e1"]), tmp_path / "bin" / "pytorch_model.bin")
    out = read_tensors(merge(tmp_path, {
        "merge_method": "linear", "models": experts({"a": tmp_path / "bin", "b": models["e1"]},
                                                    [("a", 1.0), ("b", 1.0)]),
    }))
    e1 = read_tensors(models["e1"])
    assert all(torch.allclose(out[n], e1[n]) for n in e1)


def test_bin_with_code_is_refused(tmp_path, zoo):
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(zoo("llama")["e1"], folder)
    (folder / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(mergesmith.MergesmithError, match="cannot be loaded safely"):
        mergesmith.plan({"merge_method": "linear",
                         "models": [{"model": str(folder), "parameters": {"weight": 1.0}}]})


def test_same_seed_same_bytes(tmp_path, zoo):
    models = zoo("gpt2")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
              "models": experts(models, [("e1", 0.5), ("e2", 0.5)]), "seed": 7}
    first = merge(tmp_path, recipe, name="a")
    second = merge(tmp_path, recipe, name="b", chunk_size=4096)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_plan_reports_size_and_memory_bound(zoo):
    models = zoo("llama")
    plan = mergesmith.plan({"merge_method": "linear",
                            "models": experts(models, [("e1", 1.0), ("e2", 1.0)])})
    e1 = read_tensors(models["e1"])
    assert plan.total_bytes == sum(t.numel() * t.element_size() for t in e1.values())
    assert len(plan.jobs) == len(e1)
    biggest = max(t.numel() for t in e1.values())
    assert plan.peak_memory(1 << 30) >= 2 * 4 * biggest
    assert plan.peak_memory(1024) < plan.peak_memory(1 << 30)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path, zoo):
    models = zoo("llama")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
              "models": experts(models, [("e1", 0.5), ("e2", 0.5)])}
    cpu = read_tensors(merge(tmp_path, recipe, name="cpu"))
    gpu = read_tensors(merge(tmp_path, recipe, name="gpu", device="cuda"))
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-6, atol=1e-7)
    assert math.isfinite(sum(float(t.sum()) for t in gpu.values()))


def test_yaml_scientific_notation_is_a_number(tmp_path, zoo):
    """PyYAML reads `5e-1` as a string; mergekit takes it as a number, and so must we."""
    models = zoo("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['e1']}
    parameters: {{weight: 1}}
parameters:
  lambda: 5e-1
""")
    out = read_tensors(mergesmith.merge(recipe, tmp_path / "out"))
    base, e1 = read_tensors(models["base"]), read_tensors(models["e1"])
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(out[name], base[name] + 0.5 * (e1[name] - base[name]))


# --------------------------------------------------------------------------------------------
# the allocator: freed buffers are kept for the next tensor

MALLINFO = """
import ctypes, sys
from mergesmith.engine.allocator import keep_freed_memory, return_freed_memory
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
"""
MALLINFO_PROBE = MALLINFO + """
kept = keep_freed_memory()
before = libc.mallinfo2()
buffer = bytearray(64 << 20)  # above glibc's largest adaptive threshold (32 MiB)
during = libc.mallinfo2()
del buffer
after = libc.mallinfo2()
print(kept, during.hblkhd - before.hblkhd >= 64 << 20, after.arena - before.arena >= 64 << 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("setting, expected", [(None, "True False True"),
                                               ("0", "False True False")])
def test_keep_freed_memory_serves_large_buffers_from_a_heap_it_keeps(setting, expected):
    """With it, a 64 MiB buffer comes from the heap (not its own mapping) and the heap keeps
    it after the free; MERGESMITH_KEEP_FREED_MEMORY=0 leaves glibc's defaults (mapped, unmapped
    on free). Run in a fresh process: the setting is process-wide."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    env = {k: v for k, v in os.environ.items() if k != "MERGESMITH_KEEP_FREED_MEMORY"}
    if setting is not None:
        env["MERGESMITH_KEEP_FREED_MEMORY"] = setting
    run = subprocess.run([sys.executable, "-c", MALLINFO_PROBE], env=env, capture_output=True,
                         text=True, check=True)
    assert run.stdout.split() == expected.split()


RETURN_PROBE = MALLINFO + """
keep_freed_memory()
return_freed_memory()
before = libc.mallinfo2()
buffer = bytearray(8 << 20)  # kept on the heap under keep_freed_memory; its own mapping now
print(libc.mallinfo2().hblkhd - before.hblkhd >= 8 << 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_return_freed_memory_undoes_keep_freed_memory():
    """`mergesmith extract-lora` undoes keep_freed_memory (its varied buffers fragmented the
    kept heap: the 1B peak varied from 350 to 570 MB): a large buffer gets its own mapping again."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    env = {k: v for k, v in os.environ.items() if k != "MERGESMITH_KEEP_FREED_MEMORY"}
    run = subprocess.run([sys.executable, "-c", RETURN_PROBE], env=env, capture_output=True,
                         text=True, check=True)
    assert run.stdout.split() == ["True"]
