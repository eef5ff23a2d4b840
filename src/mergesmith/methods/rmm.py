"""Reversible Model Merging for low-rank weights (Alipour & Amiri 2025, arXiv:2510.14163).

Instead of collapsing N LoRAs into one, keep a basis of k < N "basis adapters" and, per task,
coefficients from which its LoRA is rebuilt by a linear combination. Per module, each task's
factors (B_i with its scaling s_i folded in, and A_i; one rank r for all tasks) are stacked as
the columns of X = [x_1 … x_N]; the best rank-k fit X ≈ U_k (Σ_k V_kᵀ) is the truncated SVD
(Eckart–Young, the closed form): U_k's columns are the basis, column i of C = Σ_k V_kᵀ task i's
coefficients, and x̂_i = U_k C[:, i] = U_k U_kᵀ x_i. The squared reconstruction error summed over
tasks is the sum of the discarded σ_j² (j > k); with k = N (or k ≥ rank X) it is exact.

Grouping (the paper's, as far as it could be read, is unconfirmed):
  - "module" (default): x_i = [vec(s_i B_i); vec(A_i)], one basis and one coefficient vector per
    task per module: the basis adapters are k whole LoRAs, task i = Σ_j C[j, i]·basis_j;
  - "position": one X per factor position, a row of s_i B_i or a column of A_i (r-vectors, X is
    r × N), each with its own basis and coefficients, as a review of the paper describes.
X is not centred. The factors are fit as given, so a task's rebuilt ΔW is B̂_i Â_i, close to
s_i B_i A_i when the factors are; a merge's main output is the weighted sum of the rebuilt tasks
Σ w_i B̂_i Â_i, written exactly as their concatenation (rank N·r); each task's own LoRA comes back
from the basis and coefficients stored beside the merge (engine/side_outputs/rmm.py,
`mergesmith rmm apply`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mergesmith.errors import MethodError
from mergesmith.methods.registry import Param, TensorContext, register

GROUPINGS = ("module", "position")
RMM_PAPER = ("Alipour & Amiri 2025, Towards reversible model merging for low-rank weights, "
             "arXiv:2510.14163")


class Basis(NamedTuple):
    """One module's RMM fit: G groups (1, or one per factor position), each X_g (D × N)."""

    vectors: torch.Tensor       # (G, D, k) orthonormal columns: the basis
    coefficients: torch.Tensor  # (G, k, N) column i: task i's coefficients
    sigma: torch.Tensor         # (G, min(D, N)) every singular value of X_g, descending


def stacked(Bs: list[torch.Tensor], As: list[torch.Tensor], scalings: list[float],
            grouping: str) -> torch.Tensor:
    """X (G, D, N) in float64 from the tasks' factors (s_i folded into B_i)."""
    Bs = [b.to(torch.float64) * s for b, s in zip(Bs, scalings)]
    As = [a.to(torch.float64) for a in As]
    if grouping == "module":
        return torch.stack([torch.cat([b.reshape(-1), a.reshape(-1)]) for b, a in zip(Bs, As)],
                           dim=1)[None]
    # position p: row p of B_i (p < d_out), else column p − d_out of A_i
    return torch.stack([torch.cat([b, a.mT]) for b, a in zip(Bs, As)], dim=2)


def unstacked(x: torch.Tensor, d_out: int, d_in: int, rank: int,
              grouping: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's (B, A) from its column of X, x (G, D)."""
    if grouping == "module":
        flat = x[0]
        return flat[:d_out * rank].view(d_out, rank), flat[d_out * rank:].view(rank, d_in)
    return x[:d_out], x[d_out:].mT


def fit(x: torch.Tensor, k: int) -> Basis:
    """X_g ≈ U_k (Σ_k V_kᵀ) per group by a thin SVD in float64: the closed-form best rank-k fit."""
    u, sigma, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(k, sigma.shape[-1])
    return Basis(u[..., :k], sigma[..., :k, None] * vh[..., :k, :], sigma)


def reconstruct(basis: Basis, task: int) -> torch.Tensor:
    """x̂_i = U_k C[:, i] for every group: (G, D)."""
    return (basis.vectors @ basis.coefficients[..., task:task + 1]).squeeze(-1)


def discarded_energy(sigma: torch.Tensor, k: int) -> float:
    """Σ_g Σ_{j>k} σ_{g,j}²: the squared Frobenius error of the fit, summed over the tasks."""
    return float(sigma[..., k:].double().square().sum())


def task_factors(basis: Basis, task: int, d_out: int, d_in: int, rank: int,
                 grouping: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Task i's rebuilt LoRA (B̂_i, Â_i), scaling 1, in fp32."""
    b, a = unstacked(reconstruct(basis, task), d_out, d_in, rank, grouping)
    return b.to(torch.float32).contiguous(), a.to(torch.float32).contiguous()


def common_rank(As: list[torch.Tensor], ctx: TensorContext | None) -> int:
    ranks = sorted({a.shape[0] for a in As})
    if len(ranks) > 1:
        where = f" on {ctx.name!r}" if ctx is not None and ctx.name else ""
        raise MethodError(f"rmm needs adapters of one rank per module, got ranks "
                          f"{', '.join(map(str, ranks))}{where}",
                          hint="merge adapters trained with the same r, or use knots or "
                               "lora_lego, which take any ranks")
    return ranks[0]


def rmm_fit(Bs: list[torch.Tensor], As: list[torch.Tensor], scalings: list[float], *,
            basis_size: int | None = None, grouping: str = "module",
            ctx: TensorContext | None = None, **_) -> Basis:
    """The module's basis and coefficients (k = basis_size, default N − 1, at least 1)."""
    common_rank(As, ctx)
    k = basis_size if basis_size is not None else max(1, len(Bs) - 1)
    return fit(stacked(Bs, As, scalings, grouping), k)


@register(
    "rmm",
    summary="Reversible merging: a basis of k LoRAs plus per-task coefficients, written beside "
            "the merge, from which `mergesmith rmm apply` rebuilds each task's adapter.",
    paper=RMM_PAPER,
    needs_base=False,
    output="adapter",
    min_models=2,
    equal_ranks_when=lambda params: "its basis stacks the tasks' factors position by position",
    params=(
        Param("weight", default=1.0, per_model=True, arg="weights",
              doc="the rebuilt task's factor in the merged adapter"),
        Param("basis_size", int, default=None, minimum=1,
              doc="k, the basis adapters kept (default: the number of tasks − 1)"),
        Param("grouping", str, default="module", choices=GROUPINGS,
              doc="one basis per module, or per factor position (row of B, column of A)"),
    ),
)
def rmm(Bs: list[torch.Tensor], As: list[torch.Tensor], scalings: list[float], *,
        weights: list[float], ctx: TensorContext | None = None, basis_size: int | None = None,
        grouping: str = "module") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Σ w_i B̂_i Â_i as [B̂_1 … B̂_N], [w_1 Â_1; …; w_N Â_N]; info: the fit's relative error
    Σ_{j>k} σ_j² / ‖X‖_F² and, under "side", the fit the engine stores beside the merge
    (engine/side_outputs/rmm.py)."""
    basis = rmm_fit(Bs, As, scalings, basis_size=basis_size, grouping=grouping, ctx=ctx)
    rank = As[0].shape[0]
    d_out, d_in = Bs[0].shape[0], As[0].shape[1]
    tasks = [task_factors(basis, i, d_out, d_in, rank, grouping) for i in range(len(Bs))]
    b = torch.cat([t[0] for t in tasks], dim=1)
    a = torch.cat([t[1] * w for t, w in zip(tasks, weights)], dim=0)
    total = float(basis.sigma.double().square().sum())
    error = discarded_energy(basis.sigma, basis.vectors.shape[-1]) / total if total > 0 else 0.0
    fit = {"basis": basis, "d_out": d_out, "d_in": d_in, "rank": rank, "grouping": grouping}
    return b, a, {"rmm_relative_error": error, "side": fit}
