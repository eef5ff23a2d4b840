"""The demo's adapters variant in its reduced mode: tiny model, two tasks, LoRA experts of a few
steps, one full-weight method over `base+adapter` and one adapter method, on one leaderboard."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import read_tensors

from mergesmith.demo.adapters import prepare_adapter_demo, run_adapter_leaderboard
from mergesmith.demo.leaderboard import method_recipe, skip_reason
from mergesmith.evaluate import load_task
from mergesmith.methods import get_method
from mergesmith.search.scoring import Scorer
from mergesmith.search.sweep import with_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return prepare_adapter_demo(fast=True, seed=0, cache=tmp_path_factory.mktemp("cache"), progress=False)


def test_lora_experts_are_adapters_and_their_merged_models(setup):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    for task, expert in setup.experts.items():
        config = json.loads((expert.adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == setup.lora.rank
        assert config["base_model_name_or_path"] == str(setup.base)
        factors = load_file(expert.adapter / "adapter_model.safetensors")
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in factors.items()), "B was trained"
        # the reference model is exactly PEFT's merge of the adapter into the base
        peft = PeftModel.from_pretrained(AutoModel.from_pretrained(setup.base), expert.adapter)
        merged = read_tensors(expert.merged)
        for name, tensor in peft.merge_and_unload().state_dict().items():
            if name in merged:
                torch.testing.assert_close(merged[name], tensor)


def test_adapter_leaderboard_end_to_end(setup, tmp_path):
    board = run_adapter_leaderboard(tmp_path / "out", fast=True, cache=setup.base.parents[2],
                                    methods=["task_arithmetic", "lora_combine", "rmm"],
                                    say=lambda m: None, n_bootstrap=200, progress=False)
    by_method = {e.method: e for e in board.entries}
    assert set(by_method) == {"task_arithmetic", "lora_combine", "rmm"}, board.skipped
    # the full-weight method merges base+adapter inputs; the adapter method the adapter folders
    adapters = [str(e.adapter) for e in setup.experts.values()]
    assert [m.model for m in by_method["task_arithmetic"].recipe.models] == \
        [f"{setup.base}+{a}" for a in adapters]
    assert [m.model for m in by_method["lora_combine"].recipe.models] == adapters
    assert len(by_method["lora_combine"].points) == 3  # cat, svd, ties chosen on validation
    for entry in board.entries:
        assert board.test.averages[entry.method].normalized is not None
        assert entry.merge_seconds > 0
    for task in setup.tasks:  # references: the experts are the adapters merged into the base
        assert board.test.cell(f"expert: {task}", task).normalized == pytest.approx(1.0)
    assert "lora_combine" in (tmp_path / "out" / "report.md").read_text()


def test_exact_cat_of_the_adapters_scores_as_task_arithmetic_over_base_plus_adapter(setup, tmp_path):
    """lora_combine cat with weights 1 is Σ ΔW_i: scored as base + that adapter, its predictions
    are those of task arithmetic (λ = 1) over `base+adapter` inputs, merged in memory."""
    tasks = [load_task(p) for p in setup.tasks.values()]
    scorer = Scorer(tasks, tmp_path, experts={t: str(e.merged) for t, e in setup.experts.items()},
                    in_memory=True, max_examples=32)
    adapters = [e.adapter for e in setup.experts.values()]
    cat = with_parameters(method_recipe(get_method("lora_combine"), setup.base, adapters),
                          {"combination_type": "cat"})
    ta = method_recipe(get_method("task_arithmetic"), setup.base,
                       [f"{setup.base}+{a}" for a in adapters])
    cat_scores, ta_scores = scorer.score_recipe(cat, "validation"), scorer.score_recipe(ta, "validation")
    for task in cat_scores:
        assert torch.equal(cat_scores[task].predictions, ta_scores[task].predictions)
    # the in-memory merge of base+adapter inputs is the merged folder's, bit for bit
    from mergesmith.search.candidates import CandidateMerger

    in_memory = CandidateMerger(ta).tensors(ta)
    folder = read_tensors(scorer.merge_folder(ta))
    assert set(in_memory) == set(folder)
    for name, tensor in folder.items():
        assert torch.equal(in_memory[name], tensor), name
    base = read_tensors(setup.base)
    assert any(not torch.equal(base[n], t) for n, t in folder.items() if n in base)


def test_rmm_scores_each_task_with_its_rebuilt_model(setup, tmp_path):
    """With as many basis vectors as tasks RMM rebuilds every adapter exactly: each task's
    rebuilt model (base + its adapter, `rmm apply`) predicts as that task's expert does."""
    from mergesmith.demo.leaderboard import _score_per_task

    tasks = [load_task(p) for p in setup.tasks.values()]
    scorer = Scorer(tasks, tmp_path, experts={t: str(e.merged) for t, e in setup.experts.items()},
                    max_examples=32)
    recipe = with_parameters(method_recipe(get_method("rmm"), setup.base,
                                           [e.adapter for e in setup.experts.values()]),
                             {"basis_size": len(tasks)})
    rebuilt = _score_per_task(recipe, scorer, tasks, setup.base, "validation")
    merged = scorer.adapter_folder(recipe)
    base = read_tensors(setup.base)
    for task, expert in zip(tasks, setup.experts.values()):
        own = scorer.score_folder(expert.merged, "validation")[task.name]
        torch.testing.assert_close(rebuilt[task.name].predictions, own.predictions)
        # the model scored is the expert's weights (the adapters were trained: not the base's)
        weights = read_tensors(merged.parent / f"{merged.name}-{task.name}")
        expected = read_tensors(expert.merged)
        changed = [n for n, t in expected.items() if not torch.equal(t, base[n])]
        assert changed
        for name in changed:
            torch.testing.assert_close(weights[name], expected[name], rtol=1e-5, atol=1e-6)


def test_adapter_methods_apply_only_to_the_adapters_variant():
    spec = get_method("lora_combine")
    assert "adapter" in skip_reason(spec, 4)
    assert skip_reason(spec, 4, adapters=True) is None
    assert skip_reason(get_method("ties"), 4, adapters=True) is None


def test_cli_demo_adapters_fast(setup, tmp_path):
    # the module's cache: the experts trained and (after the end-to-end test) the merges scored
    done = subprocess.run([sys.executable, "-m", "mergesmith.cli", "demo", "--adapters", "--fast",
                           "--method", "lora_combine", "--out", str(tmp_path / "out"),
                           "--cache", str(setup.base.parents[2])],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lora_combine" in done.stdout and "avg normalized" in done.stdout
