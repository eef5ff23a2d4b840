"""methods/lowrank.py: exact and randomized truncated SVDs, rank selection; and the subspace
methods' fast paths, each against a float64 torch.linalg.svd reference."""

from __future__ import annotations

import pytest
import torch

from mergesmith.methods.lowrank import (kept_energy, randomized_svd, select_rank,
                                        top_eigenpairs, top_singular_triplets)


def random(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def low_rank(shape, rank, seed=0):
    m, n = shape
    return random((m, rank), seed) @ random((rank, n), seed + 1)


def decaying(shape, seed=0, rate=0.8):
    """A matrix with singular values rate^j: what a sketch with power iterations resolves."""
    m, n = shape
    r = min(m, n)
    u, _ = torch.linalg.qr(random((m, r), seed))
    v, _ = torch.linalg.qr(random((n, r), seed + 1))
    return (u * rate ** torch.arange(r, dtype=torch.float64)) @ v.T


def same_subspace(a: torch.Tensor, b: torch.Tensor, atol: float):
    """Columns of a and b (orthonormal) span the same space: compare their projectors."""
    torch.testing.assert_close(a @ a.T, b @ b.T, rtol=0, atol=atol)


@pytest.mark.parametrize("shape", [(40, 40), (30, 70), (70, 30)])
def test_exact_triplets_are_a_float64_svds_top_k(shape):
    x = random(shape).float()
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    got_u, got_s, got_vh = top_singular_triplets(x, 12)
    torch.testing.assert_close(got_s, s[:12], rtol=1e-10, atol=1e-12)
    # singular vectors up to sign: compare the rank-1 pieces u_j v_jᵀ
    torch.testing.assert_close(got_u * got_s @ got_vh, u[:, :12] * s[:12] @ vh[:12],
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", [(50, 80), (80, 50)])
def test_exact_triplets_of_a_rank_deficient_matrix_stop_at_its_rank(shape):
    x = low_rank(shape, 5).float()
    u, s, vh = top_singular_triplets(x)
    assert len(s) == 5  # the other 45 singular values are rounding noise, left out
    torch.testing.assert_close(u * s @ vh, x.double(), rtol=0, atol=1e-5)
    ref = torch.linalg.svdvals(x.double())[:5]
    torch.testing.assert_close(s, ref, rtol=1e-9, atol=0)


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_randomized_svd_is_exact_on_a_matrix_of_lower_rank(shape):
    x = low_rank(shape, 8)
    u, s, vh = randomized_svd(x, 8, oversample=5, power_iterations=1)
    assert u.dtype == torch.float64 and u.shape == (shape[0], 8) and vh.shape == (8, shape[1])
    torch.testing.assert_close(u * s @ vh, x, rtol=0, atol=1e-9 * x.abs().max().item())
    torch.testing.assert_close(s, torch.linalg.svdvals(x)[:8], rtol=1e-10, atol=0)
    # asked for more than the rank: the noise floor's directions are left out
    assert len(randomized_svd(x, 20)[1]) == 8


def test_randomized_svd_approaches_the_eckart_young_error():
    x = decaying((400, 200))
    k = 10
    u, s, vh = randomized_svd(x, k, oversample=10, power_iterations=2)
    ref_u, ref_s, ref_vh = torch.linalg.svd(x, full_matrices=False)
    best = ref_s[k]  # spectral error of the best rank-k approximation
    err = torch.linalg.matrix_norm(x - u * s @ vh, ord=2)
    assert best <= err <= 1.01 * best
    torch.testing.assert_close(s, ref_s[:k], rtol=1e-6, atol=0)
    same_subspace(u, ref_u[:, :k], atol=1e-6)
    # orthonormal factors
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=u.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(vh @ vh.T, torch.eye(k, dtype=u.dtype), rtol=0, atol=1e-12)


def test_randomized_svd_is_seeded_and_computes_in_float32_by_default():
    x = decaying((200, 100)).float()
    first, again = randomized_svd(x, 6, seed=3), randomized_svd(x, 6, seed=3)
    assert first[0].dtype == torch.float32
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other = randomized_svd(x, 6, oversample=0, power_iterations=0, seed=4)
    assert not torch.equal(first[1], other[1])  # the seed is the sketch's


def test_randomized_svd_falls_back_to_the_exact_triplets_when_the_sketch_is_the_whole_matrix():
    x = random((30, 20))
    u, s, vh = randomized_svd(x, 15, oversample=10)
    ref = top_singular_triplets(x, 15)
    torch.testing.assert_close(u * s @ vh, ref[0] * ref[1] @ ref[2], rtol=0, atol=1e-12)


def test_select_rank_fixed_epsilon_and_energy():
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5])  # squares 16, 4, 1, 1, 0.25: total 22.25
    assert select_rank(sigma) == 5
    assert select_rank(sigma, rank=3) == 3
    assert select_rank(sigma, rank=9) == 5
    assert select_rank(sigma, epsilon=1.0) == 2  # strictly above ε, as mergekit's S > ε
    assert select_rank(sigma, energy=16 / 22.25) == 1  # exactly reached at k = 1
    assert select_rank(sigma, energy=0.75) == 2  # 16/22.25 = 0.719 < 0.75 <= 20/22.25
    assert select_rank(sigma, energy=1.0) == 5
    assert select_rank(sigma, energy=0.95, rank=2) == 2  # the smallest k wins
    # a truncated spectrum with the matrix's ‖x‖_F² as the total: 20/40 never reaches 0.9
    assert select_rank(sigma[:2], energy=0.9, total=40.0) == 2
    assert select_rank(sigma[:2], energy=0.4, total=40.0) == 1


def test_kept_energy_is_the_tail_complement():
    x = random((30, 20))
    s = torch.linalg.svdvals(x)
    k = select_rank(s, energy=0.8)
    kept = kept_energy(s, k)
    assert kept >= 0.8 > kept_energy(s, k - 1)
    # Eckart–Young: ‖x − x_k‖_F² = Σ_{j>k} σ_j², the energy left out
    u, sk, vh = top_singular_triplets(x, k)
    residual = torch.linalg.matrix_norm(x - u * sk @ vh) ** 2
    total = torch.linalg.matrix_norm(x) ** 2
    assert kept_energy(sk, k, total) == pytest.approx(kept)
    assert float(residual / total) == pytest.approx(1 - kept, rel=1e-9)


# ---------------------------------------------------------------- the subspace methods' fast paths

@pytest.mark.parametrize("extra_rank", [None, 3])
def test_iso_cts_tall_residual_triplets_match_an_svd_of_the_projected_matrix(extra_rank):
    """τ − U Uᵀτ from its n×n Gram matrix equals the float64 SVD of the explicit residual, on a
    full-rank τ and on one whose part off U has rank 3 (the rest is rounding noise, left out)."""
    from mergesmith.methods.subspace import tall_residual_triplets

    m, n, k = 120, 40, 25
    u, _ = torch.linalg.qr(random((m, k), 5))
    if extra_rank is None:
        tau = random((m, n), 6)
    else:  # mostly inside span(U), plus a rank-3 part outside it
        tau = u @ random((k, n), 6) + low_rank((m, n), extra_rank, 7)
    tau = tau.float()
    residual = tau.double() - u @ (u.T @ tau.double())
    ref_u, ref_s, ref_vh = torch.linalg.svd(residual, full_matrices=False)
    got_u, got_s, got_vh = tall_residual_triplets(tau.double(), u, 10, torch.tensor(0.0))
    expect = 10 if extra_rank is None else extra_rank
    assert len(got_s) == expect
    torch.testing.assert_close(got_s, ref_s[:expect], rtol=1e-9, atol=0)
    torch.testing.assert_close(got_u * got_s @ got_vh, ref_u[:, :expect] * ref_s[:expect]
                               @ ref_vh[:expect], rtol=0, atol=1e-9)
    torch.testing.assert_close(u.T @ got_u, torch.zeros(k, expect, dtype=u.dtype),
                               rtol=0, atol=1e-10)  # left vectors off the common subspace


@pytest.mark.parametrize("rank", [3, 40])  # the subset solver's path, then the full eigh's
def test_top_eigenpairs_are_the_largest_of_a_full_eigh(rank):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(64, 48, generator=g, dtype=torch.float64)
    gram_matrix = x.mT @ x
    values, vectors = torch.linalg.eigh(gram_matrix)
    got_values, got_vectors = top_eigenpairs(gram_matrix.clone(), rank)
    assert torch.allclose(got_values, values.flip(0)[:rank], rtol=1e-12, atol=1e-10)
    # eigenvectors up to sign: compare the projectors
    expected = vectors.flip(1)[:, :rank]
    assert torch.allclose(got_vectors @ got_vectors.mT, expected @ expected.mT, atol=1e-10)
