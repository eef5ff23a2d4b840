"""Merges that decide, entry by entry, which part of the task vectors reaches the merge:
SCE (the entries the experts disagree on most, with minority signs erased), Arcee Fusion (the
entries whose change matters most) and NearSwap (every change, clipped to a step of t).
"""

from __future__ import annotations

import torch

from mergesmith.methods.blocks import disjoint_mean, elect_sign, magnitude_threshold, task_vectors
from mergesmith.methods.registry import Param, TensorContext, register


VARIANCE_BLOCK = 1 << 20  # entries: the experts' values are stacked one block at a time


def variance_across(tvs: list[torch.Tensor]) -> torch.Tensor:
    """σ²(τ1..τk) per entry (population variance), stacking one block of entries at a time."""
    variance = torch.empty_like(tvs[0])
    flat, parts = variance.view(-1), [tv.reshape(-1) for tv in tvs]
    for a in range(0, flat.numel(), VARIANCE_BLOCK):
        block = torch.stack([p[a:a + VARIANCE_BLOCK] for p in parts])
        flat[a:a + VARIANCE_BLOCK] = torch.var(block, dim=0, unbiased=False)
    return variance


def high_variance_mask(tvs: list[torch.Tensor], density: float) -> torch.Tensor:
    """SCE's select: the top-d fraction (of the entries that vary at all) by the variance of
    τ1..τk across the experts."""
    if density >= 1:
        return torch.ones_like(tvs[0], dtype=torch.bool)
    variance = variance_across(tvs)
    k = int(torch.count_nonzero(variance) * density)
    if k == 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    return variance >= magnitude_threshold(variance, k)


def energy_weights(tvs: list[torch.Tensor]) -> list[float]:
    """SCE's calculate: ηi = Σ τi² / Σj Σ τj² (any scale; uniform only when every τ is zero)."""
    energies = [float(torch.sum(tv * tv, dtype=torch.float64)) for tv in tvs]
    total = sum(energies)
    return [e / total for e in energies] if total > 0 else [1 / len(tvs)] * len(tvs)


@register(
    "sce",
    summary="Keep the entries whose task vectors vary most, weight each by its energy, "
            "average the ones agreeing with the majority sign.",
    paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models, arXiv:2408.07990",
    needs_base=True,
    params=(
        Param("select_topk", default=1.0, minimum=0.0, maximum=1.0,
              doc="fraction of the varying entries kept, by variance across the experts"),
        Param("int8_mask", bool, default=False, doc="mergekit's memory option; no effect here"),
    ),
)
def sce(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """Select, calculate, erase: θ = θ0 + Σ ηi·τ̂i / Σ ηi over the τ̂i whose sign is that of
    Σ τ̂i, with τ̂i = τi on the selected entries and ηi = Σ τ̂i² / Σj Σ τ̂j²."""
    tvs = task_vectors(base, experts)
    if select_topk < 1:
        keep = high_variance_mask(tvs, select_topk)
        tvs = [tv.mul_(keep) for tv in tvs]
    return disjoint_mean(tvs, elect_sign(tvs), energy_weights(tvs)).add_(base)


KL_EPS = 1e-8


def row_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) ‖ softmax(y)) of each row (last axis), ε added to both distributions."""
    p = torch.softmax(x, dim=-1) + KL_EPS
    q = torch.softmax(y, dim=-1) + KL_EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def lower_quantiles(x: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """The ⌊q·(n − 1)⌋-th smallest entry of x for each q, found by selection (no sort)."""
    flat = x.flatten()
    return [torch.kthvalue(flat, int(q * (flat.numel() - 1)) + 1).values for q in qs]


@register(
    "arcee_fusion",
    summary="Take the expert's change only where its importance (|τ| × the row's softmax KL) "
            "is an outlier: above median + 1.5·IQR.",
    paper="Arcee AI 2025, Arcee Fusion (mergekit's arcee_fusion; no paper)",
    needs_base=True,
    min_models=1,
    max_models=1,
    params=(),
)
def arcee_fusion(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """θ = θ0 + τ·[s ≥ median(s) + 1.5·(Q3(s) − Q1(s))], s = |τ|·KL(softmax(θ1) ‖ softmax(θ0))
    per row. The quartiles are exact; mergekit estimates them from a random sample of 10⁶
    entries on larger tensors, which makes its output change from run to run."""
    (other,) = experts
    tau = other - base
    importance = tau.abs() * row_kl(other, base)
    q1, median, q3 = lower_quantiles(importance, (0.25, 0.5, 0.75))
    return base + tau * (importance >= median + 1.5 * (q3 - q1))


@register(
    "nearswap",
    summary="Move each entry of the base toward the other model by at most t: entries closer "
            "than t take the other model's value.",
    paper="alchemonaut 2024, NearSwap (QuartetAnemoi-70B model card; no paper)",
    needs_base=True,
    min_models=1,
    max_models=1,
    params=(Param("t", minimum=0.0, doc="largest step from the base, per entry"),),
    elementwise=True,
)
def nearswap(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    t: float,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """θ = θ0 + w·τ with w = min(1, t/|τ|), that is θ = θ0 + clamp(τ, −t, t)."""
    (tau,) = task_vectors(base, experts)
    return tau.clamp_(-t, t).add_(base)
