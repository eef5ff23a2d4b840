"""Subspace merging: Task Singular Vectors (TSV-M) and isotropic merging (Iso-C, Iso-CTS).

All three work on the singular value decompositions of the task vectors τi = θi − θ0 of each
2-D weight matrix. A tensor of any other rank (norms, biases) has no singular vectors; there,
as in both papers' code, the merge is the mean task vector, θ = θ0 + λ·mean(wi τi). Embedding
and output matrices are 2-D and are merged by SVD like every other matrix, as in the papers'
code (which leaves out only CLIP's text projection).

Singular values and vectors come from methods/lowrank.py's exact path (an eigh of the smaller
Gram matrix in float64, singular values at the fp32 noise floor left out; see there why).
Results are computed in float64 and rounded to the inputs' dtype once, at the end.

Cost (bench/subspace_speed.py): the eigh of a Gram matrix is most of it, 2.7 s at 2048² on one
core, of which 0.65 s are the eigenvalues and the rest the eigenvectors. TSV-M takes T + 2 of
them per matrix (T tasks, then the polar factors of U and V, both Tk ≈ r wide), Iso-C one,
Iso-CTS one plus one per task on tall matrices (on wide ones, the task-specific parts live in the
small complement of the common subspace). torch has no partial eigh, so an exact top-k costs
the whole one. A randomized SVD does not pay for TSV-M's per-task truncation: k = r/T is a
third of the spectrum, and on the flat spectra of random task vectors (the benchmark's)
methods/lowrank.py's randomized_svd at k = 682 of 2048 (10 extra vectors, 2 power iterations,
fp32) takes 1.1 s against 3.0 s, for a rank-k part 36 % off.

Iso-C's and Iso-CTS's flat spectrum is the mean of all r = min(m, n) singular values, zeros
included, as in the authors' code (src/utils/iso.py of danielm1405/iso-merging: the mean of
the r values of a reduced SVD, `full_matrices=False`). On a rank-deficient sum (LoRA experts,
few low-rank tasks on a wide matrix) that is Σσ/r, not the mean of the non-zero ones, so λ
means the same on every tensor. That code also spreads σ̄ over the r − rank directions of the
SVD's null space; any orthonormal pairing of the two null spaces is an equally valid SVD, so
those directions depend on the LAPACK build and the rounding, not on the models: they are left
out, and on the span of Σ τi the merge equals that code's output projected onto it.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from mergesmith.methods.blocks import weighted_sum
from mergesmith.methods.lowrank import (gram, gram_svd, noise_floor, spectrum_of_gram,
                                        top_singular_triplets)
from mergesmith.methods.registry import Param, TensorContext, register

WEIGHT = Param("weight", default=1.0, per_model=True, arg="weights",
               doc="factor on the model's task vector before its SVD")
LAMBDA = Param("lambda", default=1.0, arg="lambda_",
               doc="scale of the merged task vector (the papers' α)")

def polar(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = U Σ Vᵀ ↦ (U Vᵀ, σ): the matrix with orthonormal columns (or rows, if wide) nearest
    to x, and x's singular values, both without the noise floor's directions (U Vᵀ is then
    orthonormal on x's range only, not completed by arbitrary vectors). Float64."""
    svd = gram_svd(x)
    q, sigma = svd.q[:, :svd.rank], svd.sigma[:svd.rank]
    # U Vᵀ = U Σ⁻¹ Uᵀ a, the small square factor first
    p = ((q / sigma) @ q.mT) @ svd.a
    return (p.mT if svd.flipped else p), sigma


def orthogonalize(x: torch.Tensor) -> torch.Tensor:
    """x's polar factor P Qᵀ (from x = P Σ Qᵀ): it decorrelates concatenated singular vectors."""
    return polar(x)[0]


def orthogonalize_beside(extra: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The polar factor of the rows [E; B] when B (k×n) already has orthonormal rows and E
    (t×n) adds a few. With Q an orthonormal basis of the columns of B Eᵀ (k×t) and
    W = diag(I_t, Q), the Gram matrix is G = I + W (H − I) Wᵀ, H the Gram matrix of
    Y = Wᵀ[E; B] = [E; QᵀB]; so G^-½ = I + W (H^-½ − I) Wᵀ and
    polar([E; B]) = [E; B] + W (polar(Y) − Y): one 2t-row polar factor instead of (t+k)."""
    q, _ = torch.linalg.qr(basis @ extra.mT)
    y = torch.cat([extra, q.mT @ basis])
    change = polar(y)[0].sub_(y)
    t = extra.shape[0]
    return torch.cat([extra + change[:t], basis + q @ change[t:]])


def weighted_task_vectors(base: torch.Tensor, experts: list[torch.Tensor],
                          weights: list[float] | None) -> Iterator[torch.Tensor]:
    """wi·τi, one at a time: the merges keep what they need of each, never all T whole."""
    for i, expert in enumerate(experts):
        tau = expert - base
        yield tau if weights is None else tau.mul_(weights[i])


def task_sum(taus: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ τi, accumulated in float64 (rounding it to fp32 would move its singular vectors)."""
    taus = iter(taus)
    total = next(taus).to(torch.float64, copy=True)
    for tau in taus:
        total.add_(tau)
    return total


def mean_task_vector(base: torch.Tensor, taus: Iterable[torch.Tensor], lambda_: float
                     ) -> torch.Tensor:
    """The papers' rule for tensors that are not matrices: θ0 + λ·mean(τi)."""
    taus = list(taus)
    return weighted_sum(taus, [lambda_ / len(taus)] * len(taus)).add_(base)


@register(
    "tsv_m",
    summary="Keep each task vector's top singular vectors, decorrelate them across tasks "
            "(orthogonal Procrustes), and sum.",
    paper="Gargiulo et al. 2025, Task singular vectors: reducing task interference in model "
          "merging (CVPR), arXiv:2412.00081",
    needs_base=True,
    params=(
        WEIGHT,
        LAMBDA,
        Param("rank_fraction", default=None, minimum=0.0, maximum=1.0,
              doc="fraction of each matrix's rank kept per task; default 1/(number of tasks)"),
    ),
)
def tsv_m(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    weights: list[float] | None = None,
    lambda_: float = 1.0,
    rank_fraction: float | None = None,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """τi ≈ Ui Σi Viᵀ truncated to k = ⌊r·f⌋ triplets (r = min(m, n), f = 1/T by default);
    U = [U1 … UT], Σ = diag(Σ1 … ΣT), V = [V1 … VT];
    θ = θ0 + λ·U⊥ Σ V⊥ᵀ with U⊥, V⊥ the polar factors of U, V (paper Eq. 6 and Alg. 1)."""
    taus = weighted_task_vectors(base, experts, weights)
    if base.ndim != 2:
        return mean_task_vector(base, taus, lambda_)
    fraction = 1.0 / len(experts) if rank_fraction is None else rank_fraction
    # at least one triplet each, so tiny matrices with many tasks are not dropped whole
    per_task = max(1, int(min(base.shape) * fraction))
    triplets = [top_singular_triplets(tau, per_task) for tau in taus]
    u, sigma, vh = (torch.cat(part, dim) for part, dim in zip(zip(*triplets), (1, 0, 0)))
    del triplets  # (each name below is rebound as soon as it is used: float64 is large)
    if sigma.numel() == 0:  # every task vector is zero
        return base.clone()
    u = orthogonalize(u).mul_(sigma)
    vh = orthogonalize(vh)
    return (u @ vh).mul_(lambda_).to(base.dtype).add_(base)


@register(
    "iso_c",
    summary="Sum the task vectors, then flatten the sum's spectrum: every singular value "
            "becomes the mean of all min(m, n) of them.",
    paper="Marczak et al. 2025, No task left behind: isotropic model merging with common and "
          "task-specific subspaces, arXiv:2502.04959",
    needs_base=True,
    params=(WEIGHT, LAMBDA),
)
def iso_c(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    weights: list[float] | None = None,
    lambda_: float = 1.0,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """Σ wi τi = U Σ Vᵀ; θ = θ0 + λ·σ̄ U Vᵀ with σ̄ = Σσ / min(m, n), the mean of all
    min(m, n) singular values, zeros included (Iso-C); U Vᵀ over the non-zero ones."""
    taus = weighted_task_vectors(base, experts, weights)
    if base.ndim != 2:
        return mean_task_vector(base, taus, lambda_)
    direction, sigma = polar(task_sum(taus))
    if sigma.numel() == 0:
        return base.clone()
    return direction.mul_(lambda_ * flat_value(sigma, base.shape)).to(base.dtype).add_(base)


def flat_value(sigma: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """σ̄ of the flat spectrum: the kept singular values' sum over min(m, n), as the mean of a
    reduced SVD's min(m, n) values in the authors' code (the dropped ones are zeros there)."""
    return sigma.sum() / min(shape)


def common_subspace(total: torch.Tensor, k: int) -> tuple[
        tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """Iso-CTS's common subspace: the top-k triplets (U_k, σ_k, V_kᵀ) of Σ τi; when the matrix
    is wide, an orthonormal basis of the complement of U_k (None when tall, where that basis
    would be larger than the matrix); and Σ τi's noise floor."""
    svd = gram_svd(total)
    triplets = svd.top(k)
    complement = None if svd.flipped else svd.q[:, len(triplets[1]):]
    return triplets, complement, noise_floor(svd.sigma[:1], total.shape)


def task_specific(tau: torch.Tensor, u_common: torch.Tensor, complement: torch.Tensor | None,
                  s: int, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-s triplets of τ − U_k U_kᵀ τ above `floor`, Σ τi's noise floor: what τ keeps off the
    common subspace may be rounding noise only (LoRA experts, whose sum spans all of them),
    whose directions are arbitrary. With a basis C of the complement of U_k, that matrix is
    C (Cᵀτ): its triplets are those of the small (m − k)×n matrix Cᵀτ, with C in front of the
    left vectors."""
    tau = tau.to(torch.float64)
    if complement is None:
        return tall_residual_triplets(tau, u_common, s, floor)
    u, sigma, vh = top_singular_triplets(complement.mT @ tau, s, floor)
    return complement @ u, sigma, vh


def tall_residual_triplets(tau: torch.Tensor, u: torch.Tensor, s: int, floor: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-s triplets of R = τ − U Uᵀτ for a tall τ (m > n), without forming R: its Gram matrix
    RᵀR = τᵀτ − CᵀC with C = Uᵀτ (k×n), so R = L Σ Wᵀ with (σ², W) from that n×n Gram and
    L = (τW − U(CW)) Σ⁻¹ for the s kept only. One k×m×n product instead of two and an m×n
    difference (gate/up projections, embeddings). The subtraction loses ~eps64·‖τ‖² on σ²,
    nine orders of magnitude below the noise floor's square."""
    c = u.mT @ tau
    sigma, w = spectrum_of_gram(gram(tau.mT) - gram(c.mT), tau.shape, floor)
    keep = min(s, int(torch.count_nonzero(sigma)))
    w, sigma = w[:, :keep], sigma[:keep]
    left = (tau @ w).sub_(u @ (c @ w)).div_(sigma)
    return left, sigma, w.mT


def subspace_sizes(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(k, s): k common directions and s per task, with k + T·s = r (the authors' code:
    k = ⌊r·f⌋, then s = round((r − k)/T) so that the task-specific part splits evenly)."""
    common = int(rank * common_fraction)
    per_task = min(round((rank - common) / tasks), rank // tasks)
    return rank - tasks * per_task, per_task


@register(
    "iso_cts",
    summary="Iso-C on a common subspace of the summed task vectors, completed by each task's "
            "own top directions outside it; flat spectrum.",
    paper="Marczak et al. 2025, No task left behind: isotropic model merging with common and "
          "task-specific subspaces, arXiv:2502.04959",
    needs_base=True,
    params=(
        WEIGHT,
        LAMBDA,
        Param("common_space_fraction", default=0.8, minimum=0.0, maximum=1.0,
              doc="share of each matrix's rank given to the common subspace"),
    ),
)
def iso_cts(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    weights: list[float] | None = None,
    lambda_: float = 1.0,
    common_space_fraction: float = 0.8,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """Common subspace: top-k triplets of Σ τi. Task-specific: top-s triplets of each
    τi − U_k U_kᵀ τi (τi projected off the common subspace). Concatenate all, orthogonalize the
    left and right vectors (polar factors U⊥, V⊥), and flatten the spectrum:
    θ = θ0 + λ·σ̄ U⊥ V⊥ᵀ, σ̄ the sum of the kept singular values over the k + T·s = min(m, n)
    slots, zeros included (Iso-CTS)."""
    taus = weighted_task_vectors(base, experts, weights)
    if base.ndim != 2:
        return mean_task_vector(base, taus, lambda_)
    common, per_task = subspace_sizes(min(base.shape), len(experts), common_space_fraction)
    (u_common, s_common, vh_common), complement, floor = common_subspace(
        task_sum(taus), common)
    parts = [task_specific(tau, u_common, complement, per_task, floor)
             for tau in weighted_task_vectors(base, experts, weights)] if per_task else []
    sigma = torch.cat([p[1] for p in parts] + [s_common])
    if sigma.numel() == 0:
        return base.clone()
    u, vh = u_common, vh_common  # orthonormal already
    if len(sigma) > len(s_common):
        # The task-specific left vectors are orthogonal to U_k, so the polar factor of
        # [U_task, U_k] is [polar(U_task), U_k]; the right ones are a few rows beside V_kᵀ.
        u = torch.cat([orthogonalize(torch.cat([p[0] for p in parts], dim=1)), u_common], dim=1)
        vh = orthogonalize_beside(torch.cat([p[2] for p in parts]), vh_common)
    return (u @ vh).mul_(lambda_ * flat_value(sigma, base.shape)).to(base.dtype).add_(base)
