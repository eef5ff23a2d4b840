"""VaRM, AIM and OptMerge (methods/llm_merges.py): each against its definition (METHODS.md
Part 2, "Others"; AIM's and OptMerge's read from the authors' code), and through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model, read_tensors, run_cli, write_recipe

import mergesmith
from mergesmith.calibrate.collect import collect
from mergesmith.calibrate.data import load_examples
from mergesmith.calibrate.store import read_statistics
from mergesmith.engine.api import merge
from mergesmith.methods import get_method
from mergesmith.methods.llm_merges import (aim, optmerge, optmerge_matrix, relaxation, truncated,
                                           varm, varm_weights)
from mergesmith.methods.registry import TensorContext
from mergesmith.recipe import Calibration

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- VaRM ------------------------------------------------------------------------------------

def test_varm_weights_are_each_models_share_of_the_mean_squared_change():
    base = randn(6, 5)
    experts = [base + s * randn(6, 5, seed=i) for i, s in ((1, 0.1), (2, 0.3), (3, 0.05))]
    means = torch.stack([(e - base).square().mean() for e in experts])
    w = means / means.sum()
    assert float(w.sum()) == pytest.approx(1.0)
    expected = sum(wj * e for wj, e in zip(w, experts))
    torch.testing.assert_close(varm(base, experts), expected)


def test_varm_gives_an_unchanged_model_weight_zero():
    base = randn(4, 4)
    experts = [base + randn(4, 4, seed=1), base.clone(), base - randn(4, 4, seed=2)]
    sums = torch.stack([(e - base).square().sum(dtype=torch.float64) for e in experts])
    assert varm_weights(sums)[1] == 0.0
    torch.testing.assert_close(varm(base, experts), varm(base, [experts[0], experts[2]]))


def test_varm_falls_back_to_uniform_when_no_model_changed():
    base = randn(3, 4)
    assert varm_weights(torch.zeros(3, dtype=torch.float64)) == [1 / 3] * 3
    merged = varm(base, [base.clone(), base.clone(), base.clone()])
    assert torch.equal(merged, base)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-merges")
    base = build_model(root / "base", "llama", seed=0, layers=2)
    experts = [build_model(root / f"e{i}", "llama", seed=i, base=base, layers=2) for i in (1, 2)]
    (root / "texts.txt").write_text("\n".join(
        " ".join(f"w{(7 * i + 3 * j) % 50 + 2}" for j in range(3 + i % 6)) for i in range(10)) + "\n")
    return {"root": root, "base": base, "experts": experts, "data": root / "texts.txt"}


def test_varm_streams_through_the_engine_like_whole_tensors(llama, tmp_path):
    recipe = {"merge_method": "varm", "base_model": str(llama["base"]), "dtype": "float32",
              "models": [{"model": str(e)} for e in llama["experts"]]}
    out = read_tensors(merge(recipe, tmp_path / "out", chunk_size=256))  # many row blocks
    base, *experts = (read_tensors(f) for f in (llama["base"], *llama["experts"]))
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        expected = varm(base[name], [e[name] for e in experts])
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-7)


# ---- AIM -------------------------------------------------------------------------------------

def ctx(name="model.layers.0.mlp.up_proj.weight"):
    return TensorContext(name=name)


def test_aim_with_omega_one_returns_the_merged_model():
    base, merged = randn(5, 4), randn(5, 4, seed=1)
    a = torch.rand(4, generator=torch.Generator().manual_seed(3))
    out = aim(base, [merged], weights=[1.0], omega=1.0, act_abs=[a], ctx=ctx())
    torch.testing.assert_close(out, merged)


@pytest.mark.parametrize("name, shape, axis", [
    ("model.layers.0.mlp.up_proj.weight", (5, 4), 1),   # nn.Linear [out, in]
    ("transformer.h.0.mlp.c_fc.weight", (4, 6), 0),      # GPT-2 Conv1D [in, out]
    ("model.layers.0.input_layernorm.weight", (4,), 0),  # a norm: one entry per channel
])
def test_aim_scales_the_most_active_channel_by_omega_and_keeps_a_silent_one(name, shape, axis):
    base, merged = randn(*shape), randn(*shape, seed=1)
    a = torch.tensor([0.5, 2.0, 0.0, 1.0])  # channel 1 most active, channel 2 never
    out = aim(base, [merged], weights=[1.0], omega=0.25, act_abs=[a], ctx=ctx(name))
    delta, got = (merged - base).movedim(axis, 0), (out - base).movedim(axis, 0)
    torch.testing.assert_close(got[1], 0.25 * delta[1])
    torch.testing.assert_close(got[2], delta[2])
    torch.testing.assert_close(got[0], (1 - 0.25 * 0.75) * delta[0])  # r = 1 − (0.5/2)(1 − ω)


def test_aim_leaves_embeddings_and_unmeasured_tensors_the_whole_update():
    base, merged = randn(6, 4), randn(6, 4, seed=1)
    a = torch.ones(4)
    out = aim(base, [merged], weights=[1.0], act_abs=[a], ctx=ctx("model.embed_tokens.weight"))
    torch.testing.assert_close(out, merged)
    torch.testing.assert_close(aim(base, [merged], weights=[1.0], ctx=ctx()), merged)
    assert torch.equal(relaxation(torch.zeros(3), 0.4), torch.ones(3))


def test_act_abs_is_the_mean_absolute_input_of_real_tokens(llama):
    import transformers as tf

    cal = Calibration(data=str(llama["data"]), batch_size=4)  # padded batches
    examples = load_examples(cal, llama["root"])
    stats = collect(llama["base"], examples, cal, llama["root"], kinds=["act_abs"])
    model = tf.AutoModelForCausalLM.from_pretrained(llama["base"], dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(llama["base"])
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.post_attention_layernorm", "model.norm"]
    rows = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: rows[n].append(args[0].reshape(-1, args[0].shape[-1])))
        for n in names]
    with torch.no_grad():
        for e in examples:
            model(input_ids=torch.tensor([tokenizer(e.text)["input_ids"]]))
    for h in hooks:
        h.remove()
    for n in names:
        torch.testing.assert_close(stats[f"{n}.weight::act_abs"], torch.cat(rows[n]).abs().mean(0),
                                   rtol=1e-5, atol=1e-6)
    assert "model.embed_tokens.weight::act_abs" not in stats


def test_act_abs_beside_gram_in_one_pass_equals_each_alone(llama):
    cal = Calibration(data=str(llama["data"]), batch_size=3)
    examples = load_examples(cal, llama["root"])
    both = collect(llama["base"], examples, cal, llama["root"], kinds=["gram", "act_abs"],
                   max_stats_bytes=1 << 14)  # several groups
    alone = {**collect(llama["base"], examples, cal, llama["root"], kinds=["gram"]),
             **collect(llama["base"], examples, cal, llama["root"], kinds=["act_abs"])}
    assert both.keys() == alone.keys()
    assert "model.norm.weight::act_abs" in both and "model.norm.weight::gram" not in both
    for key in both:
        torch.testing.assert_close(both[key], alone[key], rtol=1e-6, atol=1e-7)


def test_aim_recipe_relaxes_with_the_base_models_activations(llama, tmp_path):
    cache = tmp_path / "cache"
    recipe = write_recipe(tmp_path / "aim.yaml", {
        "merge_method": "aim", "base_model": str(llama["base"]), "dtype": "float32",
        "models": [{"model": str(llama["experts"][0])}],
        "parameters": {"omega": 0.3},
        "calibration": {"data": str(llama["data"]), "batch_size": 4, "cache": str(cache)}})
    out = read_tensors(mergesmith.merge(recipe, tmp_path / "out"))
    (store,) = [p for p in cache.iterdir() if (p / "config.json").is_file()]
    assert Path(json.loads((store / "config.json").read_text())["model"]).name == "base"
    stats = read_statistics(store)
    base, merged = read_tensors(llama["base"]), read_tensors(llama["experts"][0])
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight",
                 "lm_head.weight", "model.embed_tokens.weight"):
        a = stats.get(f"{name}::act_abs")
        expected = aim(base[name], [merged[name]], weights=[1.0], omega=0.3,
                       act_abs=None if a is None else [a], ctx=ctx(name))
        assert torch.equal(out[name], expected), name
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(out[name], merged[name])  # relaxed where the base is active


def test_aim_relaxes_gpt2_conv1d_weights_along_their_input_rows(zoo, llama, tmp_path):
    models = zoo("gpt2")
    recipe = write_recipe(tmp_path / "aim.yaml", {
        "merge_method": "aim", "base_model": str(models["base"]), "dtype": "float32",
        "models": [{"model": str(models["e1"])}],
        "calibration": {"data": str(llama["data"]), "batch_size": 4, "cache": str(tmp_path / "c")}})
    out = read_tensors(mergesmith.merge(recipe, tmp_path / "out"))
    (store,) = [p for p in (tmp_path / "c").iterdir() if (p / "config.json").is_file()]
    stats = read_statistics(store)
    base, merged = read_tensors(models["base"]), read_tensors(models["e1"])
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                 "transformer.h.1.mlp.c_proj.weight", "transformer.h.0.ln_1.weight"):
        a = stats[f"{name}::act_abs"]
        assert a.numel() == base[name].shape[0]  # Conv1D: [in, out]
        r = 1 - a / a.max() * 0.6  # ω = 0.4
        expected = base[name] + (merged[name] - base[name]) * (r[:, None] if a.numel() != base[name].numel() else r)
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-7)


# ---- OptMerge --------------------------------------------------------------------------------

def authors_optmerge(taus: list[torch.Tensor], steps: int, lr: float) -> torch.Tensor:
    """wudi_merging2's per-matrix loop (WalkerWorldPeace/MLLMerging), autograd and torch's SGD."""
    vectors = torch.stack(taus).double()
    low_rank, approx = [], []
    k = int(min(vectors.shape[1:]) / len(taus))
    for v in vectors:
        u, s, vh = torch.linalg.svd(v, full_matrices=False)
        padded = torch.zeros_like(v)
        padded[:k] = s[:k, None] * vh[:k]  # the code's S_matrix @ (V masked to k rows)
        low_rank.append(padded)
        approx.append(u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
    low_rank, approx = torch.stack(low_rank), torch.stack(approx)
    x = torch.nn.Parameter(vectors.mean(0))
    optimizer = torch.optim.SGD([x], lr=lr, momentum=0.9)
    norms = vectors.reshape(len(taus), -1).norm(dim=-1).square()
    for _ in range(steps):
        inner = (x.unsqueeze(0) - approx) @ low_rank.transpose(1, 2)
        loss = (inner.square() / norms[:, None, None]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return x.detach().float()


def test_optmerge_follows_the_authors_loss_and_optimiser():
    taus = [randn(12, 9, seed=i) for i in (1, 2, 3)]
    ours = optmerge_matrix(taus, rank_ratio=None, steps=25, lr=0.05, momentum=0.9)
    theirs = authors_optmerge(taus, steps=25, lr=0.05)
    assert not torch.allclose(ours, torch.stack(taus).mean(0), atol=1e-3)  # it moved
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_optmerge_of_one_task_vector_without_truncation_is_that_task_vector():
    base, expert = randn(7, 5), randn(7, 5, seed=1)
    out = optmerge(base, [expert], steps=50, lr=0.1, ctx=ctx())
    torch.testing.assert_close(out, expert)


def test_optmerge_truncation_keeps_exactly_the_configured_rank():
    tau = randn(10, 8)
    for rank in (1, 3, 8):
        approx, side = truncated(tau, rank)
        assert int(torch.linalg.matrix_rank(approx)) == rank and side.shape == (8, rank)


def test_optmerge_averages_vectors_and_the_output_head():
    base = randn(6, 4)
    experts = [randn(6, 4, seed=i) for i in (1, 2)]
    mean = (experts[0] + experts[1]) / 2
    head = optmerge(base, experts, lambda_=0.5, ctx=ctx("lm_head.weight"))
    torch.testing.assert_close(head, base + 0.5 * (mean - base))
    norm = optmerge(base[0], [e[0] for e in experts], ctx=ctx("model.norm.weight"))
    torch.testing.assert_close(norm, mean[0])


def test_optmerge_merges_through_the_engine(llama, tmp_path):
    recipe = {"merge_method": "optmerge", "base_model": str(llama["base"]), "dtype": "float32",
              "models": [{"model": str(e)} for e in llama["experts"]],
              "parameters": {"steps": 5, "lr": 0.01}}
    out = read_tensors(merge(recipe, tmp_path / "out"))
    base, *experts = (read_tensors(f) for f in (llama["base"], *llama["experts"]))
    name = "model.layers.1.mlp.down_proj.weight"
    expected = optmerge(base[name], [e[name] for e in experts], steps=5, lr=0.01, ctx=ctx(name))
    assert torch.equal(out[name], expected)


# ---- listing ---------------------------------------------------------------------------------

def test_the_methods_are_listed_with_what_they_need(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "methods")
    assert code == 0
    for name in ("varm", "aim", "optmerge", "rcp_merging"):
        assert name in out
    from mergesmith.cli.merging import _data_needs

    assert "needs data (act_abs of the base)" in _data_needs(get_method("aim"))
    assert get_method("aim").needs_data and get_method("aim").statistics_from == "base"
    assert get_method("varm").chunkable and not get_method("optmerge").chunkable


# ---- RCP-Merging -----------------------------------------------------------------------------

def test_rcp_mask_zero_keeps_the_reasoning_model_and_one_adds_the_domain_update():
    from mergesmith.methods.rcp_merging import stitch

    base, reasoning, domain = randn(4, 3), randn(4, 3, seed=1), randn(4, 3, seed=2)
    ones = torch.ones(4, 3, dtype=torch.bool)
    for m in (torch.zeros(4, 3, dtype=torch.bool), ones):
        out = stitch(base, [reasoning, domain], weights=[1.0, 1.0], mask=[ones, m], overlap="sum")
        torch.testing.assert_close(out, reasoning + m * (domain - base))


def test_rcp_votes_by_hand():
    from mergesmith.methods.rcp_merging import domain_votes

    threshold = torch.tensor([0.0, 1.0, 2.0])
    s = [torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([1.0, -2.0, -3.0]), torch.tensor([0.0, -0.5, 0.0])]
    # S + T ≤ 0: [yes, yes, no], [no, yes, yes], [yes, no, no]
    assert domain_votes(s, threshold).tolist() == [1, 1, -1]


def linear_problem(lambda_seed=0):
    """A softmax regression θ = (w, b) on 3 classes, each text one row: per-text gradients in
    closed form, ∂ℓ/∂w = (p − e_y) xᵀ, ∂ℓ/∂b = p − e_y."""
    from mergesmith.methods.adaptive import Batch, MergeProblem

    base = {"w": randn(3, 4, seed=10), "b": randn(3, seed=11)}
    taus = [{"w": 0.5 * randn(3, 4, seed=s), "b": 0.5 * randn(3, seed=s + 1)} for s in (20, 30)]
    data = [(randn(5, 4, seed=40 + t), torch.tensor([0, 1, 2, 1, 0][t:] + [2, 1, 0][:t])) for t in (0, 1)]
    batches = [[Batch(x[i:i + 1], y[i:i + 1]) for i in range(5)] for x, y in data]

    def forward(params, task, x):
        return x @ params["w"].T + params["b"]

    problem = MergeProblem(base=base, task_vectors=taus, layer_of={"w": None, "b": None},
                           forward=forward, batches=batches)
    return problem, data


def closed_form_gradients(theta, x, y):
    for xi, yi in zip(x, y):
        p = torch.softmax(xi @ theta["w"].T + theta["b"], -1)
        p[yi] -= 1
        yield {"w": p[:, None] * xi[None, :], "b": p}


def test_rcp_learns_the_codes_mask_on_a_softmax_regression():
    from mergesmith.methods.rcp_merging import learn_rcp

    problem, data = linear_problem()
    lam = 3.0
    base, (tau_r, tau_d) = problem.base, problem.task_vectors
    theta_r = {n: base[n] + tau_r[n] for n in base}
    theta_d = {n: base[n] + tau_d[n] for n in base}
    grads_r = list(closed_form_gradients(theta_r, *data[0]))
    fisher = {n: sum((g[n] * theta_r[n]) ** 2 for g in grads_r) / len(grads_r) for n in base}
    learned = learn_rcp(problem, lambda_=lam)
    taken = 0
    for n in base:
        threshold = lam * fisher[n] * (theta_r[n] - theta_d[n]) ** 2
        votes = sum(torch.where(g[n] * theta_d[n] + threshold <= 0, 1, -1)
                    for g in closed_form_gradients(theta_d, *data[1]))
        assert learned.masks[n][0].all() and learned.weights[n] == [1.0, 1.0]
        assert torch.equal(learned.masks[n][1], votes > 0), n
        taken += int((votes > 0).sum())
    assert 0 < taken < 15  # some entries of the 15 taken, not all


def test_rcp_recipe_takes_domain_updates_entry_by_entry(llama, tmp_path):
    recipe = {"merge_method": "rcp_merging", "base_model": str(llama["base"]), "dtype": "float32",
              "models": [{"model": str(e)} for e in llama["experts"]],
              "parameters": {"lambda": 0.0},
              "calibration": {"data": str(llama["data"]), "samples": 4, "batch_size": 1,
                              "cache": str(tmp_path / "cache")}}
    out = read_tensors(mergesmith.merge(write_recipe(tmp_path / "rcp.yaml", recipe), tmp_path / "out"))
    base, reasoning, domain = (read_tensors(f) for f in (llama["base"], *llama["experts"]))
    taken = total = 0
    for name, merged in out.items():
        update, tau = merged - reasoning[name], domain[name] - base[name]
        took = (update - tau).abs() <= 1e-6
        assert bool((took | (update.abs() <= 1e-6)).all()), name  # θ_R or θ_R + τ_D per entry
        taken, total = taken + int((took & (tau != 0)).sum()), total + int((tau != 0).sum())
    assert 0 < taken < total
    recipe["calibration"]["batch_size"] = 2
    with pytest.raises(mergesmith.errors.MergesmithError, match="batch_size: 1"):
        mergesmith.merge(write_recipe(tmp_path / "rcp2.yaml", recipe), tmp_path / "out2")


def test_aim_averages_the_bases_activations_over_the_models_calibration_sets():
    base, experts = randn(3, 4), [randn(3, 4, seed=1), randn(3, 4, seed=2)]
    a, b = torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([3.0, 0.0, 0.0, 1.0])
    out = aim(base, experts, weights=[1.0, 1.0], omega=0.5, act_abs=[a, b], ctx=ctx())
    r = 1 - torch.tensor([2.0, 0.0, 1.0, 1.0]) / 2 * 0.5  # mean a = [2, 0, 1, 1]
    torch.testing.assert_close(out, base + (experts[0] + experts[1] - 2 * base) * r)
