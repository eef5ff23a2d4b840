"""Adapters as recipe inputs: `model: BASE+ADAPTER` (mergekit's form) and bare adapter folders are
merged as the full checkpoints PEFT's merge_and_unload gives, streaming; bad adapters are named."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, model_class, read_tensors, run_cli, write_recipe
from test_adapter_io import make_adapter

import mergesmith
from mergesmith.errors import CheckpointError, ModelNotFoundError, PlanError

peft = pytest.importorskip("peft")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """A base, three adapters on it (rank patterns, rsLoRA, DoRA), and the full checkpoints PEFT
    merges them into."""
    root = tmp_path_factory.mktemp("adapter-inputs")
    base = build_model(root / "base", "llama", seed=0)
    kinds = [dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}),
             dict(r=8, lora_alpha=4, use_rslora=True, modules_to_save=["lm_head"]),
             dict(r=4, lora_alpha=4, use_dora=True)]
    adapters, full = [], []
    for i, kind in enumerate(kinds):
        adapters.append(make_adapter(base, root / f"a{i}", "llama", seed=i, target_modules=ALL_LINEAR, **kind))
        model = peft.PeftModel.from_pretrained(model_class("llama").from_pretrained(base), adapters[-1])
        model.merge_and_unload().save_pretrained(root / f"full{i}")
        full.append(root / f"full{i}")
    return base, adapters, full


def merged(tmp_path, name, recipe, **options):
    return read_tensors(mergesmith.merge(write_recipe(tmp_path / f"{name}.yaml", recipe), tmp_path / name, **options))


def assert_same(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("method, params", [("linear", {}), ("ties", {"density": 0.5})])
def test_merge_of_base_plus_adapter_equals_the_merge_of_merged_checkpoints(experts, tmp_path, method, params):
    base, adapters, full = experts
    weights = [0.5, 0.3, 0.2]

    def recipe(models):
        return {"merge_method": method, "dtype": "float32", "parameters": params,
                "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)],
                **({"base_model": str(base)} if method == "ties" else {})}

    want = merged(tmp_path, "full", recipe([str(f) for f in full]))
    assert_same(merged(tmp_path, "plus", recipe([f"{base}+{a}" for a in adapters])), want)
    # a bare adapter folder: its base is the recipe's base_model, else its adapter_config's
    assert_same(merged(tmp_path, "bare", recipe([str(a) for a in adapters])), want)


def test_streaming_in_row_blocks_stays_within_fp32_rounding(experts, tmp_path):
    base, adapters, full = experts
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in adapters[:1]]}
    # no base_model: the adapter's base_model_name_or_path names it
    got = merged(tmp_path, "chunked", recipe, chunk_size=256)
    want = read_tensors(full[0])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           read_tensors(base)["model.layers.0.self_attn.q_proj.weight"])


def test_bf16_output_stays_the_bases_dtype(experts, tmp_path):
    base, adapters, _ = experts
    bf16 = build_model(tmp_path / "bf16", "llama", seed=0, dtype=torch.bfloat16)
    out = merged(tmp_path, "out", {"merge_method": "task_arithmetic", "base_model": str(bf16),
                                   "models": [{"model": str(a), "parameters": {"weight": 1.0}} for a in adapters[:2]]})
    assert {t.dtype for t in out.values()} == {torch.bfloat16}


def test_check_names_adapter_inputs_and_their_base(experts, tmp_path, monkeypatch, capsys):
    base, adapters, _ = experts
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "linear",
        "models": [{"model": f"{base}+{adapters[0]}", "parameters": {"weight": 1.0}},
                   {"model": str(adapters[2]), "parameters": {"weight": 1.0}}]})
    code, out, err = run_cli(monkeypatch, capsys, "check", recipe)
    text = " ".join(out.split())
    assert code == 0, err
    assert f"LoRA adapter {adapters[0]} (rank 2-4, 28 modules)" in text
    assert f"LoRA adapter {adapters[2]} (rank 4, 28 modules, DoRA) on {base} " \
           f"(base_model_name_or_path of its adapter_config.json)" in text


def test_adapter_for_another_base_names_module_and_both_shapes(experts, tmp_path):
    base, _, _ = experts
    wider = build_model(tmp_path / "wider", "llama", seed=0, hidden=48)
    adapter = make_adapter(wider, tmp_path / "a", "llama", r=2, target_modules=["q_proj"])
    with pytest.raises(PlanError) as info:
        mergesmith.plan({"merge_method": "linear", "models": [{"model": f"{base}+{adapter}"}]})
    assert info.value.message == (f"{base}+{adapter}: module 'model.layers.0.self_attn.q_proj.weight' "
                                  f"has shape [48, 48], but 'model.layers.0.self_attn.q_proj.weight' "
                                  f"of the base {base} has [32, 32]")


def test_target_module_absent_from_the_base(experts, tmp_path):
    base, _, _ = experts
    deeper = build_model(tmp_path / "deeper", "llama", seed=0, layers=5)
    adapter = make_adapter(deeper, tmp_path / "a", "llama", r=2, target_modules=["q_proj"])
    with pytest.raises(PlanError, match=r"target module 'model.layers.4.self_attn.q_proj.weight' is "
                                        r"absent from the base"):
        mergesmith.plan({"merge_method": "linear", "base_model": str(base),
                         "models": [{"model": str(adapter)}]})


def test_missing_adapter_and_non_lora_type_through_the_cli(experts, tmp_path, monkeypatch, capsys):
    base, adapters, _ = experts
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        mergesmith.plan({"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path}/nowhere"}]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no adapter_config.json in .*empty"):
        mergesmith.plan({"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path}/empty"}]})
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "base_model_name_or_path": str(base)}))
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [{"model": str(ia3)}]})
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out")
    assert code != 0 and "Traceback" not in err
    assert f"{ia3}: adapter type 'IA3' is not supported" in " ".join(err.split())


def test_adapter_form_needs_both_parts(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: org/base\n  - model: org/base+\n")
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out")
    assert code != 0 and "Traceback" not in err
    assert f"{recipe}:4: models[1].model: 'org/base+': mergekit's model+adapter form needs both" in err


def test_same_bytes_as_mergekit_base_plus_adapter(experts, tmp_path):
    """mergekit 0.1.5 merges each LoRA into its base with PEFT (merge_and_unload), then merges."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from test_parity import compare

    base, adapters, _ = experts
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": f"{base}+{a}", "parameters": {"weight": w}} for a, w in zip(adapters, (0.5, 0.3, 0.2))]})
    text = recipe.read_text()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mergekit"),
              options=MergeOptions(quiet=True, lora_merge_cache=str(tmp_path / "cache")), config_source=text)
    compare(tmp_path / "mergekit", mergesmith.merge(recipe, tmp_path / "ours"))


def test_data_aware_methods_refuse_adapters_by_line(experts, tmp_path):
    base, adapters, _ = experts
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "regmean", "calibration": {"data": "d.jsonl"},
        "models": [{"model": str(base)}, {"model": f"{base}+{adapters[0]}"}]})
    with pytest.raises(PlanError) as info:
        mergesmith.plan(recipe)
    assert info.value.message == (f"{recipe}:6: models[1].model: {base}+{adapters[0]} is a LoRA "
                                  f"adapter, and regmean runs full checkpoints on calibration data")
