"""Consensus merging (TALL masks) and MagMax: hand-computed tensors, limits, and the engine.

Consensus: Wang et al. 2024, arXiv:2405.07813, eq. 3 (m_i = |τi| > λi·|τ_MTL − τi|, strict as
in the authors' code) and the consensus mask 1[Σ m_i ≥ k]. MagMax: Marczak et al. 2024,
arXiv:2407.06322, §3 (per entry the τi of largest |τi|).
"""

from __future__ import annotations

import pytest
import torch
from conftest import read_tensors, write_recipe

import mergesmith
from mergesmith.errors import PlanError
from mergesmith.methods import task_arithmetic
from mergesmith.methods.consensus import consensus_ta, consensus_ties, magmax, tall_masks

BASE = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
TAUS = [
    torch.tensor([1.0, 1.0, -1.0, 0.5, 0.0, 1.0]),
    torch.tensor([1.0, 2.0, 1.0, 0.0, 0.0, 1.0]),
    torch.tensor([0.5, -0.5, 0.4, 0.0, 0.3, 1.0]),
]
EXPERTS = [BASE + tau for tau in TAUS]
ONES = [1.0, 1.0, 1.0]
HALVES = [0.5, 0.5, 0.5]


def test_tall_masks_by_hand():
    """Eq. 3 with τ_MTL = Σ τi = [2.5, 2.5, 0.4, 0.5, 0.3, 3], λ = 0.5:
    0.5·|τ_MTL − τ1| = [.75, .75, .7, 0, .15, 1]   -> m1 = |τ1| > that = [1, 1, 1, 1, 0, 0]
    0.5·|τ_MTL − τ2| = [.75, .25, .3, .25, .15, 1] -> m2 = [1, 1, 1, 0, 0, 0]
    0.5·|τ_MTL − τ3| = [1, 1.5, 0, .25, 0, 1]      -> m3 = [0, 0, 1, 0, 1, 0]
    The last entry is a tie (1 vs 1) for every task: the strict > leaves it out of all masks."""
    masks = tall_masks(TAUS, sum(TAUS), HALVES)
    expected = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 1, 0]]
    assert [m.int().tolist() for m in masks] == expected


@pytest.mark.parametrize("k, keep", [
    (1, [1, 1, 1, 1, 1, 0]),  # votes [2, 2, 3, 1, 1, 0]
    (2, [1, 1, 1, 0, 0, 0]),
    (3, [0, 0, 1, 0, 0, 0]),
])
def test_consensus_ta_by_hand(k, keep):
    """θ = θ0 + λ·(1[Σ m_i ≥ k] ⊙ Σ τi), the masks of test_tall_masks_by_hand, λ = 0.7."""
    merged = consensus_ta(BASE, EXPERTS, weights=ONES, tall_mask_lambdas=HALVES, k=k, lambda_=0.7)
    multi_task = torch.tensor([2.5, 2.5, 0.4, 0.5, 0.3, 3.0])
    expected = BASE + 0.7 * multi_task * torch.tensor(keep, dtype=torch.float32)
    torch.testing.assert_close(merged, expected)


def test_consensus_ta_weights_and_per_task_lambdas():
    """τ_MTL = Σ wi τi with w = [2, 1, 1] = [3.5, 3.5, -0.6, 1, 0.3, 4]; the masks compare the
    unweighted τi (θi is the task's model), each with its own λ = [0.2, 0.5, 1.0]:
    0.2·|τ_MTL − τ1| = [.5, .5, .08, .1, .06, .6]    -> m1 = [1, 1, 1, 1, 0, 1]
    0.5·|τ_MTL − τ2| = [1.25, .75, .8, .5, .15, 1.5] -> m2 = [0, 1, 1, 0, 0, 0]
    1.0·|τ_MTL − τ3| = [3, 4, 1, 1, 0, 3]            -> m3 = [0, 0, 0, 0, 1, 0]
    votes [1, 2, 2, 1, 1, 1]; k = 2 keeps [0, 1, 1, 0, 0, 0]."""
    merged = consensus_ta(BASE, EXPERTS, weights=[2.0, 1.0, 1.0], tall_mask_lambdas=[0.2, 0.5, 1.0],
                          k=2)
    multi_task = torch.tensor([3.5, 3.5, -0.6, 1.0, 0.3, 4.0])
    keep = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(merged, BASE + multi_task * keep)


def test_consensus_k0_is_task_arithmetic_and_k_above_n_is_the_base():
    """k = 0 keeps every entry (plain TA); k > number of tasks keeps none (θ0)."""
    weights = [0.3, 1.2, -0.4]
    plain = task_arithmetic(BASE, EXPERTS, weights=weights, lambda_=0.8)
    kept = consensus_ta(BASE, EXPERTS, weights=weights, tall_mask_lambdas=HALVES, k=0, lambda_=0.8)
    assert torch.equal(kept, plain)
    none = consensus_ta(BASE, EXPERTS, weights=weights, tall_mask_lambdas=[0.0] * 3, k=4)
    assert torch.equal(none, BASE)


def test_consensus_ties_by_hand():
    """TIES at density 1 (no trim): s = sign(Σ τi) = + everywhere, and the disjoint mean of the
    agreeing entries gives τ_MTL = [5/6, 1.5, 0.7, 0.5, 0.3, 1]. With λ = 0.5:
    m1 = [1, 1, 1, 1, 0, 1], m2 = [1, 1, 1, 0, 0, 1], m3 = [1, 0, 1, 0, 1, 1];
    votes [3, 2, 3, 1, 1, 3]; k = 2 keeps [1, 1, 1, 0, 0, 1]. Unlike TA, the last entry is kept:
    τ_MTL = 1 equals every τi there."""
    merged = consensus_ties(BASE, EXPERTS, weights=ONES, densities=ONES, tall_mask_lambdas=HALVES,
                            k=2, lambda_=1.0)
    multi_task = torch.tensor([5 / 6, 1.5, 0.7, 0.5, 0.3, 1.0])
    keep = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(merged, BASE + multi_task * keep)


def test_consensus_ties_trims_and_sums():
    """density 0.5 keeps the top 3 |τi| of each task, ties at the threshold included:
    trim(τ1) = [1, 1, -1, 0, 0, 1], trim(τ2) = [1, 2, 1, 0, 0, 1], trim(τ3) = [.5, -.5, 0, 0, 0, 1].
    s = sign(Σ trim) = [+, +, 0, 0, 0, +]; the disjoint sum (normalize: false, the authors'
    choice) is τ_MTL = [2.5, 3, 0, 0, 0, 3]. The TALL masks use the untrimmed τi, λ = 0.5:
    0.5·|τ_MTL − τ1| = [.75, 1, .5, .25, 0, 1]   -> m1 = [1, 0, 1, 1, 0, 0]
    0.5·|τ_MTL − τ2| = [.75, .5, .5, 0, 0, 1]    -> m2 = [1, 1, 1, 0, 0, 0]
    0.5·|τ_MTL − τ3| = [1, 1.75, .2, 0, .15, 1]  -> m3 = [0, 0, 1, 0, 1, 0]
    votes [2, 1, 3, 1, 1, 0]; k = 2 keeps [1, 0, 1, 0, 0, 0]."""
    merged = consensus_ties(BASE, EXPERTS, weights=ONES, densities=HALVES, tall_mask_lambdas=HALVES,
                            k=2, normalize=False)
    expected = BASE + torch.tensor([2.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(merged, expected)


def test_magmax_by_hand():
    """Per entry the τi of largest |τi|; on a tie (0.5 vs -0.5) the first model's."""
    taus = [torch.tensor([1.0, -3.0, 0.5, 0.0]), torch.tensor([-2.0, 1.0, -0.5, 0.0]),
            torch.tensor([1.5, 2.0, 0.25, 0.0])]
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    merged = magmax(base, [base + t for t in taus], lambda_=0.5)
    torch.testing.assert_close(merged, base + 0.5 * torch.tensor([-2.0, -3.0, 0.5, 0.0]))


def test_magmax_one_expert_is_the_expert():
    expert = BASE + TAUS[0]
    torch.testing.assert_close(magmax(BASE, [expert]), expert, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# through the engine


def _recipe(models, method, parameters=None, **per_model):
    return {"merge_method": method, "base_model": str(models["base"]),
            "parameters": parameters or {},
            "models": [{"model": str(models[m]), "parameters": dict(per_model)} for m in ("e1", "e2")]}


def test_consensus_ta_in_the_engine_matches_the_function_and_chunking(tmp_path, zoo):
    """Element-wise, so streamed in row blocks: the tensors equal the function's on whole
    tensors, bit for bit, whatever the chunk size."""
    models = zoo("llama")
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(models, "consensus_ta", {"k": 1, "lambda": 0.9},
                                                       tall_mask_lambda=0.4))
    whole = read_tensors(mergesmith.merge(recipe, tmp_path / "whole"))
    rows = read_tensors(mergesmith.merge(recipe, tmp_path / "rows", chunk_size=512))
    ins = [read_tensors(models[m]) for m in ("base", "e1", "e2")]
    for name, tensor in whole.items():
        expected = consensus_ta(ins[0][name], [ins[1][name], ins[2][name]], weights=[1.0, 1.0],
                                tall_mask_lambdas=[0.4, 0.4], k=1, lambda_=0.9)
        assert torch.equal(tensor, expected), name
        assert torch.equal(rows[name], tensor), name
    assert not torch.equal(whole["model.layers.0.mlp.up_proj.weight"],
                           ins[0]["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("method", ["consensus_ties", "magmax"])
def test_other_methods_run_in_the_engine(tmp_path, zoo, method):
    models = zoo("llama")
    out = read_tensors(mergesmith.merge(_recipe(models, method), tmp_path / method))
    ins = [read_tensors(models[m]) for m in ("base", "e1", "e2")]
    fn = {"consensus_ties": lambda b, e: consensus_ties(b, e, weights=[1.0, 1.0], densities=[1.0, 1.0],
                                                        tall_mask_lambdas=[0.6, 0.6]),
          "magmax": lambda b, e: magmax(b, e)}[method]
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.o_proj.weight"):
        torch.testing.assert_close(out[name], fn(ins[0][name], [ins[1][name], ins[2][name]]))


def test_negative_k_is_a_plan_error(tmp_path, zoo):
    with pytest.raises(PlanError, match=r"parameters\.k: k must be >= 0"):
        mergesmith.plan(_recipe(zoo("llama"), "consensus_ta", {"k": -1}))
