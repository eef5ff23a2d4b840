"""The search space: unit coordinates, the parameter space's recipes, the search: section's
errors and round trip (the data-flow space and genomes: test_search_dataflow.py). Expected values
are computed by hand from the definitions (README "Search")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import read_tensors, run_cli, write_recipe
from mergesmith import merge
from mergesmith.errors import RecipeError
from mergesmith.recipe import load_recipe
from mergesmith.search.parameter_space import layer_groups
from mergesmith.search.space import Dimension, SearchSettings, load_search


def search_recipe(zoo, **search) -> dict:
    models = zoo("llama")
    return {"merge_method": "ties", "base_model": str(models["base"]),
            "models": [{"model": str(models["e1"]), "parameters": {"weight": 0.7}},
                       {"model": str(models["e2"])}],
            "parameters": {"density": 0.5, "weight": 1.0}, "dtype": "float32",
            "search": {"fitness": {"tasks": ["sentiment"]}, **search}}


def merged(recipe, out) -> dict[str, torch.Tensor]:
    merge(recipe, out)
    return read_tensors(out)


# -- dimensions --------------------------------------------------------------------------------

def test_dimension_maps_unit_coordinates_by_hand():
    lin = Dimension("w", -1.0, 3.0)
    assert [lin.value(u) for u in (0, 0.25, 1)] == [-1.0, 0.0, 3.0]
    assert lin.value(-5) == -1.0 and lin.value(7) == 3.0  # clipped into the cube
    log = Dimension("lr", 0.01, 100.0, scale="log")
    assert log.value(0.5) == pytest.approx(1.0) and log.value(0.75) == pytest.approx(10.0)
    assert log.unit(10.0) == pytest.approx(0.75)
    ints = Dimension("k", 1, 4, kind="int")  # four equal shares of [0, 1]
    assert [ints.value(u) for u in (0, 0.24, 0.26, 0.74, 0.76, 1)] == [1, 1, 2, 3, 4, 4]
    assert ints.unit(3) == pytest.approx(0.625)
    pick = Dimension("m", 0, 2, kind="choice", choices=("ties", "dare_ties", "linear"))
    assert [pick.value(u) for u in (0.1, 0.5, 0.99)] == ["ties", "dare_ties", "linear"]
    assert pick.unit("linear") == pytest.approx(5 / 6)
    assert lin.unit(10.0) == 1.0 and lin.unit(-10.0) == 0.0


def test_layer_groups_split_contiguously():
    assert layer_groups(4, 2) == [(0, 2), (2, 4)]
    assert layer_groups(5, 2) == [(0, 3), (3, 5)]
    assert layer_groups(3, 3) == [(0, 1), (1, 2), (2, 3)]


# -- the parameter space -----------------------------------------------------------------------

def test_space_names_start_and_recipe(zoo):
    problem = load_search(search_recipe(zoo, parameters={
        "weight": {"low": 0.0, "high": 1.5, "per_model": True},
        "density": {"low": 0.1, "high": 1.0},
        "lambda": {"low": 0.1, "high": 10.0, "scale": "log"}}))
    space = problem.space
    e1, e2 = problem.recipe.models[0].model, problem.recipe.models[1].model
    # parameters in name order, whatever order they are written in
    assert space.names == ["density", "lambda", f"weight[{e1}]", f"weight[{e2}]"]
    # the recipe's own values: e1's 0.7, e2 falls back to the global 1.0, lambda to its default 1
    assert space.start() == pytest.approx([0.4 / 0.9, 0.5, 0.7 / 1.5, 1.0 / 1.5])
    recipe = space.recipe([0.5, 0.0, 1.0, 0.0])
    assert recipe.models[0].parameters["weight"] == 1.5
    assert recipe.models[1].parameters["weight"] == 0.0
    assert recipe.parameters["density"] == pytest.approx(0.55)
    assert recipe.parameters["lambda"] == pytest.approx(0.1)
    assert "search" not in recipe.model_dump()
    assert problem.settings == SearchSettings(fitness={"tasks": ["sentiment"]})


def test_start_is_clipped_into_the_bounds(zoo):
    data = search_recipe(zoo, parameters={"weight": {"low": 0.0, "high": 0.5, "per_model": True},
                                          "density": {"low": 0.6, "high": 0.9}})
    assert load_search(data).space.start() == pytest.approx([0.0, 1.0, 1.0])


def test_the_recipe_of_a_point_merges_as_the_hand_written_recipe(zoo, tmp_path):
    data = search_recipe(zoo, parameters={"weight": {"low": 0.0, "high": 2.0, "per_model": True},
                                          "density": {"low": 0.0, "high": 1.0}})
    space = load_search(data).space
    hand = {k: v for k, v in data.items() if k != "search"}
    hand["models"] = [{"model": hand["models"][0]["model"], "parameters": {"weight": 0.5}},
                      {"model": hand["models"][1]["model"], "parameters": {"weight": 1.5}}]
    hand["parameters"] = {"density": 0.75, "weight": 1.0}
    got = merged(space.recipe([0.75, 0.25, 0.75]), tmp_path / "a")
    want = merged(hand, tmp_path / "b")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_layer_groups_give_each_group_its_value(zoo, tmp_path):
    """Two groups over the toy's 4 layers: layers 0-1 merge with the first group's weights,
    layers 2-3 with the second's, exactly as recipes with those scalar weights."""
    data = search_recipe(zoo, parameters={"weight": {"low": 0.0, "high": 1.0, "per_model": True,
                                                     "layer_groups": 2}})
    space = load_search(data).space
    e1 = data["models"][0]["model"]
    assert space.names[:2] == [f"weight[{e1}]@layers.0-1", f"weight[{e1}]@layers.2-3"]
    recipe = space.recipe([0.2, 0.9, 0.6, 0.1])
    assert recipe.models[0].parameters["weight"] == [0.2, 0.2, 0.9, 0.9]
    assert recipe.models[1].parameters["weight"] == [0.6, 0.6, 0.1, 0.1]
    got = merged(recipe, tmp_path / "groups")
    for name, weights in (("first", (0.2, 0.6)), ("second", (0.9, 0.1))):
        flat = {k: v for k, v in data.items() if k != "search"}
        flat["models"] = [{"model": m["model"], "parameters": {"weight": w}}
                          for m, w in zip(data["models"], weights)]
        want = merged(flat, tmp_path / name)
        layers = (0, 1) if name == "first" else (2, 3)
        keys = [k for k in want if any(f"layers.{i}." in k for i in layers)]
        assert keys and all(torch.equal(got[k], want[k]) for k in keys)
        if name == "first":  # tensors outside the layers take the first group's value (t = 0)
            outside = [k for k in want if ".layers." not in k]
            assert outside and all(torch.equal(got[k], want[k]) for k in outside)
    # the start reads a gradient the recipe already has, one value per group
    again = dict(data, models=[dict(m) for m in recipe.model_dump(exclude_none=True)["models"]])
    assert load_search(again).space.start() == pytest.approx([0.2, 0.9, 0.6, 0.1])


def test_smooth_groups_and_filters_write_gradients_and_conditionals(zoo):
    data = search_recipe(zoo, parameters={"density": {"low": 0.0, "high": 1.0, "layer_groups": 3,
                                                      "smooth": True, "filters": ["mlp"]}})
    space = load_search(data).space
    assert space.names == ["density{mlp}@t=0", "density{mlp}@t=0.5", "density{mlp}@t=1",
                           "density{*}@t=0", "density{*}@t=0.5", "density{*}@t=1"]
    recipe = space.recipe([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert recipe.parameters["density"] == [{"filter": "mlp", "value": [0.1, 0.2, 0.3]},
                                            {"value": [0.4, 0.5, 0.6]}]
    assert space.start() == pytest.approx([0.5] * 6)  # the recipe's density 0.5 everywhere


def test_method_choice_drops_what_a_method_does_not_take(zoo, tmp_path):
    data = search_recipe(zoo, method=["ties", "task_arithmetic"],
                         parameters={"density": {"low": 0.2, "high": 1.0},
                                     "lambda": {"low": 0.5, "high": 1.5}})
    space = load_search(data).space
    assert space.names == ["merge_method", "density", "lambda"]
    assert space.start()[0] == pytest.approx(0.25)  # ties, the recipe's method, first of two
    ta = space.recipe([0.9, 0.5, 0.5])
    assert ta.merge_method == "task_arithmetic"
    assert ta.parameters == {"weight": 1.0, "lambda": 1.0}  # density dropped
    ties = space.recipe([0.1, 0.5, 0.5])
    assert ties.merge_method == "ties" and ties.parameters["density"] == pytest.approx(0.6)
    merged(ta, tmp_path / "ta")  # a plain recipe the engine takes as it is


def test_integer_and_choice_parameters(zoo):
    models = zoo("llama")
    data = {"merge_method": "breadcrumbs_ties", "base_model": str(models["base"]),
            "models": [{"model": str(models["e1"]), "parameters": {"weight": 1.0}}],
            "search": {"parameters": {"normalize": {"choices": [True, False]},
                                      "gamma": {"low": 0.0, "high": 0.2}}}}
    space = load_search(data).space
    assert space.dimensions[1].kind == "choice"
    assert space.names == ["gamma", "normalize"]
    assert space.recipe([0.5, 0.9]).parameters == {"normalize": False, "gamma": pytest.approx(0.1)}


# -- round trip --------------------------------------------------------------------------------

def test_to_dict_round_trips(zoo, tmp_path):
    data = search_recipe(zoo, method=["ties", "dare_ties"], optimizer="not-a-real-optimizer",
                         evaluations=50, seconds=60.0, population=8, seed=3,
                         fidelity={"min": 0.25}, options={"sigma0": 0.2},
                         parameters={"weight": {"low": 0.0, "high": 1.5, "per_model": True,
                                                "layer_groups": 2},
                                     "density": {"low": 0.1, "high": 1.0, "int": False}})
    path = write_recipe(tmp_path / "search.yaml", data)
    problem = load_search(path)
    assert problem.source == path
    assert problem.settings.optimizer == "not-a-real-optimizer"  # the optimizers judge the name
    as_dict = problem.to_dict()
    json.dumps(as_dict)  # plain data
    again = load_search(yaml.safe_load(yaml.safe_dump(as_dict)))
    assert again.to_dict() == as_dict
    assert again.source == path and again.settings == problem.settings
    assert again.space.names == problem.space.names
    x = np.random.default_rng(0).random(len(problem.space))
    assert again.space.recipe(x) == problem.space.recipe(x)


# -- errors ------------------------------------------------------------------------------------

def _error(data, tmp_path) -> str:
    path = write_recipe(tmp_path / "bad.yaml", data)
    with pytest.raises(RecipeError) as info:
        load_search(path)
    return str(info.value)


def _line(path, text: str) -> int:
    """The last line holding `text` (the search: section comes after the recipe's own fields)."""
    return [i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line][-1]


def test_an_empty_search_space_is_refused(zoo, tmp_path):
    message = _error(search_recipe(zoo), tmp_path)
    assert f"bad.yaml:{_line(tmp_path / 'bad.yaml', 'search:')}: search: the search space is empty" in message


def test_one_method_and_one_choice_are_an_empty_space(zoo, tmp_path):
    data = search_recipe(zoo, method=["ties"], parameters={"normalize": {"choices": [True]}})
    assert "the search space is empty" in _error(data, tmp_path)


def test_reversed_bounds_name_file_line_and_field(zoo, tmp_path):
    message = _error(search_recipe(zoo, parameters={"density": {"low": 0.9, "high": 0.1}}), tmp_path)
    line = _line(tmp_path / "bad.yaml", "density:")  # the search entry, after the recipe's own
    assert f"bad.yaml:{line}: search.parameters.density: " in message
    assert "bounds reversed" in message


def test_unknown_parameter_is_refused(zoo, tmp_path):
    message = _error(search_recipe(zoo, parameters={"t": {"low": 0.0, "high": 1.0}}), tmp_path)
    assert "search.parameters.t: unknown parameter 't'" in message and "density" in message


@pytest.mark.parametrize("search, says", [
    ({"parameters": {"density": {"low": 0.1, "high": 1.5}}}, "out of range: density must be <= 1"),
    ({"parameters": {"lambda": {"low": 0.0, "high": 1.0, "scale": "log"}}}, "log scale needs low > 0"),
    ({"parameters": {"lambda": {"low": 0.0, "high": 1.0, "per_model": True}}}, "not per model"),
    ({"parameters": {"normalize": {"low": 0, "high": 1}}}, "give its values as choices"),
    ({"parameters": {"density": {"low": 0.1}}}, "give low and high"),
    ({"parameters": {"density": {"low": 0.1, "hihg": 1.0}}}, "unknown field 'hihg'"),
    ({"method": ["ties", "tiess"]}, "search.method[1]: unknown merge method 'tiess'"),
    ({"parameters": {"weight": {"low": 0, "high": 1, "per_model": True, "layer_groups": 9}}},
     "9 groups, but the models have 4 layers"),
    ({"parameters": {"density": {"low": 0, "high": 1}}, "dataflow": {}}, "give one space"),
    ({"evaluations": 0, "method": ["ties"]}, "search.evaluations"),
])
def test_bad_search_sections_are_refused(zoo, tmp_path, search, says):
    assert says in _error(search_recipe(zoo, **search), tmp_path)


def test_merge_refuses_a_recipe_with_a_search_section(zoo, tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path / "s.yaml", search_recipe(zoo, method=["ties"]))
    with pytest.raises(RecipeError, match="this recipe has a search: section; run mergesmith search"):
        load_recipe(path)
    code, _, err = run_cli(monkeypatch, capsys, "merge", path, tmp_path / "out")
    assert code != 0 and "run mergesmith search" in err and "Traceback" not in err
    assert f"s.yaml:{_line(path, 'search:')}" in err
    assert not (tmp_path / "out").exists()


def test_a_recipe_without_a_search_section_is_not_a_search(zoo, tmp_path):
    data = {k: v for k, v in search_recipe(zoo).items() if k != "search"}
    with pytest.raises(RecipeError, match="no search: section"):
        load_search(data)


def test_a_base_model_folder_named_base_is_a_model():
    """`base` is a tokenizer source keyword, not a reserved model name (the README's toy world
    names its base model folder `base`)."""
    recipe = load_recipe({"merge_method": "ties", "base_model": "base", "tokenizer_source": "base",
                          "models": [{"model": "math"}]})
    assert recipe.model_refs() == ["base", "math"]


def test_ends_give_embeddings_and_head_their_own_values(zoo, tmp_path):
    """The paper's genome (evo_merge_ps): one TIES weight and DARE density per expert for every
    layer plus the input and output embeddings. With every density 1 and the weights e_k, the
    merge is expert k (METHODS evo_merge_ps test (1); TIES with one non-zero weight, normalized)."""
    models = zoo("llama")
    data = search_recipe(zoo, parameters={
        "weight": {"low": 0.0, "high": 1.0, "per_model": True, "layer_groups": 4, "ends": True},
        "density": {"low": 0.1, "high": 1.0, "per_model": True, "layer_groups": 4, "ends": True}})
    data["merge_method"] = "dare_ties"
    space = load_search(data).space
    e1 = data["models"][0]["model"]
    assert len(space) == 2 * 2 * (4 + 2)
    assert space.names[4:6] == [f"density[{e1}]@embeddings", f"density[{e1}]@head"]
    values = {n: (1.0 if n.startswith("density") or n.startswith(f"weight[{e1}]") else 0.0)
              for n in space.names}
    values[f"weight[{e1}]@head"] = 0.5  # a different value at the head: it must land there
    recipe = space.recipe(space.encode(values))
    assert recipe.models[0].parameters["weight"] == [
        {"filter": "model.embed_tokens.weight", "value": 1.0},
        {"filter": "lm_head.weight", "value": 0.5}, {"filter": "model.norm.weight", "value": 0.5},
        {"value": [1.0, 1.0, 1.0, 1.0]}]
    got = merged(recipe, tmp_path / "k")
    want, base = read_tensors(models["e1"]), read_tensors(models["base"])
    for name in ("lm_head.weight", "model.norm.weight"):  # the head: θ0 + 0.5·τ1
        want[name] = base[name] + 0.5 * (want[name] - base[name])
    assert got.keys() == want.keys()
    for name in want:  # θ0 + τ1 in fp32 (dare_ties sums, unnormalized): e1 but at the head
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-6), name
    # the start reads the recipe's own values at the ends: e1's weight 0.7 (the global 1.0 for e2)
    start = space.decode(space.start())
    assert start[f"weight[{e1}]@embeddings"] == 0.7 and start[f"density[{e1}]@head"] == 0.5
