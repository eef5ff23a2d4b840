"""Twin-Merging (Lu et al. 2024, arXiv:2406.15479, §3): θ* a data-free merge, v_t = θ_t − θ*
compressed to its ⌊ρ·min(m, n)⌋ largest singular triplets (vectors whole), and per input
θ(x) = θ* + Σ_t softmax(R(h(x)))_t v_t with R trained to tell the experts' data apart.

The parts are checked against an independent float64 SVD, the shared model against task
arithmetic, `apply` against θ* + Σ w_t v_t and (at ρ = 1) against the experts themselves, and
per-input routing against the model written for that input's weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, read_tensors, run_cli, write_recipe

import mergesmith
from mergesmith.calibrate.router import RoutedModule, TwinModel, fit_router, route_texts
from mergesmith.engine.side_outputs.twin import Parts, apply_twin
from mergesmith.errors import MergesmithError, PlanError, RecipeError
from mergesmith.methods import task_arithmetic
from mergesmith.methods.twin import compress, compressed_rank, expand, routed, twin_side

# two tasks with disjoint words, so that the router has something to tell apart
WORDS = [[f"w{i}" for i in range(2, 30)], [f"w{i}" for i in range(30, 58)]]


def best_rank_r(x: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vt = torch.linalg.svd(x.double().reshape(x.shape[0], -1), full_matrices=False)
    return (u[:, :r] * s[:r] @ vt[:r]).reshape(x.shape).float()


def test_compress_keeps_the_largest_singular_directions(one_thread):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 20, generator=gen)
    for ratio, r in [(0.25, 3), (0.5, 6), (1.0, 12), (0.01, 1)]:
        assert compressed_rank(x.shape, ratio) == r
        a, b = compress(x, ratio)
        assert a.shape == (12, r) and b.shape == (r, 20)
        torch.testing.assert_close(a @ b, best_rank_r(x, r), atol=2e-5, rtol=0)
    conv = torch.randn(6, 3, 2, 2, generator=gen)  # a matrix of 6 rows by 12
    torch.testing.assert_close(expand(compress(conv, 0.5), conv.shape), best_rank_r(conv, 3),
                               atol=2e-5, rtol=0)
    vector = torch.randn(7, generator=gen)
    assert compress(vector, 0.1) == (vector,)


def test_side_parts_are_each_experts_difference_from_the_shared_model(one_thread):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(8, 10, generator=gen)
    experts = [base + 0.1 * torch.randn(8, 10, generator=gen) for _ in range(3)]
    params = dict(weights=[1.0, 1.0, 1.0], densities=[1.0] * 3, lambda_=0.4)
    shared = task_arithmetic(base, experts, weights=params["weights"], lambda_=0.4)
    parts = twin_side(base, experts, rank_ratio=0.5, **params)
    for expert, part in zip(experts, parts):
        torch.testing.assert_close(expand(part, base.shape), best_rank_r(expert - shared, 4),
                                   atol=2e-5, rtol=0)
    # with every direction kept, one-hot routing gives back each expert
    whole = twin_side(base, experts, rank_ratio=1.0, **params)
    for t, expert in enumerate(experts):
        onehot = [float(t == i) for i in range(3)]
        torch.testing.assert_close(routed(shared, whole, onehot), expert, atol=1e-5, rtol=0)
    mix = [0.2, 0.5, 0.3]
    expected = shared + sum(w * expand(p, base.shape) for w, p in zip(mix, parts))
    torch.testing.assert_close(routed(shared, parts, mix), expected)


def test_router_learns_to_tell_separable_inputs_apart():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=gen) * 3
    labels = torch.arange(3).repeat_interleave(20)
    x = centers[labels] + torch.randn(60, 16, generator=gen)
    router, record = fit_router(x, labels, 3, steps=100, lr=5e-3, seed=0)
    assert record["train_accuracy"] == 1.0
    again, _ = fit_router(x, labels, 3, steps=100, lr=5e-3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(router.state_dict().values(),
                                                 again.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def twin_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("twin")
    base = build_model(root / "base", "llama", seed=0, layers=2)
    experts = [build_model(root / f"e{i}", "llama", seed=i, base=base, layers=2, delta=0.05)
               for i in (1, 2)]
    data = []
    for i, words in enumerate(WORDS):
        gen = torch.Generator().manual_seed(i)
        lines = [" ".join(words[j] for j in torch.randint(0, len(words), (int(n),), generator=gen))
                 for n in torch.randint(4, 12, (24,), generator=gen)]
        path = root / f"task{i}.txt"
        path.write_text("\n".join(lines) + "\n")
        data.append(path)
    return {"root": root, "base": base, "experts": experts, "data": data}


def twin_recipe(m, tmp_path, name="twin", calibration=True, **parameters) -> dict:
    recipe = {
        "merge_method": "twin",
        "base_model": str(m["base"]),
        "models": [{"model": str(e), **({"calibration": {"data": str(d)}} if calibration else {})}
                   for e, d in zip(m["experts"], m["data"])],
        "parameters": {"lambda": 0.5, "rank_ratio": 0.5, "router_lr": 5e-3, **parameters},
        "calibration": {"samples": 24, "max_length": 16, "batch_size": 8},
        "dtype": "float32",
    }
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


@pytest.fixture(scope="module")
def twin_merge(twin_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("twin-out")
    out = mergesmith.merge(twin_recipe(twin_models, tmp), tmp / "merged", shard_size="30KB")
    return out, tmp


def test_twin_merge_writes_the_shared_model_its_parts_and_a_router(twin_models, twin_merge):
    out, _ = twin_merge
    merged = read_tensors(out)
    base = read_tensors(twin_models["base"])
    experts = [read_tensors(e) for e in twin_models["experts"]]
    parts = Parts(out)
    assert parts.tasks == [str(e) for e in twin_models["experts"]]
    assert len(list((out / "twin").glob("parts-*.safetensors"))) >= 2  # one per output shard
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight",
                 "model.norm.weight"):
        shared = task_arithmetic(base[name], [x[name] for x in experts], weights=[1.0, 1.0],
                                 lambda_=0.5)
        assert torch.equal(merged[name], shared), name
        r = compressed_rank(shared.shape, 0.5) if shared.dim() > 1 else None
        for t, delta in enumerate(parts.deltas(name, shared.shape)):
            expected = experts[t][name] - shared
            if r is not None:
                expected = best_rank_r(expected, r)
            torch.testing.assert_close(delta, expected, atol=5e-6, rtol=0)
    router = json.loads((out / "twin" / "twin.json").read_text())["router"]
    assert router["train_accuracy"] >= 0.9
    assert router["examples"] == {str(e): 24 for e in twin_models["experts"]}


def test_router_sends_each_tasks_inputs_to_its_expert(twin_merge):
    out, _ = twin_merge
    weights = route_texts(out, ["w3 w7 w11 w20 w5", "w31 w40 w45 w50 w33"])
    assert weights.shape == (2, 2)
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    assert weights[0, 0] > 0.5 and weights[1, 1] > 0.5


def test_apply_writes_the_shared_model_plus_the_weighted_parts(twin_merge):
    out, tmp = twin_merge
    parts = Parts(out)
    shared = read_tensors(out)
    folder = apply_twin(out, tmp / "mix", weights=[0.3, 0.7])
    written = read_tensors(folder)
    assert written.keys() == shared.keys()
    for name, theta in written.items():
        expected = shared[name] + sum(w * d for w, d in zip([0.3, 0.7], parts.deltas(name, theta.shape)))
        torch.testing.assert_close(theta, expected, atol=1e-6, rtol=0)
    assert (folder / "config.json").is_file() and "fixed routing" in (folder / "README.md").read_text()


def test_full_rank_parts_give_back_each_expert(twin_models, tmp_path):
    recipe = twin_recipe(twin_models, tmp_path, rank_ratio=1.0, router_steps=1)
    out = mergesmith.merge(recipe, tmp_path / "full")
    for t, expert in enumerate(twin_models["experts"]):
        rebuilt = read_tensors(apply_twin(out, tmp_path / f"task{t}", task=t))
        for name, theta in read_tensors(expert).items():
            torch.testing.assert_close(rebuilt[name], theta, atol=2e-6, rtol=0)


def test_each_input_runs_on_its_own_routed_weights(twin_merge):
    """RoutedModule on a batch == each row alone on the model `apply` writes for its weights."""
    import transformers as tf

    out, tmp = twin_merge
    tokenizer = tf.AutoTokenizer.from_pretrained(out)
    module = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model = RoutedModule(TwinModel(out, module))
    texts = ["w3 w7 w11 w20 w5 w9", "w31 w40 w45 w50"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    weights = model.twin.route(dict(batch))
    assert not torch.allclose(weights[0], weights[1], atol=0.1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, text in enumerate(texts):
            folder = apply_twin(out, tmp / f"row{row}", weights=weights[row].tolist(), overwrite=True)
            alone = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            ids = tokenizer([text], return_tensors="pt")
            expected = alone(**ids).logits[0]
            n = expected.shape[0]
            torch.testing.assert_close(logits[row, :n], expected, atol=1e-4, rtol=1e-4)
        # the encoder view routes the same way (evaluation with a head file uses it)
        hidden = model.base_model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).last_hidden_state
        assert hidden.shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_routed_inference_keeps_matrices_low_rank_on_any_layer_kind(arch, twin_models, tmp_path):
    """GPT-2 (Conv1D layers, tied embeddings) and Gemma (tied embeddings): every matrix read by
    a Linear, Embedding or Conv1D layer is applied through its low-rank parts (no dense routed
    copy is held), and each input still gets the logits of the model `apply` writes for it."""
    import transformers as tf

    base = build_model(tmp_path / "base", arch, seed=0, layers=2)
    experts = [build_model(tmp_path / f"e{i}", arch, seed=i, base=base, layers=2, delta=0.05)
               for i in (1, 2)]
    m = {"base": base, "experts": experts, "data": twin_models["data"]}
    out = mergesmith.merge(twin_recipe(m, tmp_path), tmp_path / "merged")
    tokenizer = tf.AutoTokenizer.from_pretrained(out)
    module = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    twin = TwinModel(out, module)
    plain = (torch.nn.Linear, torch.nn.Embedding, tf.pytorch_utils.Conv1D)
    readers: dict[int, set[type]] = {}
    for layer in module.modules():
        if isinstance(layer._parameters.get("weight"), torch.Tensor):
            readers.setdefault(id(layer.weight), set()).add(type(layer))
    matrices = {name for name, p in module.named_parameters()
                if p.dim() == 2 and readers.get(id(p), set()) <= set(plain)}
    assert len(matrices) >= 10 and set(twin.low_rank) == matrices
    others = set(twin.deltas) - {"model.embed_tokens.weight"}  # Gemma's scales its output
    assert all(twin.deltas[name].dim() == 2 for name in others)  # [T, n]: vectors only
    model = RoutedModule(twin)
    texts = ["w3 w7 w11 w20 w5 w9", "w31 w40 w45 w50"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    weights = twin.route(dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, text in enumerate(texts):
            folder = apply_twin(out, tmp_path / f"row{row}", weights=weights[row].tolist())
            alone = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            ids = tokenizer([text], return_tensors="pt")
            expected = alone(**ids).logits[0]
            n = expected.shape[0]
            torch.testing.assert_close(logits[row, :n], expected, atol=1e-4, rtol=1e-4)
        # outside a routed forward the module is the shared model
        shared = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ids = tokenizer([texts[0]], return_tensors="pt")
        torch.testing.assert_close(module(**ids).logits, shared(**ids).logits)


def test_evaluation_runs_every_input_on_its_own_routed_weights(twin_merge, tmp_path):
    """Scoring a twin folder routes each input: its loss is that of the model for its weights."""
    import torch.nn.functional as F
    import transformers as tf

    from mergesmith.evaluate import evaluate_model, load_task

    out, _ = twin_merge
    texts = ["w3 w7 w11 w20 w5", "w31 w40 w45 w50", "w4 w33 w9 w40 w12 w51"]
    folder = tmp_path / "ppl"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (folder / "task.yaml").write_text("name: ppl\nkind: perplexity\ndata: {test: test.jsonl}\n")
    result = evaluate_model(out, load_task(folder / "task.yaml"), "test", batch_size=3)
    tokenizer = tf.AutoTokenizer.from_pretrained(out)
    weights = route_texts(out, texts)
    for i, text in enumerate(texts):
        model = tf.AutoModelForCausalLM.from_pretrained(
            apply_twin(out, tmp_path / f"m{i}", weights=weights[i].tolist()), dtype=torch.float32)
        ids = tokenizer([text], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
        assert float(result.per_example[i]) == pytest.approx(float(loss), rel=1e-4)


def test_twin_needs_calibration_data_before_anything_is_written(twin_models, tmp_path):
    recipe = twin_recipe(twin_models, tmp_path, calibration=False)
    with pytest.raises(RecipeError, match=r"models\[0\]\.calibration: no data for"):
        mergesmith.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_twin_refuses_lines_and_bad_parameters(twin_models, tmp_path):
    data = {"merge_method": "twin", "base_model": str(twin_models["base"]),
            "models": [{"model": str(e)} for e in twin_models["experts"]],
            "lines": {"alpha": 0.5, "beta": 0.5}}
    with pytest.raises(PlanError, match="lines"):
        mergesmith.engine.api.plan(data)
    data.pop("lines")
    data["parameters"] = {"rank_ratio": 0.0}
    with pytest.raises(MergesmithError, match="rank_ratio"):
        mergesmith.engine.api.plan(data)


def test_apply_and_route_errors_are_clear(twin_models, twin_merge, tmp_path):
    out, _ = twin_merge
    with pytest.raises(MergesmithError, match="unknown task 'nope'"):
        apply_twin(out, tmp_path / "x", task="nope")
    with pytest.raises(MergesmithError, match="task or routing weights"):
        apply_twin(out, tmp_path / "x", task=0, weights=[1.0, 0.0])
    with pytest.raises(MergesmithError, match="3 routing weights for 2 tasks"):
        apply_twin(out, tmp_path / "x", weights=[1.0, 0.0, 0.0])
    with pytest.raises(MergesmithError, match="not a merge made with merge_method: twin"):
        apply_twin(twin_models["base"], tmp_path / "x", task=0)
    assert not (tmp_path / "x").exists()
    # the engine alone merges without data: no router, and routing says so
    engine_only = mergesmith.engine.api.merge(twin_recipe(twin_models, tmp_path), tmp_path / "bare")
    with pytest.raises(MergesmithError, match="has no router"):
        route_texts(engine_only, ["w3 w4"])


def test_cli_twin_merge_apply_and_route(twin_models, twin_merge, tmp_path, monkeypatch, capsys):
    recipe = twin_recipe(twin_models, tmp_path, router_steps=5)
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "cli", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "cli" / "twin" / "twin.json").read_text())["router"]["steps"] == 5
    out, _ = twin_merge
    code, _, err = run_cli(monkeypatch, capsys, "twin", "apply", out, tmp_path / "t0", "--task", "0")
    assert code == 0 and (tmp_path / "t0" / "config.json").is_file()
    code, _, err = run_cli(monkeypatch, capsys, "twin", "apply", out, tmp_path / "t1", "--weights", "a,b")
    assert code != 0 and "--weights" in err
    code, stdout, _ = run_cli(monkeypatch, capsys, "twin", "route", out, "w3 w7 w11")
    assert code == 0 and "=" in stdout
    code, stdout, _ = run_cli(monkeypatch, capsys, "methods")
    assert "twin" in stdout
