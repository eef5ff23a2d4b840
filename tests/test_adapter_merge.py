"""Adapters merged into one adapter folder (engine/adapters.py, `mergesmith merge` with an adapter
method): what it writes PeftModel loads, with the logits of the base plus the merged ΔW; under
mode: peft_compat the folder holds what PEFT's add_weighted_adapter + save_pretrained writes;
bad inputs are refused by name before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, write_recipe
from test_adapter_io import make_adapter as make_any_adapter, merged_by_peft as merged_state
from mergesmith.engine import adapters as engine_adapters
from mergesmith.errors import MergesmithError
from mergesmith.toy import build_model, model_class

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def make_adapter(base: Path, folder: Path, arch: str, *, seed: int, **lora) -> Path:
    lora.setdefault("target_modules", TARGETS[arch])
    return make_any_adapter(base, folder, arch, seed=seed, fan_in_fan_out=arch == "gpt2", **lora)


def logits(model) -> torch.Tensor:
    ids = torch.arange(12).reshape(2, 6) % 90 + 2
    with torch.no_grad():
        return model(input_ids=ids).logits


def recipe_for(tmp_path: Path, folders: list[Path], weights: list[float], **params) -> Path:
    return write_recipe(tmp_path / "adapters.yaml", {
        "merge_method": "lora_combine",
        "models": [{"model": str(f), "parameters": {"weight": w}}
                   for f, w in zip(folders, weights)],
        "parameters": params})


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("gpt2") / "base", "gpt2", seed=0, layers=2)


@pytest.mark.parametrize("arch,kind,targets", [
    ("llama", "svd", None), ("llama", "cat", ["embed_tokens", "q_proj"]), ("gpt2", "svd", None)])
def test_merged_adapter_loads_in_peft_with_the_logits_of_base_plus_the_weighted_deltas(
        zoo, gpt2_base, tmp_path, monkeypatch, capsys, arch, kind, targets):
    """Llama, GPT-2 (Conv1D: fan_in_fan_out) and a LoRA on the embedding (PEFT also saves the
    embedding's own weight, which goes back under base_layer, not into modules_to_save)."""
    base = zoo("llama")["base"] if arch == "llama" else gpt2_base
    lora = {"target_modules": targets} if targets else {}
    folders = [make_adapter(base, tmp_path / "a", arch, seed=1, r=4, lora_alpha=8, **lora),
               make_adapter(base, tmp_path / "b", arch, seed=2, r=2, lora_alpha=3,
                            use_rslora=True, **lora)]
    weights = [0.6, -0.4]
    out = tmp_path / "merged"
    params = {"combination_type": kind} | ({"svd_rank": 6} if kind == "svd" else {})
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe_for(tmp_path, folders, weights,
                                                                    **params), out)
    assert code == 0, err
    assert ("energy kept: mean 1.0000" in err) == (kind == "svd")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 6 and not config["use_rslora"]
    assert config["modules_to_save"] is None
    # expected: W + Σ w_i ΔW_i, each ΔW_i as PEFT merges it
    model = model_class(arch).from_pretrained(base)
    state = model.state_dict()
    for w, folder in zip(weights, folders):
        for name, tensor in merged_state(base, folder, arch).items():
            if name in state and not torch.equal(tensor, state[name]):
                state[name] = state[name] + w * (tensor - model.state_dict()[name])
    expected = model_class(arch).from_pretrained(base)
    expected.load_state_dict(state)
    got = peft.PeftModel.from_pretrained(model_class(arch).from_pretrained(base), out)
    torch.testing.assert_close(logits(got), logits(expected), rtol=1e-4, atol=1e-4)


def test_peft_compat_writes_what_peft_saves_and_gives_its_logits(zoo, tmp_path):
    """Adapter 0 uses rsLoRA: PEFT 0.21.2's merged adapter inherits it (scaling √r, not 1), and
    so does the folder written under peft_compat; its tensors are PEFT's."""
    base = zoo("llama")["base"]
    folders = [make_adapter(base, tmp_path / "a", "llama", seed=1, r=4, lora_alpha=8,
                            use_rslora=True),
               make_adapter(base, tmp_path / "b", "llama", seed=2, r=4, lora_alpha=2)]
    weights = [0.8, 0.5]
    model = peft.PeftModel.from_pretrained(model_class("llama").from_pretrained(base), folders[0],
                                           adapter_name="a")
    model.load_adapter(folders[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type="svd", svd_rank=3)
    model.save_pretrained(tmp_path / "peft", selected_adapters=["m"])
    model.set_adapter("m")
    want = load_file(tmp_path / "peft" / "m" / "adapter_model.safetensors")
    out = tmp_path / "ours"
    engine_adapters.merge_adapters(recipe_for(tmp_path, folders, weights, combination_type="svd",
                                              svd_rank=3, mode="peft_compat"), out)
    got = load_file(out / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:  # an SVD of a sum: its vectors move with the sum's last bits
        torch.testing.assert_close(got[name], want[name], rtol=1e-4,
                                   atol=1e-4 * float(want[name].abs().max()))
    ours = json.loads((out / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "m" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "fan_in_fan_out"):
        assert ours[key] == theirs[key], key
    assert ours["use_rslora"]
    loaded = peft.PeftModel.from_pretrained(model_class("llama").from_pretrained(base), out)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-4, atol=1e-4)


def test_modules_to_save_are_averaged_with_the_weights(zoo, tmp_path):
    base = zoo("llama")["base"]
    folders = [make_adapter(base, tmp_path / n, "llama", seed=s, r=2, lora_alpha=2,
                            modules_to_save=["lm_head"]) for n, s in (("a", 1), ("b", 2))]
    out = engine_adapters.merge_adapters(
        recipe_for(tmp_path, folders, [3.0, 1.0], combination_type="cat"), tmp_path / "m").path
    heads = [load_file(f / "adapter_model.safetensors") for f in folders]
    name = next(n for n in heads[0] if "lm_head" in n)
    got = load_file(out / "adapter_model.safetensors")
    torch.testing.assert_close(got[name], (3 * heads[0][name] + heads[1][name]) / 4)
    loaded = peft.PeftModel.from_pretrained(model_class("llama").from_pretrained(base), out)
    head = loaded.base_model.model.lm_head.modules_to_save["default"].weight
    torch.testing.assert_close(head, got[name])


def refused(monkeypatch, capsys, tmp_path, recipe: Path) -> str:
    out = tmp_path / "never"
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, out)
    assert code == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / ".never.partial").exists()
    return " ".join(err.split())


def test_bad_inputs_are_refused_by_name_before_anything_is_written(zoo, gpt2_base, tmp_path,
                                                                   monkeypatch, capsys):
    base = zoo("llama")["base"]
    four = make_adapter(base, tmp_path / "four", "llama", seed=1, r=4, lora_alpha=4)
    two = make_adapter(base, tmp_path / "two", "llama", seed=2, r=2, lora_alpha=4)
    # factor-space linear (PEFT's) adds factors entry by entry: one rank
    err = refused(monkeypatch, capsys, tmp_path, recipe_for(
        tmp_path, [four, two], [1, 1], combination_type="linear", mode="peft_compat"))
    assert "model.layers.0.self_attn.q_proj.weight" in err and "needs adapters of one rank" in err
    assert f"{four}: r=4" in err and f"{two}: r=2" in err
    # an adapter trained on another base: its shapes differ
    other = build_model(tmp_path / "wide", "llama", seed=0, layers=4, hidden=48)
    wide = make_adapter(other, tmp_path / "wide-lora", "llama", seed=3, r=4, lora_alpha=4)
    err = refused(monkeypatch, capsys, tmp_path, recipe_for(tmp_path, [four, wide], [1, 1]))
    assert "q_proj.weight" in err and "different base models" in err
    # one adapter adapts a module the other does not
    q_only = make_adapter(base, tmp_path / "q", "llama", seed=4, r=4, lora_alpha=4,
                          target_modules=["q_proj"])
    err = refused(monkeypatch, capsys, tmp_path, recipe_for(tmp_path, [four, q_only], [1, 1]))
    assert f"v_proj.weight: adapted by {four} but not by {q_only}" in err
    # the recipe's base lacks a module the adapters adapt
    recipe = json.loads(json.dumps({"merge_method": "lora_combine", "base_model": str(gpt2_base),
                                    "models": [{"model": str(four)}, {"model": str(two)}]}))
    err = refused(monkeypatch, capsys, tmp_path, write_recipe(tmp_path / "b.yaml", recipe))
    assert "q_proj.weight" in err and "does not have" in err
    # DoRA magnitudes have no combination
    dora = make_adapter(base, tmp_path / "dora", "llama", seed=5, r=4, lora_alpha=4, use_dora=True)
    err = refused(monkeypatch, capsys, tmp_path, recipe_for(tmp_path, [four, dora], [1, 1]))
    assert "DoRA" in err
    # a missing adapter file
    (two / "adapter_model.safetensors").unlink()
    err = refused(monkeypatch, capsys, tmp_path, recipe_for(tmp_path, [four, two], [1, 1]))
    assert "no adapter weights" in err


def test_a_failed_merge_leaves_no_folder_in_place(zoo, tmp_path, monkeypatch):
    base = zoo("llama")["base"]
    folders = [make_adapter(base, tmp_path / n, "llama", seed=s, r=2, lora_alpha=2)
               for n, s in (("a", 1), ("b", 2))]
    calls = []

    def fail_later(plan, weight, params, device):
        calls.append(weight)
        if len(calls) == 3:
            raise MergesmithError("stop")
        return original(plan, weight, params, device)

    original = engine_adapters.merge_module
    monkeypatch.setattr(engine_adapters, "merge_module", fail_later)
    with pytest.raises(MergesmithError, match="stop"):
        engine_adapters.merge_adapters(recipe_for(tmp_path, folders, [1, 1]), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_check_plans_an_adapter_merge_and_the_tensor_engine_refuses_one(zoo, tmp_path,
                                                                       monkeypatch, capsys):
    from mergesmith.errors import PlanError
    from mergesmith.pipeline import plan

    base = zoo("llama")["base"]
    folders = [make_adapter(base, tmp_path / n, "llama", seed=s, r=r, lora_alpha=2)
               for n, s, r in (("a", 1, 4), ("b", 2, 2))]
    recipe = recipe_for(tmp_path, folders, [1, 1], combination_type="svd")
    code, out, err = run_cli(monkeypatch, capsys, "check", recipe)
    assert code == 0, err
    text = " ".join(out.split())
    assert f"{folders[0]} (rank 4, 8 modules" in text and "one LoRA adapter: 8 modules" in text
    with pytest.raises(PlanError, match="merges LoRA adapters into an adapter"):
        plan(recipe)
