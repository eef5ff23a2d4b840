"""Recipe loading, error locations, fingerprints and parameter resolution (against mergekit's own)."""

from __future__ import annotations

import itertools
import textwrap

import pytest
import yaml
from pydantic import TypeAdapter

from mergesmith.errors import RecipeError
from mergesmith.recipe import Recipe, load_recipe, resolve_setting
from mergesmith.recipe.parameters import lookup

TIES = """\
models:
  - model: org/base
  - model: org/math@v1.0
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: ./local/code
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: org/base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
tokenizer_source: union
"""

SLERP = """\
slices:
  - sources:
      - model: org/a
        layer_range: [0, 32]
      - model: org/b
        layer_range: [0, 32]
merge_method: slerp
base_model: org/a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bf16
"""

PASSTHROUGH = """\
slices:
  - sources:
      - model: org/a
        layer_range: [0, 24]
  - sources:
      - model: org/b
        layer_range: [8, 32]
        parameters:
          scale: {filter: o_proj, value: 0.0}
    base_model: org/c
    residual_weight: 0.1
merge_method: passthrough
dtype: float32
tokenizer_source: org/tok
seed: 7
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(source) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(source)
    return info.value


# --- the mergekit forms load --------------------------------------------------------------


def test_models_form(tmp_path):
    recipe = load_recipe(write(tmp_path, TIES))
    assert recipe.merge_method == "ties" and recipe.base_model == "org/base"
    assert recipe.models[1].model == "org/math@v1.0"
    assert recipe.models[1].parameters == {"density": [1, 0.7, 0.1], "weight": 1.0}
    assert recipe.models[0].parameters is None and recipe.slices is None
    assert recipe.parameters == {"normalize": True, "int8_mask": True}
    assert recipe.dtype == "float16" and recipe.tokenizer_source == "union"
    assert recipe.source == str(tmp_path / "recipe.yaml")
    assert recipe.model_refs() == ["org/base", "org/math@v1.0", "./local/code"]


def test_slices_form_with_filtered_gradient():
    recipe = load_recipe(SLERP)
    assert recipe.dtype == "bfloat16"  # alias normalised
    sources = recipe.slices[0].sources
    assert [s.model for s in sources] == ["org/a", "org/b"]
    assert sources[1].layer_range == (0, 32)
    assert recipe.parameters["t"][0] == {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}
    assert recipe.parameters["t"][2] == {"value": 0.5}
    assert recipe.model_refs() == ["org/a", "org/b"]


def test_slice_parameters_and_refs():
    recipe = load_recipe(PASSTHROUGH)
    piece = recipe.slices[1]
    assert piece.base_model == "org/c" and piece.residual_weight == 0.1
    assert piece.sources[0].parameters == {"scale": {"filter": "o_proj", "value": 0.0}}
    assert recipe.seed == 7
    assert recipe.model_refs() == ["org/a", "org/b", "org/c", "org/tok"]


def test_same_recipe_from_dict_file_and_string(tmp_path):
    from_file = load_recipe(write(tmp_path, SLERP))
    assert load_recipe(SLERP) == from_file == load_recipe(yaml.safe_load(SLERP))
    assert load_recipe(str(tmp_path / "recipe.yaml")).source == str(tmp_path / "recipe.yaml")


@pytest.mark.parametrize("alias,name", [("fp32", "float32"), ("half", "float16"),
                                        ("torch.bfloat16", "bfloat16"), ("float", "float32")])
def test_dtype_aliases(alias, name):
    assert load_recipe({"merge_method": "linear", "models": [{"model": "a"}], "out_dtype": alias}).out_dtype == name


def test_where_gives_the_line_of_nested_fields(tmp_path):
    recipe = load_recipe(write(tmp_path, TIES))
    f = tmp_path / "recipe.yaml"
    assert recipe.where("models", 2, "parameters", "weight") == f"{f}:10: models[2].parameters.weight"
    assert recipe.where("models", 1) == f"{f}:3: models[1]"
    assert recipe.where("merge_method") == f"{f}:11: merge_method"
    # Not written in the file: the nearest ancestor's line.
    assert recipe.where("models", 0, "parameters", "weight") == f"{f}:2: models[0].parameters.weight"
    assert load_recipe(TIES).where("models", 1, "parameters") == "models[1].parameters"


# --- every mistake is a RecipeError at its place ---------------------------------------------


def test_misspelled_field_suggests_the_right_one(tmp_path):
    path = write(tmp_path, """\
        merge_method: linear
        models:
          - model: a
            parameters:
              weight: 1
          - model: b
            paramters:
              weight: 1
        """)
    err = error_of(path)
    assert err.message.startswith(f"{path}:7: models[1].paramters: unknown field 'paramters'")
    assert err.hint == "did you mean 'parameters'?"


def test_misspelled_conditional_key(tmp_path):
    path = write(tmp_path, "merge_method: slerp\nmodels:\n  - model: a\nparameters:\n  t:\n    - filtr: mlp\n      value: 1\n")
    err = error_of(path)
    assert err.message.startswith(f"{path}:6: parameters.t[0].filtr: unknown field 'filtr'")
    assert err.hint == "did you mean 'filter'?"


def test_parameter_outside_parameters_gets_a_hint(tmp_path):
    path = write(tmp_path, "merge_method: linear\nmodels:\n  - model: a\n    weight: 0.5\n")
    err = error_of(path)
    assert err.message.startswith(f"{path}:4: models[0].weight: unknown field 'weight'")
    assert "under 'parameters:'" in err.hint


def test_wrong_type(tmp_path):
    path = write(tmp_path, "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [0.5, null]\n")
    err = error_of(path)
    assert err.message.startswith(f"{path}:5: models[0].parameters.weight[1]: expected a number")
    path = write(tmp_path, "merge_method: linear\nseed: 1.5\nmodels:\n  - model: a\n")
    assert error_of(path).message == f"{path}:2: seed: expected an integer, got 1.5"


def test_model_entry_written_as_a_string(tmp_path):
    path = write(tmp_path, "merge_method: linear\nmodels:\n  - org/a\n")
    err = error_of(path)
    assert err.message == f"{path}:3: models[0]: expected a mapping, got 'org/a'"
    assert err.hint == "write each entry as '- model: org/a'"


def test_missing_merge_method(tmp_path):
    path = write(tmp_path, "# merge\nmodels:\n  - model: a\n")
    assert error_of(path).message == f"{path}:2: merge_method: required field missing"
    assert error_of({"models": [{"model": "a"}]}).message == "merge_method: required field missing"


def test_models_and_slices_exclusive(tmp_path):
    both = write(tmp_path, SLERP + "models:\n  - model: org/a\n")
    assert error_of(both).message.startswith(f"{both}:1: slices: give either 'models' or 'slices'")
    neither = write(tmp_path, "merge_method: linear\nmodels: []\n", "neither.yaml")
    assert "give a non-empty 'models' or 'slices'" in error_of(neither).message
    modules = write(tmp_path, "merge_method: linear\nmodules:\n  text: {}\n", "modules.yaml")
    assert error_of(modules).message.startswith(f"{modules}:3: modules.text: give either a non-empty 'models' or 'slices'")


def test_bad_dtype_lists_allowed(tmp_path):
    path = write(tmp_path, "merge_method: linear\nmodels:\n  - model: a\ndtype: float64\n")
    message = error_of(path).message
    assert message.startswith(f"{path}:4: dtype: unsupported dtype 'float64'")
    assert "float32, float16, bfloat16" in message


def test_bad_layer_range(tmp_path):
    path = write(tmp_path, SLERP.replace("layer_range: [0, 32]\n      - model: org/b", "layer_range: [32, 0]\n      - model: org/b"))
    assert error_of(path).message.startswith(f"{path}:4: slices[0].sources[0].layer_range: expected [start, end)")
    path = write(tmp_path, SLERP.replace("[0, 32]", "[0, 16, 32]"))
    assert "two integers" in error_of(path).message


def test_yaml_syntax_error(tmp_path):
    path = write(tmp_path, "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1\n")
    message = error_of(path).message
    assert message.startswith(f"{path}:5: invalid YAML")
    path = write(tmp_path, "merge_method: linear\n  models: x\n")
    assert error_of(path).message.startswith(f"{path}:2: invalid YAML")


def test_empty_and_non_mapping_files(tmp_path):
    path = write(tmp_path, "# nothing here\n\n")
    assert error_of(path).message == f"{path}:1: the recipe is empty"
    path = write(tmp_path, "- model: a\n")
    assert error_of(path).message.startswith(f"{path}:1: a recipe must be a mapping")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error_of(path).message == f"{path}: recipe file not found"
    assert error_of(str(path)).message == f"{path}: recipe file not found"


# --- fingerprint and YAML round trip ---------------------------------------------------------


def test_fingerprint_ignores_key_order_and_sees_values():
    data = yaml.safe_load(TIES)
    reordered = dict(reversed(list(data.items())))
    reordered["models"] = [dict(reversed(list(m.items()))) for m in data["models"]]
    assert load_recipe(data).fingerprint() == load_recipe(reordered).fingerprint()
    changed = yaml.safe_load(TIES)
    changed["models"][1]["parameters"]["density"][2] = 0.2
    assert load_recipe(changed).fingerprint() != load_recipe(data).fingerprint()
    assert len(load_recipe(data).fingerprint()) == 64


@pytest.mark.parametrize("text", [TIES, SLERP, PASSTHROUGH])
def test_to_yaml_round_trips(text):
    recipe = load_recipe(text)
    again = load_recipe(recipe.to_yaml())
    assert again == recipe and again.fingerprint() == recipe.fingerprint()
    assert "null" not in recipe.to_yaml()


def test_equality_sees_content():
    assert load_recipe(TIES) != load_recipe(TIES.replace("density: 0.5", "density: 0.6"))


# --- parameter resolution ---------------------------------------------------------------------

FILTERED = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]
ATTN, MLP, EMBED = "model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight", "model.embed_tokens.weight"


@pytest.mark.parametrize("setting,t,expected", [
    (0.3, 0.9, 0.3),
    ([0, 0.5, 0.3, 0.7, 1], 0.6, 0.46),   # scaled 2.4: 0.6 * 0.3 + 0.4 * 0.7
    ([0, 0.5, 0.3, 0.7, 1], 0.125, 0.25),  # scaled 0.5: halfway between 0 and 0.5
    ([0, 0.5, 0.3, 0.7, 1], 1.0, 1),
    ([1, 0.7, 0.1], 0.25, 0.85),
    ([1, 0.7, 0.1], 0.75, 0.4),
    ([2], 0.7, 2),
    (["a", "b", "c"], 0.6, "b"),           # discrete: index int(0.6 * 2)
    ([True, False], 0.9, True),
    ([True, False], 1.0, False),
    ([], 0.5, None),
])
def test_resolve_by_hand(setting, t, expected):
    got = resolve_setting(setting, ATTN, t)
    assert got is None if expected is None else got == pytest.approx(expected)


@pytest.mark.parametrize("name,t,expected", [
    (ATTN, 0.25, 0.25), (ATTN, 1.0, 1.0), (MLP, 0.25, 0.75), (MLP, 0.5, 0.5), (EMBED, 0.1, 0.5),
])
def test_resolve_filters(name, t, expected):
    assert resolve_setting(FILTERED, name, t) == pytest.approx(expected)


def test_filter_misses():
    only_mlp = [{"filter": "mlp", "value": 1}]
    assert resolve_setting(only_mlp, ATTN, 0.5) is None
    assert resolve_setting({"filter": "mlp", "value": 2}, MLP, 0.5) == 2
    assert resolve_setting({"filter": "*", "value": 3}, ATTN, 0.5) == 3
    assert resolve_setting(only_mlp, "", 0.5) is None  # no name, no filter match (as mergekit)


def test_lookup_takes_the_most_specific_level_that_matches():
    source, slice_, top = {"t": [{"filter": "mlp", "value": 0.9}]}, None, {"t": 0.5, "w": [0, 1]}
    assert lookup("t", [source, slice_, top], MLP, 0.0) == 0.9
    assert lookup("t", [source, slice_, top], ATTN, 0.0) == 0.5  # filter misses: falls through
    assert lookup("w", [source, slice_, top], ATTN, 0.25) == 0.25
    assert lookup("x", [source, slice_, top], ATTN, 0.25) is None


def test_validate_converts_like_mergekit():
    # PyYAML reads 1e-3 as a string; a numeric parameter's validator makes it interpolable.
    assert resolve_setting(["1e-3", 0.002], ATTN, 0.5, validate=float) == pytest.approx(0.0015)


SETTINGS = [
    0.5, 3, True, "x", [0, 0.5, 0.3, 0.7, 1], [1, 0.7, 0.1], [2, 4], [7], ["a", "b", "c"],
    [True, False, True], [1, "b"], [True, 1], [], FILTERED,
    {"value": [0, 1], "filter": "mlp"}, {"value": 0.2}, [{"filter": "*", "value": ["p", "q"]}],
    [{"filter": "attn", "value": 1}, {"filter": "proj", "value": [0.1, 0.9]}],
    [{"filter": "", "value": 1}, {"value": 2}],  # "" matches any name but the empty one
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # mergekit's own numpy import
@pytest.mark.parametrize("raw", SETTINGS, ids=range(len(SETTINGS)))
@pytest.mark.parametrize("validate", [None, "float"])
def test_matches_mergekit_evaluate_setting(raw, validate):
    from mergekit.config import ParameterSetting as MkSetting
    from mergekit.config import evaluate_setting

    def check(v):
        # A "typed" validator: numeric strings become numbers, like a float parameter's.
        if validate and isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        return v

    theirs = TypeAdapter(MkSetting).validate_python(raw)
    ours = load_recipe({"merge_method": "m", "models": [{"model": "a"}], "parameters": {"p": raw}}).parameters["p"]
    for name, t in itertools.product([ATTN, MLP, EMBED, ""], [i / 20 for i in range(21)]):
        expected = evaluate_setting(name, theirs, t, validate=check)
        assert resolve_setting(ours, name, t, validate=check if validate else None) == expected
        assert type(resolve_setting(ours, name, t, validate=check)) is type(expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_whole_recipe_resolves_like_mergekit():
    from mergekit.config import MergeConfiguration, evaluate_setting

    theirs = MergeConfiguration.model_validate(yaml.safe_load(SLERP))
    ours = load_recipe(SLERP)
    for name, t in itertools.product([ATTN, MLP, EMBED], [i / 10 for i in range(11)]):
        expected = evaluate_setting(name, theirs.parameters["t"], t, validate=lambda v: v)
        assert lookup("t", [None, ours.parameters], name, t) == expected


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("text", [TIES, SLERP, PASSTHROUGH])
def test_samples_are_genuine_mergekit_recipes(text):
    from mergekit.config import MergeConfiguration

    theirs = MergeConfiguration.model_validate(yaml.safe_load(text))
    # Ours also lists slice base models and the tokenizer source, which mergekit leaves out.
    assert {str(m) for m in theirs.referenced_models()} <= set(load_recipe(text).model_refs())
