"""TSV-M, Iso-C, Iso-CTS (methods/subspace.py), PCB and WIDEN (methods/competition.py).

Three kinds of check, each naming the definition it tests:
* hand-built matrices whose answer is known in closed form (flat spectra, orthogonal supports);
* the authors' released code, ported here line by line in its own style (zeros_like buffers,
  full sorts, explicit direction matrices) and run on the same small tensors: TSV-M from
  AntoAndGar/task_singular_vectors src/utils/TSVM_utils.py (compute_and_sum_svd_mem_reduction),
  Iso-CTS from danielm1405/iso-merging as shipped in FusionBench (iso_utils.iso_cts), PCB from
  duguodong7/pcb-merging pcb-merging.py (PCB_merge) with merging.py's per-task λ, WIDEN from
  yule-BUAA/MergeLLM model_merging_methods/merging_methods.py (widen_merging);
* one merge per method through the engine on tiny Llama models, loaded back in transformers.
"""

from __future__ import annotations

import pytest
import torch
from conftest import model_class, read_tensors

import mergesmith
from mergesmith.methods import TensorContext, get_method, iso_c, iso_cts, pcb, tsv_m, widen
from mergesmith.methods.subspace import (gram, orthogonalize_beside, polar, subspace_sizes,
                                         top_singular_triplets)


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same random matrices, whatever ran before it."""
    torch.manual_seed(0)


def experts_around(base: torch.Tensor, count: int, seed: int = 0, scale: float = 0.1):
    gen = torch.Generator().manual_seed(seed)
    return [base + scale * torch.randn(base.shape, generator=gen) for _ in range(count)]


def singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


def column_projector(x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(x.double(), full_matrices=False)
    u = u[:, s > tol * s[0]]
    return u @ u.T


# ---------------------------------------------------------------- the authors' code, ported

def tsv_reference(taus):
    sv_reduction = 1 / len(taus)
    for i, vec in enumerate(taus):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        k = int(s.shape[0] * sv_reduction)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def iso_cts_reference(taus, common_space_fraction):
    shape_ = taus[0].shape
    combined_w = sum(taus)
    common = int(min(shape_) * common_space_fraction)
    total_ts = round((min(shape_) - common) / len(taus)) * len(taus)
    common = min(shape_) - total_ts
    u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    n = int((min(shape_) - common) / len(taus))
    for i, w in enumerate(taus):
        u_ts, s_ts, v_ts = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        if i == 0:
            all_u, all_s = torch.zeros_like(u_ts), torch.zeros_like(s_ts)
            all_v = torch.zeros_like(v_ts)
        all_u[:, i * n:(i + 1) * n] = u_ts[:, :n]
        all_s[i * n:(i + 1) * n] = s_ts[:n]
        all_v[i * n:(i + 1) * n, :] = v_ts[:n, :]
    t = len(taus) * n
    all_u[:, t:t + common], all_s[t:t + common], all_v[t:t + common, :] = cu, cs, cv
    a, _, b = torch.linalg.svd(all_u, full_matrices=False)
    c, _, d = torch.linalg.svd(all_v, full_matrices=False)
    return torch.linalg.multi_dot((a @ b, torch.diag(torch.ones_like(all_s) * all_s.mean()), c @ d))


def pcb_reference(flat, ratio, lams):
    def normalize(x, dim=0):
        lo, hi = x.min(dim=dim, keepdim=True)[0], x.max(dim=dim, keepdim=True)[0]
        return (x - lo) / (hi - lo)

    def clamp(x, min_ratio=0, max_ratio=0):
        d = x.size(1)
        sorted_x, _ = torch.sort(x, dim=1)
        lo = sorted_x[:, int(d * min_ratio)].unsqueeze(1)
        hi = sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    n, d = flat.shape
    all_abs = clamp(torch.abs(flat), min_ratio=0.0001, max_ratio=0.0001)
    clamped = torch.sign(flat) * all_abs
    self_act = torch.exp(n * normalize(all_abs, 1) ** 2)
    cross_act = torch.tanh(flat * torch.sum(flat, dim=0))
    scale = normalize(clamp(self_act * cross_act, 1 - ratio, 0), dim=1)
    tvs = clamped * torch.tensor(lams).unsqueeze(1)
    return torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)


def widen_reference(base, experts, ratio=1.0, calibration=1.0, embedding=False):
    def rank(diff):
        order = torch.argsort(diff, dim=1, descending=False, stable=True)
        sig = (torch.arange(diff.shape[1]) / diff.shape[1]).repeat(diff.shape[0])
        sig = sig.reshape(diff.shape)
        return torch.scatter(torch.zeros(sig.shape), dim=1, index=order, src=sig)

    def importance(sig):
        scores = torch.softmax(sig, dim=0)
        scores[sig > torch.mean(sig, dim=1, keepdim=True) * ratio] = calibration
        return scores

    deltas = torch.stack([e - base for e in experts])
    if base.dim() == 1:
        scores = importance(torch.abs(torch.stack(experts) - base))
        return base + (deltas * scores).sum(dim=0)
    if embedding:
        return widen_reference(base.T, [e.T for e in experts], ratio, calibration).T
    m0 = torch.norm(base, p=2, dim=0)
    mag, dirs = [], []
    for e in experts:
        m = torch.norm(e, p=2, dim=0)
        mag.append(torch.abs(m - m0))
        dirs.append(1.0 - torch.cosine_similarity(e / m, base / m0, dim=0))
    w = 0.5 * (importance(rank(torch.stack(mag))) + importance(rank(torch.stack(dirs))))
    return base + (deltas * w.unsqueeze(dim=1)).sum(dim=0)


# ---------------------------------------------------------------- TSV-M

@pytest.mark.parametrize("shape,count", [((6, 4), 2), ((8, 6), 3), ((5, 9), 3)])
def test_tsv_m_matches_the_authors_code(shape, count):
    """Alg. 1 / Eq. 6: top-(r/T) triplets per task, U⊥ = polar(U), V⊥ = polar(V), U⊥ΣV⊥ᵀ."""
    base = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    experts = experts_around(base, count)
    expected = base + tsv_reference([e - base for e in experts])
    torch.testing.assert_close(tsv_m(base, experts), expected, rtol=1e-5, atol=1e-5)
    # per-model weights scale τi before its SVD; λ scales the merged task vector
    weights = [2.0, -0.5, 1.5][:count]
    got = tsv_m(base, experts, lambda_=0.5, weights=weights)
    expected = base + 0.5 * tsv_reference([w * (e - base) for w, e in zip(weights, experts)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tsv_m_one_expert_at_full_rank_returns_the_expert():
    """T = 1, k = r: U⊥ = U, V⊥ = V, so U Σ Vᵀ = τ."""
    base = torch.randn(6, 4)
    (expert,) = experts_around(base, 1)
    torch.testing.assert_close(tsv_m(base, [expert]), expert, rtol=1e-5, atol=1e-6)
    # and with rank fraction 1/2 it is the best rank-2 approximation (Eckart-Young)
    u, s, vh = torch.linalg.svd(expert - base, full_matrices=False)
    torch.testing.assert_close(tsv_m(base, [expert], rank_fraction=0.5),
                               base + u[:, :2] @ torch.diag(s[:2]) @ vh[:2], rtol=1e-5, atol=1e-6)


def test_tsv_m_of_orthogonal_task_vectors_is_task_arithmetic():
    """Disjoint row and column supports: the Ui (and Vi) are mutually orthogonal, the polar
    factors change nothing, and U⊥ΣV⊥ᵀ = Σ τi (the paper's zero-interference case)."""
    base = torch.randn(6, 4)
    tau1, tau2 = torch.zeros(6, 4), torch.zeros(6, 4)
    tau1[:3, :2] = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])
    tau2[3:, 2:] = torch.tensor([[-2.0, 1.0], [0.0, 4.0], [1.0, 1.0]])
    torch.testing.assert_close(tsv_m(base, [base + tau1, base + tau2]), base + tau1 + tau2,
                               rtol=1e-5, atol=1e-5)


def test_tsv_m_vectors_take_the_mean_task_vector():
    """1-D tensors: θ0 + λ·mean(τi), as the authors' code averages non-matrix parameters."""
    base = torch.randn(7)
    experts = experts_around(base, 3)
    expected = base + 0.7 * sum(e - base for e in experts) / 3
    torch.testing.assert_close(tsv_m(base, experts, lambda_=0.7), expected)


# ---------------------------------------------------------------- Iso-C / Iso-CTS

def test_iso_c_by_hand():
    """Σ τi = diag(3, 1) padded: σ̄ = 2, so the merged task vector is 2·U Vᵀ."""
    base = torch.zeros(3, 2)
    tau1 = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    tau2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    expected = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(iso_c(base, [tau1, tau2]), expected)
    torch.testing.assert_close(iso_c(base, [tau1, tau2], lambda_=1.5), 1.5 * expected)


def test_iso_c_flattens_the_spectrum_and_keeps_the_subspace():
    """Iso-C: singular values of the merged τ all equal mean(σ(Σ τi)); its left and right
    singular subspaces are those of Σ τi."""
    base = torch.randn(6, 4)
    experts = experts_around(base, 3)
    total = sum(e - base for e in experts)
    merged = iso_c(base, experts) - base
    sigma = singular_values(merged)
    torch.testing.assert_close(sigma, torch.full_like(sigma, float(singular_values(total).mean())),
                               rtol=1e-5, atol=1e-6)
    for side in (lambda x: x, lambda x: x.T):
        torch.testing.assert_close(column_projector(side(merged)), column_projector(side(total)),
                                   rtol=0, atol=1e-5)


def test_iso_c_with_one_expert_keeps_its_direction():
    """One expert: σ̄ U Vᵀ has τ's singular vectors. If τ's spectrum is already flat (τ = c·Q,
    Q with orthonormal columns), Iso-C with λ = 1 returns τ itself; a rank-one τ gains no
    directions from the zero singular values (the noise-floor rule), but they count in the
    mean (σ̄ = σ1/4 on 6×4, as the authors' code): τ/4."""
    base = torch.randn(6, 4)
    q, _ = torch.linalg.qr(torch.randn(6, 4))
    torch.testing.assert_close(iso_c(base, [base + 0.3 * q]), base + 0.3 * q, rtol=1e-5, atol=1e-6)
    rank_one = torch.outer(torch.randn(6), torch.randn(4))
    torch.testing.assert_close(iso_c(base, [base + rank_one]), base + rank_one / 4,
                               rtol=1e-5, atol=1e-5)
    tau = torch.randn(6, 4)
    u, _, vh = torch.linalg.svd(tau, full_matrices=False)
    direction = iso_c(base, [base + tau]) - base
    torch.testing.assert_close(direction / direction.norm(), (u @ vh) / (u @ vh).norm(),
                               rtol=1e-5, atol=1e-6)


def test_iso_cts_matches_the_authors_code():
    """Iso-CTS: common top-k of Σ τi plus each task's top-s directions off it, orthogonalized,
    flat spectrum. 12×10, 3 tasks, fraction 0.5: k = 5 → s = round(5/3) = 2, k = 10 − 6 = 4."""
    assert subspace_sizes(10, 3, 0.5) == (4, 2)
    base = torch.randn(12, 10, generator=torch.Generator().manual_seed(5))
    experts = experts_around(base, 3, seed=6)
    expected = base + iso_cts_reference([e - base for e in experts], 0.5)
    torch.testing.assert_close(iso_cts(base, experts, common_space_fraction=0.5), expected,
                               rtol=1e-5, atol=1e-5)
    merged = iso_cts(base, experts, common_space_fraction=0.5) - base
    sigma = singular_values(merged)
    torch.testing.assert_close(sigma, sigma.mean().expand_as(sigma), rtol=1e-5, atol=1e-6)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    """k = r leaves no task-specific directions: Iso-CTS reduces to Iso-C (the paper's Iso-C
    is Iso-CTS without task-specific subspaces)."""
    base = torch.randn(8, 6)
    experts = experts_around(base, 3)
    torch.testing.assert_close(iso_cts(base, experts, common_space_fraction=1.0),
                               iso_c(base, experts),
                               rtol=1e-5, atol=1e-6)


def test_iso_cts_never_asks_for_more_directions_than_the_rank():
    """r = 2, T = 3, fraction 0: round(2/3)·3 = 3 > r in the authors' sizing; capped here."""
    assert subspace_sizes(2, 3, 0.0) == (2, 0)
    assert subspace_sizes(4096, 8, 0.8) == (3280, 102)
    base = torch.randn(2, 5)
    experts = experts_around(base, 3)
    assert torch.isfinite(iso_cts(base, experts, common_space_fraction=0.0)).all()


# ---------------------------------------------------------------- the Gram route against full SVDs
# subspace.py takes singular values and vectors from an eigh of the smaller Gram matrix in
# float64, never from an SVD. These compare it with torch.linalg.svd in float64 on wide, tall
# and square matrices, and the methods with the authors' code run in float64: within 1e-6 of
# the largest entry (measured: 4e-8, the fp32 output's own rounding; the former fp32-SVD route
# was 1e-5 to 1e-4 off).

SHAPES = [(30, 70), (70, 30), (32, 32)]


def low_rank_plus_noise(shape, count, seed, rank=6, noise=0.05):
    """Task vectors like fine-tunes': a few strong directions over a full-rank floor."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    return [torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) / rank
            + noise * torch.randn(shape, generator=gen) for _ in range(count)]


def close_to(got, expected, tol=1e-6):
    """|got − expected| ≤ tol·max|expected|, entry by entry, in float64."""
    expected = expected.double()
    err = float((got.double() - expected).abs().max() / expected.abs().max())
    assert err <= tol, f"{err:.2e} of the largest entry"


@pytest.mark.parametrize("shape", SHAPES + [(1, 5), (7, 3)])
def test_gram_is_the_product(shape):
    """Blocks above the diagonal mirrored below (rows not a multiple of the block count too)."""
    a = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(gram(a), a @ a.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_triplets_and_polar_factor_match_a_full_svd(shape):
    x = sum(low_rank_plus_noise(shape, 1, seed=21))
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    got_u, got_s, got_vh = top_singular_triplets(x, 10)
    torch.testing.assert_close(got_s, s[:10], rtol=1e-10, atol=0)
    # the vectors up to sign: compare the rank-10 truncation they rebuild (Eckart-Young)
    close_to((got_u * got_s) @ got_vh, (u[:, :10] * s[:10]) @ vh[:10], tol=1e-10)
    direction, sigma = polar(x)
    close_to(direction, u @ vh, tol=1e-10)
    torch.testing.assert_close(sigma, s, rtol=1e-10, atol=0)


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_polar_factor_of_a_rank_deficient_matrix_spans_its_range_only(shape):
    """Rank 3: U Vᵀ over the 3 directions, not completed by arbitrary ones (the noise floor)."""
    x = torch.randn(shape[0], 3) @ torch.randn(3, shape[1])
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    direction, sigma = polar(x)
    assert len(sigma) == 3
    close_to(direction, u[:, :3] @ vh[:3], tol=1e-10)


@pytest.mark.parametrize("k,t,n", [(20, 5, 50), (4, 9, 30), (0, 3, 8), (15, 15, 40)])
def test_orthogonalize_beside_is_the_polar_factor_of_the_stack(k, t, n):
    """[E; B] with B's rows orthonormal: the low-rank update equals the whole polar factor."""
    basis = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0].T
    extra = torch.randn(t, n, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(torch.cat([extra, basis]), full_matrices=False)
    torch.testing.assert_close(orthogonalize_beside(extra, basis), u @ vh, rtol=0, atol=1e-12)


def iso_c_reference(taus):
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return s.mean() * u @ vh


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_methods_match_the_authors_code_in_float64(method, shape):
    """Zero base, so the output is the merged task vector; references in float64 throughout.
    Iso-CTS goes through the complement basis when wide and projects τi when tall."""
    taus = low_rank_plus_noise(shape, 3, seed=22)
    zero = torch.zeros(shape)
    taus64 = [tau.double() for tau in taus]
    expected = {"tsv_m": lambda: tsv_reference(taus64),
                "iso_c": lambda: iso_c_reference(taus64),
                "iso_cts": lambda: iso_cts_reference(taus64, 0.8)}[method]()
    got = {"tsv_m": tsv_m, "iso_c": iso_c, "iso_cts": iso_cts}[method](zero, taus)
    assert got.dtype == torch.float32
    close_to(got, expected)


def test_tsv_m_of_identical_experts_is_their_best_low_rank_approximation():
    """T copies of τ: U = [U_k … U_k], whose polar factor on its range is [U_k … U_k]/√T, so
    U⊥ Σ V⊥ᵀ = U_k Σ_k V_kᵀ, the best rank-k approximation (k = r/T). An SVD-based polar
    factor completes it with arbitrary directions instead."""
    (tau,) = low_rank_plus_noise((12, 20), 1, seed=23)
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    expected = (u[:, :4] * s[:4]) @ vh[:4]
    close_to(tsv_m(torch.zeros(12, 20), [tau, tau.clone(), tau.clone()]), expected)


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)])
def test_iso_cts_of_experts_inside_the_common_subspace_is_iso_c(shape):
    """LoRA-like experts (rank 2 each) whose sum spans all of them: nothing of any τi lies off
    the common subspace but rounding noise, so no task-specific direction is added (their
    directions would be arbitrary) and Iso-CTS is Iso-C."""
    gen = torch.Generator().manual_seed(24)
    taus = [torch.randn(shape[0], 2, generator=gen) @ torch.randn(2, shape[1], generator=gen)
            for _ in range(3)]
    zero = torch.zeros(shape)
    merged = iso_cts(zero, taus)
    torch.testing.assert_close(merged, iso_c(zero, taus), rtol=1e-5, atol=1e-6)
    assert int((singular_values(merged) > 1e-4).sum()) == 6


# ---------------------------------------------------------------- PCB

@pytest.mark.parametrize("shape,density", [((6, 4), 0.5), ((300,), 0.1), ((40, 30), 0.2)])
def test_pcb_matches_the_authors_code(shape, density):
    """PCB_merge: intra exp(T·Norm(|τ|)²), inter tanh(τi Σ τj), top-r by the signed score,
    Norm-rescaled weights, Σ λi β̂i τ̃i / Σ β̂i, θ = θ0 + λ·that."""
    base = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    experts = experts_around(base, 3, seed=8)
    experts[2] = base - 0.5 * (experts[0] - base)  # a task that fights the others
    lams = [1.0, 0.8, 1.2]
    flat = torch.stack([(e - base).flatten() for e in experts])
    expected = base + 0.9 * pcb_reference(flat, density, lams).view(shape)
    got = pcb(base, experts, weights=lams, density=density, lambda_=0.9)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_pcb_of_identical_experts_keeps_the_top_fraction():
    """Identical experts: every task scores the same, β increases with |τ|, so the merge is τ
    on the kept entries and 0 elsewhere; the code keeps d − ⌊d(1 − r)⌋ − 1 entries (the entry
    at the threshold is rescaled to weight 0) and clips the largest |τ| to the next one."""
    base = torch.randn(1000)
    (expert,) = experts_around(base, 1, seed=9)
    tau = expert - base
    merged = pcb(base, [expert, expert.clone(), expert.clone()], density=0.2) - base
    kept = merged != 0
    assert int(kept.sum()) == 1000 - 800 - 1
    assert torch.equal(kept, tau.abs() > tau.abs().kthvalue(801).values)
    top = tau.abs().argmax()
    rest = kept.clone()
    rest[top] = False
    torch.testing.assert_close(merged[rest], tau[rest])
    torch.testing.assert_close(merged[top].abs(), tau.abs().kthvalue(999).values)


# ---------------------------------------------------------------- WIDEN

@pytest.mark.parametrize("shape,t,s", [((6, 4), 1.0, 1.0), ((12, 9), 1.0, 1.0), ((6, 4), 0.5, 0.7),
                                       ((9,), 1.0, 1.0)])
def test_widen_matches_the_authors_code(shape, t, s):
    """ΔM = |m_i − m_0|, ΔD = 1 − cos(D_i, D_0) per column, ranked within each model, softmax
    over models, calibrated to s above t × mean; vectors: the same on raw |τ|."""
    base = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    experts = experts_around(base, 3, seed=12)
    got = widen(base, experts, above_average_value_ratio=t, score_calibration_value=s)
    torch.testing.assert_close(got, widen_reference(base, experts, t, s), rtol=1e-5, atol=1e-6)


def test_widen_scores_token_embeddings_by_row():
    """The code transposes model.embed_tokens.weight, so each token (row) is a column."""
    base = torch.randn(10, 4)
    experts = experts_around(base, 2, seed=13)
    ctx = TensorContext("model.embed_tokens.weight")
    expected = widen_reference(base, experts, embedding=True)
    torch.testing.assert_close(widen(base, experts, ctx=ctx), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(widen(base, experts), expected)


def test_widen_one_expert_returns_it_and_identical_experts_average():
    """T = 1: softmax gives 1 and calibration s = 1, so θ0 + τ. Two identical experts with
    calibration out of reach (t large): softmax gives ½ each, θ0 + ½τ + ½τ."""
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(14))
    (expert,) = experts_around(base, 1, seed=15)
    tau = expert - base
    torch.testing.assert_close(widen(base, [expert]), expert)
    torch.testing.assert_close(
        widen(base, [expert, expert.clone()], above_average_value_ratio=1e6), expert)
    # with the default t = s = 1, each of a column's magnitude and direction scores is ½
    # (softmax) or 1 (ranked above the mean), so each copy of τ counts ½, ¾ or 1 there
    delta = widen(base, [expert, expert.clone()]) - base
    factor = (delta * tau).sum(0) / (tau * tau).sum(0)
    torch.testing.assert_close(delta, tau * factor)
    assert set(factor.round(decimals=4).tolist()) <= {1.0, 1.5, 2.0} and factor.max() == 2.0


# ---------------------------------------------------------------- registry and engine

@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts"])  # PCB, WIDEN: streamed
def test_registered_whole_tensor_methods(name):
    spec = get_method(name)
    assert spec.needs_base and not spec.elementwise and not spec.chunkable



@pytest.mark.parametrize("name,params", [
    ("tsv_m", {"lambda": 0.8}),
    ("iso_c", {"lambda": 1.2}),
    ("iso_cts", {"lambda": 1.1, "common_space_fraction": 0.5}),
    ("pcb", {"density": 0.3}),
    ("widen", {"above_average_value_ratio": 1.0, "score_calibration_value": 1.0}),
])
def test_engine_merge_loads_in_transformers(tmp_path, zoo, name, params, one_thread):
    """mergesmith.merge on tiny Llamas: the output loads and runs, and its tensors are the
    method applied to the inputs (parameters reach the function; embeddings by name)."""
    models = zoo("llama")
    out = mergesmith.merge({
        "merge_method": name, "base_model": str(models["base"]), "parameters": params,
        "models": [{"model": str(models[m])} for m in ("e1", "e2")],
    }, tmp_path / name)
    model = model_class("llama").from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[3, 5, 7, 9]])).logits).all()
    merged = read_tensors(out)
    inputs = [read_tensors(models[m]) for m in ("base", "e1", "e2")]
    spec = get_method(name)
    kwargs = {p.argname: params.get(p.name, p.default) for p in spec.params if not p.per_model}
    kwargs.update({p.argname: [p.default] * 2 for p in spec.params if p.per_model})
    for tensor in ("model.layers.1.self_attn.q_proj.weight",
                   "model.layers.2.input_layernorm.weight", "model.embed_tokens.weight"):
        base, *experts = (t[tensor].float() for t in inputs)
        expected = spec.fn(base, experts, ctx=TensorContext(tensor), **kwargs)
        torch.testing.assert_close(merged[tensor], expected, rtol=1e-5, atol=1e-6)
