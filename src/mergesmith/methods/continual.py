"""Continual merging: models arrive one at a time and are folded into the merge so far, with
memory for one merged model plus a few scalars (engine/continual.py streams the chains and keeps
their state beside the merge, engine/side_outputs/continual.py).

Rules, each as FusionBench (FB, tanganke/fusion_bench, fusion_bench/method/opcm/) defines it;
θ0 the base, τ_t = θ_t − θ0 the t-th model's task vector, τ̄_t = θ̄_t − θ0 the merge after t:

- **opcm** (Tang et al., arXiv 2501.09522; FB opcm.py): S_1 = τ_1; S_t = S_{t−1} + τ_t^⊥, with
  τ_t^⊥ τ_t projected away from the singular directions of the merge so far (`opcm_project`,
  linear-layer weights only; other tensors τ_t^⊥ = τ_t); θ̄_t = θ0 + S_t/λ_t with
  λ_t = ‖S_t‖/n̄_t, the norm over the whole model and n̄_t the mean of ‖τ_1‖..‖τ_t‖ (each over the
  whole model), so that ‖θ̄_t − θ0‖ = n̄_t. FB writes the step as S_t = λ_{t−1}τ̄_{t−1} + τ_t^⊥;
  since λ_{t−1}τ̄_{t−1} = S_{t−1} and the projection does not change when its reference is
  rescaled, the running sum S is what each tensor carries, and only the last division needs
  the whole model (a first pass of norms, then the written pass).
- **continual_task_arithmetic** (FB task_arithmetic.py): θ̄_t = θ̄_{t−1} + λτ_t, θ̄_0 = θ0;
  closed form θ̄_t = θ0 + λ·Σ τ_i (task arithmetic), in any order.
- **continual_average** (FB weight_average.py): θ̄_t = ((t−1)·θ̄_{t−1} + θ_t)/t; closed form the
  mean of θ_1..θ_t.
- **continual_ties** (FB ties_merging.py): τ̄_1 = λτ_1; τ̄_t = τ̄_{t−1} + λ·TIES(τ̄_{t−1}, τ_t), the
  TIES of the two (trim each to its top-d by magnitude, elect s = sign of the sum of the trimmed
  two, an entry with no majority taking the majority sign of the tensor's elected signs, sum the
  agreeing entries: FB's merge_func "sum"). FB trims over the whole flattened model; here
  per tensor, keeping ⌊d·n⌋ (FB's kthvalue keeps ⌊d·n⌋ + 1), as every mergesmith trim.
- **continual_magmax** (MagMax, Marczak et al. 2024): per entry the task vector of largest
  magnitude seen so far, M_t = maxmag(M_{t−1}, τ_t) with M_{t−1} = τ̄_{t−1}/λ; θ̄_t = θ0 + λ·M_t;
  closed form: the all-at-once `magmax` of τ_1..τ_t (the first on a tie).
- **dop** (FB dop.py, dop.yaml; paper's arXiv id unconfirmed): θ̄_1 = θ_1; then per linear
  weight, W from the average of θ̄_{t−1} and θ_t, Adam on c_1·Loss_prev + c_2·Loss_new, each
  Loss_m the deviation W − W_m inside τ_m's principal subspaces weighted by its singular values
  (`dop_loss`), c from MGDA smoothed by an EMA (`dop_merge`); other tensors: the average of the
  two, so older models' share there halves at every step. No closed form; tested against FB's
  loop.
"""

from __future__ import annotations

import math

import torch

from mergesmith.methods.blocks import disjoint_mean, keep_topk
from mergesmith.methods.consensus import MAGMAX_PAPER, largest_magnitude
from mergesmith.methods.registry import register_operation

OPCM_PAPER = ("Tang et al. 2025, Merging Models on the Fly Without Retraining: A Sequential "
              "Approach to Scalable Continual Model Merging, arXiv 2501.09522")
FB_CONTINUAL = "FusionBench's continual baselines (tanganke/fusion_bench, method/opcm/)"

# rule -> (its parameters with their defaults (FB's configs), summary, paper)
RULES = {
    "opcm": ({"alpha": 0.5}, "project each new task vector away from the merge's singular "
             "directions, keep the merge's norm at the mean task-vector norm", OPCM_PAPER),
    "continual_task_arithmetic": ({"lambda": 0.3}, "add λ·τ_t to the merge so far", FB_CONTINUAL),
    "continual_average": ({}, "running mean of the models", FB_CONTINUAL),
    "continual_ties": ({"lambda": 0.5, "density": 0.2}, "add λ·TIES(merge so far, τ_t)",
                       FB_CONTINUAL),
    "continual_magmax": ({"lambda": 1.0}, "per entry, the largest-magnitude task vector so far",
                         MAGMAX_PAPER),
}

for _name, (_params, _summary, _paper) in RULES.items():
    register_operation(
        _name, command=f"mergesmith merge [--onto MERGED] RECIPE OUT (merge_method: {_name})",
        summary=f"continual: {_summary}", paper=_paper, needs="θ0 and models one at a time")


def split_rank(sigma: torch.Tensor, alpha: float) -> int:
    """r_α: the first index i with (σ_0 + … + σ_i)/Σσ > α (singular values, not their squares);
    0 when none is (FB's argmax of an all-false mask), or when Σσ = 0."""
    total = float(sigma.sum())
    if total <= 0:
        return 0
    above = (sigma.cumsum(0) / total) > alpha
    return int(above.nonzero()[0, 0]) if bool(above.any()) else 0


def opcm_project(reference: torch.Tensor, tau: torch.Tensor, alpha: float
                 ) -> tuple[torch.Tensor, dict]:
    """τ^⊥ of OPCM (FB merge_linear_weights): with reference = U S Vᵀ and P = Uᵀ τ V, zero P's
    diagonal and its top-left r_α × r_α block, τ^⊥ = U P Vᵀ. Every zeroed entry lies in the k × k
    block of the reference's rank k, so τ^⊥ = τ − U_k (M ⊙ U_kᵀ τ V_k) V_kᵀ on the thin SVD. FB
    also zeroes the diagonal beyond the rank, where the full SVD's null-space vectors are any
    orthonormal completion (LAPACK's choice, not the models'): left out here; on a reference of
    full rank (a dense fine-tune's) the two agree. In float64; returns τ^⊥ in τ's dtype and
    {"rank": k, "split_rank": r_α}."""
    ref, x = reference.double(), tau.double()
    u, s, vh = torch.linalg.svd(ref, full_matrices=False)
    floor = float(s[0]) * max(ref.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    k = int((s > floor).sum())
    r = min(split_rank(s, alpha), k)
    u, v = u[:, :k], vh[:k].T
    p = u.T @ x @ v
    mask = torch.eye(k, dtype=torch.bool, device=x.device)
    mask[:r, :r] = True
    removed = u @ (p * mask) @ v.T
    return (x - removed).to(tau.dtype), {"rank": k, "split_rank": r}


def opcm_add(running: torch.Tensor | None, tau: torch.Tensor, alpha: float, project: bool
             ) -> torch.Tensor:
    """S_t = S_{t−1} + τ_t^⊥ (S_1 = τ_1); only linear-layer weights (`project`) are projected."""
    if running is None:
        return tau.clone()
    if project and tau.ndim == 2:
        tau, _ = opcm_project(running, tau, alpha)
    return running + tau


def opcm_scale(total_squares: float, norms: list[float] | tuple[float, float]) -> float:
    """1/λ_t = n̄_t/‖S_t‖ from Σ‖S_t‖² over the model's tensors and the task-vector norms (a
    list, or (Σ n_i, t))."""
    mean = norms[0] / norms[1] if isinstance(norms, tuple) else sum(norms) / len(norms)
    norm = math.sqrt(total_squares)
    return mean / norm if norm > 0 else 1.0


def ta_add(merged_tau: torch.Tensor, tau: torch.Tensor, lambda_: float) -> torch.Tensor:
    """τ̄_t = τ̄_{t−1} + λτ_t."""
    return merged_tau + lambda_ * tau


def average_add(merged: torch.Tensor, model: torch.Tensor, count: int) -> torch.Tensor:
    """θ̄_t = ((t−1)·θ̄_{t−1} + θ_t)/t for the t-th model (`count` = t)."""
    return (merged * (count - 1) + model) / count


def ties_pair(merged_tau: torch.Tensor, tau: torch.Tensor, density: float) -> torch.Tensor:
    """FB's ties_merging of the two task vectors with merge_func "sum": trim, elect (an even
    vote takes the majority sign of the tensor's elected signs), sum the agreeing entries."""
    trimmed = [keep_topk(merged_tau, density), keep_topk(tau, density)]
    sign = (trimmed[0] + trimmed[1]).sign_()
    majority = torch.sign(sign.sum())
    sign = torch.where(sign == 0, majority, sign)
    return disjoint_mean(trimmed, sign, normalize=False)


def ties_add(merged_tau: torch.Tensor | None, tau: torch.Tensor, lambda_: float, density: float
             ) -> torch.Tensor:
    """τ̄_t = τ̄_{t−1} + λ·TIES(τ̄_{t−1}, τ_t); τ̄_1 = λτ_1."""
    if merged_tau is None:
        return lambda_ * tau
    return merged_tau + lambda_ * ties_pair(merged_tau, tau, density)


def magmax_add(merged_tau: torch.Tensor | None, tau: torch.Tensor, lambda_: float,
               previous_lambda: float) -> torch.Tensor:
    """θ̄_t − θ0 = λ·maxmag(τ̄_{t−1}/λ_{t−1}, τ_t); λ·τ_1 for the first."""
    if merged_tau is None:
        return lambda_ * tau
    return lambda_ * largest_magnitude([merged_tau / previous_lambda, tau])


# ------------------------------------------------------------------------------------------
# DOP: dual orthogonal projections (FB method/dop/dop.py, config dop.yaml)

DOP_PAPER = ("Continual Model Merging without Data: Dual Projections for Balancing Stability and "
             "Plasticity, NeurIPS 2025 (code: FusionBench method/dop)")
RULES["dop"] = ({"alpha": 0.8, "lr": 1e-4, "steps": 200, "ema_beta": 0.999, "epsilon": 0.99999},
                "per linear weight, Adam on the two models' losses inside their principal "
                "subspaces, weighted by MGDA; other tensors: the average of the two", DOP_PAPER)
register_operation("dop", command="mergesmith merge [--onto MERGED] RECIPE OUT (merge_method: dop)",
                   summary=f"continual: {RULES['dop'][1]}", paper=DOP_PAPER,
                   needs="θ0 and models one at a time; 200 Adam steps per linear weight")


def principal(tau: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V) of τ's leading components: FB keeps the first searchsorted(cumsum(S)/ΣS, ε)
    (those before the one where the ratio reaches ε); ε ≥ 1 keeps them all."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    total = s.sum()
    if total <= 0:
        k = 0
    elif epsilon >= 1:
        k = s.numel()
    else:
        reach = torch.tensor([float(epsilon)], dtype=s.dtype, device=s.device)
        k = int(torch.searchsorted(s.cumsum(0) / total, reach))
    return u[:, :k], s[:k], vh[:k].T


def dop_loss(delta: torch.Tensor, u, s, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss_m = ‖diag(S)Uᵀ Δ‖² + ‖Δ V diag(S)‖² (FB's cal_loss_i, space "uv") for Δ = W − W_m,
    and its gradient 2·U S² Uᵀ Δ + 2·Δ V S² Vᵀ."""
    left, right = s[:, None] * (u.T @ delta), (delta @ v) * s
    loss = left.square().sum() + right.square().sum()
    grad = 2 * (u @ (s[:, None] * left)) + 2 * ((right * s) @ v.T)
    return loss, grad


def min_norm_pair(g1: torch.Tensor, g2: torch.Tensor) -> float:
    """γ of the min-norm point γ·g1 + (1 − γ)·g2 (MGDA's two-task solver as FB's MinNormSolver,
    with its 0.999 / 0.001 ends)."""
    v11, v12, v22 = float((g1 * g1).sum()), float((g1 * g2).sum()), float((g2 * g2).sum())
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return -(v12 - v22) / (v11 + v22 - 2 * v12)


def dop_merge(base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor, *, alpha: float = 0.8,
              lr: float = 1e-4, steps: int = 200, ema_beta: float = 0.999,
              epsilon: float = 0.99999) -> torch.Tensor:
    """FB's _optimize_weight with mgda and ema on: W from the average of the two, Adam on
    Σ_m c_m Loss_m, c from MGDA of the loss-normalised gradients, smoothed by an EMA started at
    (α, 1 − α). A loss of 0 (W already the model's inside its subspaces) contributes a zero
    gradient, where FB's division by it would give NaN."""
    models = [previous.float(), new.float()]
    losses = [_loss_of(principal(m - base.float(), epsilon)) for m in models]
    w = ((models[0] + models[1]) / 2).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    weights = [alpha, 1 - alpha]
    for _ in range(int(steps)):
        with torch.no_grad():
            pairs = [loss(w - m) for m, loss in zip(models, losses)]
            normed = [g / loss if loss > 0 else torch.zeros_like(g) for loss, g in pairs]
            gamma = min_norm_pair(*normed)
            weights = [ema_beta * c + (1 - ema_beta) * x for c, x in zip(weights, (gamma, 1 - gamma))]
            w.grad = weights[0] * pairs[0][1] + weights[1] * pairs[1][1]
        optimizer.step()
    return w.detach()


def _loss_of(components):
    """`dop_loss` for one model's (U, S, V), by the cheaper of two equal forms: the factors
    (4·m·n·k per call), or the projectors A = U S² Uᵀ and B = V S² Vᵀ formed once, the
    gradient 2(AΔ + ΔB) and the loss ½⟨Δ, gradient⟩ (m·n·(m + n) per call)."""
    u, s, v = components
    if 4 * s.numel() < u.shape[0] + v.shape[0]:
        return lambda delta: dop_loss(delta, u, s, v)
    a, b = (u * s.square()) @ u.T, (v * s.square()) @ v.T

    def loss(delta):
        grad = 2 * (a @ delta + delta @ b)
        return (delta * grad).sum() / 2, grad
    return loss
