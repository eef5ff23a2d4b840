"""LoRA-LEGO, KnOTS and orthogonal adaptation (methods/lora_modular.py) on one module's factors,
against hand computations and the definitions in METHODS.md ("lora_lego", "knots",
"orthogonal_lora_sum")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergesmith.methods import lora_modular as lm
from mergesmith.methods.registry import TensorContext

CTX = TensorContext(name="model.layers.0.self_attn.q_proj.weight", seed=7)


def loras(ranks, d_out=12, d_in=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d_out, r, generator=g) for r in ranks]
    As = [torch.randn(r, d_in, generator=g) for r in ranks]
    return Bs, As


def delta(B, A):
    return B.double() @ A.double()


def weighted_sum(Bs, As, scalings, weights):
    return sum(w * s * delta(b, a) for b, a, s, w in zip(Bs, As, scalings, weights))


# ---------------------------------------------------------------------------- LoRA-LEGO


@pytest.mark.parametrize("reweight", ["none", "norm", "sum"])
def test_lego_full_rank_is_the_sum_of_the_deltas(reweight, one_thread):
    """k = Σ r_i: every unit is its own cluster, so BA = Σ w_i s_i B_i A_i (negative weights
    too)."""
    Bs, As = loras([2, 3, 2])
    scalings, weights = [0.5, 2.0, 1.5], [1.0, -0.5, 2.0]
    B, A = lm.lora_lego(Bs, As, scalings, weights=weights, ctx=CTX, rank=7, reweight=reweight)
    assert B.shape == (12, 7) and A.shape == (7, 10)
    torch.testing.assert_close(delta(B, A), weighted_sum(Bs, As, scalings, weights),
                               atol=1e-5, rtol=1e-5)


def test_lego_clusters_coinciding_units_up_to_sign_and_scale(one_thread):
    """Two adapters hold the same unit as (b, a) and (−2b, −a/2); with k = 1 the centroid is that
    unit: `sum` gives ΔW_1 + ΔW_2 = 2 b aᵀ, `none` and `norm` the one unit b aᵀ."""
    b = torch.tensor([[1.0], [2.0], [0.0]])
    a = torch.tensor([[3.0, -1.0]])
    Bs, As = [b, -2 * b], [a, -a / 2]
    for reweight, factor in (("sum", 2.0), ("none", 1.0), ("norm", 1.0)):
        B, A = lm.lora_lego(Bs, As, [1.0, 1.0], weights=[1.0, 1.0], ctx=CTX, rank=1,
                            reweight=reweight)
        torch.testing.assert_close(delta(B, A), factor * delta(b, a))


def test_lego_ignores_unit_order_and_sign(one_thread):
    """Permuting the units inside an input LoRA, or flipping (b, a) -> (−b, −a) of one unit, leaves
    the merge unchanged (canonical form and order before a seeded k-means)."""
    Bs, As = loras([4, 4, 4], d_out=16, d_in=14, seed=3)
    reference = lm.lora_lego(Bs, As, [1.0] * 3, weights=[1.0] * 3, ctx=CTX, rank=5)
    order = torch.tensor([2, 0, 3, 1])
    permuted_B, permuted_A = list(Bs), list(As)
    permuted_B[1], permuted_A[1] = Bs[1][:, order], As[1][order]
    flipped_B, flipped_A = list(Bs), list(As)
    flipped_B[2], flipped_A[2] = Bs[2].clone(), As[2].clone()
    flipped_B[2][:, 1] *= -3.0
    flipped_A[2][1] /= -3.0
    for b_list, a_list in ((permuted_B, permuted_A), (flipped_B, flipped_A)):
        B, A = lm.lora_lego(b_list, a_list, [1.0] * 3, weights=[1.0] * 3, ctx=CTX, rank=5)
        torch.testing.assert_close(delta(B, A), delta(*reference), atol=1e-5, rtol=1e-5)


def test_lego_is_seeded(one_thread):
    """Same seed, same merge; the rank is k."""
    Bs, As = loras([4, 4, 4], d_out=16, d_in=14, seed=5)
    first = lm.lora_lego(Bs, As, [1.0] * 3, weights=[1.0] * 3, ctx=CTX, rank=3)
    again = lm.lora_lego(Bs, As, [1.0] * 3, weights=[1.0] * 3, ctx=CTX, rank=3)
    assert first[0].shape == (16, 3) and first[1].shape == (3, 14)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    points = torch.cat([c + 0.1 * torch.randn(5, 2, generator=g, dtype=torch.float64)
                        for c in centers])
    labels = lm.kmeans(points, 3, torch.Generator().manual_seed(1))
    groups = {tuple(sorted(torch.nonzero(labels == c).flatten().tolist())) for c in range(3)}
    assert groups == {tuple(range(0, 5)), tuple(range(5, 10)), tuple(range(10, 15))}


# ---------------------------------------------------------------------------- KnOTS


def test_knots_shared_basis_reproduces_each_delta(one_thread):
    """U S V_iᵀ = s_i B_i A_i for every i, before any merge (ranks may differ)."""
    Bs, As = loras([2, 3, 4])
    scalings = [0.5, 2.0, 1.0]
    u, blocks = lm.shared_basis(Bs, As, scalings)
    assert u.shape[1] <= 9
    torch.testing.assert_close(u.mT @ u, torch.eye(u.shape[1], dtype=torch.float64))
    for block, b, a, s in zip(blocks, Bs, As, scalings):
        torch.testing.assert_close(u @ block, s * delta(b, a))


def test_knots_plain_average_is_the_average_delta(one_thread):
    """KnOTS with a plain mean of the V_i equals the mean of the ΔW_i (a per-adapter SVD would
    not: its bases differ); the rank is at most Σ r_i."""
    Bs, As = loras([2, 3, 2])
    scalings = [0.5, 2.0, 1.5]
    B, A = lm.knots(Bs, As, scalings, weights=[1.0, 1.0, 1.0], ctx=CTX, merge="mean")
    assert B.shape[1] <= 7
    torch.testing.assert_close(delta(B, A), weighted_sum(Bs, As, scalings, [1 / 3] * 3),
                               atol=1e-5, rtol=1e-5)


def ties_reference(blocks, density):
    """TIES on arrays (trim top ⌊d·n⌋ |x| per block, elect sign of the sum, disjoint mean)."""
    trimmed = []
    for x in blocks:
        k = int(density * x.size)
        cut = np.sort(np.abs(x).ravel())[-k]
        trimmed.append(np.where(np.abs(x) >= cut, x, 0.0))
    sign = np.sign(sum(trimmed))
    agree = [np.where(np.sign(x) == sign, x, 0.0) for x in trimmed]
    count = sum((x != 0).astype(float) for x in agree)
    return sum(agree) / np.maximum(count, 1)


def test_knots_ties_matches_the_definition_on_the_full_svd(one_thread):
    """KnOTS-TIES equals TIES applied to the blocks S V_iᵀ of numpy's SVD of the formed
    M = [ΔW_1 … ΔW_N], mapped back by U (a component's sign flip flips its row of every block
    and its column of U alike, which TIES follows)."""
    Bs, As = loras([2, 2, 3], d_out=14, d_in=9, seed=2)
    scalings = [1.0, 0.7, 1.3]
    M = np.concatenate([s * delta(b, a).numpy() for b, a, s in zip(Bs, As, scalings)], axis=1)
    u, sigma, vh = np.linalg.svd(M, full_matrices=False)
    rank = 7
    u, sv = u[:, :rank], sigma[:rank, None] * vh[:rank]
    blocks = np.split(sv, 3, axis=1)
    expected = u @ ties_reference(blocks, 0.5)
    B, A = lm.knots(Bs, As, scalings, weights=[1.0] * 3, ctx=CTX, merge="ties", density=0.5)
    assert B.shape == (14, rank)
    np.testing.assert_allclose(delta(B, A).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("merge", ["ties", "dare_ties", "dare_linear", "sum"])
def test_knots_rules_keep_rank_and_seed(merge, one_thread):
    Bs, As = loras([2, 3, 2])
    run = lambda: lm.knots(Bs, As, [1.0] * 3, weights=[1.0] * 3, ctx=CTX, merge=merge,  # noqa: E731
                           density=0.5)
    (B, A), (B2, A2) = run(), run()
    assert B.shape[1] <= 7 and torch.equal(B, B2) and torch.equal(A, A2)


def test_knots_rank_truncates_to_the_best_rank_k(one_thread):
    Bs, As = loras([3, 3])
    full = delta(*lm.knots(Bs, As, [1.0, 1.0], weights=[1.0, 1.0], ctx=CTX, merge="sum"))
    B, A, info = lm.knots(Bs, As, [1.0, 1.0], weights=[1.0, 1.0], ctx=CTX, merge="sum", rank=2)
    assert B.shape[1] == 2
    u, s, vh = torch.linalg.svd(full)
    torch.testing.assert_close(delta(B, A), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-5)
    assert info["energy"] == pytest.approx(float(s[:2].square().sum() / s.square().sum()))


# ---------------------------------------------------------------------------- orthogonal


def test_orthogonal_sum_has_no_crosstalk(one_thread):
    """With A_i from the sampler, an input in A_i's row span sees only λ_i s_i B_i A_i."""
    ranks, d_in = [2, 3, 2], 10
    As = lm.orthogonal_down_projections(d_in, ranks, seed=4, module="m")
    Bs, _ = loras(ranks, d_in=d_in)
    scalings, weights = [2.0, 0.5, 1.0], [1.0, -1.0, 0.5]
    B, A, info = lm.orthogonal_lora_sum(Bs, As, scalings, weights=weights)
    off_diagonal = info["side"] - torch.diag(torch.diagonal(info["side"]))
    assert float(off_diagonal.abs().max()) < 1e-6
    merged = delta(B, A)
    torch.testing.assert_close(merged, weighted_sum(Bs, As, scalings, weights))
    g = torch.Generator().manual_seed(9)
    for i in range(3):
        x = As[i].double().mT @ torch.randn(ranks[i], 1, generator=g, dtype=torch.float64)
        torch.testing.assert_close(merged @ x, weights[i] * scalings[i] * delta(Bs[i], As[i]) @ x,
                                   atol=1e-5, rtol=1e-5)


def test_sampler_is_orthonormal_and_reproducible():
    ranks = [3, 4, 5]
    As = lm.orthogonal_down_projections(16, ranks, seed=1, module="m")
    assert [a.shape for a in As] == [(3, 16), (4, 16), (5, 16)]
    rows = torch.cat(As).double()
    torch.testing.assert_close(rows @ rows.mT, torch.eye(12, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    again = lm.orthogonal_down_projections(16, ranks, seed=1, module="m")
    assert all(torch.equal(a, b) for a, b in zip(As, again))
    other = lm.orthogonal_down_projections(16, ranks, seed=2, module="m")
    assert not torch.equal(As[0], other[0])
    crowded = lm.orthogonal_down_projections(8, [6, 6], seed=1)  # Σ r_i > d_in: two bases
    first = torch.cat(crowded)[:8].double()
    torch.testing.assert_close(first @ first.mT, torch.eye(8, dtype=torch.float64), atol=1e-6,
                               rtol=0)


def test_cross_orthogonality_by_hand():
    """‖A_1A_2ᵀ‖_F / (‖A_1‖_F‖A_2‖_F): [1 0 0]·[1 1 0]ᵀ = 1 over 1·√2; orthogonal rows give 0."""
    a1 = torch.tensor([[1.0, 0.0, 0.0]])
    a2 = torch.tensor([[1.0, 1.0, 0.0]])
    a3 = torch.tensor([[0.0, 0.0, 2.0]])
    c = lm.cross_orthogonality([a1, a2, a3])
    assert c[0, 1] == pytest.approx(1 / np.sqrt(2)) and c[1, 0] == pytest.approx(1 / np.sqrt(2))
    assert c[0, 2] == 0 and c[1, 2] == 0 and c[2, 2] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory):
    """A toy Llama and two LoRAs of different ranks and scalings on q_proj and v_proj."""
    pytest.importorskip("peft")
    from test_adapter_io import make_adapter

    from mergesmith.toy import build_model

    root = tmp_path_factory.mktemp("modular")
    base = build_model(root / "base", "llama", seed=0)
    targets = ["q_proj", "v_proj"]
    return base, [make_adapter(base, root / "a1", "llama", seed=1, r=2, lora_alpha=4,
                               target_modules=targets),
                  make_adapter(base, root / "a2", "llama", seed=2, r=3, lora_alpha=3,
                               target_modules=targets, use_rslora=True)]


@pytest.mark.parametrize("method, params", [
    ("lora_lego", {"rank": 3}),
    ("knots", {"merge": "ties", "density": 0.5}),
    ("orthogonal_lora_sum", {}),
])
def test_recipe_merges_adapters_into_an_adapter_peft_loads(method, params, llama_adapters,
                                                           tmp_path, monkeypatch, capsys,
                                                           one_thread):
    """Through `mergesmith merge`: each module of the written adapter is the method's (B, A) on
    the inputs' factors, and PeftModel's merged weights are the base plus that B·A."""
    import peft
    from conftest import run_cli, write_recipe

    from mergesmith.io.adapter import read_adapter
    from mergesmith.methods import get_method
    from mergesmith.toy import model_class

    base, paths = llama_adapters
    weights = [1.0, 0.5]
    recipe = write_recipe(tmp_path / "recipe.yml", {
        "merge_method": method,
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights)],
        "parameters": params})
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out")
    assert code == 0, err
    merged, inputs = read_adapter(tmp_path / "out"), [read_adapter(p) for p in paths]
    model = peft.PeftModel.from_pretrained(model_class("llama").from_pretrained(base),
                                           tmp_path / "out").merge_and_unload().state_dict()
    original = model_class("llama").from_pretrained(base).state_dict()
    assert set(merged.modules) == set(inputs[0].modules)
    for weight in merged.modules:
        Bs, As = zip(*(a.factors(weight) for a in inputs))
        scalings = [a.modules[weight].scaling for a in inputs]
        B, A = get_method(method).fn(list(Bs), list(As), scalings, weights=weights,
                                     ctx=TensorContext(weight, seed=0), **params)[:2]
        torch.testing.assert_close(merged.delta(weight), B @ A, rtol=0, atol=1e-6)
        torch.testing.assert_close(model[weight], original[weight] + B @ A, rtol=1e-5, atol=1e-5)
    if method == "orthogonal_lora_sum":  # the report of how orthogonal the A_i are
        import json

        report = json.loads((tmp_path / "out" / "cross_orthogonality.json").read_text())
        worst = max(float(lm.cross_orthogonality([a.factors(w)[1] for a in inputs])[0, 1])
                    for w in merged.modules)
        assert report["largest_off_diagonal"] == pytest.approx(worst)
        assert report["adapters"] == [str(p) for p in paths]
