"""Subspace merging: Task Singular Vectors (TSV-M) and isotropic merging (Iso-C, Iso-CTS).

All three work on the singular value decompositions of the task vectors τi = θi − θ0 of each
2-D weight matrix. A tensor of any other rank (norms, biases) has no singular vectors; there,
as in both papers' code, the merge is the mean task vector, θ = θ0 + λ·mean(wi τi). Embedding
and output matrices are 2-D and are merged by SVD like every other matrix, as in the papers'
code (which leaves out only CLIP's text projection).

Singular values and vectors come from the eigendecomposition of the smaller Gram matrix (x xᵀ
for a wide x, xᵀx for a tall one), formed and solved in float64 on the tensor's device, never
from an SVD: on the CPU that eigh costs half of an fp32 SVD of the same matrix (2048×5632), it
never fails to converge (MKL's gesdd does, on Iso-CTS's concatenated bases, whose singular
values are mostly exactly 1), and float64 keeps every σ the methods use more accurate than an
fp32 SVD would (σ² is resolved to eps64·σ1², i.e. σ to 1e-9·σ1 and better).

Singular values at the fp32 noise floor (σ ≤ σ1·max(m, n)·eps32) are left out: their singular
vectors are arbitrary, and keeping them would add random directions to a low-rank update (a
LoRA fine-tune, an untouched matrix). On full-rank task vectors this changes nothing.
Results are computed in float64 and rounded to the inputs' dtype once, at the end.
"""

from __future__ import annotations

import torch

from mergesmith.methods.blocks import task_vectors, weighted_sum
from mergesmith.methods.registry import Param, TensorContext, register

WEIGHT = Param("weight", default=1.0, per_model=True, arg="weights",
               doc="factor on the model's task vector before its SVD")
LAMBDA = Param("lambda", default=1.0, arg="lambda_",
               doc="scale of the merged task vector (the papers' α)")

NOISE_EPS = torch.finfo(torch.float32).eps  # the precision of the checkpoints' values


def smaller_side(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x in float64, transposed when it has more rows than columns (so that a·aᵀ is the
    smaller Gram matrix), and whether it was."""
    flipped = x.shape[0] > x.shape[1]
    return (x.mT if flipped else x).to(torch.float64), flipped


def gram_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a aᵀ = Q diag(σ²) Qᵀ for a wide float64 a: its singular values σ, descending, and its
    left singular vectors Q, a whole orthonormal basis (the columns past the rank span the
    complement of a's column space). σ at the noise floor is set to 0."""
    eigenvalues, q = torch.linalg.eigh(a @ a.mT)
    sigma = eigenvalues.flip(0).clamp_(min=0).sqrt_()
    sigma[sigma <= sigma[:1] * max(a.shape) * NOISE_EPS] = 0
    return sigma, q.flip(1)


def rank_of(sigma: torch.Tensor) -> int:
    return int(torch.count_nonzero(sigma))


def top_singular_triplets(x: torch.Tensor, k: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x ≈ U_k diag(σ_k) V_kᵀ: the k largest singular triplets (all when k is None), without
    those at the noise floor. Returns (U_k, σ_k, V_kᵀ) in float64."""
    a, flipped = smaller_side(x)
    sigma, q = gram_eigh(a)
    k = rank_of(sigma) if k is None else min(k, rank_of(sigma))
    u, s = q[:, :k], sigma[:k]
    vh = (u.mT @ a).div_(s[:, None])  # a = U Σ Vᵀ  ⇒  Vᵀ = Σ⁻¹ Uᵀ a
    return (vh.mT, s, u.mT) if flipped else (u, s, vh)


def polar(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = U Σ Vᵀ ↦ (U Vᵀ, σ): the matrix with orthonormal columns (or rows, if wide) nearest
    to x, and x's singular values, both without the noise floor's directions (U Vᵀ is then
    orthonormal on x's range only, not completed by arbitrary vectors). Float64."""
    a, flipped = smaller_side(x)
    sigma, q = gram_eigh(a)
    rank = rank_of(sigma)
    q, sigma = q[:, :rank], sigma[:rank]
    # U Vᵀ = U Σ⁻¹ Uᵀ a, the small square factor first
    p = ((q / sigma) @ q.mT) @ a
    return (p.mT if flipped else p), sigma


def orthogonalize(x: torch.Tensor) -> torch.Tensor:
    """x's polar factor P Qᵀ (from x = P Σ Qᵀ): it decorrelates concatenated singular vectors."""
    return polar(x)[0]


def weighted_task_vectors(base: torch.Tensor, experts: list[torch.Tensor],
                          weights: list[float] | None) -> list[torch.Tensor]:
    taus = task_vectors(base, experts)
    return taus if weights is None else [tau.mul_(w) for tau, w in zip(taus, weights)]


def mean_task_vector(base: torch.Tensor, taus: list[torch.Tensor], lambda_: float) -> torch.Tensor:
    """The papers' rule for tensors that are not matrices: θ0 + λ·mean(τi)."""
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
    fraction = 1.0 / len(taus) if rank_fraction is None else rank_fraction
    # at least one triplet each, so tiny matrices with many tasks are not dropped whole
    per_task = max(1, int(min(base.shape) * fraction))
    triplets = [top_singular_triplets(tau, per_task) for tau in taus]
    u = torch.cat([t[0] for t in triplets], dim=1)
    sigma = torch.cat([t[1] for t in triplets])
    vh = torch.cat([t[2] for t in triplets], dim=0)
    if sigma.numel() == 0:  # every task vector is zero
        return base.clone()
    merged = (orthogonalize(u) * sigma) @ orthogonalize(vh)
    return merged.mul_(lambda_).to(base.dtype).add_(base)


@register(
    "iso_c",
    summary="Sum the task vectors, then flatten the sum's spectrum: every singular value "
            "becomes their mean.",
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
    """Σ wi τi = U Σ Vᵀ; θ = θ0 + λ·σ̄ U Vᵀ with σ̄ = mean of the singular values (Iso-C)."""
    taus = weighted_task_vectors(base, experts, weights)
    if base.ndim != 2:
        return mean_task_vector(base, taus, lambda_)
    direction, sigma = polar(weighted_sum(taus, [1.0] * len(taus)))
    if sigma.numel() == 0:
        return base.clone()
    return direction.mul_(lambda_ * sigma.mean()).to(base.dtype).add_(base)


def common_subspace(total: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Iso-CTS's common subspace: the top-k triplets (U_k, σ_k, V_kᵀ) of Σ τi, and, when the
    matrix is wide, an orthonormal basis of the complement of U_k (the rest of the Gram
    matrix's eigenvectors; None when tall, where that basis would be larger than the matrix)."""
    if total.shape[0] > total.shape[1]:
        return (*top_singular_triplets(total, k), None)
    a = total.to(torch.float64)
    sigma, q = gram_eigh(a)
    k = min(k, rank_of(sigma))
    u, s = q[:, :k], sigma[:k]
    return u, s, (u.mT @ a).div_(s[:, None]), q[:, k:]


def task_specific(tau: torch.Tensor, u_common: torch.Tensor, complement: torch.Tensor | None,
                  s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-s triplets of τ − U_k U_kᵀ τ. With a basis C of the complement of U_k, that is
    C (Cᵀτ), whose triplets are those of the small (m − k)×n matrix Cᵀτ, with C in front of
    the left vectors."""
    tau = tau.to(torch.float64)
    if complement is None:
        return top_singular_triplets(tau - u_common @ (u_common.mT @ tau), s)
    u, sigma, vh = top_singular_triplets(complement.mT @ tau, s)
    return complement @ u, sigma, vh


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
    θ = θ0 + λ·σ̄ U⊥ V⊥ᵀ, σ̄ the mean of all kept singular values (Iso-CTS)."""
    taus = weighted_task_vectors(base, experts, weights)
    if base.ndim != 2:
        return mean_task_vector(base, taus, lambda_)
    common, per_task = subspace_sizes(min(base.shape), len(taus), common_space_fraction)
    u_common, s_common, vh_common, complement = common_subspace(
        weighted_sum(taus, [1.0] * len(taus)), common)
    parts = [task_specific(tau, u_common, complement, per_task)
             for tau in taus] if per_task else []
    sigma = torch.cat([p[1] for p in parts] + [s_common])
    if sigma.numel() == 0:
        return base.clone()
    # The task-specific left vectors are orthogonal to U_k, so the polar factor of
    # [U_task, U_k] is [polar(U_task), U_k]: only the smaller block needs orthogonalizing.
    u_task = [orthogonalize(torch.cat([p[0] for p in parts], dim=1))] if parts else []
    u = torch.cat(u_task + [u_common], dim=1)
    vh = orthogonalize(torch.cat([p[2] for p in parts] + [vh_common], dim=0))
    return (u @ vh).mul_(lambda_ * sigma.mean()).to(base.dtype).add_(base)
