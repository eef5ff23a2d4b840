"""Merges that treat each entry by how many experts changed it: RAM and RAM+ (Yuan et al. 2026,
arXiv:2601.13572). RL fine-tuning changes few entries, and different ones per task; averaging
would dilute an entry only one expert changed, so such unique entries are kept whole (RAM+
even scales them up) and only the entries several experts changed are averaged.

An entry counts as changed by expert i when |τi| > ε.
"""

from __future__ import annotations

import torch

from mergesmith.methods.blocks import task_vectors, weighted_sum
from mergesmith.methods.registry import Param, TensorContext, register

EPSILON = Param("epsilon", default=1e-5, minimum=0.0,
                doc="a change |τi| ≤ epsilon counts as no change")


def significant_updates(tvs: list[torch.Tensor], epsilon: float) -> list[torch.Tensor]:
    """τi with the entries |τi| ≤ ε set to zero."""
    return [tv.mul_(tv.abs() > epsilon) for tv in tvs]


def contributors(updates: list[torch.Tensor]) -> torch.Tensor:
    """n = #{i : τi ≠ 0} per entry."""
    return sum((u != 0).to(u.dtype) for u in updates)


def shared_mean(updates: list[torch.Tensor], count: torch.Tensor) -> torch.Tensor:
    """Σ τi / max(1, n): the mean over the experts that changed the entry."""
    return weighted_sum(updates, [1.0] * len(updates)).div_(count.clamp_min(1))


@register(
    "ram",
    summary="Average each entry over the experts that changed it; an entry one expert changed "
            "keeps that change whole.",
    paper="Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models "
          "(RAM), arXiv:2601.13572",
    needs_base=True,
    params=(EPSILON,),
    elementwise=True,
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
)
def ram(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    epsilon: float = 1e-5,
    ctx: TensorContext | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ = θ0 + Σ τi·[|τi| > ε] / max(1, n), n = #{i : |τi| > ε}; with `compute_dtype`, as
    mergekit evaluates it (`ram_rounded`)."""
    if compute_dtype is not None:
        return ram_rounded(base, experts, epsilon, compute_dtype)
    updates = significant_updates(task_vectors(base, experts), epsilon)
    return shared_mean(updates, contributors(updates)).add_(base)


def ram_rounded(base: torch.Tensor, experts: list[torch.Tensor], epsilon: float,
                dtype: torch.dtype, scales: torch.Tensor | None = None) -> torch.Tensor:
    """RAM as mergekit 0.1.5 evaluates it (`compat: mergekit`): the stacked τi in `dtype`, each
    shared entry's τi / n rounded there, the sum over the experts a torch sum; with `scales`
    (RAM+'s λi, fp32 as mergekit's), the unique entries' λi·τi and the sum in fp32."""
    theta0 = base.to(dtype)
    tvs = torch.stack([expert.to(dtype) - theta0 for expert in experts]).view(len(experts), -1)
    changed = tvs.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)
    tvs = tvs * changed
    unique = tvs * (count == 1)
    if scales is not None:
        unique = unique * scales.unsqueeze(-1)
    merged = (unique + tvs * (count > 1) / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return theta0 + merged.reshape_as(theta0)


def overlap_counts(base: torch.Tensor, experts: list[torch.Tensor], *, epsilon: float = 1e-5,
                   compute_dtype: torch.dtype | None = None, **_) -> torch.Tensor:
    """Per expert i, (shared_i, unique_i) in float64: how many entries it changes together with
    another expert, and alone. The whole-tensor part of RAM+. With `compute_dtype`, τi as
    mergekit rounds it (`compat: mergekit`)."""
    if compute_dtype is not None:
        base, experts = base.to(compute_dtype), [e.to(compute_dtype) for e in experts]
    updates = significant_updates(task_vectors(base, experts), epsilon)
    shared = contributors(updates) > 1
    return torch.tensor([[float(((u != 0) & shared).sum()), float(((u != 0) & ~shared).sum())]
                         for u in updates], dtype=torch.float64)


def unique_scales(counts: torch.Tensor, r: float, alpha: float, epsilon: float) -> list[float]:
    """λi = 1 + r·clamp(ρi, 0, α), ρi = shared_i / max(unique_i, ε)."""
    return [1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
            for shared, unique in counts.tolist()]


@register(
    "ramplus_tl",
    summary="RAM with each expert's unique changes scaled up by how much of its update the "
            "others share (RAM+, ratios counted per tensor).",
    paper="Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models "
          "(RAM+), arXiv:2601.13572",
    needs_base=True,
    params=(
        Param("r", default=0.1, doc="strength of the unique-entry rescaling"),
        Param("alpha", default=0.2, doc="cap on the shared/unique ratio ρ"),
        EPSILON,
    ),
    reduce=overlap_counts,
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
)
def ramplus_tl(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    stats: torch.Tensor | None = None,
    ctx: TensorContext | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ = θ0 + (λj·τj where only expert j changed the entry, else Σ τi / n over the n that did),
    λi = 1 + r·clamp(ρi, 0, α) with ρi = shared_i / unique_i counted over this tensor. With
    `compute_dtype`, as mergekit evaluates it (`ram_rounded`, ρi and λi in fp32)."""
    counts = (overlap_counts(base, experts, epsilon=epsilon, compute_dtype=compute_dtype)
              if stats is None else stats)
    if compute_dtype is not None:
        shared, unique = counts.float().unbind(1)
        rho = shared / unique.clamp(min=epsilon)
        return ram_rounded(base, experts, epsilon, compute_dtype,
                           scales=1 + r * rho.clamp(min=0, max=alpha))
    scales = unique_scales(counts, r, alpha, epsilon)
    updates = significant_updates(task_vectors(base, experts), epsilon)
    count = contributors(updates)
    # where n = 1 the sum has a single non-zero term, λj·τj
    unique = weighted_sum(updates, scales)
    return torch.where(count == 1, unique, shared_mean(updates, count)).add_(base)
