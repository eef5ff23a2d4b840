"""Recipe shapes mergekit 0.1.5 runs, run by mergesmith with the same result.

The `tokenizer:` section, named and automatic chat templates, multi-document (multi-stage)
recipes and `modules:` for multimodal checkpoints (the model+adapter form: test_adapter_inputs.py).
Each case merges tiny models with both tools from one recipe file and compares every tensor
bitwise and the tokenizer files byte for byte.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import build_model, default_tokens, read_tensors, run_cli, save_tokenizer

pytest.importorskip("mergekit")
with warnings.catch_warnings():  # mergekit's lazy unpickler touches the deprecated numpy.core
    warnings.simplefilter("ignore", DeprecationWarning)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

import mergesmith  # noqa: E402
from mergesmith.errors import MergesmithError, PlanError, RecipeError  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")


def run_mergekit(recipe_file: Path, out: Path) -> Path:
    """What `mergekit-yaml RECIPE OUT` does, without starting a new interpreter."""
    text = recipe_file.read_text()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              options=MergeOptions(quiet=True), config_source=text)
    return out


def assert_same_merge(theirs: Path, ours: Path) -> None:
    """Every tensor bitwise, the vocabulary size, and the tokenizer files byte for byte."""
    a, b = read_tensors(theirs), read_tensors(ours)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name
    config = [json.loads((f / "config.json").read_text()) for f in (theirs, ours)]
    assert config[0].get("vocab_size") == config[1].get("vocab_size")
    for name in TOKENIZER_FILES:
        assert (theirs / name).is_file() == (ours / name).is_file(), name
        if (theirs / name).is_file():
            assert (theirs / name).read_bytes() == (ours / name).read_bytes(), name


def merge_both(tmp_path: Path, text: str) -> tuple[Path, Path]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    return run_mergekit(recipe, tmp_path / "mergekit"), mergesmith.merge(recipe, tmp_path / "mergesmith")


# ---------------------------------------------------------------------------------------------
# 1. the tokenizer: section


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    """A base (96 tokens) and two fine-tunes whose vocabularies differ from it and each other:
    e1 (shuffled) lacks w20 and has zeta; e2 lacks w20 and w21, has zeta, and one padding row.
    One token is new to the base: mergekit orders several new ones differently on each run."""
    root = tmp_path_factory.mktemp("vocabs")
    tokens = default_tokens(96)
    base = build_model(root / "base", "llama", seed=0)
    t1 = [t for t in tokens if t != "w20"] + ["zeta"]
    random.Random(0).shuffle(t1)
    e1 = build_model(root / "e1", "llama", seed=1, base=base, tokens=t1)
    t2 = [t for t in tokens if t not in ("w20", "w21")] + ["zeta"]
    e2 = build_model(root / "e2", "llama", seed=2, base=base, tokens=t2)
    return base, e1, e2


def linear3(base, e1, e2, tail: str) -> str:
    return (f"merge_method: linear\nbase_model: {base}\nmodels:\n"
            f"  - model: {base}\n    parameters: {{weight: 0.2}}\n"
            f"  - model: {e1}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {e2}\n    parameters: {{weight: 0.3}}\n" + tail)


def test_tokenizer_section_matches_mergekit(vocabs, tmp_path):
    """mergekit's documented shape: union, tokens re-sourced from a model, another token's row,
    zeros (forced), and padding; rows of tokens some models lack come from the one model that
    has them (w20: the base), the base (w21), or the average of those that have them (zeta)."""
    base, e1, e2 = vocabs
    tail = ("dtype: float32\ntokenizer:\n  source: union\n  tokens:\n"
            f"    \"<|im_start|>\":\n      source: {{kind: model_token, model: {e1}, token: w5}}\n"
            f"    w3:\n      source: {e2}\n      force: true\n"
            "    w7:\n      source: {kind: zero}\n      force: true\n"
            f"    w21:\n      source: {{kind: model_token, model: {e2}, token_id: 4}}\n"
            "  pad_to_multiple_of: 8\n")
    theirs, ours = merge_both(tmp_path, linear3(base, e1, e2, tail))
    assert_same_merge(theirs, ours)
    got = read_tensors(ours)["model.embed_tokens.weight"]
    assert got.shape[0] == 104  # 96 + zeta, <|im_start|> = 98, padded to 8
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(ours).get_vocab()
    assert torch.equal(got[vocab["w7"]], torch.zeros(32))  # forced zeros in every model
    # padding: each model's mean row, merged (so the merged rows' mean, up to rounding)
    torch.testing.assert_close(got[98:], got[:98].mean(0).expand(6, -1))


@pytest.mark.parametrize("source", ["base", "e1"])
def test_tokenizer_source_base_or_model_matches_mergekit(vocabs, tmp_path, source):
    base, e1, e2 = vocabs
    name = {"base": "base", "e1": str(e1)}[source]
    tail = f"tokenizer:\n  source: {name}\n  pad_to_multiple_of: 16\n"
    assert_same_merge(*merge_both(tmp_path, linear3(base, e1, e2, tail)))


def test_tokenizer_source_field_is_the_same_code_path(vocabs, tmp_path):
    """`tokenizer_source: union` is `tokenizer: {source: union}`: the same bytes."""
    base, e1, e2 = vocabs
    theirs, ours = merge_both(tmp_path, linear3(base, e1, e2, "tokenizer_source: union\n"))
    assert_same_merge(theirs, ours)
    section = tmp_path / "section.yaml"
    section.write_text(linear3(base, e1, e2, "tokenizer:\n  source: union\n"))
    assert_same_merge(ours, mergesmith.merge(section, tmp_path / "section"))


def test_tokenizer_base_with_new_token(vocabs, tmp_path):
    """mergekit 0.1.5 fails here (KeyError in its permutation); the token's rows are zeros."""
    base, e1, e2 = vocabs
    recipe = tmp_path / "r.yaml"
    recipe.write_text(linear3(base, e1, e2, "tokenizer:\n  source: base\n  tokens:\n"
                                            "    new_tok: {source: {kind: zero}}\n"))
    out = mergesmith.merge(recipe, tmp_path / "out")
    got = read_tensors(out)["model.embed_tokens.weight"]
    assert got.shape[0] == 97 and torch.equal(got[96], torch.zeros(32))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 97


@pytest.mark.parametrize("tokens, message", [
    ("    w5: {source: nowhere}\n", "'nowhere' is not one of the models merged"),
    ("    zeta: {source: BASE}\n", "has no token 'zeta'"),
    ("    w5: {source: {kind: model_token, model: E1, token: nope}}\n", "has no token 'nope'"),
    ("    w5: {source: {kind: model_token, model: E1, token_id: 500}}\n", "token id 500 is beyond"),
    ("    fresh: {force: true}\n", "no source for 'fresh'"),
])
def test_tokenizer_section_errors_name_the_line(vocabs, tmp_path, tokens, message):
    base, e1, e2 = vocabs
    recipe = tmp_path / "r.yaml"
    recipe.write_text(linear3(base, e1, e2, "tokenizer:\n  tokens:\n"
                                            + tokens.replace("BASE", str(base)).replace("E1", str(e1))))
    with pytest.raises(PlanError) as info:
        mergesmith.plan(recipe)
    assert info.value.message.startswith(f"{recipe}:12: tokenizer.tokens."), info.value.message
    assert message in info.value.message


def test_tokenizer_section_schema_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels: [{model: a}]\ntokenizer:\n  tokens:\n"
                      "    x: {source: {kind: zeroo}}\n")
    with pytest.raises(RecipeError, match=r":5: tokenizer.tokens.x.source: expected a model, "
                                          r"\{kind: zero\}"):
        mergesmith.plan(recipe)
    recipe.write_text("merge_method: linear\nmodels: [{model: a}]\ntokenizer:\n"
                      "  pad_to_multiple_of: 0\n")
    with pytest.raises(RecipeError, match=r":4: tokenizer.pad_to_multiple_of"):
        mergesmith.plan(recipe)


# ---------------------------------------------------------------------------------------------
# 2. chat templates


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """Three models of one vocabulary; two share a chat template, the third has another."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat")
    base = build_model(root / "base", "llama", seed=0)
    experts = [build_model(root / f"e{i}", "llama", seed=i, base=base) for i in (1, 2)]
    for folder, template in [(base, "{{ 'other' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"),
                             (experts[0], "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"),
                             (experts[1], "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}\n")]:
        tok = AutoTokenizer.from_pretrained(folder)
        tok.chat_template = template
        tok.save_pretrained(folder)
    return base, *experts


def names_of_templates() -> list[str]:
    from mergesmith.engine.vocab import named_chat_templates

    return named_chat_templates()


def test_every_mergekit_template_is_shipped():
    import importlib.resources

    from mergekit._data import chat_templates

    theirs = {p.name: p.read_text() for p in importlib.resources.files(chat_templates).iterdir()
              if p.name.endswith(".jinja")}
    ours = importlib.resources.files("mergesmith.engine") / "chat_templates"
    assert sorted(theirs) == sorted(f"{n}.jinja" for n in names_of_templates())
    for name, text in theirs.items():
        assert (ours / name).read_text() == text, name


@pytest.mark.parametrize("template", ["chatml", "auto", "llama3", "literal", "named+tokenizer"])
def test_chat_template_matches_mergekit(chat_models, tmp_path, template):
    base, e1, e2 = chat_models
    tail = {"literal": "chat_template: \"{% for m in messages %}[{{ m['content'] }}]{% endfor %}\"\n",
            "named+tokenizer": "chat_template: mistral\ntokenizer_source: base\n"}.get(
        template, f"chat_template: {template}\n")
    theirs, ours = merge_both(tmp_path, linear3(base, e1, e2, tail))
    assert_same_merge(theirs, ours)
    from transformers import AutoTokenizer

    written = AutoTokenizer.from_pretrained(ours).chat_template
    if template == "auto":  # the one two of three models share
        assert written.startswith("{% for m in messages %}<{{ m['role'] }}>")
    elif template == "chatml":
        assert "<|im_start|>" in written


def test_unknown_chat_template_is_a_plan_error(chat_models, tmp_path):
    base, e1, e2 = chat_models
    recipe = tmp_path / "r.yaml"
    recipe.write_text(linear3(base, e1, e2, "chat_template: chatmll\n"))
    with pytest.raises(PlanError) as info:
        mergesmith.plan(recipe)
    assert info.value.message.startswith(f"{recipe}:10: chat_template: unknown chat template 'chatmll'")
    assert "chatml" in info.value.hint and "auto" in info.value.hint


# ---------------------------------------------------------------------------------------------
# 3. multi-stage recipes (mergekit-multi)


def two_stages(models: dict) -> str:
    """mergekit's multi-stage example shape: a named soup, then a final merge that uses it."""
    return (f"name: soup\nmerge_method: linear\nmodels:\n"
            f"  - model: {models['e1']}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {models['e2']}\n    parameters: {{weight: 0.4}}\n"
            f"dtype: float32\n---\n"
            f"merge_method: slerp\nbase_model: {models['base']}\nmodels:\n"
            f"  - model: {models['base']}\n  - model: soup\n"
            f"parameters:\n  t: [0, 0.3, 0.7]\ndtype: float32\n")


def test_two_stages_equal_two_chained_merges(zoo, tmp_path, monkeypatch, capsys):
    models = zoo("llama")
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(two_stages(models))
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out")
    assert code == 0, err
    stage = tmp_path / "out-stages" / "soup"
    assert (stage / "model.safetensors").is_file()

    first, second = recipe.read_text().split("---\n")
    (tmp_path / "one.yaml").write_text(first)
    (tmp_path / "two.yaml").write_text(second.replace("model: soup", f"model: {tmp_path / 'one'}"))
    mergesmith.merge(tmp_path / "one.yaml", tmp_path / "one")
    mergesmith.merge(tmp_path / "two.yaml", tmp_path / "two")
    for a, b in [(stage, tmp_path / "one"), (tmp_path / "out", tmp_path / "two")]:
        x, y = read_tensors(a), read_tensors(b)
        assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)

    # a rerun skips the finished stage (its folder is not touched) and merges the final again
    mtime = (stage / "model.safetensors").stat().st_mtime_ns
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out", "--overwrite")
    assert code == 0, err
    assert (stage / "model.safetensors").stat().st_mtime_ns != mtime  # --overwrite redoes it
    mtime = (stage / "model.safetensors").stat().st_mtime_ns
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "again",
                           "--intermediate-dir", tmp_path / "out-stages")
    assert code == 0, err
    assert "stage 'soup': already merged" in err
    assert (stage / "model.safetensors").stat().st_mtime_ns == mtime

    # a changed stage recipe is not silently reused
    recipe.write_text(two_stages(models).replace("weight: 0.6", "weight: 0.5"))
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "third",
                           "-I", tmp_path / "out-stages")
    assert code != 0 and "stage 'soup'" in err and "another recipe" in err


def test_multi_stage_matches_mergekit_multi(zoo, tmp_path):
    models = zoo("llama")
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(two_stages(models))
    from mergekit.scripts.multimerge import main as mergekit_multi  # `mergekit-multi`, in process

    mergekit_multi.main([str(recipe), "--intermediate-dir", str(tmp_path / "mk-stages"),
                         "--out-path", str(tmp_path / "mk"), "--quiet"], standalone_mode=False)
    ours = mergesmith.merge(recipe, tmp_path / "ms", intermediate_dir=tmp_path / "ms-stages")
    for a, b in [(tmp_path / "mk-stages" / "soup", tmp_path / "ms-stages" / "soup"),
                 (tmp_path / "mk", ours)]:
        x, y = read_tensors(a), read_tensors(b)
        assert sorted(x) == sorted(y)
        for k in x:  # linear bitwise; SLERP within 2 ulps at the inputs' scale (test_parity)
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=2 * 2**-23 * float(x[k].abs().max() + 1e-3))


def test_a_stage_failing_leaves_earlier_stages_and_no_output(zoo, tmp_path):
    models = zoo("llama")
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(two_stages(models).replace("merge_method: slerp", "merge_method: slerp\n"
                                                 "tokenizer_source: nowhere"))
    with pytest.raises(MergesmithError, match="nowhere"):
        mergesmith.merge(recipe, tmp_path / "out")
    assert (tmp_path / "out-stages" / "soup" / "config.json").is_file()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("name: a\nmerge_method: linear\nmodels: [{model: x}]\n---\nname: a\nmerge_method: linear\n"
     "models: [{model: a}]\n", "multi.yaml:5: name: stage name 'a' is used twice"),
    ("merge_method: linear\nmodels: [{model: x}]\n---\nmerge_method: linear\nmodels: [{model: y}]\n",
     "multi.yaml:4: a second recipe without a name"),
    ("name: a\nmerge_method: linear\nmodels: [{model: b}]\n---\nname: b\nmerge_method: linear\n"
     "models: [{model: a}]\n---\nmerge_method: linear\nmodels: [{model: a}]\n", "use each other in a cycle"),
    ("name: a\nmerge_method: linear\nmodels: [{model: x}]\n---\nname: b\nmerge_method: linear\n"
     "models: [{modell: a}]\n", "multi.yaml:7: models[0].modell: unknown field"),
])
def test_multi_stage_recipe_errors(tmp_path, text, message):
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError) as info:
        mergesmith.merge(recipe, tmp_path / "out")
    assert message in info.value.message, info.value.message
    assert not (tmp_path / "out-stages").exists()


# ---------------------------------------------------------------------------------------------
# 4. modules: for multimodal models


TEXT = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "post_attention_layernorm", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"]
VISION = ["ffn_norm", "feed_forward.down_proj", "feed_forward.gate_proj", "feed_forward.up_proj",
          "attention_norm", "attention.k_proj", "attention.o_proj", "attention.q_proj", "attention.v_proj"]


def build_vl(folder: Path, seed: int, text_layers: int = 4, vision_layers: int = 2) -> Path:
    """A tiny Mistral3-style vision-language checkpoint with the tensor names mergekit's
    architecture file expects: `language_model.`, `vision_tower.`, `multi_modal_projector.`."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}

    def put(name, *shape):
        tensors[name] = torch.randn(shape, generator=g) * 0.02

    put("language_model.model.embed_tokens.weight", 96, 16)
    for i in range(text_layers):
        for n in TEXT:
            put(f"language_model.model.layers.{i}.{n}.weight", *((16,) if "norm" in n else (16, 16)))
    put("language_model.model.norm.weight", 16)
    put("language_model.lm_head.weight", 96, 16)
    for n, shape in [("linear_1", (16, 8)), ("linear_2", (16, 16)), ("norm", (8,)),
                     ("patch_merger.merging_layer", (8, 32))]:
        put(f"multi_modal_projector.{n}.weight", *shape)
    put("vision_tower.patch_conv.weight", 8, 3, 2, 2)
    put("vision_tower.ln_pre.weight", 8)
    for i in range(vision_layers):
        for n in VISION:
            put(f"vision_tower.transformer.layers.{i}.{n}.weight", *((8,) if "norm" in n else (8, 8)))
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
              "text_config": {"model_type": "mistral", "vocab_size": 96, "hidden_size": 16,
                              "intermediate_size": 16, "num_hidden_layers": text_layers,
                              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8},
              "vision_config": {"model_type": "pixtral", "hidden_size": 8, "intermediate_size": 8,
                                "num_hidden_layers": vision_layers, "num_attention_heads": 2,
                                "head_dim": 4, "patch_size": 2, "image_size": 8},
              "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    save_tokenizer(folder, default_tokens(96))
    return folder


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    return build_vl(root / "a", 1), build_vl(root / "b", 2)


MODULE_RECIPES = {
    # per-module weights (the README's example)
    "models": """merge_method: linear
modules:
  text_decoder:
    models:
      - model: A
        parameters: {weight: 0.7}
      - model: B
        parameters: {weight: 0.3}
  vision_tower:
    models: [{model: A}, {model: B}]
    parameters: {weight: 0.5}
  multi_modal_projector:
    models: [{model: A}]
    parameters: {weight: 1.0}
""",
    # a frankenmerge of the text decoder only; the output config counts 6 text layers
    "slices": """merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources: [{model: A, layer_range: [0, 3]}]
      - sources: [{model: B, layer_range: [1, 4]}]
  vision_tower:
    slices:
      - sources: [{model: B, layer_range: [0, 2]}]
  multi_modal_projector:
    models: [{model: A}]
""",
    # precedence: slice (gradient) over module over recipe
    "slerp": """merge_method: slerp
base_model: A
parameters: {t: 0.3}
modules:
  text_decoder:
    slices:
      - sources: [{model: A, layer_range: [0, 4]}, {model: B, layer_range: [0, 4]}]
        parameters: {t: [0, 1]}
  vision_tower:
    models: [{model: A}, {model: B}]
    parameters: {t: 0.8}
  multi_modal_projector:
    models: [{model: A}, {model: B}]
""",
}


@pytest.mark.parametrize("form", list(MODULE_RECIPES))
def test_modules_match_mergekit(vl, tmp_path, form):
    a, b = vl
    text = MODULE_RECIPES[form].replace("model: A", f"model: {a}").replace("model: B", f"model: {b}")
    theirs, ours = merge_both(tmp_path, text.replace("base_model: A", f"base_model: {a}"))
    x, y = read_tensors(theirs), read_tensors(ours)
    assert sorted(x) == sorted(y)
    for k in x:
        if form == "slerp":  # fp32 SLERP: within 2 ulps at the inputs' scale (test_parity)
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=2 * 2**-23 * 0.1)
        else:
            assert torch.equal(x[k], y[k]), k
    cx, cy = (json.loads((f / "config.json").read_text()) for f in (theirs, ours))
    for part in ("text_config", "vision_config"):
        assert cx[part]["num_hidden_layers"] == cy[part]["num_hidden_layers"]
    if form == "slices":
        assert cy["text_config"]["num_hidden_layers"] == 6
        assert torch.equal(y["language_model.model.layers.3.mlp.up_proj.weight"],
                           read_tensors(b)["language_model.model.layers.1.mlp.up_proj.weight"])
    if form == "models":
        name = "vision_tower.transformer.layers.1.attention.q_proj.weight"
        torch.testing.assert_close(y[name], 0.5 * read_tensors(a)[name] + 0.5 * read_tensors(b)[name])


def test_a_module_left_out_is_an_error(vl, tmp_path):
    """mergekit writes a model without the module's tensors; mergesmith says which are missing."""
    a, b = vl
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodules:\n  text_decoder:\n    models: [{{model: {a}}}, {{model: {b}}}]\n")
    with pytest.raises(PlanError) as info:
        mergesmith.plan(recipe)
    assert info.value.message.startswith(f"{recipe}:2: modules: ")
    assert "belong to no module listed" in info.value.message
    recipe.write_text(f"merge_method: linear\nmodules:\n  audio_tower:\n    models: [{{model: {a}}}]\n")
    with pytest.raises(PlanError, match=r":3: modules.audio_tower: .* has no module 'audio_tower'"):
        mergesmith.plan(recipe)


def test_check_a_multi_stage_recipe(zoo, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(two_stages(zoo("llama")))
    code, out, err = run_cli(monkeypatch, capsys, "check", recipe)
    assert code == 0, err
    assert "stage 'soup': linear, 2 model(s)" in out and "final stage: valid; uses 'soup'" in out
    assert not list(tmp_path.glob("*stages*"))  # check writes nothing
