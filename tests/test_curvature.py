"""Fisher merging, RegMean, OTA / FFG and stitching (methods/curvature.py), and Adam's second
moments read from a model folder (calibrate/moments.py).

Expected values come from the papers' definitions computed independently here: least squares by
torch.linalg.lstsq, small cases by hand, masks by torch.topk."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, read_tensors, write_recipe

from mergesmith.calibrate.moments import (
    SECOND_MOMENTS_FILE,
    TRAINER_OPTIMIZER_FILE,
    read_second_moments,
    write_second_moments,
)
from mergesmith.engine.api import merge
from mergesmith.errors import CalibrationError, CheckpointError, PlanError
from mergesmith.io.checkpoint import Checkpoint
from mergesmith.methods import TensorContext, get_method
from mergesmith.methods.curvature import ffg, fisher, ota, regmean, stitch, top_fraction_mask


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return x[start:stop].clone()


# --------------------------------------------------------------------------------------------
# RegMean


def least_squares(inputs: list[torch.Tensor], targets: list[torch.Tensor],
                  weights: list[float] | None = None) -> torch.Tensor:
    """argmin_W Σi wi ||Xi W − Yi||², by lstsq on the stacked rows scaled by √wi (float64)."""
    weights = weights or [1.0] * len(inputs)
    x = torch.cat([xi.double() * w ** 0.5 for xi, w in zip(inputs, weights)])
    y = torch.cat([yi.double() * w ** 0.5 for yi, w in zip(targets, weights)])
    return torch.linalg.lstsq(x, y).solution


def test_regmean_on_a_linear_layer_is_the_least_squares_solution():
    # Jin et al. 2023, eq. for linear models: W = (Σ XiᵀXi)⁻¹ Σ XiᵀXi Wi minimizes Σ ||Xi Wᵀ − Xi Wiᵀ||²
    xs = [randn(40, 6, seed=1), randn(25, 6, seed=2) * 2 + 1]
    ws = [randn(4, 6, seed=3), randn(4, 6, seed=4)]  # nn.Linear: [out, in]
    grams = [x.T @ x for x in xs]
    merged = regmean(None, ws, weights=[1.0, 1.0], alpha=1.0, gram=grams)
    expected = least_squares(xs, [x @ w.T for x, w in zip(xs, ws)]).T
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)

    # the per-model weight scales the model's Gram: a weighted least-squares problem
    merged = regmean(None, ws, weights=[0.25, 2.0], alpha=1.0, gram=grams)
    expected = least_squares(xs, [x @ w.T for x, w in zip(xs, ws)], [0.25, 2.0]).T
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)


def test_regmean_of_conv1d_weights_works_in_their_in_out_layout():
    xs = [randn(30, 5, seed=5), randn(30, 5, seed=6)]
    ws = [randn(5, 7, seed=7), randn(5, 7, seed=8)]  # transformers' Conv1D: [in, out], y = x W
    grams = [x.T @ x for x in xs]
    merged = regmean(None, ws, weights=[1.0, 1.0], alpha=1.0, gram=grams)
    expected = least_squares(xs, [x @ w for x, w in zip(xs, ws)])
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)

    # a square weight fits its Gram both ways: GPT-2's attn.c_proj is a Conv1D, o_proj a Linear
    square = [randn(5, 5, seed=9), randn(5, 5, seed=10)]
    conv = regmean(None, square, weights=[1.0, 1.0], alpha=1.0, gram=grams,
                   ctx=TensorContext("transformer.h.0.attn.c_proj.weight"))
    linear = regmean(None, square, weights=[1.0, 1.0], alpha=1.0, gram=grams,
                     ctx=TensorContext("model.layers.0.self_attn.o_proj.weight"))
    torch.testing.assert_close(conv.double(), least_squares(xs, [x @ w for x, w in zip(xs, square)]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.double(),
                               least_squares(xs, [x @ w.T for x, w in zip(xs, square)]).T,
                               rtol=1e-5, atol=1e-5)


def test_regmean_refuses_a_gram_that_fits_neither_axis():
    with pytest.raises(ValueError, match=r"\[3, 3\].*\[4, 5\]"):
        regmean(None, [torch.ones(4, 5)] * 2, weights=[1.0, 1.0], gram=[torch.eye(3)] * 2)


def test_regmean_scales_off_diagonal_entries_by_alpha():
    # α = 0.5: G1' = [[2, .5], [.5, 3]], G2' = [[1, .25], [.25, 2]]; W1 = [1, 2], W2 = [3, −1]
    # A = G1' + G2' = [[3, .75], [.75, 5]];  b = G1'W1 + G2'W2 = [3, 6.5] + [2.75, −1.25] = [5.75, 5.25]
    # W = A⁻¹ b, det A = 15 − .5625 = 14.4375 (Cramer's rule)
    g1 = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    g2 = torch.tensor([[1.0, 0.5], [0.5, 2.0]])
    merged = regmean(None, [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])],
                     weights=[1.0, 1.0], alpha=0.5, gram=[g1, g2])
    expected = torch.tensor([[(5.75 * 5 - 0.75 * 5.25) / 14.4375, (3 * 5.25 - 0.75 * 5.75) / 14.4375]])
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)


def test_regmean_gives_unseen_input_features_the_weighted_average():
    xs = [randn(20, 4, seed=11), randn(20, 4, seed=12)]
    for x in xs:
        x[:, 2] = 0  # feature 2 never fires: its weights are not determined by the data
    ws = [randn(3, 4, seed=13), randn(3, 4, seed=14)]
    merged = regmean(None, ws, weights=[1.0, 3.0], alpha=1.0, gram=[x.T @ x for x in xs])
    torch.testing.assert_close(merged[:, 2], (ws[0][:, 2] + 3 * ws[1][:, 2]) / 4)
    seen = [0, 1, 3]
    expected = least_squares([x[:, seen] for x in xs],
                             [x @ w.T for x, w in zip(xs, ws)], [1.0, 3.0]).T
    torch.testing.assert_close(merged[:, seen].double(), expected, rtol=1e-5, atol=1e-5)


def test_regmean_singular_gram_is_a_clear_error():
    x = torch.tensor([[1.0, 2.0, 3.0]])  # one token, three features: rank 1
    with pytest.raises(ValueError, match="singular.*alpha < 1"):
        regmean(None, [torch.ones(2, 3)] * 2, weights=[1.0, 1.0], alpha=1.0, gram=[x.T @ x] * 2)


def test_regmean_falls_back_for_tensors_without_a_gram():
    bias = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    torch.testing.assert_close(regmean(None, bias, weights=[1.0, 3.0]), torch.tensor([2.5, 5.0]))
    base = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(
        regmean(base, bias, weights=[1.0, 1.0], fallback="task_arithmetic"),
        base + (bias[0] - base) + (bias[1] - base))
    with pytest.raises(ValueError, match="base model"):
        regmean(None, bias, weights=[1.0, 1.0], fallback="task_arithmetic")
    spec, plus = get_method("regmean"), get_method("regmean_plusplus")
    assert spec.fn is plus.fn and spec.needs_data and plus.statistics == ("gram",)
    assert not spec.elementwise and spec.optional_base


# --------------------------------------------------------------------------------------------
# Fisher merging


def test_fisher_with_identical_fishers_is_weighted_averaging():
    experts = [randn(6, 5, seed=s) for s in (1, 2, 3)]
    same = randn(6, 5, seed=4).abs()
    merged = fisher(None, experts, weights=[1.0, 2.0, 0.5], fisher=[same] * 3)
    expected = (experts[0] + 2 * experts[1] + 0.5 * experts[2]) / 3.5
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)
    # and without any Fisher, the same weighted average
    torch.testing.assert_close(fisher(None, experts, weights=[1.0, 2.0, 0.5]), expected,
                               rtol=1e-6, atol=1e-6)


def test_fisher_of_one_model_is_that_model():
    expert = randn(4, 3, seed=5)
    merged = fisher(None, [expert], weights=[1.0], fisher=[randn(4, 3, seed=6).abs()])
    torch.testing.assert_close(merged, expert, rtol=1e-6, atol=0)


def test_fisher_weighs_each_entry_by_each_experts_information():
    a, b = torch.tensor([1.0, 1.0, 4.0]), torch.tensor([3.0, 5.0, 0.0])
    fa, fb = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([2.0, 3.0, 2.0])
    merged = fisher(None, [a, b], weights=[1.0, 1.0], epsilon=0.0, fisher=[fa, fb])
    # entry 0: a's Fisher is 0, so b's value; entry 1: (1·1 + 3·5) / 4; entry 2: the mean
    torch.testing.assert_close(merged, torch.tensor([3.0, 4.0, 2.0]))
    # per-model weights multiply the Fisher: entry 1 = (2·1·1 + 1·3·5) / (2 + 3)
    merged = fisher(None, [a, b], weights=[2.0, 1.0], epsilon=0.0, fisher=[fa, fb])
    torch.testing.assert_close(merged[1], torch.tensor(17 / 5))
    # with ε = 0, an entry no Fisher sees is the weighted average
    merged = fisher(None, [a, b], weights=[1.0, 3.0], epsilon=0.0, fisher=[fa * 0, fb * 0])
    torch.testing.assert_close(merged, (a + 3 * b) / 4)
    # with the default ε, a zero Fisher still gives the other's value (to ε)
    merged = fisher(None, [a, b], weights=[1.0, 1.0], fisher=[fa, fb])
    torch.testing.assert_close(merged[0], torch.tensor(3.0), rtol=1e-7, atol=1e-7)


def test_fisher_normalize_divides_each_fisher_by_its_mean():
    a, b = torch.tensor([0.0, 4.0]), torch.tensor([2.0, 0.0])
    fa, fb = torch.tensor([1.0, 3.0]), torch.tensor([40.0, 40.0])  # means 2 and 40
    merged = fisher(None, [a, b], weights=[1.0, 1.0], epsilon=0.0, normalize=True, fisher=[fa, fb])
    # normalized: fa = [.5, 1.5], fb = [1, 1]
    torch.testing.assert_close(merged, torch.tensor([(0 + 2) / 1.5, (1.5 * 4 + 0) / 2.5]))
    spec = get_method("fisher")
    assert spec.streams({"normalize": False}) and not spec.streams({"normalize": True})


def test_fisher_on_row_chunks_equals_fisher_on_the_whole_tensor():
    experts = [randn(9, 4, seed=s) for s in (7, 8)]
    fishers = [randn(9, 4, seed=s).square() for s in (9, 10)]
    whole = fisher(None, experts, weights=[1.0, 2.0], fisher=fishers)
    parts = [fisher(None, [rows(e, i, i + 4) for e in experts], weights=[1.0, 2.0],
                    fisher=[rows(f, i, i + 4) for f in fishers]) for i in (0, 4, 8)]
    assert torch.equal(torch.cat(parts), whole)


# --------------------------------------------------------------------------------------------
# OTA and Fast Fisher Grafting


def topk_mask(score: torch.Tensor, density: float) -> torch.Tensor:
    """The int(d·n) largest scores, by a full sort (no ties in the tests' data)."""
    k = int(density * score.numel())
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[score.reshape(-1).topk(k).indices] = True
    return mask.reshape(score.shape)


def test_ota_by_hand():
    base = torch.full((4,), 10.0)
    tau1, v1 = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([4.0, 1.0, 1.0, 0.01])
    tau2, v2 = torch.tensor([2.0, 1.0, -1.0, 1.0]), torch.tensor([1.0, 9.0, 4.0, 16.0])
    # FFG at d = 0.5 keeps 2 of 4 entries by v·τ²: [4, 4, .25, .09] -> {0, 1}; [4, 9, 4, 16] -> {1, 3}
    # curvature √v: c1 = [2, 1, 1, .1], c2 = [1, 3, 2, 4]
    # entry 0: expert 1 only -> τ1; entry 1: (1·(−2) + 3·1)/(1 + 3); entry 2: nobody -> θ0;
    # entry 3: expert 2 only -> τ2
    merged = ota(base, [base + tau1, base + tau2], weights=[1.0, 1.0], density=0.5, epsilon=0.0,
                 second_moment=[v1, v2])
    torch.testing.assert_close(merged, base + torch.tensor([1.0, 0.25, 0.0, 1.0]))
    # weights scale the curvature: entry 1 = (1·1·(−2) + 3·3·1) / (1 + 9)
    merged = ota(base, [base + tau1, base + tau2], weights=[1.0, 3.0], density=0.5, epsilon=0.0,
                 second_moment=[v1, v2])
    torch.testing.assert_close(merged[1], torch.tensor(10.7))
    # without FFG: Σ ci θi / Σ ci everywhere
    merged = ota(base, [base + tau1, base + tau2], weights=[1.0, 1.0], ffg=False, epsilon=0.0,
                 second_moment=[v1, v2])
    c1, c2 = v1.sqrt(), v2.sqrt()
    torch.testing.assert_close(merged, base + (c1 * tau1 + c2 * tau2) / (c1 + c2))


def test_ota_with_equal_moments_averages_the_grafted_task_vectors():
    base = randn(8, 8, seed=20)
    experts = [base + randn(8, 8, seed=s) for s in (21, 22, 23)]
    taus = [e - base for e in experts]
    moment = torch.full((8, 8), 0.3)
    merged = ota(base, experts, weights=[1.0] * 3, density=0.25, second_moment=[moment] * 3)
    masks = [topk_mask(t.abs(), 0.25).float() for t in taus]
    kept_by = sum(masks)
    expected = base + sum(m * t for m, t in zip(masks, taus)) / kept_by.clamp(min=1)
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)
    # no second moments at all: the same (equal curvature), as does power 0 with any moments
    torch.testing.assert_close(ota(base, experts, weights=[1.0] * 3, density=0.25), expected,
                               rtol=1e-6, atol=1e-6)
    other = [randn(8, 8, seed=s).square() for s in (24, 25, 26)]
    grafted_masks = [topk_mask(v * t.square(), 0.25).float() for v, t in zip(other, taus)]
    expected_p0 = base + sum(m * t for m, t in zip(grafted_masks, taus)) / sum(grafted_masks).clamp(min=1)
    torch.testing.assert_close(ota(base, experts, weights=[1.0] * 3, density=0.25, power=0.0,
                                   second_moment=other), expected_p0, rtol=1e-6, atol=1e-6)


def test_ota_at_density_one_with_equal_moments_is_the_plain_average():
    base = randn(5, 6, seed=30)
    experts = [base + randn(5, 6, seed=s) for s in (31, 32)]
    merged = ota(base, experts, weights=[1.0, 1.0], density=1.0, second_moment=[torch.ones(5, 6)] * 2)
    torch.testing.assert_close(merged, (experts[0] + experts[1]) / 2, rtol=1e-6, atol=1e-6)


def test_ota_streams_only_without_whole_tensor_selection():
    spec = get_method("ota")
    assert spec.needs_base and spec.statistics == ("second_moment",)
    assert not spec.streams({"ffg": True, "density": 0.1})
    assert spec.streams({"ffg": False, "density": 0.1, "normalize": False})
    assert spec.streams({"ffg": True, "density": 1.0})
    base = randn(9, 3, seed=33)
    experts = [base + randn(9, 3, seed=s) for s in (34, 35)]
    moments = [randn(9, 3, seed=s).square() for s in (36, 37)]
    whole = ota(base, experts, weights=[1.0, 2.0], ffg=False, second_moment=moments)
    parts = [ota(rows(base, i, i + 3), [rows(e, i, i + 3) for e in experts], weights=[1.0, 2.0],
                 ffg=False, second_moment=[rows(m, i, i + 3) for m in moments]) for i in (0, 3, 6)]
    assert torch.equal(torch.cat(parts), whole)


def test_ffg_grafts_the_most_salient_entries_of_one_expert():
    base = torch.zeros(5)
    tau = torch.tensor([3.0, -1.0, 2.0, 0.5, -4.0])
    v = torch.tensor([0.1, 10.0, 1.0, 100.0, 0.01])
    # saliency v·τ² = [.9, 10, 4, 25, .16]: the top 2 are entries 3 and 1
    grafted = ffg(base, [base + tau], density=0.4, second_moment=[v])
    torch.testing.assert_close(grafted, torch.tensor([0.0, -1.0, 0.0, 0.5, 0.0]))
    # no second moment: saliency τ², i.e. magnitude
    torch.testing.assert_close(ffg(base, [base + tau], density=0.4),
                               torch.tensor([3.0, 0.0, 0.0, 0.0, -4.0]))
    assert get_method("ffg").max_models == 1
    with pytest.raises(ValueError, match="one expert"):
        ffg(base, [base + tau] * 2, density=0.4)


def test_zero_saliency_is_never_in_the_top_fraction():
    assert top_fraction_mask(torch.tensor([0.0, 0.0, 0.0, 5.0]), 0.5).tolist() == [0, 0, 0, 1]
    assert top_fraction_mask(torch.tensor([0.0, 1.0]), 1.0).tolist() == [1, 1]
    # ties with the cut are kept, and only they
    assert top_fraction_mask(torch.tensor([3.0, 2.0, 2.0, 1.0]), 0.5).tolist() == [1, 1, 1, 0]


# --------------------------------------------------------------------------------------------
# Localize-and-Stitch


def test_stitch_by_hand_average_and_sum():
    base = torch.full((4,), 1.0)
    tau1, tau2 = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])
    m1, m2 = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    experts = [base + tau1, base + tau2]
    averaged = stitch(base, experts, weights=[1.0, 1.0], mask=[m1, m2])
    torch.testing.assert_close(averaged, base + torch.tensor([1.0, (2 + 20) / 2, 30.0, 0.0]))
    summed = stitch(base, experts, weights=[1.0, 1.0], overlap="sum", mask=[m1, m2])
    torch.testing.assert_close(summed, base + torch.tensor([1.0, 22.0, 30.0, 0.0]))
    weighted = stitch(base, experts, weights=[1.0, 0.5], mask=[m1.bool(), m2.bool()])
    torch.testing.assert_close(weighted, base + torch.tensor([1.0, (2 + 10) / 2, 15.0, 0.0]))
    with pytest.raises(ValueError, match="0/1"):
        stitch(base, experts, weights=[1.0, 1.0], mask=[m1 * 0.5, m2])


def test_dataless_stitch_keeps_exactly_the_top_fraction_of_each_task_vector():
    base = randn(10, 10, seed=40)
    tau = randn(10, 10, seed=41)
    stitched = stitch(base, [base + tau], weights=[1.0], density=0.1)
    expected = torch.where(topk_mask(tau.abs(), 0.1), tau, torch.zeros_like(tau))
    torch.testing.assert_close(stitched - base, expected, rtol=0, atol=1e-6)
    assert int((stitched != base).sum()) == 10


# --------------------------------------------------------------------------------------------
# end to end: RegMean through the engine, GPT-2's Conv1D weights


def write_store(folder, tensors):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"mergesmith_statistics": 1}))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_regmean_recipe_merges_gpt2_conv1d_weights_and_falls_back_elsewhere(tmp_path, zoo, one_thread):
    models = zoo("gpt2")
    e1, e2 = read_tensors(models["e1"]), read_tensors(models["e2"])
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
             "transformer.h.1.mlp.c_proj.weight"]
    inputs = {}
    stores = {}
    for label, seed in (("e1", 50), ("e2", 60)):
        grams = {}
        for i, name in enumerate(names):
            x = randn(80, e1[name].shape[0], seed=seed + i)  # Conv1D: inputs index axis 0
            inputs[label, name] = x
            grams[f"{name}::gram"] = x.T @ x / 80
        stores[str(models[label])] = write_store(tmp_path / f"stats-{label}", grams)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "regmean", "dtype": "float32", "parameters": {"alpha": 1.0},
        "models": [{"model": str(models["e1"])}, {"model": str(models["e2"])}]})
    with pytest.raises(PlanError, match="have no gram statistics"):  # 10 linear weights lack one
        merge(recipe, tmp_path / "out", statistics=stores)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "regmean", "dtype": "float32",
        "parameters": {"alpha": 1.0, "fallback": "linear"},  # asked for: no silent fallback
        "models": [{"model": str(models["e1"])}, {"model": str(models["e2"])}]})
    merge(recipe, tmp_path / "out", statistics=stores)  # the engine, given statistics stores
    out = read_tensors(tmp_path / "out")
    for name in names:
        xs = [inputs["e1", name], inputs["e2", name]]
        expected = least_squares(xs, [xs[0] @ e1[name], xs[1] @ e2[name]])
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-4, atol=1e-4)
    bias = "transformer.h.0.attn.c_attn.bias"
    torch.testing.assert_close(out[bias], (e1[bias] + e2[bias]) / 2)


# --------------------------------------------------------------------------------------------
# Adam's second moments


def trained(folder, arch="llama"):
    """A tiny random model saved in `folder`, loaded back for training."""
    import transformers

    build_model(folder, arch, seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return model


def step(model, optimizer, seed=0):
    ids = torch.randint(2, 90, (2, 8), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def expected_moments(model, optimizer):
    return {name: optimizer.state[p]["exp_avg_sq"] for name, p in model.named_parameters()}


def test_second_moments_round_trip_through_our_safetensors(tmp_path):
    model = trained(tmp_path)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step(model, optimizer)
    write_second_moments(model, optimizer, tmp_path)
    moments = read_second_moments(tmp_path)
    expected = expected_moments(model, optimizer)
    assert moments.keys() == expected.keys()
    assert set(expected) <= set(Checkpoint(tmp_path).tensors)
    for name in expected:
        assert torch.equal(moments[name], expected[name])


def test_second_moments_from_a_trainer_optimizer_pt(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = trained(tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True,
                             weight_decay=0.01)
    optimizer = Trainer(model=model, args=args).create_optimizer()
    assert len(optimizer.param_groups) == 2  # Trainer's decay / no-decay groups
    step(model, optimizer)
    step(model, optimizer, seed=1)
    torch.save(optimizer.state_dict(), tmp_path / TRAINER_OPTIMIZER_FILE)
    moments = read_second_moments(tmp_path)
    expected = expected_moments(model, optimizer)
    assert moments.keys() == expected.keys()
    for name in expected:
        assert torch.equal(moments[name], expected[name]), name


def test_second_moments_from_a_plain_adam_in_model_order(tmp_path):
    model = trained(tmp_path, "gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step(model, optimizer)
    torch.save(optimizer.state_dict(), tmp_path / TRAINER_OPTIMIZER_FILE)
    moments = read_second_moments(tmp_path)
    for name, moment in expected_moments(model, optimizer).items():
        assert torch.equal(moments[name], moment), name


def test_second_moments_errors(tmp_path):
    model = trained(tmp_path)
    with pytest.raises(CalibrationError, match="no optimizer second moments"):
        read_second_moments(tmp_path)
    # a frozen parameter shifts every index: no order fits, and the error says so
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params[1:], lr=1e-3)
    step(model, optimizer)
    torch.save(optimizer.state_dict(), tmp_path / TRAINER_OPTIMIZER_FILE)
    with pytest.raises(CalibrationError, match="match no order"):
        read_second_moments(tmp_path)
    # a pickle that is more than tensors and containers is never unpickled
    torch.save({"state": {}, "param_groups": [], "evil": Exception("x")},
               tmp_path / TRAINER_OPTIMIZER_FILE)
    with pytest.raises(CheckpointError, match="not a plain optimizer state"):
        read_second_moments(tmp_path)
    # our format naming a tensor the checkpoint does not have
    from safetensors.torch import save_file

    save_file({"model.nope.weight": torch.ones(2)}, str(tmp_path / SECOND_MOMENTS_FILE))
    with pytest.raises(CalibrationError, match="model.nope.weight"):
        read_second_moments(tmp_path)
