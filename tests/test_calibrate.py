"""calibrate/: data, forward passes, statistics (Gram, Fisher, act_sq), stores, RegMean++ Grams.

Every statistic is checked against a computation that does not use calibrate/: inputs captured
with our own hook on a model loaded by transformers, gradients from torch.autograd.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mergesmith.calibrate import (CalibrationModel, collect, collect_groups, ensure_statistics, fingerprint,
                                  load_examples, read_statistics, store_path, write_store)
from mergesmith.calibrate import store as store_module
from mergesmith.calibrate.sequential import collect_sequential_grams, repeated_blocks
from mergesmith.errors import CalibrationError
from mergesmith.io import Checkpoint
from mergesmith.recipe import Calibration

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [" ".join(f"w{(7 * i + 3 * j) % 90}" for j in range(2 + (5 * i) % 9)) for i in range(12)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("calibration")
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n\n")
    rows = [{"sentence": t, "label": ["neg", "pos"][i % 2]} for i, t in enumerate(TEXTS)]
    (root / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cal(**settings) -> Calibration:
    return Calibration(**{"data": "texts.txt", "batch_size": 4, **settings})


def _load(folder: Path, cls=None) -> torch.nn.Module:
    import transformers as tf

    from mergesmith.calibrate.forward import quiet_transformers

    with quiet_transformers():
        return (cls or tf.AutoModelForCausalLM).from_pretrained(folder, dtype=torch.float32).eval()


def _captured_inputs(model: torch.nn.Module, module_name: str, texts: list[str], tokenizer) -> torch.Tensor:
    """The rows a layer receives, one text at a time (no padding anywhere), stacked."""
    rows = []
    handle = model.get_submodule(module_name).register_forward_hook(
        lambda m, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).detach()))
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            model(input_ids=ids)
    handle.remove()
    return torch.cat(rows)


# ---- Gram and act_sq -------------------------------------------------------------------------

@pytest.mark.parametrize("arch, layers", [
    ("llama", ["model.layers.1.self_attn.k_proj", "model.layers.2.mlp.down_proj", "lm_head"]),
    ("gpt2", ["transformer.h.0.attn.c_attn", "transformer.h.3.mlp.c_proj"]),  # Conv1D, weight [in, out]
])
def test_gram_is_the_mean_outer_product_of_real_token_inputs(zoo, data, arch, layers):
    from transformers import AutoTokenizer

    folder = zoo(arch)["e1"]
    cal = _cal()
    examples = load_examples(cal, data)
    stats = collect(folder, examples, cal, data, kinds=["gram", "act_sq"])  # batches of 4, padded
    model, tokenizer = _load(folder), AutoTokenizer.from_pretrained(folder)
    for name in layers:
        x = _captured_inputs(model, name, [e.text for e in examples], tokenizer)
        assert x.shape[0] == sum(len(tokenizer(e.text)["input_ids"]) for e in examples)
        gram = stats[f"{name}.weight::gram"]
        torch.testing.assert_close(gram, x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[f"{name}.weight::act_sq"], x.square().mean(0), rtol=1e-5, atol=1e-6)
    assert stats[f"{layers[0]}.weight::gram"].dtype == torch.float32


def test_padding_does_not_change_the_gram(zoo, data):
    folder = zoo("llama")["e1"]
    examples = load_examples(_cal(), data)
    padded = collect(folder, examples, _cal(batch_size=5), data, kinds=["gram"])
    single = collect(folder, examples, _cal(batch_size=1), data, kinds=["gram"])
    assert padded.keys() == single.keys()
    for key in padded:
        torch.testing.assert_close(padded[key], single[key], rtol=1e-5, atol=1e-6)


def test_grouped_collection_equals_one_pass(zoo, data):
    folder = zoo("llama")["e1"]
    cal = _cal(samples=4)
    examples = load_examples(cal, data)
    model = CalibrationModel.load(folder, cal, data)
    whole = list(collect_groups(model, examples, kinds=["gram", "act_sq", "fisher"]))
    pieces = list(collect_groups(model, examples, kinds=["gram", "act_sq", "fisher"], max_stats_bytes=6000))
    assert len(whole) == 2 and len(pieces) > 10  # one forward group + one Fisher group, or many
    merged_whole = {k: v for group in whole for k, v in group.items()}
    merged_pieces = {k: v for group in pieces for k, v in group.items()}
    assert merged_whole.keys() == merged_pieces.keys()
    for key in merged_whole:
        torch.testing.assert_close(merged_pieces[key], merged_whole[key], rtol=1e-6, atol=1e-7)


def test_tied_head_and_fresh_pooler_have_no_statistics(zoo, data, tmp_path):
    gemma = zoo("gemma")["e1"]  # lm_head tied to the embeddings: no tensor of its own
    stats = collect(gemma, load_examples(_cal(samples=3), data), _cal(samples=3), data, kinds=["gram"])
    assert not any(key.startswith("lm_head") for key in stats)
    assert "model.layers.0.mlp.down_proj.weight::gram" in stats
    bert = zoo("bert")["e1"]
    model = CalibrationModel.load(bert, _cal(head=str(_head(tmp_path, 2))), data)
    # AutoModel drops the masked-LM folder's `bert.` prefix; its pooler is not in the files
    assert model.checkpoint_name("encoder.layer.0.attention.self.query.weight") == \
        "bert.encoder.layer.0.attention.self.query.weight"
    assert model.checkpoint_name("pooler.dense.weight") is None
    assert "bert.pooler.dense.weight" not in model.parameters()


# ---- Fisher ----------------------------------------------------------------------------------

def test_fisher_of_a_causal_lm_is_the_mean_squared_per_text_gradient(zoo, data):
    from transformers import AutoTokenizer

    folder = zoo("llama")["e1"]
    cal = _cal(samples=5)
    examples = load_examples(cal, data)
    stats = collect(folder, examples, cal, data, kinds=["fisher"])
    model, tokenizer = _load(folder), AutoTokenizer.from_pretrained(folder)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        param = model.get_parameter(name)
        squares = []
        for example in examples:
            ids = torch.tensor([tokenizer(example.text)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            loglik = -F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            (grad,) = torch.autograd.grad(loglik, param)
            squares.append(grad.square())
        expected = torch.stack(squares).mean(0)
        torch.testing.assert_close(stats[f"{name}::fisher"], expected, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("labelled", [True, False])
def test_fisher_with_a_head_uses_labels_or_the_models_prediction(zoo, data, tmp_path, labelled):
    from transformers import AutoModel, AutoTokenizer

    from mergesmith.calibrate.forward import mean_pool

    folder = zoo("bert")["e1"]
    head = _head(tmp_path, 2)
    cal = Calibration(data="labelled.jsonl", text_field="sentence", label_field="label" if labelled else None,
                      labels=["neg", "pos"], head=str(head), samples=6, batch_size=3)
    examples = load_examples(cal, data)
    stats = collect(folder, examples, cal, data, kinds=["fisher"])
    encoder, tokenizer = _load(folder, AutoModel), AutoTokenizer.from_pretrained(folder)
    weight, bias = (t for t in _read_head(head))
    name = "encoder.layer.1.output.dense.weight"
    squares = []
    for example in examples:
        ids = torch.tensor([tokenizer(example.text)["input_ids"]])
        mask = torch.ones_like(ids)
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = mean_pool(hidden, mask) @ weight.T + bias
        target = TEXTS.index(example.text) % 2 if labelled else int(logits.argmax())
        (grad,) = torch.autograd.grad(logits.log_softmax(-1)[0, target], encoder.get_parameter(name))
        squares.append(grad.square())
    expected = torch.stack(squares).mean(0)
    torch.testing.assert_close(stats[f"bert.{name}::fisher"], expected, rtol=1e-4, atol=1e-12)


def _head(folder: Path, classes: int, hidden: int = 32) -> Path:
    path = folder / f"head-{classes}x{hidden}.safetensors"
    generator = torch.Generator().manual_seed(classes * 1000 + hidden)
    save_file({"weight": torch.randn(classes, hidden, generator=generator),
               "bias": torch.randn(classes, generator=generator)}, str(path))
    return path


def _read_head(path: Path):
    from safetensors.torch import load_file

    tensors = load_file(path)
    return tensors["weight"], tensors["bias"]



def test_a_sequence_classifier_uses_its_own_head_and_pooled_inputs(data, tmp_path):
    """BERT's classifier sees one pooled row per example: its Gram is over examples."""
    import transformers as tf

    from mergesmith.toy import default_tokens, save_tokenizer, tiny_config

    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 2
    config.architectures = ["BertForSequenceClassification"]
    folder = tmp_path / "classifier"
    tf.BertForSequenceClassification(config).save_pretrained(folder)
    save_tokenizer(folder, default_tokens())
    cal = Calibration(data="labelled.jsonl", text_field="sentence", label_field="label", labels=["neg", "pos"],
                      samples=5, batch_size=2)
    examples = load_examples(cal, data)
    model = CalibrationModel.load(folder, cal, data)
    assert model.objective == "sequence" and model.num_classes == 2
    stats = collect(folder, examples, cal, data, kinds=["gram", "fisher"], progress=True)
    reference = _load(folder, tf.AutoModelForSequenceClassification)
    pooled = _captured_inputs(reference, "classifier", [e.text for e in examples],
                              tf.AutoTokenizer.from_pretrained(folder))
    assert pooled.shape == (5, 32)
    torch.testing.assert_close(stats["classifier.weight::gram"], pooled.T @ pooled / 5, rtol=1e-5, atol=1e-6)
    assert stats["classifier.bias::fisher"].shape == (2,) and stats["classifier.bias::fisher"].sum() > 0


def test_a_local_dataset_folder_loads_through_datasets(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # not the user's
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    examples = load_examples(Calibration(dataset=str(tmp_path / "set"), samples=3, seed=1), tmp_path)
    assert len(examples) == 3 and all(e.text in TEXTS for e in examples)
    assert "row" in examples[0].where
    with pytest.raises(CalibrationError, match=r"dataset .* \(split 'test'\): cannot be loaded"):
        load_examples(Calibration(dataset=str(tmp_path / "set"), split="test"), tmp_path)


# ---- forward: logits and differentiable parameters -------------------------------------------

def test_logits_with_params_equal_logits_of_a_model_holding_them(zoo, data):
    family = zoo("llama")
    cal = _cal(samples=4)
    examples = load_examples(cal, data)
    base = CalibrationModel.load(family["base"], cal, data)
    expert = CalibrationModel.load(family["e2"], cal, data)
    batch = base.batches(examples)[0]
    params = {name: p.detach().clone().requires_grad_(True) for name, p in expert.parameters().items()}
    logits = base.logits(batch, params)
    torch.testing.assert_close(logits, expert.logits(expert.batches(examples)[0]), rtol=1e-5, atol=1e-5)
    assert logits.shape == (int(batch.inputs["attention_mask"][:, 1:].sum()), 96)
    logits.logsumexp(-1).sum().backward()
    assert params["model.layers.0.self_attn.q_proj.weight"].grad.abs().sum() > 0
    assert all(p.grad is None for p in base.module.parameters())


# ---- stores ----------------------------------------------------------------------------------

def test_store_round_trip_is_bit_identical(tmp_path):
    tensors = {"a.weight::gram": torch.randn(5, 5), "b::fisher": torch.rand(3, 2).double().float()}
    path = write_store(tmp_path / "store", tensors, {"model": "x"})
    back = read_statistics(path)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert Checkpoint(path).config["mergesmith_statistics"] == 1


def test_ensure_statistics_collects_once_then_reuses(zoo, data, tmp_path, monkeypatch):
    folder = zoo("gpt2")["e1"]
    cal = _cal(samples=6)
    path = ensure_statistics(folder, cal, data, ["gram", "fisher"], cache=tmp_path, max_stats_bytes=20_000)
    store = Checkpoint(path)
    assert (path / "model.safetensors.index.json").is_file()  # several groups: one shard each
    assert store.config["kinds"] == ["gram", "fisher"] and store.config["examples"] == 6
    assert store.config["tokens"] == sum(len(e.text.split()) for e in load_examples(cal, data))  # word-level
    expected = collect(folder, load_examples(cal, data), cal, data, kinds=["gram", "fisher"])
    back = read_statistics(path)
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    stamp = (path / "config.json").stat().st_mtime_ns

    def no_collection(*args, **kwargs):
        raise AssertionError("statistics collected again")

    monkeypatch.setattr(store_module, "collect_groups", no_collection)
    assert ensure_statistics(folder, cal, data, ["fisher", "gram"], cache=tmp_path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp


def test_the_store_path_follows_data_settings_kinds_and_model(zoo, data, tmp_path):
    family = zoo("gpt2")
    path = store_path(tmp_path, family["e1"], _cal(), data, ["gram"])
    assert store_path(tmp_path, family["e1"], _cal(), data, ["gram"]) == path
    assert store_path(tmp_path, family["e1"], _cal(cache="elsewhere"), data, ["gram"]) == path
    for other in (store_path(tmp_path, family["e1"], _cal(samples=5), data, ["gram"]),
                  store_path(tmp_path, family["e1"], _cal(max_length=16), data, ["gram"]),
                  store_path(tmp_path, family["e1"], _cal(), data, ["gram", "fisher"]),
                  store_path(tmp_path, family["e1"], _cal(), data, ["gram"], torch.bfloat16),
                  store_path(tmp_path, family["e2"], _cal(), data, ["gram"])):
        assert other != path
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "texts.txt").write_text((data / "texts.txt").read_text())
    assert fingerprint(_cal(), copy) == fingerprint(_cal(), data)
    (copy / "texts.txt").write_text((data / "texts.txt").read_text() + "w1 w2\n")
    assert store_path(tmp_path, family["e1"], _cal(), copy, ["gram"]) != path


def test_an_interrupted_collection_leaves_no_store(zoo, data, tmp_path, monkeypatch):
    folder = zoo("gpt2")["e1"]
    cal = _cal(samples=4)
    real = store_module.collect_groups

    def killed_after_one_group(*args, **kwargs):
        groups = real(*args, **kwargs)
        yield next(groups)
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "collect_groups", killed_after_one_group)
    with pytest.raises(KeyboardInterrupt):
        ensure_statistics(folder, cal, data, ["gram"], cache=tmp_path, max_stats_bytes=20_000)
    assert list(tmp_path.iterdir()) == []
    # a process killed outright leaves its temporary folder, which never looks like a store
    path = store_path(tmp_path, folder, cal, data, ["gram"])
    abandoned = path.parent / f".{path.name}.partial-999999999"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"")
    assert not path.exists()
    monkeypatch.setattr(store_module, "collect_groups", real)
    assert ensure_statistics(folder, cal, data, ["gram"], cache=tmp_path) == path
    assert not abandoned.exists() and Checkpoint(path).config["kinds"] == ["gram"]


def test_default_cache_is_relative_to_the_recipe_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESMITH_CACHE", str(tmp_path / "env"))
    assert store_module.default_cache(_cal(), tmp_path) == tmp_path / "env" / "statistics"
    assert store_module.default_cache(_cal(cache="stats"), tmp_path) == (tmp_path / "stats").resolve()


# ---- data ------------------------------------------------------------------------------------

def test_examples_are_drawn_with_the_seed_in_file_order(data, tmp_path):
    every = load_examples(_cal(samples=100), data)
    assert [e.text for e in every] == TEXTS  # blank lines skipped, all kept when fewer
    drawn = load_examples(_cal(samples=5, seed=3), data)
    assert drawn == load_examples(_cal(samples=5, seed=3), data)
    assert drawn != load_examples(_cal(samples=5, seed=4), data)
    assert [TEXTS.index(e.text) for e in drawn] == sorted(TEXTS.index(e.text) for e in drawn)
    labelled = load_examples(Calibration(data="labelled.jsonl", text_field="sentence", label_field="label",
                                         labels=["neg", "pos"]), data)
    assert [e.label for e in labelled] == [i % 2 for i in range(len(TEXTS))]
    (tmp_path / "rows.csv").write_text('text,label\n"a, quoted\nline",1\nplain,0\n')
    rows = load_examples(Calibration(data="rows.csv", label_field="label"), tmp_path)
    assert [(e.text, e.label) for e in rows] == [("a, quoted\nline", 1), ("plain", 0)]
    import pandas as pd

    pd.DataFrame({"text": ["x", "y"], "label": ["pos", "neg"]}).to_parquet(tmp_path / "rows.parquet")
    named = Calibration(data="rows.parquet", label_field="label", labels=["neg", "pos"])
    rows = load_examples(named, tmp_path)
    assert [(e.text, e.label) for e in rows] == [("x", 1), ("y", 0)]


@pytest.mark.parametrize("name, content, settings, message", [
    ("empty.txt", "\n  \n", {}, r"empty.txt: no examples"),
    ("missing.txt", None, {}, r"missing.txt: no such calibration file"),
    ("data.tsv", "a\tb\n", {}, r"data.tsv: unknown calibration file type '.tsv'"),
    ("bad.jsonl", '{"text": "w1"}\n{"text": \n', {}, r"bad.jsonl:2: not valid JSON"),
    ("field.jsonl", '{"text": "w1"}\n{"body": "w2"}\n', {}, r"field.jsonl:2: no field 'text'"),
    ("label.jsonl", '{"text": "w1"}\n', {"label_field": "label"}, r"label.jsonl:1: no field 'label'"),
    ("name.jsonl", '{"text": "w1", "label": "maybe"}\n', {"label_field": "label", "labels": ["no", "yes"]},
     r"name.jsonl:1: label: 'maybe' is not one of the labels"),
    ("text.jsonl", '{"text": "w1", "label": "yes"}\n', {"label_field": "label"},
     r"text.jsonl:1: label: expected a class index or a label name"),
])
def test_bad_calibration_data_is_named(tmp_path, name, content, settings, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(CalibrationError, match=message):
        load_examples(Calibration(data=name, **settings), tmp_path)


def test_texts_beyond_the_models_context_are_errors(zoo, data, tmp_path):
    folder = zoo("llama")["e1"]  # 64 positions
    (tmp_path / "long.txt").write_text("w1 w2\n" + " ".join(["w3"] * 70) + "\n")
    cal = Calibration(data="long.txt")
    model = CalibrationModel.load(folder, cal, tmp_path)
    with pytest.raises(CalibrationError, match=r"long.txt:2: the text is 70 tokens long, .* at most 64"):
        model.batches(load_examples(cal, tmp_path))
    cut = Calibration(data="long.txt", max_length=16)
    batches = CalibrationModel.load(folder, cut, tmp_path).batches(load_examples(cut, tmp_path))
    assert max(b.inputs["input_ids"].shape[1] for b in batches) == 16
    with pytest.raises(CalibrationError, match=r"max_length: 100 is beyond .*'s context of 64 tokens"):
        CalibrationModel.load(folder, Calibration(data="long.txt", max_length=100), tmp_path)


def test_a_head_that_does_not_fit_is_an_error(zoo, data, tmp_path):
    folder = zoo("bert")["e1"]  # hidden size 32
    with pytest.raises(CalibrationError, match=r"head-2x16.safetensors: weight has 16 columns, .* is 32"):
        CalibrationModel.load(folder, _cal(head=str(_head(tmp_path, 2, hidden=16))), data)
    with pytest.raises(CalibrationError, match=r"do not match 3 labels"):
        CalibrationModel.load(folder, _cal(head=str(_head(tmp_path, 2)), labels=["a", "b", "c"]), data)
    with pytest.raises(CalibrationError, match=r"BertForMaskedLM has no causal-LM .*\(hint: give `head"):
        CalibrationModel.load(folder, _cal(), data)  # a masked LM has no causal-LM head


# ---- RegMean++ -------------------------------------------------------------------------------

def test_regmean_plus_plus_grams_see_the_merged_blocks(zoo, data):
    from transformers import AutoTokenizer

    family = zoo("llama")
    experts = [family["e1"], family["e2"]]
    cals = [_cal(samples=4, seed=0), _cal(samples=4, seed=1)]
    examples = [load_examples(cal, data) for cal in cals]
    checkpoints = [Checkpoint(folder) for folder in experts]
    merged_blocks: dict[int, dict[str, torch.Tensor]] = {}

    def average(layer, grams):
        assert len(grams) == 2 and all(f"model.layers.{layer}.mlp.up_proj.weight::gram" in g for g in grams)
        names = [n for n in checkpoints[0].tensors if n.startswith(f"model.layers.{layer}.")]
        merged_blocks[layer] = {n: (checkpoints[0].read(n) + checkpoints[1].read(n)) / 2 for n in names}
        return merged_blocks[layer]

    plus = collect_sequential_grams(experts, examples, cals, data, merge_block=average)
    assert sorted(merged_blocks) == [0, 1, 2, 3]
    for i, folder in enumerate(experts):
        plain = collect(folder, examples[i], cals[i], data, kinds=["gram"])
        assert plus[i].keys() == plain.keys()
        for key in plain:
            if key.startswith("model.layers.0.") or key.startswith("lm_head"):
                torch.testing.assert_close(plus[i][key], plain[key], rtol=1e-5, atol=1e-6)
        key = "model.layers.1.self_attn.q_proj.weight::gram"
        assert not torch.allclose(plus[i][key], plain[key], rtol=1e-3, atol=1e-4)
        # by hand: expert i with block 0 replaced by the merged block 0
        model = _load(folder)
        model.load_state_dict(merged_blocks[0], strict=False)
        x = _captured_inputs(model, "model.layers.1.self_attn.q_proj", [e.text for e in examples[i]],
                             AutoTokenizer.from_pretrained(folder))
        torch.testing.assert_close(plus[i][key], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)


def test_repeated_blocks_are_found_in_every_family(zoo):
    import transformers as tf

    expected = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer"}
    for arch, name in expected.items():
        model = tf.AutoModelForMaskedLM if arch == "bert" else tf.AutoModelForCausalLM
        assert repeated_blocks(_load(zoo(arch)["e1"], model)) == (name, 4)



def test_regmean_plus_plus_stores_merge_each_block_as_the_recipe_says(zoo, data, tmp_path):
    """End to end: the engine merges block 0 with RegMean (alpha 0.5) from RegMean's own Grams;
    block 1's Grams are then those of the experts with that merged block 0, by hand."""
    from transformers import AutoTokenizer

    from mergesmith.calibrate.sequential import sequential_statistics
    from mergesmith.recipe import load_recipe

    family = zoo("llama")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps({
        "merge_method": "regmean_plusplus", "base_model": str(family["base"]),
        "models": [{"model": str(family["e1"])}, {"model": str(family["e2"])}],
        "parameters": {"alpha": 0.5},
        "calibration": {"data": str(data / "texts.txt"), "samples": 5, "batch_size": 2, "cache": "stats"}}))
    recipe = load_recipe(recipe_file)
    cal = recipe.calibration
    experts = [family["e1"], family["e2"]]
    stores = sequential_statistics(recipe, family["base"], {str(f): f for f in experts}, [cal, cal], tmp_path)
    assert all(path.parent.parent == tmp_path / "stats" / "regmean_plusplus" for path in stores.values())
    grams = [read_statistics(stores[str(f)]) for f in experts]
    examples = load_examples(cal, tmp_path)
    plain = [collect(f, examples, cal, tmp_path, kinds=["gram"]) for f in experts]
    for mine, theirs in zip(grams, plain):
        assert mine.keys() == theirs.keys()
        for key in (k for k in theirs if k.startswith("model.layers.0.")):
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)

    checkpoints = [Checkpoint(f) for f in experts]
    block0 = {}
    for name in (n for n in checkpoints[0].tensors if n.startswith("model.layers.0.")):
        weights = [ck.read(name).double() for ck in checkpoints]
        if name.endswith("proj.weight"):  # Wᵀ = (Σ Gi')⁻¹ Σ Gi' Wiᵀ, Gi' = α Gi + (1 − α) diag(Gi)
            grams_0 = [p[f"{name}::gram"].double() for p in plain]
            scaled = [0.5 * g + 0.5 * torch.diag(g.diagonal()) for g in grams_0]
            rhs = sum(g @ w.T for g, w in zip(scaled, weights))
            block0[name] = torch.linalg.solve(sum(scaled), rhs).T.float()
        else:
            block0[name] = (sum(weights) / 2).float()
    key = "model.layers.1.mlp.gate_proj.weight::gram"
    for folder, mine in zip(experts, grams):
        model = _load(folder)
        model.load_state_dict(block0, strict=False)
        x = _captured_inputs(model, "model.layers.1.mlp.gate_proj", [e.text for e in examples],
                             AutoTokenizer.from_pretrained(folder))
        torch.testing.assert_close(mine[key], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(mine[key], plain[experts.index(folder)][key], rtol=1e-3, atol=1e-4)
    again = sequential_statistics(recipe, family["base"], {str(f): f for f in experts}, [cal, cal], tmp_path)
    assert again == stores
