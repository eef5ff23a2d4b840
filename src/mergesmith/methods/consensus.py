"""Methods that choose, per entry, which task vectors to keep: Consensus (TALL masks) and MagMax.

Consensus merging (Wang et al. 2024, arXiv:2405.07813, §3-4). A task's TALL mask marks the
entries where the multi-task vector τ_MTL brings θi's weights nearer than the base does:

    m_i = |τi| > λi·|τ_MTL − τi|                     (their eq. 3; θ_MTL − θi = τ_MTL − τi)

An entry set in no mask, or in one only, helps no task or a single one ("catastrophic" and
"selfish" weights); consensus merging keeps τ_MTL only where at least k masks agree:

    θ = θ0 + λ·(1[Σ m_i ≥ k] ⊙ τ_MTL)

τ_MTL is task arithmetic's Σ wi τi (`consensus_ta`) or TIES' merge (`consensus_ties`). As in the
authors' code (nik-dim/tall_masks), the masks compare with the strict >, use the untrimmed τi
and the unscaled τ_MTL, and k = 2 by default; k = 0 keeps everything (the plain merge), k > n
keeps nothing (the base). Their code picks each λi from {0.2, ..., 0.6} on validation data;
without data we default to 0.6, FusionBench's default. Their TIES runs use density 0.2 and the
disjoint sum (`density: 0.2, normalize: false`); our defaults are our `ties`' ones. Unlike their
code, which trims over the whole flattened model, TIES' trim here is per tensor, as in `ties`.

MagMax (Marczak et al. 2024, arXiv:2407.06322, §3): per entry, the task vector of largest
magnitude, θ = θ0 + λ·τ_{argmax_i |τi|}; on a tie the first model in the recipe wins.
"""

from __future__ import annotations

import torch

from mergesmith.methods.blocks import disjoint_mean, elect_sign, task_vectors, weighted_sum
from mergesmith.methods.registry import Param, TensorContext, register
from mergesmith.methods.magnitude_trim import cut_passes, cut_sums, finish_cuts, magnitude_cuts

CONSENSUS_PAPER = ("Wang et al. 2024, Localizing task information for improved model merging and "
                   "compression (ICML), arXiv:2405.07813")
MAGMAX_PAPER = ("Marczak et al. 2024, MagMax: leveraging model merging for seamless continual "
                "learning (ECCV), arXiv:2407.06322")

WEIGHT = Param("weight", default=1.0, per_model=True, arg="weights",
               doc="the model's coefficient wi in τ_MTL")
TALL_MASK_LAMBDA = Param("tall_mask_lambda", default=0.6, per_model=True, arg="tall_mask_lambdas",
                         minimum=0.0, doc="λi of the TALL mask |τi| > λi·|τ_MTL − τi|; the "
                         "authors pick it per task in [0.2, 0.6]")
K = Param("k", int, default=2, minimum=0,
          doc="keep entries set in at least k of the TALL masks (0: keep all)")
LAMBDA = Param("lambda", default=1.0, arg="lambda_", doc="scale of the merged task vector")


def tall_masks(taus: list[torch.Tensor], multi_task: torch.Tensor,
               lambdas: list[float]) -> list[torch.Tensor]:
    """m_i = |τi| > λi·|τ_MTL − τi|: where τ_MTL keeps what task i needs."""
    return [tau.abs() > (multi_task - tau).abs_().mul_(lam) for tau, lam in zip(taus, lambdas)]


def consensus_mask(masks: list[torch.Tensor], k: int) -> torch.Tensor:
    """1[Σ m_i ≥ k]: the entries at least k tasks use."""
    votes = torch.zeros(masks[0].shape, dtype=torch.int32, device=masks[0].device)
    for mask in masks:
        votes += mask
    return votes >= k


def consensus_merge(base: torch.Tensor, taus: list[torch.Tensor], multi_task: torch.Tensor, *,
                    tall_mask_lambdas: list[float], k: int, lambda_: float) -> torch.Tensor:
    """θ0 + λ·(1[Σ m_i ≥ k] ⊙ τ_MTL)."""
    keep = consensus_mask(tall_masks(taus, multi_task, tall_mask_lambdas), k)
    return multi_task.mul_(keep).mul_(lambda_).add_(base)


@register(
    "consensus_ta",
    summary="Task arithmetic keeping only the entries that at least k tasks' TALL masks use.",
    paper=CONSENSUS_PAPER,
    needs_base=True,
    params=(WEIGHT, TALL_MASK_LAMBDA, K, LAMBDA),
    elementwise=True,
)
def consensus_ta(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    weights: list[float],
    tall_mask_lambdas: list[float],
    k: int = 2,
    lambda_: float = 1.0,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """τ_MTL = Σ wi τi;  θ = θ0 + λ·(1[Σ m_i ≥ k] ⊙ τ_MTL)."""
    taus = task_vectors(base, experts)
    multi_task = weighted_sum(taus, weights)  # a new tensor: consensus_merge may scale it in place
    return consensus_merge(base, taus, multi_task, tall_mask_lambdas=tall_mask_lambdas, k=k,
                           lambda_=lambda_)


@register(
    "consensus_ties",
    summary="TIES merge keeping only the entries that at least k tasks' TALL masks use.",
    paper=CONSENSUS_PAPER,
    needs_base=True,
    params=(
        WEIGHT,
        Param("density", default=1.0, per_model=True, arg="densities", minimum=0.0, maximum=1.0,
              doc="fraction of τi's entries TIES keeps (the authors use 0.2)"),
        TALL_MASK_LAMBDA, K, LAMBDA,
        Param("normalize", bool, default=True,
              doc="TIES' disjoint mean (true) or disjoint sum (false, the authors' choice)"),
    ),
    # elementwise once TIES' cuts are known: they stream as TIES' (methods/magnitude_trim.py)
    reduce=cut_sums, finish=finish_cuts, passes=cut_passes,
)
def consensus_ties(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    weights: list[float],
    densities: list[float],
    tall_mask_lambdas: list[float],
    k: int = 2,
    lambda_: float = 1.0,
    normalize: bool = True,
    ctx: TensorContext | None = None,
    stats: list[tuple[float, float]] | None = None,
) -> torch.Tensor:
    """τ_MTL = disjoint_mean(trim(τi), s) with s = sign(Σ wi trim(τi));
    θ = θ0 + λ·(1[Σ m_i ≥ k] ⊙ τ_MTL). The trims' thresholds are `stats`, those of the whole
    tensor when the engine streams it."""
    taus = task_vectors(base, experts)
    trims = magnitude_cuts(base, experts, densities, unbiased=False, stats=stats)
    trimmed = [trim(tau, 0) for trim, tau in zip(trims, taus)]  # new tensors, or τi itself
    multi_task = disjoint_mean(trimmed, elect_sign(trimmed, weights), weights, normalize)
    return consensus_merge(base, taus, multi_task, tall_mask_lambdas=tall_mask_lambdas, k=k,
                           lambda_=lambda_)


def largest_magnitude(taus: list[torch.Tensor]) -> torch.Tensor:
    """Per entry, the τi of largest |τi| (the first one on a tie)."""
    chosen = taus[0].clone()
    for tau in taus[1:]:
        torch.where(tau.abs() > chosen.abs(), tau, chosen, out=chosen)
    return chosen


@register(
    "magmax",
    summary="Per entry, keep the task vector of largest magnitude; add it to the base.",
    paper=MAGMAX_PAPER,
    needs_base=True,
    params=(Param("lambda", default=1.0, arg="lambda_",
                  doc="scale of the chosen task vector (the authors' reproduction uses 0.5)"),),
    elementwise=True,
)
def magmax(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    lambda_: float = 1.0,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """θ = θ0 + λ·τ_{argmax_i |τi|}, entry by entry."""
    return largest_magnitude(task_vectors(base, experts)).mul_(lambda_).add_(base)
