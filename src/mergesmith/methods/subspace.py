"""Subspace merging: Task Singular Vectors (TSV-M) and isotropic merging (Iso-C, Iso-CTS).

All three work on the singular value decompositions of the task vectors τi = θi − θ0 of each
2-D weight matrix. A tensor of any other rank (norms, biases) has no singular vectors; there,
as in both papers' code, the merge is the mean task vector, θ = θ0 + λ·mean(wi τi). Embedding
and output matrices are 2-D and are merged by SVD like every other matrix, as in the papers'
code (which leaves out only CLIP's text projection).

SVDs run in fp32 on the tensor's device. Singular values at the fp32 noise floor
(σ ≤ σ1·max(m, n)·eps) are left out: their singular vectors are arbitrary, and keeping them
would add random directions to a low-rank update (a LoRA fine-tune, an untouched matrix).
On full-rank task vectors this changes nothing.
"""

from __future__ import annotations

import torch

from mergesmith.methods.blocks import task_vectors, weighted_sum
from mergesmith.methods.registry import Param, TensorContext, register

WEIGHT = Param("weight", default=1.0, per_model=True, arg="weights",
               doc="factor on the model's task vector before its SVD")
LAMBDA = Param("lambda", default=1.0, arg="lambda_",
               doc="scale of the merged task vector (the papers' α)")


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x = U diag(σ) Vᵀ, thin (torch.linalg.svd with full_matrices=False), computed on the tall
    orientation: the CPU's LAPACK (MKL gesdd) takes about 4× longer on a wide matrix than on
    its tall transpose (2048×5632: 104 s against 24 s on two shared cores)."""
    if x.shape[0] >= x.shape[1]:
        return torch.linalg.svd(x, full_matrices=False)
    u, s, vh = torch.linalg.svd(x.mT, full_matrices=False)
    return vh.mT, s, u.mT


def top_singular_triplets(x: torch.Tensor, k: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x ≈ U_k diag(σ_k) V_kᵀ: the k largest singular triplets (all when k is None), without
    those at the noise floor. Returns (U_k, σ_k, V_kᵀ)."""
    u, s, vh = svd(x)
    floor = s[:1] * max(x.shape) * torch.finfo(x.dtype).eps
    rank = int((s > floor).sum())
    k = rank if k is None else min(k, rank)
    return u[:, :k], s[:k], vh[:k]


def orthogonalize(x: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns (or rows, if wide) nearest to x: P Qᵀ from the SVD
    x = P Σ Qᵀ, i.e. x's polar factor. It decorrelates concatenated singular vectors."""
    p, _, qh = svd(x)
    return p @ qh


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
    return merged.mul_(lambda_).add_(base)


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
    u, sigma, vh = top_singular_triplets(weighted_sum(taus, [1.0] * len(taus)))
    if sigma.numel() == 0:
        return base.clone()
    return (u @ vh).mul_(lambda_ * sigma.mean()).add_(base)


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
    u_common, s_common, vh_common = top_singular_triplets(
        weighted_sum(taus, [1.0] * len(taus)), common)
    parts = [top_singular_triplets(tau - u_common @ (u_common.T @ tau), per_task)
             for tau in taus] if per_task else []
    parts.append((u_common, s_common, vh_common))
    sigma = torch.cat([p[1] for p in parts])
    if sigma.numel() == 0:
        return base.clone()
    u = orthogonalize(torch.cat([p[0] for p in parts], dim=1))
    vh = orthogonalize(torch.cat([p[2] for p in parts], dim=0))
    return (u @ vh).mul_(lambda_ * sigma.mean()).add_(base)
