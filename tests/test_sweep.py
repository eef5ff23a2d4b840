"""search/: grid sweeps (known best point, caching, in-memory merges) and model soups."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import build_model, run_cli, write_recipe
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

from mergesmith.errors import MergesmithError
from mergesmith.evaluate import evaluate_model, load_task
from mergesmith.evaluate.run import mean_pool, quiet_transformers
from mergesmith.search import greedy_selection, parse_grid, soup, sweep, with_parameters
from mergesmith.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base BERT, its fine-tune e1, and a task whose labels are e1's own predictions (so e1 is
    its expert, scoring 1.0), balanced between the two labels by the head's bias."""
    root = tmp_path_factory.mktemp("sweep")
    base = build_model(root / "base", "bert", seed=0)
    e1 = build_model(root / "e1", "bert", seed=1, base=base, delta=0.3)
    rnd = random.Random(0)
    texts = [" ".join(f"w{rnd.randrange(90)}" for _ in range(rnd.randint(3, 8))) for _ in range(80)]
    task_dir = root / "task"
    task_dir.mkdir()
    with quiet_transformers():
        encoder, tokenizer = AutoModel.from_pretrained(e1).eval(), AutoTokenizer.from_pretrained(e1)
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        features = mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"])
    weight = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    margin = features @ (weight[1] - weight[0])
    bias = torch.tensor([0.0, -float(margin.median())])
    save_file({"weight": weight, "bias": bias}, task_dir / "head.safetensors")
    labels = ["a" if m - margin.median() <= 0 else "b" for m in margin]
    for split, part in (("validation", slice(0, 40)), ("test", slice(40, 80))):
        rows = [{"text": t, "label": y} for t, y in zip(texts[part], labels[part])]
        (task_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / "task.yaml").write_text(
        "name: t\nkind: classification\ndata: {validation: validation.jsonl, test: test.jsonl}\n"
        "labels: [a, b]\nhead: head.safetensors\n")
    recipe = write_recipe(root / "recipe.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(e1), "parameters": {"weight": 1.0}}], "parameters": {"lambda": 1.0}})
    return {"root": root, "base": base, "e1": e1, "task": task_dir / "task.yaml", "recipe": recipe}


def test_merge_tensors_gives_the_tensors_merge_writes(tmp_path, zoo):
    import mergesmith
    from conftest import read_tensors
    from transformers import AutoModelForCausalLM

    from mergesmith.engine.memory import load_merged, merge_tensors

    models = zoo("llama")
    for recipe in (
        {"merge_method": "task_arithmetic", "base_model": str(models["base"]), "parameters": {"lambda": 0.7},
         "models": [{"model": str(models[m]), "parameters": {"weight": 0.5}} for m in ("e1", "e2")]},
        {"merge_method": "slerp", "base_model": str(models["base"]), "parameters": {"t": 0.3},
         "models": [{"model": str(models["e1"])}]},
    ):
        written = read_tensors(mergesmith.merge(recipe, tmp_path / recipe["merge_method"]))
        in_memory = merge_tensors(recipe)
        assert in_memory.keys() == written.keys()
        assert all(torch.equal(in_memory[k], written[k]) for k in written)
    module = load_merged(AutoModelForCausalLM.from_pretrained(models["base"]), in_memory)
    assert torch.equal(module.model.embed_tokens.weight, in_memory["model.embed_tokens.weight"])
    with pytest.raises(MergesmithError, match="has no tensor"):
        load_merged(AutoModelForCausalLM.from_pretrained(models["base"]),
                    {**in_memory, "extra.weight": torch.ones(1)})
    with pytest.raises(MergesmithError, match="the merge has no tensor for"):
        load_merged(AutoModelForCausalLM.from_pretrained(models["base"]),
                    {k: v for k, v in in_memory.items() if "layers.0.mlp" not in k})


def test_parse_grid():
    assert parse_grid("lambda=0.3:1.5:0.2") == ("lambda", [0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5])
    assert parse_grid("density=0.2,0.5,0.8") == ("density", [0.2, 0.5, 0.8])
    assert parse_grid("k=1,2") == ("k", [1, 2])
    assert parse_grid("normalize=true,false") == ("normalize", [True, False])
    for bad in ("lambda", "lambda=", "lambda=a,b", "lambda=1:0:0.5", "lambda=0:1", "lambda=0:1:0"):
        with pytest.raises(MergesmithError, match="--grid"):
            parse_grid(bad)


def test_with_parameters_overrides_the_global_entry(world):
    recipe = with_parameters(load_recipe(world["recipe"]), {"lambda": 0.5})
    assert recipe.parameters["lambda"] == 0.5
    assert recipe.models[0].parameters["weight"] == 1.0


def test_sweep_picks_the_known_best_point_reports_test_and_caches(world, monkeypatch):
    out = world["root"] / "out"
    grid = {"lambda": [0.0, 0.5, 2.0, 1.0, 1.5]}
    experts = {"t": str(world["e1"])}
    result = sweep(world["recipe"], grid, [world["task"]], out, experts=experts, base=str(world["base"]))
    # θ = θ0 + λ(θ1 − θ0): λ = 1 is the expert itself, the only point that agrees with every label
    assert result.best.values == {"lambda": 1.0}
    assert result.best.score == pytest.approx(1.0)
    assert all(p.score < 1.0 for p in result.points if p is not result.best)
    assert result.merged == 5
    test = result.test.cell("lambda=1", "t")
    assert test.score == pytest.approx(evaluate_model(world["e1"], load_task(world["task"]), "test").score)
    assert test.normalized == pytest.approx(1.0)
    assert result.test.cell(str(world["base"]), "t").forgetting == 0.0
    for name in ("sweep.json", "sweep.md", "sweep.png"):
        assert (out / name).is_file()
    data = json.loads((out / "sweep.json").read_text())
    assert data["best"]["values"] == {"lambda": 1.0} and len(data["points"]) == 5
    assert data["best"]["folder"] == str(out / "merges" / result.best.key)
    assert "| **1** |" in (out / "sweep.md").read_text()

    # a rerun merges nothing: every point's folder and scores are found by its recipe fingerprint
    def no_merge(*args, **kwargs):
        raise AssertionError("merged again")

    monkeypatch.setattr("mergesmith.engine.api.merge", no_merge)
    again = sweep(world["recipe"], grid, [world["task"]], out, experts=experts, base=str(world["base"]))
    assert again.merged == 0
    assert [p.score for p in again.points] == [p.score for p in result.points]


def test_in_memory_sweep_scores_as_the_folder_sweep(world):
    grid = {"lambda": [0.5, 1.0]}
    experts = {"t": str(world["e1"])}
    on_disk = sweep(world["recipe"], grid, [world["task"]], world["root"] / "disk", experts=experts)
    in_memory = sweep(world["recipe"], grid, [world["task"]], world["root"] / "memory", experts=experts,
                      in_memory=True)
    assert [p.score for p in in_memory.points] == [p.score for p in on_disk.points]
    assert not (world["root"] / "memory" / "merges").exists()
    # two points on validation, and the best again (in memory) for its test score
    assert in_memory.merged == 3
    assert load_recipe(world["root"] / "memory" / "best.yaml").parameters["lambda"] == 1.0


def test_sweep_refuses_unknown_parameters_and_missing_experts(world, tmp_path):
    with pytest.raises(MergesmithError, match="method 'task_arithmetic' has no parameter 'density'"):
        sweep(world["recipe"], {"density": [0.5]}, [world["task"]], tmp_path)
    with pytest.raises(MergesmithError, match="--grid lambda: value 'x'"):
        sweep(world["recipe"], {"lambda": ["x"]}, [world["task"]], tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("task.yaml", "head.safetensors", "validation.jsonl", "test.jsonl"):
        (other / name).write_bytes((world["task"].parent / name).read_bytes())
    (other / "task.yaml").write_text((other / "task.yaml").read_text().replace("name: t", "name: u"))
    with pytest.raises(MergesmithError, match="tasks u have no expert"):
        sweep(world["recipe"], {"lambda": [1.0]}, [world["task"], other / "task.yaml"], tmp_path,
              experts={"t": str(world["e1"])})
    assert not (tmp_path / "merges").exists()


def test_greedy_selection_follows_the_paper():
    # Wortsman et al. 2022, Recipe 1: ranked best first; add an ingredient iff the soup's held-out
    # value does not drop (>=)
    values = {("a",): 0.9, ("a", "b"): 0.85, ("a", "c"): 0.9, ("a", "c", "d"): 0.95}
    kept, best = greedy_selection(["a", "b", "c", "d"], lambda soup: values[tuple(soup)])
    assert kept == ["a", "c", "d"] and best == 0.95


def test_greedy_soup_skips_the_ingredient_that_hurts(world):
    root = world["root"]
    twin = build_model(root / "twin", "bert", seed=5, base=world["e1"], delta=0.002)
    bad = build_model(root / "bad", "bert", seed=6, base=world["base"], delta=0.3)
    models = [str(bad), str(twin), str(world["e1"])]
    lines = []
    result = soup(models, [world["task"]], root / "soup", progress=lines.append)
    # ranked by their own validation accuracy; the twin's soup with e1 keeps every label, bad's does not
    assert [m for m, _ in result.ingredients][2] == str(bad)
    assert result.kept == [str(world["e1"]), str(twin)] or result.kept == [str(twin), str(world["e1"])]
    assert result.score == pytest.approx(1.0)
    assert any(line.startswith(f"skip {bad}") for line in lines)
    assert result.test.cell("soup", "t").score > result.test.cell(str(bad), "t").score
    assert load_recipe(root / "soup" / "soup.yaml").merge_method == "linear"
    assert (result.folder / "config.json").is_file()
    uniform = soup(models, [world["task"]], root / "soup", greedy=False)
    assert uniform.kept == [m for m, _ in uniform.ingredients] and uniform.score < result.score


def test_cli_sweep_and_soup(world, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "sweep", world["recipe"], "--grid", "lambda=0.5:1:0.5",
                             "--grid", "normalize=true,false", "--tasks", world["task"],
                             "--expert", f"t={world['e1']}", "--out", tmp_path / "s", "--in-memory")
    assert code == 0, err
    assert "best: lambda=" in out and (tmp_path / "s" / "sweep.png").is_file()
    code, out, err = run_cli(monkeypatch, capsys, "sweep", world["recipe"], "--grid", "lambda=oops",
                             "--tasks", world["task"], "--out", tmp_path / "s")
    assert code == 1 and err.splitlines()[0] == "error: --grid 'lambda=oops': 'oops' is not a number"
    code, out, err = run_cli(monkeypatch, capsys, "soup", world["e1"], world["base"],
                             "--tasks", world["task"], "--out", tmp_path / "soup", "--uniform")
    assert code == 0, err
    assert "soup of 2" in out and (tmp_path / "soup" / "soup.md").is_file()
