"""Data-aware merges end to end: recipe with a calibration: section -> statistics or learning ->
the engine's streamed merge. The maths of each method is tested on tensors in test_curvature.py
and test_adaptive.py; here, that the pieces meet: the right statistics reach the right tensors,
stores are reused bit for bit, learned coefficients land in the written model, and bad
calibration input stops the merge with a clear error before anything looks complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, read_tensors, run_cli, write_recipe

import mergesmith
from mergesmith.calibrate.store import read_statistics
from mergesmith.errors import MergesmithError
from mergesmith.methods import fisher, regmean

WORDS = [f"w{i}" for i in range(2, 60)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-aware")
    base = build_model(root / "base", "llama", seed=0, layers=2)
    experts = [build_model(root / f"e{i}", "llama", seed=i, base=base, layers=2) for i in (1, 2)]
    data = []
    for i in (1, 2):
        gen = torch.Generator().manual_seed(i)
        lines = [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (int(n),), generator=gen))
                 for n in torch.randint(3, 12, (12,), generator=gen)]
        path = root / f"task{i}.txt"
        path.write_text("\n".join(lines) + "\n")
        data.append(path)
    return {"root": root, "base": base, "experts": experts, "data": data}


def data_recipe(models, tmp_path, method, **parameters):
    recipe = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(e), "calibration": {"data": str(d)}}
                   for e, d in zip(models["experts"], models["data"])],
        "calibration": {"samples": 8, "max_length": 16, "batch_size": 4,
                        "cache": str(tmp_path / "cache")},
        "dtype": "float32",
    }
    if parameters:
        recipe["parameters"] = parameters
    return write_recipe(tmp_path / f"{method}.yaml", recipe)


def stores_of(tmp_path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").iterdir() if (p / "config.json").is_file())


def test_fisher_merge_uses_each_experts_own_statistics(models, tmp_path):
    out = read_tensors(mergesmith.merge(data_recipe(models, tmp_path, "fisher"), tmp_path / "out"))
    stores = {json.loads((p / "config.json").read_text())["model"]: read_statistics(p)
              for p in stores_of(tmp_path)}
    assert len(stores) == 2
    experts = [read_tensors(e) for e in models["experts"]]
    stats = [stores[next(k for k in stores if Path(k).name == e.name)] for e in models["experts"]]
    for name in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        f = [s[f"{name}::fisher"] for s in stats]
        expected = fisher(None, [x[name] for x in experts], fisher=f, weights=[1.0, 1.0])
        assert torch.equal(out[name], expected), name
        # and not plain averaging: the statistics made a difference
        assert not torch.allclose(out[name], (experts[0][name] + experts[1][name]) / 2)


def test_fisher_row_chunks_change_nothing(models, tmp_path):
    recipe = data_recipe(models, tmp_path, "fisher")
    whole = read_tensors(mergesmith.merge(recipe, tmp_path / "whole"))
    chunked = read_tensors(mergesmith.merge(recipe, tmp_path / "chunked", chunk_size="1KiB"))
    assert whole.keys() == chunked.keys()
    assert all(torch.equal(whole[n], chunked[n]) for n in whole)


def test_regmean_solves_linear_layers_and_averages_the_rest(models, tmp_path):
    out = read_tensors(mergesmith.merge(data_recipe(models, tmp_path, "regmean", alpha=1.0),
                                        tmp_path / "out"))
    experts = [read_tensors(e) for e in models["experts"]]
    stores = [read_statistics(p) for p in stores_of(tmp_path)]
    names = [json.loads((p / "config.json").read_text())["model"] for p in stores_of(tmp_path)]
    grams = [stores[[Path(n).name for n in names].index(e.name)] for e in models["experts"]]
    name = "model.layers.1.self_attn.q_proj.weight"
    g = [s[f"{name}::gram"].double() for s in grams]
    w = [x[name].double() for x in experts]
    expected = torch.linalg.solve(g[0] + g[1], g[0] @ w[0].T + g[1] @ w[1].T).T
    torch.testing.assert_close(out[name].double(), expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(regmean(None, [x[name] for x in experts], gram=[s[f"{name}::gram"] for s in grams],
                               weights=[1.0, 1.0], alpha=1.0, fallback="linear"), out[name])
    norm = "model.layers.1.input_layernorm.weight"  # no Gram: the named fallback (an average)
    torch.testing.assert_close(out[norm], (experts[0][norm] + experts[1][norm]) / 2)


def test_statistics_are_reused_and_give_identical_bytes(models, tmp_path):
    recipe = data_recipe(models, tmp_path, "regmean")
    first = mergesmith.merge(recipe, tmp_path / "a")
    stamps = {p: (p / "model.safetensors").stat().st_mtime_ns for p in stores_of(tmp_path)}
    second = mergesmith.merge(recipe, tmp_path / "b")
    assert {p: (p / "model.safetensors").stat().st_mtime_ns for p in stores_of(tmp_path)} == stamps
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    for store in stores_of(tmp_path):  # collected afresh: the same statistics, the same merge
        import shutil
        shutil.rmtree(store)
    third = mergesmith.merge(recipe, tmp_path / "c")
    assert (first / "model.safetensors").read_bytes() == (third / "model.safetensors").read_bytes()


def test_ota_reads_the_experts_optimizer_state(models, tmp_path):
    from safetensors.torch import save_file

    from mergesmith.methods import ota

    root = tmp_path / "models"
    base = build_model(root / "base", "llama", seed=0, layers=1)
    experts = [build_model(root / f"e{i}", "llama", seed=i, base=base, layers=1) for i in (1, 2)]
    loaded = [read_tensors(f) for f in (base, *experts)]  # before the moments join the folders
    moments = []
    for i, folder in enumerate(experts):
        tensors = loaded[1 + i]
        gen = torch.Generator().manual_seed(10 + i)
        moments.append({n: torch.rand(t.shape, generator=gen) for n, t in tensors.items()})
        save_file(moments[-1], folder / "optimizer_second_moments.safetensors")
    path = write_recipe(tmp_path / "ota.yaml", {
        "merge_method": "ota", "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(e)} for e in experts],
        "calibration": {"cache": str(tmp_path / "cache")}})
    out = read_tensors(mergesmith.merge(path, tmp_path / "out"))
    name = "model.layers.0.mlp.down_proj.weight"
    expected = ota(loaded[0][name], [x[name] for x in loaded[1:]], weights=[1.0, 1.0],
                   second_moment=[m[name] for m in moments])
    assert torch.equal(out[name], expected)


def test_missing_optimizer_state_is_a_clear_error(models, tmp_path):
    path = write_recipe(tmp_path / "ota.yaml", {
        "merge_method": "ota", "base_model": str(models["base"]),
        "models": [{"model": str(e)} for e in models["experts"]],
        "calibration": {"cache": str(tmp_path / "cache")}})
    with pytest.raises(MergesmithError, match="second moment|optimizer"):
        mergesmith.merge(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem, message", [
    ("no_section", "learns from data"),
    ("empty_file", "empty"),
    ("too_long", "max_length"),
    ("missing_file", "not found|no such|missing|does not exist"),
])
def test_bad_calibration_input_stops_before_anything_is_written(models, tmp_path, problem, message):
    recipe = {
        "merge_method": "regmean", "base_model": str(models["base"]),
        "models": [{"model": str(e)} for e in models["experts"]],
        "calibration": {"data": str(models["data"][0]), "cache": str(tmp_path / "cache")},
    }
    if problem == "no_section":
        del recipe["calibration"]
    elif problem == "empty_file":
        (tmp_path / "empty.txt").write_text("")
        recipe["calibration"]["data"] = str(tmp_path / "empty.txt")
    elif problem == "too_long":
        recipe["calibration"]["max_length"] = 1000  # the tiny models hold 64 positions
    else:
        recipe["calibration"]["data"] = str(tmp_path / "nowhere.jsonl")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(MergesmithError, match=message):
        mergesmith.merge(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_engine_alone_refuses_statistics_methods_without_statistics(models, tmp_path):
    from mergesmith.engine.api import plan

    with pytest.raises(MergesmithError, match="statistics"):
        plan(data_recipe(models, tmp_path, "fisher"))


def test_cli_merges_with_data_and_lists_what_methods_need(models, tmp_path, monkeypatch, capsys):
    recipe = data_recipe(models, tmp_path, "fisher")
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(recipe), str(tmp_path / "out"), "--quiet")
    assert code == 0, err
    # the recipe's method with its statistics, not the plain average `check` plans with
    cli, api = read_tensors(tmp_path / "out"), read_tensors(mergesmith.merge(recipe, tmp_path / "api"))
    assert all(torch.equal(cli[n], api[n]) for n in api)
    average = read_tensors(models["experts"][0])
    name = "model.layers.0.mlp.up_proj.weight"
    other = read_tensors(models["experts"][1])
    assert not torch.allclose(cli[name], (average[name] + other[name]) / 2)
    code, out, _ = run_cli(monkeypatch, capsys, "methods")
    assert code == 0
    assert "needs data" in out and "adamerging" in out and "regmean" in out
    code, out, err = run_cli(monkeypatch, capsys, "check", str(data_recipe(models, tmp_path, "fisher")))
    assert code == 0, err
    assert "fisher" in out


# --- learned merges: a BERT encoder under frozen task heads, as in the demo -------------------


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("heads")
    base = build_model(root / "base", "bert", seed=0, layers=2)
    experts = [build_model(root / f"e{i}", "bert", seed=i, base=base, layers=2, delta=0.05)
               for i in (1, 2)]
    tasks = []
    for i in (1, 2):
        gen = torch.Generator().manual_seed(20 + i)
        head = {"weight": torch.randn(3, 32, generator=gen), "bias": torch.zeros(3)}
        save_file(head, root / f"head{i}.safetensors")
        rows = [{"text": " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (6,), generator=gen)),
                 "label": int(torch.randint(0, 3, (1,), generator=gen))} for _ in range(16)]
        (root / f"train{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks.append({"data": str(root / f"train{i}.jsonl"), "head": str(root / f"head{i}.safetensors"),
                      "label_field": "label"})
    return {"base": base, "experts": experts, "tasks": tasks}


def learned_recipe(heads, tmp_path, method, **parameters):
    return write_recipe(tmp_path / f"{method}.yaml", {
        "merge_method": method, "base_model": str(heads["base"]), "dtype": "float32",
        "models": [{"model": str(e), "calibration": t} for e, t in zip(heads["experts"], heads["tasks"])],
        "calibration": {"samples": 16, "max_length": 16, "batch_size": 8,
                        "cache": str(tmp_path / "cache")},
        "parameters": parameters})


def test_adamerging_writes_its_learned_coefficients(heads, tmp_path):
    recipe = learned_recipe(heads, tmp_path, "adamerging", granularity="layer", steps=5, lr=0.05)
    folder = mergesmith.merge(recipe, tmp_path / "out")
    learned = json.loads((folder / "learned.json").read_text())
    assert learned["losses"][-1] < learned["losses"][0]
    weights = learned["weights"]
    assert all(0.0 <= w <= 1.0 for ws in weights.values() for w in ws)
    out = read_tensors(folder)
    base = read_tensors(heads["base"])
    experts = [read_tensors(e) for e in heads["experts"]]
    for name in ("encoder.layer.1.attention.self.query.weight", "embeddings.word_embeddings.weight"):
        key = next(k for k in weights if k.endswith(name))
        expected = base[key] + sum(w * (x[key] - base[key]) for w, x in zip(weights[key], experts))
        torch.testing.assert_close(out[key], expected, rtol=0, atol=1e-6)
    # learned once: a second merge of the same recipe reuses it, with the same bytes
    again = mergesmith.merge(recipe, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method, parameters", [
    ("expert_merging", {"steps": 3}),
    ("concrete_ta", {"steps": 3, "lr": 0.05}),
    ("localize_stitch", {"steps": 3, "density": 0.2}),
])
def test_other_learned_merges_run_from_a_recipe(heads, tmp_path, method, parameters):
    """What each learned (coefficients, masks, or both) reaches the written model as the
    learned recipe says: θ0 + Σ share_i·m_i·τ_i entry by entry."""
    folder = mergesmith.merge(learned_recipe(heads, tmp_path, method, **parameters), tmp_path / "out")
    learned = json.loads((folder / "learned.json").read_text())
    assert len(learned["losses"]) in (parameters["steps"], 2 * parameters["steps"])  # (per expert)
    out, base = read_tensors(folder), read_tensors(heads["base"])
    experts = [read_tensors(e) for e in heads["experts"]]
    changed = [n for n in out if not torch.equal(out[n], base[n])]
    assert changed, "the merge kept the base everywhere"
    if method != "expert_merging":  # masks: every change is some expert's entry (or a share of it)
        name = next(n for n in changed if n.endswith("query.weight"))
        moved = out[name] != base[name]
        deltas = [(x[name] - base[name]) for x in experts]
        assert bool((moved <= ((deltas[0] != 0) | (deltas[1] != 0))).all())
        assert float(moved.float().mean()) < 0.9  # sparse: most entries keep the base


def test_learned_merges_see_each_blocks_hidden_states_at_the_real_tokens(models, tmp_path):
    """Expert Merging aligns hidden states: the problem's forward gives, besides the logits,
    each block's output at the unpadded positions, as the module computes it."""
    import transformers as tf

    from mergesmith.pipeline import calibration_for, root_of
    from mergesmith.calibrate.problem import build_problem
    from mergesmith.methods import get_method
    from mergesmith.recipe import load_recipe

    recipe = load_recipe(data_recipe(models, tmp_path, "expert_merging"))
    cals = [calibration_for(recipe, str(e), get_method("expert_merging")) for e in models["experts"]]
    problem = build_problem(models["base"], models["experts"], cals, root_of(recipe))
    # a batch with padding, which must be left out
    batch = next(b.inputs for b in problem.batches[0] if int((b.inputs.inputs["attention_mask"] == 0).sum()))
    logits, hidden = problem.forward(problem.base, 0, batch)
    mask = batch.inputs["attention_mask"]
    assert len(hidden) == 2  # two blocks
    module = tf.AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    with torch.no_grad():
        states = module(**batch.inputs, output_hidden_states=True).hidden_states
    for got, want in zip(hidden, states[1:]):
        torch.testing.assert_close(got, want[mask.bool()], rtol=1e-5, atol=1e-6)


def test_regmean_plusplus_matches_regmean_on_the_first_block_only(models, tmp_path):
    """Block 0 sees the same inputs in both (nothing below it is merged); block 1's Grams come
    from the merged block 0 in RegMean++, so its weights differ."""
    plain = read_tensors(mergesmith.merge(data_recipe(models, tmp_path, "regmean"), tmp_path / "a"))
    plus = read_tensors(mergesmith.merge(data_recipe(models, tmp_path, "regmean_plusplus"),
                                         tmp_path / "b"))
    first, second = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(plus[first], plain[first], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(plus[second], plain[second], rtol=1e-4, atol=1e-6)


def test_every_method_is_in_the_readme_table():
    from mergesmith.methods import all_methods

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [s.name for s in all_methods() if f"| `{s.name}` |" not in readme]
    assert not missing


def test_a_recipe_written_out_keeps_what_each_model_entry_inherits(models, tmp_path):
    """A model entry's calibration holds only what it sets: written out and read back (model
    cards, the demo's timed runs), it must not turn the defaults it left unset into overrides."""
    from mergesmith.pipeline import calibration_for
    from mergesmith.methods import get_method
    from mergesmith.recipe import load_recipe

    recipe = load_recipe(data_recipe(models, tmp_path, "fisher"))
    assert recipe.calibration.samples == 8
    again = load_recipe(recipe.model_dump(exclude_none=True))
    written = tmp_path / "again.yaml"
    written.write_text(recipe.to_yaml())
    for copy in (again, load_recipe(written)):
        cal = calibration_for(copy, str(models["experts"][0]), get_method("fisher"))
        assert (cal.samples, cal.max_length, cal.batch_size) == (8, 16, 4)
        assert cal.data == str(models["data"][0])


# --- up front: tensors no statistics can reach; allow_crimes through RegMean++'s blocks -------


def renamed_copy(folder: Path, to: Path) -> Path:
    """The model with its layers' tensors named otherwise than transformers' modules read them."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(folder, to, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = {n.replace(".self_attn.", ".attn.").replace(".mlp.", ".ffn."): t
               for n, t in read_tensors(folder).items()}
    save_file(tensors, str(to / "model.safetensors"), metadata={"format": "pt"})
    return to


@pytest.mark.parametrize("method", ["regmean", "fisher", "regmean_plusplus"])
def test_check_refuses_layers_no_statistics_reach_before_reading_data(models, tmp_path, method,
                                                                      monkeypatch, capsys):
    import time

    root = tmp_path / "renamed"
    base = renamed_copy(models["base"], root / "base")
    experts = [renamed_copy(e, root / e.name) for e in models["experts"]]
    recipe = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(e)} for e in experts],
              "calibration": {"data": str(tmp_path / "never-read.txt"), "cache": str(tmp_path / "cache")}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    started = time.perf_counter()
    code, _, err = run_cli(monkeypatch, capsys, "check", path)
    took = time.perf_counter() - started
    message = " ".join(err.split())
    assert code != 0 and "Traceback" not in err, err
    kind = "fisher" if method == "fisher" else "gram"
    assert f"have no {kind} statistics, e.g. 'model.layers.0.attn." in message, message
    assert str(experts[0]) in message and "names its layers otherwise" in message
    assert took < 2.0, took
    # the API refuses before collecting anything (the data file does not exist)
    with pytest.raises(MergesmithError, match=f"have no {kind} statistics"):
        mergesmith.merge(path, tmp_path / "out")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
    if method != "fisher":  # the recipe may ask for the data-free merge of those tensors
        write_recipe(path, dict(recipe, parameters={"fallback": "linear"}))
        code, _, err = run_cli(monkeypatch, capsys, "check", path)
        assert code == 0, err


def test_regmean_plusplus_plans_its_blocks_with_allow_crimes(models, tmp_path):
    """A Gemma-style expert beside Llama ones (other architecture, tied head): refused, and with
    allow_crimes merged, block by block as well; block 0 sees RegMean's inputs."""
    gemma = build_model(models["root"] / "gemma", "gemma", seed=3, layers=2) \
        if not (models["root"] / "gemma" / "config.json").is_file() else models["root"] / "gemma"

    def recipe(method):
        path = data_recipe(models, tmp_path, method)
        data = yaml.safe_load(path.read_text())
        data["models"][1]["model"] = str(gemma)
        return write_recipe(path, data)

    with pytest.raises(MergesmithError, match="architectures .*GemmaForCausalLM"):
        mergesmith.merge(recipe("regmean_plusplus"), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    plus = read_tensors(mergesmith.merge(recipe("regmean_plusplus"), tmp_path / "plus",
                                         allow_crimes=True))
    # each block merged by RegMean on the Grams its store holds (expert-0: Llama, expert-1: Gemma)
    grams = [read_statistics(p) for p in sorted((tmp_path / "cache" / "regmean_plusplus").glob("*/expert-*"))]
    experts = [read_tensors(models["experts"][0]), read_tensors(gemma)]
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        expected = regmean(None, [x[name] for x in experts], gram=[g[f"{name}::gram"] for g in grams],
                           weights=[1.0, 1.0], alpha=0.9, fallback="linear")
        assert torch.equal(plus[name], expected), name
    # the Llama expert's block 0 sees its own inputs, as in RegMean
    mergesmith.merge(recipe("regmean"), tmp_path / "plain", allow_crimes=True)
    own = next(read_statistics(p) for p in stores_of(tmp_path)
               if Path(json.loads((p / "config.json").read_text())["model"]).name == models["experts"][0].name)
    key = "model.layers.0.self_attn.q_proj.weight::gram"
    torch.testing.assert_close(grams[0][key], own[key], rtol=1e-5, atol=1e-7)
