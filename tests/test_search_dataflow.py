"""The data-flow space (METHODS.md evo_merge_dfs) and mergekit-evolve genomes (evolve_genome):
paths of layers decoded to slices, checked tensor by tensor; genomes decoded as mergekit 0.1.5
decodes them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from conftest import read_tensors, write_recipe
from mergesmith.errors import RecipeError
from mergesmith.search.space import load_search
from test_search_space import _error, merged


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

def evolve_config(tmp_path, models, method, **genome):
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
