"""The search space: unit coordinates, recipes from points, the search: section's errors, the
data-flow space and mergekit-evolve genomes. Expected values are computed by hand from the
definitions (README "Search", METHODS.md evo_merge_dfs and evolve_genome)."""

from __future__ import annotations

import json
import math

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


# -- the data-flow space -----------------------------------------------------------------------

def dataflow_recipe(zoo, **dataflow) -> dict:
    models = zoo("llama")
    return {"merge_method": "passthrough", "dtype": "float32",
            "models": [{"model": str(models["e1"])}, {"model": str(models["e2"])}],
            "search": {"dataflow": {"repeats": 2, **dataflow}}}


def path_point(space, kept: set[int], scales: dict[str, float] | None = None, rest: float = 0.8):
    """A point keeping slots `kept`, with the named scale genes set and the others at `rest`."""
    values = {}
    for t, d in enumerate(space.dimensions):
        if d.name.startswith("path["):
            values[d.name] = 0.5 if t in kept else -0.5
        else:
            values[d.name] = (scales or {}).get(d.name, rest)
    return space.encode(values)


def test_dataflow_dimensions(zoo):
    pair = load_search(dataflow_recipe(zoo)).space
    assert len(pair) == 8 * 2 + 8 * 8  # T = M·r slots, M² pair scales
    e1 = zoo("llama")["e1"]
    assert pair.names[1] == f"path[1]:{e1}:1" and pair.names[9] == f"path[9]:{e1}:1"
    assert len(load_search(dataflow_recipe(zoo, scaling="layer")).space) == 16 + 8
    assert len(load_search(dataflow_recipe(zoo, scaling="none", repeats=3)).space) == 24


def test_dataflow_path_of_one_models_layers_reproduces_it(zoo, tmp_path):
    """METHODS evo_merge_dfs test (1): I selecting exactly model k's layers in order, W = 1,
    gives model k: its tensors bit for bit, hence its logits."""
    from transformers import AutoModelForCausalLM

    e2 = zoo("llama")["e2"]
    space = load_search(dataflow_recipe(zoo)).space
    x = path_point(space, {12, 13, 14, 15}, rest=1.0)  # e2's layers, in the second repeat
    recipe = space.recipe(x)
    assert [s.sources[0].layer_range for s in recipe.slices] == [(0, 4)]
    got = merged(recipe, tmp_path / "k")
    want = read_tensors(e2)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "k")(ids).logits
        b = AutoModelForCausalLM.from_pretrained(e2)(ids).logits
    assert torch.equal(a, b)


def test_dataflow_scale_is_indexed_by_absolute_layers(zoo, tmp_path):
    """METHODS evo_merge_dfs test (2), the expressible part: the path e1:0 -> e2:1 -> e1:0 -> e2:1
    (slots 0, 5, 8, 13) scales layer j's q, k, v inputs by W[i -> j] of the absolute layers, the
    same gene at both visits of (e1:0 -> e2:1); the first layer and every other tensor unscaled."""
    models = zoo("llama")
    e1, e2 = models["e1"], models["e2"]
    space = load_search(dataflow_recipe(zoo)).space
    x = path_point(space, {0, 5, 8, 13}, {f"scale[{e1}:0->{e2}:1]": 0.5, f"scale[{e2}:1->{e1}:0]": 1.5})
    got = merged(space.recipe(x), tmp_path / "path")
    a, b = read_tensors(e1), read_tensors(e2)
    layers = [(a, 0, 1.0), (b, 1, 0.5), (a, 0, 1.5), (b, 1, 0.5)]
    names = [n for n in a if ".layers.0." in n]
    for out, (source, layer, scale) in enumerate(layers):
        for name in names:
            mine = got[name.replace(".layers.0.", f".layers.{out}.")]
            theirs = source[name.replace(".layers.0.", f".layers.{layer}.")]
            first_linear = any(p in name for p in ("q_proj", "k_proj", "v_proj"))
            assert torch.equal(mine, theirs * scale if first_linear else theirs), (out, name)
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])  # the last layer's model
    config = json.loads((tmp_path / "path" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4


def test_dataflow_layer_scaling_and_a_longer_path(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    e1 = zoo("llama")["e1"]
    space = load_search(dataflow_recipe(zoo, scaling="layer")).space
    x = path_point(space, {0, 1, 2, 3, 6, 7}, {f"scale[{e1}:1]": 0.25}, rest=1.0)
    recipe = space.recipe(x)
    assert [(s.sources[0].layer_range, bool(s.sources[0].parameters)) for s in recipe.slices] == [
        ((0, 1), False), ((1, 2), True), ((2, 4), False), ((2, 4), False)]
    merged(recipe, tmp_path / "six")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "six")
    assert model.config.num_hidden_layers == 6 and torch.isfinite(model(torch.tensor([[1, 2]])).logits).all()


def test_an_empty_path_is_a_clear_error(zoo):
    """METHODS evo_merge_dfs test (3): no crash; the candidate is scored as failed."""
    space = load_search(dataflow_recipe(zoo)).space
    with pytest.raises(RecipeError, match="the path is empty"):
        space.recipe(path_point(space, set()))


def test_dataflow_starts_from_the_recipes_own_path(zoo):
    models = zoo("llama")
    e1, e2 = str(models["e1"]), str(models["e2"])
    data = {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": e1, "layer_range": [2, 4]}]},
                       {"sources": [{"model": e2, "layer_range": [0, 2]}]},
                       {"sources": [{"model": e1, "layer_range": [0, 1]}]}],
            "search": {"dataflow": {"repeats": 2, "models": [e1, e2]}}}
    space = load_search(data).space
    start = space.decode(space.start())
    kept = [t for t, d in enumerate(space.dimensions[:16]) if start[d.name] > 0]
    assert kept == [2, 3, 4, 5, 8]  # e1:2-3, e2:0-1, then e1:0 from the second repeat
    recipe = space.recipe(space.start())
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in recipe.slices] == [
        (e1, (2, 4)), (e2, (0, 2)), (e1, (0, 1))]


@pytest.mark.parametrize("dataflow, says", [
    ({"scale": {"low": 2.0, "high": 1.0}}, "search.dataflow.scale: bounds reversed"),
    ({"repeat": 2}, "unknown field 'repeat' (hint: did you mean 'repeats'?)"),
    ({"scaling": "pairs"}, "search.dataflow.scaling"),
])
def test_bad_dataflow_sections(zoo, tmp_path, dataflow, says):
    data = dataflow_recipe(zoo)
    data["search"]["dataflow"] = dataflow
    assert says in _error(data, tmp_path)


# -- mergekit-evolve genomes ------------------------------------------------------------------

def evolve_config(tmp_path, models, method, **genome) -> "Path":
    config = {"genome": {"models": [str(m) for m in models], "merge_method": method,
                         "base_model": str(zoo_base(models)), **genome},
              "tasks": ["arc_easy_train", {"name": "piqa_train", "weight": 2.0}], "limit": 50}
    return write_recipe(tmp_path / f"evolve-{method}.yaml", config)


def zoo_base(models):
    return models[0].parent / "base"


GENOMES = [("ties", {"layer_granularity": 2, "filters": ["mlp"]}),
           ("dare_ties", {"layer_granularity": 2, "smooth": True}),
           ("slerp", {"layer_granularity": 1}),
           ("linear", {}),
           ("task_arithmetic", {"allow_negative_weights": True, "layer_granularity": 4,
                                "filters": ["self_attn", "mlp"]})]


@pytest.mark.parametrize("method, genome", GENOMES, ids=[g[0] for g in GENOMES])
def test_genome_decodes_as_mergekit(zoo, tmp_path, method, genome):
    """The recipe of a random genotype equals mergekit 0.1.5's genotype_merge_config, less the
    parameters our method does not take (mergekit ignores them too)."""
    from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition

    from mergesmith.methods import get_method
    from mergesmith.search.mergekit_evolve import GENE_BOUND, load_evolve_config

    models = zoo("llama")
    path = evolve_config(tmp_path, [models["e1"], models["e2"]], method, **genome)
    problem = load_evolve_config(path)
    definition = ModelGenomeDefinition.model_validate(yaml.safe_load(path.read_text())["genome"])
    reference = ModelGenome(definition)
    assert len(problem.space) == reference.initial_genotype().numel()
    x = np.random.default_rng(1).random(len(problem.space))
    theirs = reference.genotype_merge_config(-GENE_BOUND + 2 * GENE_BOUND * x)
    theirs = theirs.model_dump(mode="json", exclude_none=True)
    own = {p.name for p in get_method(method).params}
    theirs["parameters"] = {k: v for k, v in theirs["parameters"].items() if k in own}
    if not theirs["parameters"]:
        del theirs["parameters"]
    for entry in theirs.get("models") or []:
        entry.pop("layer_range", None)  # the whole model, our models: entries' only range
    ours = problem.space.recipe(x).model_dump(mode="json", exclude_none=True)
    assert ours == theirs


def test_genome_start_and_identical_experts(zoo, tmp_path):
    """METHODS evolve_genome test (1): x0 gives weight 1/N and density 1 everywhere; with
    identical experts the merge returns that expert."""
    import shutil

    from mergesmith.search.mergekit_evolve import load_evolve_config

    models = zoo("llama")
    twin = tmp_path / "e1-copy"
    shutil.copytree(models["e1"], twin)
    problem = load_evolve_config(evolve_config(tmp_path, [models["e1"], twin], "ties", layer_granularity=2))
    recipe = problem.space.recipe(problem.space.start())
    for piece in recipe.slices:
        for source in piece.sources[:2]:
            assert source.parameters["weight"] == pytest.approx(0.5, abs=1e-12)
            assert source.parameters["density"] == 1.0
    got = merged(recipe, tmp_path / "out")
    want = read_tensors(models["e1"])
    assert all(got[k].dtype == torch.bfloat16 for k in got)
    assert all(torch.allclose(got[k].float(), want[k].to(torch.bfloat16).float(), rtol=0, atol=1e-2)
               for k in want)
    settings = problem.settings
    assert (settings.optimizer, settings.evaluations) == ("cma", 100)
    assert settings.options["sigma0"] == pytest.approx(1 / 24)  # 1/6 of a gene, genes span 4
    assert settings.fitness["lm_eval"][1] == {"name": "piqa_train", "weight": 2.0, "metric": "acc,none"}
    assert settings.fitness["limit"] == 50
    again = load_search(problem.to_dict())
    assert again.space.names == problem.space.names and again.source == problem.source


def test_genome_mirror_symmetry(zoo, tmp_path):
    """METHODS evolve_genome test (2): without allow_negative_weights, x and −x (u and 1 − u)
    decode to the same recipe; with it they differ."""
    from mergesmith.search.mergekit_evolve import load_evolve_config

    models = zoo("llama")
    pair = [models["e1"], models["e2"]]
    x = np.random.default_rng(2).random(4 * 2 * 1 * 2)
    space = load_evolve_config(evolve_config(tmp_path, pair, "ties", layer_granularity=1)).space
    assert space.recipe(x) == space.recipe(1 - x)
    signed = load_evolve_config(evolve_config(tmp_path, pair, "ties", layer_granularity=1,
                                              allow_negative_weights=True)).space
    assert signed.recipe(x) != signed.recipe(1 - x)


def test_genome_slerp_keeps_the_leading_model_as_base(zoo, tmp_path):
    """METHODS evolve_genome test (3): t <= 0.5 and base = the model of the largest gene."""
    from mergesmith.search.mergekit_evolve import load_evolve_config

    models = zoo("llama")
    names = [models["e1"], models["e2"], models["base"]]
    space = load_evolve_config(evolve_config(tmp_path, names, "slerp", layer_granularity=2)).space
    for seed in range(5):
        x = np.random.default_rng(seed).random(len(space))
        genes = space.genotype(space.decode(x))
        for g, piece in enumerate(space.recipe(x).slices):
            a, b = np.argsort(-genes[g, :, 0, 0])[:2]
            assert piece.base_model == str(names[a])
            assert piece.parameters["t"] == pytest.approx(math.exp(genes[g, b, 0, 0]) / (
                math.exp(genes[g, a, 0, 0]) + math.exp(genes[g, b, 0, 0])))
            assert piece.parameters["t"] <= 0.5


def test_genome_granularity_must_divide_the_layers(zoo, tmp_path):
    """METHODS evolve_genome test (4)."""
    from mergesmith.search.mergekit_evolve import load_evolve_config

    models = zoo("llama")
    with pytest.raises(RecipeError, match="layer_granularity 3 does not divide the 4 layers"):
        load_evolve_config(evolve_config(tmp_path, [models["e1"], models["e2"]], "ties",
                                         layer_granularity=3))


def test_a_base_model_folder_named_base_is_a_model():
    """`base` is a tokenizer source keyword, not a reserved model name (the README's toy world
    names its base model folder `base`)."""
    recipe = load_recipe({"merge_method": "ties", "base_model": "base", "tokenizer_source": "base",
                          "models": [{"model": "math"}]})
    assert recipe.model_refs() == ["base", "math"]
