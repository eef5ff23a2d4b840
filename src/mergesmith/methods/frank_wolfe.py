"""FW-Merging: Frank-Wolfe merging over a pool of checkpoints (Chen et al. 2025, arXiv
2503.12649), the "hard" variant of FusionBench's method/fw_merging (fw_hard.py, whose defaults
are ours: 10 iterations, step size 0.1, λ = 0.3, task granularity, cross-entropy):

    θ^(0) = θ0 + λ Σi τi                     (task arithmetic of the pool; or θ0 with init: base)
    pool  = {θ1, …, θN, θ^(0)}               (θ^(0) joins as "initial")
    for t < iterations:
        g   = ∇θ mean loss of θ^(t) over every task's calibration batches
        s*  = argmin_{s ∈ pool} Σ_p cos(g_p, s_p)    (p over the tensors of a group)
        θ^(t+1) = θ^(t) + γ_t λ (s* − θ^(t)),  γ_t = step_size · 2/(t + 2)

The oracle scores a checkpoint's weights s_p, not its task vector, by the sum of per-tensor
cosines, as the reference code does (the paper's linear minimisation of ⟨g, s⟩ over the pool's
hull can pick a different s*). Granularity `task` picks one s* for the model; `layer` one per
tensor (the reference's two); `block` one per block of layers, our addition.

Every iterate is θ0 + Σi c_i τi: each pool member is (θ0 + τi, or θ^(0) = θ0 + Σi c^(0)_i τi),
and the step is a convex combination of the iterate and a member, so the step maps the
coefficients, c ← c + γ_t λ (c(s*) − c), and nothing model-sized is kept besides the iterate
the gradient is taken at. The result is learned per-tensor weights: the learn route writes
them as an ordinary task-arithmetic recipe (pipeline.py). The cosines come from dot products,
⟨g, s⟩ = ⟨g, θ0⟩ + Σi ci ⟨g, τi⟩ and ‖s‖² from the constant Gram matrix of (θ0, τ1, …, τN),
so no member is materialised either. A tensor whose gradient (or member) is zero scores 0
(the reference's 0/0 would make every score NaN).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mergesmith.methods.adaptive import (Learned, MergeProblem, backward_tasks, check_problem,
                                         coefficient_rows, entropy, split_outputs,
                                         weights_by_tensor)
from mergesmith.methods.blocks import gram64
from mergesmith.methods.linear import task_arithmetic
from mergesmith.methods.registry import Param, register

FW_PAPER = ("Chen et al. 2025, FW-Merging: scaling model merging with Frank-Wolfe optimization, "
            "arXiv:2503.12649")


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.reshape(-1))


def pool_coefficients(initial: Tensor) -> Tensor:
    """[member, row, expert]: expert j is e_j in every row; the last member is θ^(0)."""
    rows, count = initial.shape
    experts = torch.eye(count, dtype=initial.dtype, device=initial.device)
    return torch.cat([experts[:, None, :].expand(count, rows, count), initial[None]])


def iterate(problem: MergeProblem, coeffs: Tensor, rows: dict[str, int]) -> dict[str, Tensor]:
    """θ = θ0 + Σi c_i τi per tensor, as leaves that collect the loss's gradient."""
    params = {}
    for name, theta0 in problem.base.items():
        theta = theta0.clone()
        for c, tau in zip(coeffs[rows[name]].tolist(), problem.task_vectors):
            theta.add_(tau[name], alpha=c)
        params[name] = theta.requires_grad_(True)
    return params


def gradient(problem: MergeProblem, params: dict[str, Tensor], loss: str
             ) -> tuple[dict[str, Tensor | None], float]:
    """∇θ of the mean loss over every task's batches, and that mean."""
    work = [(task, index) for task, batches in enumerate(problem.batches)
            for index in range(len(batches))]

    def value(task: int, index: int, output: Any) -> Tensor:
        logits = split_outputs(output)[0]
        if loss == "entropy":
            return entropy(logits)
        return cross_entropy(logits, problem.batches[task][index].targets)

    with torch.enable_grad():
        mean = backward_tasks(problem, params, work, value)
    return {name: theta.grad for name, theta in params.items()}, mean


class Oracle:
    """Scores of the pool's members against a gradient, per group of tensors (a row of c)."""

    def __init__(self, problem: MergeProblem, rows: dict[str, int], count: int):
        self.problem, self.rows, self.count = problem, rows, count
        # G[p] = Gram matrix of (θ0_p, τ1_p, …, τN_p): ‖θ0 + Σ ci τi‖² = (1, c)ᵀ G (1, c)
        self.grams = {name: gram64([theta0, *(tau[name] for tau in problem.task_vectors)]).cpu()
                      for name, theta0 in problem.base.items()}

    def scores(self, grads: dict[str, Tensor | None], pool: Tensor) -> Tensor:
        """[row, member] Σ over the row's tensors p of cos(g_p, s_p)."""
        members = pool.shape[0]
        total = torch.zeros(self.count, members, dtype=torch.float64)
        for name, theta0 in self.problem.base.items():
            g = grads.get(name)
            if g is None:
                continue
            row = self.rows[name]
            flat = g.reshape(-1)
            vectors = [theta0, *(tau[name] for tau in self.problem.task_vectors)]
            dots = torch.tensor([float(torch.dot(flat, v.reshape(-1))) for v in vectors],
                                dtype=torch.float64)
            grad_norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
            ext = torch.cat([torch.ones(members, 1, dtype=torch.float64),
                             pool[:, row]], dim=1)  # (1, c) per member
            norms = ((ext @ self.grams[name]) * ext).sum(1).clamp_(min=0).sqrt_()
            scale = grad_norm * norms
            total[row] += torch.where(scale > 0, (ext @ dots) / scale.clamp(min=1e-300), 0.0)
        return total


def learn_fw_merging(problem: MergeProblem, *, granularity: str = "task", lambda_: float = 0.3,
                     step_size: float = 0.1, iterations: int = 10, init: str = "task_arithmetic",
                     loss: str = "cross_entropy") -> Learned:
    """The iterations above on the coefficients c (one row per group, one c_i per expert);
    `losses` holds the mean loss at each iterate the gradient was taken at."""
    check_problem(problem, "fw_merging", needs_targets=loss == "cross_entropy")
    rows, count = coefficient_rows(problem, granularity)
    experts = len(problem.task_vectors)
    initial = torch.full((count, experts), lambda_ if init == "task_arithmetic" else 0.0,
                         dtype=torch.float64)
    pool = pool_coefficients(initial)
    oracle = Oracle(problem, rows, count)
    coeffs, losses = initial.clone(), []
    for t in range(iterations):
        grads, mean = gradient(problem, iterate(problem, coeffs, rows), loss)
        losses.append(mean)
        chosen = oracle.scores(grads, pool).argmin(dim=1)  # the first member on a tie
        target = pool[chosen, torch.arange(count)]
        gamma = step_size * 2 / (t + 2)
        coeffs += gamma * lambda_ * (target - coeffs)
    return Learned(weights=weights_by_tensor(coeffs, rows), losses=losses)


register(
    "fw_merging",
    summary="Frank-Wolfe over a pool of checkpoints: from task arithmetic, repeatedly step "
            "toward the checkpoint least aligned with the loss gradient on labelled (or "
            "unlabelled) calibration data.",
    paper=FW_PAPER,
    needs_base=True,
    params=(
        Param("granularity", str, default="task", choices=("task", "layer", "block"),
              doc="one chosen checkpoint per step for the model (task), per tensor (layer) or "
                  "per block"),
        Param("lambda", default=0.3, arg="lambda_",
              doc="scale of the initial task arithmetic and of every step (the code's 0.3)"),
        Param("step_size", default=0.1, minimum=0.0, doc="γ_t = step_size·2/(t+2)"),
        Param("iterations", int, default=10, minimum=0,
              doc="Frank-Wolfe steps (one gradient over all calibration batches each)"),
        Param("init", str, default="task_arithmetic", choices=("task_arithmetic", "base"),
              doc="θ^(0): task arithmetic of the pool with λ, or the base"),
        Param("loss", str, default="cross_entropy", choices=("cross_entropy", "entropy"),
              doc="cross-entropy on labelled data, or prediction entropy on unlabelled"),
    ),
    learn=learn_fw_merging,
)(task_arithmetic)
