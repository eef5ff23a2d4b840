"""DOGE (doge_ta; Wei et al. 2025, arXiv:2501.01230), checked against its definition and an
independent transcription of FusionBench's method/doge_ta per-layer update (that code is not
installed: the few lines below transcribe it, with torch's SVD, autograd and torch.optim.Adam).

The METHODS.md properties: (1) projected SGD keeps δ off the shared subspace (Adam does not: the
reference's behaviour, documented); (2) N = 1, η = ‖τ‖, K = 100 %, zero steps returns θ0 + τ;
(3) scaling τi by c > 0 leaves λi·τi (and so the merge without steps) unchanged.
"""

from __future__ import annotations

import pytest
import torch
from conftest import read_tensors, run_cli, write_recipe

from mergesmith.methods import get_method
from mergesmith.methods.doge import AlignmentLoss, adaptive_lambdas, doge_ta, learn_delta, shared_subspace

pytestmark = pytest.mark.usefixtures("one_thread")


def models(shape=(40, 24), experts=3, seed=0, scale=0.1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (base.to(dtype), [(base + scale * torch.randn(shape, generator=gen, dtype=torch.float64))
                             .to(dtype) for _ in range(experts)])


# ------------------------------------------------------------------ the reference, transcribed

def reference_projection(taus, subspace):
    """FusionBench: U_i's top ⌊r/N⌋ columns side by side in an m × r zero matrix, its SVD,
    P = U_u[:, :⌊r/s⌋] U_u[:, :⌊r/s⌋]ᵀ."""
    for i, tau in enumerate(taus):
        u, s, _ = torch.linalg.svd(tau, full_matrices=False)
        if i == 0:
            sum_u = torch.zeros_like(u)
        k = int(s.shape[0] / len(taus))
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
    u_u, _, _ = torch.linalg.svd(sum_u, full_matrices=False)
    keep = int(s.shape[0] / subspace)
    return u_u[:, :keep] @ u_u[:, :keep].T


def reference_delta(taus, eta, subspace, steps, lr):
    """FusionBench's optimize_delta for one layer: autograd through taskvector_loss, the
    gradient's projection onto P subtracted, torch.optim.Adam."""
    vectors = torch.stack(taus)
    lamdas = torch.stack([eta / torch.norm(t) for t in taus])
    projection = reference_projection(taus, subspace)
    delta = torch.nn.Parameter(torch.zeros_like(taus[0]))
    optimizer = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        total_sum = (vectors * lamdas.view(-1, 1, 1)).sum(0)
        delta_sum = (delta.unsqueeze(0) * lamdas.view(-1, 1, 1)).sum(0)
        loss = 0.0
        for v in vectors:
            loss = loss + (-v * total_sum - v * delta_sum + v * v).sum(dim=1).pow(2).sum()
        loss.backward()
        delta.grad.data.sub_(projection @ delta.grad.detach())
        optimizer.step()
    return delta.detach(), lamdas


def reference_mask(tau, percent):
    """topk_values_mask(flat τ, K): |τ| ≥ the (d − ⌊d·K⌋)-th smallest |τ|."""
    flat = tau.reshape(-1)
    d = flat.numel()
    kth = flat.abs().kthvalue(d - int(d * percent / 100)).values
    return (tau.abs() >= kth)


# ------------------------------------------------------------------ tests


def test_same_update_as_fusionbench_per_layer_code():
    """On float64 inputs (no rounding left to differ), δ after 60 Adam steps and the merge equal
    the transcription's; the masks differ only by the one extra entry the reference keeps."""
    base, experts = models(dtype=torch.float64)
    taus = [e - base for e in experts]
    want_delta, lamdas = reference_delta(taus, 0.07, 6, steps=60, lr=1e-3)
    lambdas = adaptive_lambdas(taus, 0.07)
    torch.testing.assert_close(torch.tensor(lambdas, dtype=torch.float64), lamdas, rtol=1e-12, atol=0)
    got_delta = learn_delta(torch.stack(taus), lambdas, shared_subspace(taus, 6),
                            steps=60, lr=1e-3, optimizer="adam")
    assert float(want_delta.abs().max()) > 1e-3  # δ moved: the comparison means something
    torch.testing.assert_close(got_delta, want_delta, rtol=1e-9, atol=1e-12)

    got = doge_ta(base, experts, eta=0.07, subspace=6, topk=0.3, steps=60, lr=1e-3)
    masks = [reference_mask(t, 30) for t in taus]
    want = base + sum(lam * (t + want_delta) * m for lam, t, m in zip(lamdas, taus, masks))
    kept = [torch.count_nonzero(m) for m in masks]
    assert kept == [int(0.3 * base.numel()) + 1] * 3  # the reference's extra entry
    extra = torch.zeros_like(base, dtype=torch.bool)
    for t, m in zip(taus, masks):  # the smallest |τi| the reference keeps, which ours does not
        extra |= m & (t.abs() == t.abs()[m].min())
    torch.testing.assert_close(got[~extra], want[~extra], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got[extra], want[extra])


def test_same_update_in_float32_within_rounding():
    base, experts = models()
    taus = [e - base for e in experts]
    want, _ = reference_delta(taus, 0.07, 6, steps=40, lr=1e-3)
    got = learn_delta(torch.stack(taus), adaptive_lambdas(taus, 0.07), shared_subspace(taus, 6),
                      steps=40, lr=1e-3, optimizer="adam")
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)


def test_sgd_keeps_delta_off_the_shared_subspace_and_adam_does_not():
    """Projected gradient descent stays in the complement of U_s; Adam's entrywise rescaling of
    the projected gradient leaves it (the reference's behaviour, documented). Both lower L."""
    base, experts = models()
    taus = [e - base for e in experts]
    stacked, lambdas = torch.stack(taus), adaptive_lambdas(taus, 0.07)
    basis = shared_subspace(taus, 6)
    assert basis.shape == (40, 24 // 6)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), rtol=0, atol=1e-5)
    loss = AlignmentLoss(stacked, lambdas)
    for optimizer, lr in (("sgd", 1e-2), ("adam", 1e-3)):
        delta = learn_delta(stacked, lambdas, basis, steps=100, lr=lr, optimizer=optimizer)
        on_subspace = float((basis.T @ delta).norm() / delta.norm())
        assert on_subspace < 1e-5 if optimizer == "sgd" else on_subspace > 1e-2, optimizer
        assert loss(delta) < loss(torch.zeros_like(delta)), optimizer


def test_one_expert_with_eta_its_norm_full_mask_and_no_steps_is_the_expert():
    base, (expert,) = models(experts=1)
    norm = float((expert - base).norm())
    got = doge_ta(base, [expert], eta=norm, topk=1.0, steps=0)
    torch.testing.assert_close(got, expert, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(doge_ta(base, [expert], eta=norm, topk=0.3, steps=0), expert)


def test_scaling_a_task_vector_leaves_lambda_tau_and_the_merge_unchanged():
    """λi·τi = η·τi/‖τi‖ per tensor: c·τi gives the same merge (before δ; matrices and vectors)."""
    for shape in ((40, 24), (24,)):
        base, experts = models(shape)
        scaled = [base + c * (e - base) for c, e in zip((3.0, 0.25, 1.0), experts)]
        got = doge_ta(base, scaled, steps=0)
        torch.testing.assert_close(got, doge_ta(base, experts, steps=0), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, get_method("task_arithmetic").fn(
            base, scaled, weights=[0.07] * 3))


def test_tensors_that_are_not_matrices_get_task_arithmetic_with_the_same_lambdas():
    base, experts = models((7,))
    want = base + sum(0.07 * (e - base) / (e - base).norm() for e in experts)
    torch.testing.assert_close(doge_ta(base, experts), want, rtol=1e-6, atol=1e-7)
    # a zero task vector adds nothing (no 0/0)
    torch.testing.assert_close(doge_ta(base, [base.clone(), experts[0]]),
                               base + 0.07 * (experts[0] - base) / (experts[0] - base).norm())


def test_mask_keeps_the_top_k_fraction_of_each_task_vector_per_tensor():
    base, (expert,) = models(experts=1)
    tau = expert - base
    got = doge_ta(base, [expert], eta=1.0, topk=0.3, steps=0) - base
    kept = got != 0
    assert int(kept.sum()) == int(0.3 * tau.numel())
    assert float(tau.abs()[kept].min()) >= float(tau.abs()[~kept].max())
    torch.testing.assert_close(got[kept], (tau / tau.norm())[kept])


def test_merge_from_a_recipe_applies_doge_to_each_tensor(zoo, tmp_path, monkeypatch, capsys):
    """Through `mergesmith merge`: each matrix is doge_ta of its own inputs, with the recipe's
    parameters; norms are task arithmetic with λi = η/‖τi‖."""
    folders = zoo("llama")
    params = {"eta": 0.5, "steps": 5, "lr": 1e-3, "topk": 0.5, "subspace": 3, "optimizer": "sgd"}
    recipe = write_recipe(tmp_path / "doge.yaml", {
        "merge_method": "doge_ta", "base_model": str(folders["base"]), "dtype": "float32",
        "models": [{"model": str(folders[k])} for k in ("e1", "e2")], "parameters": params})
    rc, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out")
    assert rc == 0, err
    out = read_tensors(tmp_path / "out")
    base, e1, e2 = (read_tensors(folders[k]) for k in ("base", "e1", "e2"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.norm.weight"):
        want = doge_ta(base[name], [e1[name], e2[name]], **params)
        torch.testing.assert_close(out[name], want, rtol=0, atol=0)
        assert not torch.equal(out[name], base[name])
