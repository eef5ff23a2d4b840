"""DOGE: multi-task merging as adaptive projective gradient descent (Wei et al. 2025, arXiv
2501.01230, ICML), data-free, on each 2-D weight W with task vectors τi = θi − θ0:

    λi = η / ‖τi‖_F                                   (per tensor, their adaptive λ)
    U_s = top ⌊r/s⌋ left singular vectors of [U_1 … U_N],  U_i = top ⌊r/N⌋ of τi's, r = min(m, n)
    L(δ) = Σ_j Σ_rows (⟨τj, τj − Σi λi τi − (Σi λi) δ⟩_row)²
    δ ← optimiser step on (I − U_s U_sᵀ) ∇L(δ), from δ = 0, `steps` times
    m_i = |τi| ≥ k-th largest |τi|,  k = ⌊K·n⌋
    θ = θ0 + Σi λi ((τi + δ) ⊙ m_i)

as FusionBench's method/doge_ta (the reference code: subspace 6, K 30 %, η 0.07, Adam with
lr 1e-4 and 400 steps per layer). Where ours differs, and why:

- The mask is per tensor. The reference takes the top 30 % of each τi over the whole flattened
  model (its filtered encoder weights); the engine streams one tensor at a time and its reduce
  passes sum over the chunks of one tensor only, so a model-wide k-th value would need a pass
  over every tensor before the first is written. Per tensor, as TIES' trim here.
- The mask keeps ⌊K·n⌋ entries (and any tied with the k-th), as `keep_topk_mask`; the
  reference's kthvalue index keeps one more.
- Tensors that are not matrices (norms, biases) have no singular vectors: there the merge is
  task arithmetic with the same λi, θ0 + Σi λi τi. The reference's filter leaves them (and
  every tensor outside the CLIP encoder) at the base.
- Adam rescales the projected gradient entrywise, so δ does not stay off the shared subspace
  (the reference's behaviour, our default); `optimizer: sgd` is plain projected gradient
  descent, which keeps U_sᵀδ = 0.
- The loss's gradient is written out, ∇L = −2(Σλ)·Σ_j r_j τj with r_j the row sums inside the
  square, instead of autograd through the loss (the same gradient; one pass over the τ's).
- The singular vectors come from eigh of the smaller Gram matrix in float64 (methods/subspace.py);
  the reference's SVD in fp32 differs in rounding only.

Nothing is random (δ starts at 0), so the result needs no seed. Cost per matrix: `steps` passes
over the N task vectors plus a rank-⌊r/s⌋ projection each; meant for a GPU (`--device cuda`).
"""

from __future__ import annotations

import torch

from mergesmith.methods.blocks import keep_topk_mask, task_vectors, weighted_sum
from mergesmith.methods.registry import Param, TensorContext, register
from mergesmith.methods.subspace import top_singular_triplets

DOGE_PAPER = ("Wei et al. 2025, Modeling multi-task model merging as adaptive projective "
              "gradient descent (ICML), arXiv:2501.01230")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the reference uses


def adaptive_lambdas(taus: list[torch.Tensor], eta: float) -> list[float]:
    """λi = η/‖τi‖_F; a zero task vector gets 0 (it adds nothing either way)."""
    norms = [float(torch.linalg.vector_norm(tau, dtype=torch.float64)) for tau in taus]
    return [eta / norm if norm > 0 else 0.0 for norm in norms]


def shared_subspace(taus: list[torch.Tensor], subspace: int) -> torch.Tensor:
    """U_s (m × ⌊r/s⌋, fp32): the top left singular vectors of the task vectors' top ⌊r/N⌋ left
    singular vectors placed side by side. Directions at the noise floor are left out."""
    rank = min(taus[0].shape)
    per_task = rank // len(taus)
    keep = rank // subspace
    columns = [top_singular_triplets(tau, per_task)[0] for tau in taus] if per_task else []
    if keep == 0 or sum(c.shape[1] for c in columns) == 0:
        return taus[0].new_zeros(taus[0].shape[0], 0)
    return top_singular_triplets(torch.cat(columns, dim=1), keep)[0].to(taus[0].dtype)


def off_subspace(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(I − U_s U_sᵀ) g, without forming the m × m projector."""
    return grad.sub_(basis @ (basis.mT @ grad)) if basis.shape[1] else grad


class AlignmentLoss:
    """L(δ) = Σ_j ‖r_j(δ)‖², r_j = rowsum(τj ⊙ (τj − T − Sδ)), T = Σi λi τi, S = Σi λi.
    r_j = c_j − S·rowsum(τj ⊙ δ) with the constant c_j = rowsum(τj ⊙ (τj − T))."""

    def __init__(self, taus: torch.Tensor, lambdas: list[float]):
        self.taus = taus  # N × m × n
        self.total = sum(lambdas)
        drift = weighted_sum(list(taus), lambdas)
        self.constant = (torch.linalg.vecdot(taus, taus)
                         - torch.einsum("jmn,mn->jm", taus, drift))

    def residuals(self, delta: torch.Tensor) -> torch.Tensor:
        return self.constant - self.total * torch.einsum("jmn,mn->jm", self.taus, delta)

    def gradient(self, delta: torch.Tensor) -> torch.Tensor:
        """∂L/∂δ = −2S Σ_j r_j[:, None] ⊙ τj."""
        return torch.einsum("jm,jmn->mn", self.residuals(delta), self.taus).mul_(-2 * self.total)

    def __call__(self, delta: torch.Tensor) -> float:
        return float(self.residuals(delta).square().sum(dtype=torch.float64))


class Adam:
    """torch.optim.Adam's update (default betas and eps, no weight decay), on one tensor whose
    gradient we compute ourselves: the engine merges without autograd."""

    def __init__(self, like: torch.Tensor, lr: float):
        self.lr, self.step_count = lr, 0
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(like), torch.zeros_like(like)

    def step(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        beta1, beta2 = ADAM_BETAS
        self.step_count += 1
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction1 = 1 - beta1 ** self.step_count
        correction2 = 1 - beta2 ** self.step_count
        denom = (self.exp_avg_sq.sqrt() / correction2 ** 0.5).add_(ADAM_EPS)
        param.addcdiv_(self.exp_avg, denom, value=-self.lr / correction1)


class SGD:
    def __init__(self, like: torch.Tensor, lr: float):
        self.lr = lr

    def step(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        param.add_(grad, alpha=-self.lr)


OPTIMIZERS = {"adam": Adam, "sgd": SGD}


def learn_delta(taus: torch.Tensor, lambdas: list[float], basis: torch.Tensor, *,
                steps: int, lr: float, optimizer: str) -> torch.Tensor:
    """δ after `steps` optimiser steps on L from 0, each on the gradient projected off U_s;
    `taus` stacked, N × m × n."""
    loss = AlignmentLoss(taus, lambdas)
    delta = torch.zeros_like(taus[0])
    stepper = OPTIMIZERS[optimizer](delta, lr)
    for _ in range(steps):
        stepper.step(delta, off_subspace(loss.gradient(delta), basis))
    return delta


@register(
    "doge_ta",
    summary="Per weight matrix, learn one shared change δ that keeps the task vectors aligned "
            "(gradient steps off their shared singular subspace), add it to each task vector, "
            "keep each one's top-K magnitudes, and sum them scaled to norm η.",
    paper=DOGE_PAPER,
    needs_base=True,
    params=(
        Param("eta", default=0.07, minimum=0.0,
              doc="each task vector's scale λi = η/‖τi‖ per tensor (the paper's η)"),
        Param("subspace", int, default=6, minimum=1,
              doc="the shared subspace keeps ⌊min(m, n)/subspace⌋ directions"),
        Param("topk", default=0.3, minimum=0.0, maximum=1.0,
              doc="fraction of each task vector's entries kept (per tensor; the reference's K "
                  "is over the whole model)"),
        Param("steps", int, default=400, minimum=0, doc="optimiser steps on δ per matrix"),
        Param("lr", default=1e-4, minimum=0.0, doc="the optimiser's learning rate"),
        Param("optimizer", str, default="adam", choices=tuple(OPTIMIZERS),
              doc="adam (the reference) or sgd (plain projected gradient descent)"),
    ),
)
def doge_ta(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    eta: float = 0.07,
    subspace: int = 6,
    topk: float = 0.3,
    steps: int = 400,
    lr: float = 1e-4,
    optimizer: str = "adam",
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """θ = θ0 + Σi λi ((τi + δ) ⊙ m_i) on a matrix; θ0 + Σi λi τi on any other tensor."""
    if base.ndim != 2:
        taus = task_vectors(base, experts)
        return weighted_sum(taus, adaptive_lambdas(taus, eta)).add_(base)
    stacked = torch.stack(experts).sub_(base)  # the τi as views of one N × m × n tensor
    taus = list(stacked)
    lambdas = adaptive_lambdas(taus, eta)
    delta = learn_delta(stacked, lambdas, shared_subspace(taus, subspace),
                        steps=steps, lr=lr, optimizer=optimizer)
    merged = torch.zeros_like(base)
    for tau, lam in zip(taus, lambdas):
        merged.add_((tau + delta).mul_(keep_topk_mask(tau, topk)), alpha=lam)
    return merged.add_(base)
