"""SCE (Wan et al. 2024, FuseChat): select the entries the experts disagree on most, calculate
each expert's weight from its energy, erase the minority signs.
"""

from __future__ import annotations

import torch

from mergesmith.methods.blocks import (break_ties, disjoint_mean, elect_sign, magnitude_threshold,
                                       task_vectors)
from mergesmith.methods.registry import Param, TensorContext, register


# SCE never holds the T task vectors whole: each pass recomputes τi = θi − θ0 block by block
# from the inputs (the same subtraction, so the same values); only what spans the tensor (the
# variance's threshold, the energies) is computed on whole tensors, one at a time.
VARIANCE_BLOCK = 1 << 20  # entries stacked per torch.var call (as before: the same roundings)
MERGE_BLOCK = 1 << 18  # entries per block of the elementwise combination (any size: same bytes)


def flat_inputs(base: torch.Tensor, experts: list[torch.Tensor]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return base.reshape(-1), [expert.reshape(-1) for expert in experts]


def block_task_vectors(base: torch.Tensor, experts: list[torch.Tensor], start: int, size: int,
                       keep: torch.Tensor | None = None) -> list[torch.Tensor]:
    """τi = θi − θ0 on entries [start, start + size) of the flattened tensors; 0 where the
    flattened `keep` mask is False, when one is given."""
    tvs = task_vectors(base[start:start + size], [e[start:start + size] for e in experts])
    return tvs if keep is None else [tv.mul_(keep[start:start + size]) for tv in tvs]


def variance_across(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """σ²(τ1..τk) per entry (population variance) of flattened inputs, one block at a time."""
    variance = torch.empty_like(base)
    for a in range(0, base.numel(), VARIANCE_BLOCK):
        block = torch.stack(block_task_vectors(base, experts, a, VARIANCE_BLOCK))
        variance[a:a + VARIANCE_BLOCK] = torch.var(block, dim=0, unbiased=False)
    return variance


def high_variance_mask(base: torch.Tensor, experts: list[torch.Tensor], density: float
                       ) -> torch.Tensor:
    """SCE's select, on flattened inputs: the top-d fraction (of the entries that vary at all)
    by the variance of τ1..τk across the experts."""
    variance = variance_across(base, experts)
    k = int(torch.count_nonzero(variance) * density)
    if k == 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    return variance >= magnitude_threshold(variance, k)


def energies(base: torch.Tensor, experts: list[torch.Tensor], shape: torch.Size,
             keep: torch.Tensor | None) -> list[float]:
    """Σ τ̂i² of each expert over the whole tensor (flattened inputs), as torch.sum(τ̂i², dtype=
    float64) adds them: that call first copies τ̂i² to a float64 tensor of the input's shape and
    sums it; here the copy is filled block by block, so no τ̂i exists whole in fp32."""
    squares = torch.empty(shape, dtype=torch.float64, device=base.device)
    flat = squares.view(-1)
    sums = []
    for expert in experts:
        for a in range(0, base.numel(), MERGE_BLOCK):
            (tv,) = block_task_vectors(base, [expert], a, MERGE_BLOCK, keep)
            flat[a:a + MERGE_BLOCK] = tv.mul_(tv)
        sums.append(float(squares.sum()))
    return sums


def energy_weights(energies: list[float]) -> list[float]:
    """SCE's calculate: ηi = Σ τi² / Σj Σ τj² (any scale; uniform only when every τ is zero)."""
    total = sum(energies)
    return [e / total for e in energies] if total > 0 else [1 / len(energies)] * len(energies)


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
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
)
def sce(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    ctx: TensorContext | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Select, calculate, erase: θ = θ0 + Σ ηi·τ̂i / Σ ηi over the τ̂i whose sign is that of
    Σ τ̂i, with τ̂i = τi on the selected entries and ηi = Σ τ̂i² / Σj Σ τ̂j².

    Three passes over the inputs: the variance and its threshold (a bool mask remains), the
    energies (one τ̂i² at a time, in float64), then the sign election and disjoint mean, block
    by block into the output. Peak working memory, 2048×5632 and 3 experts: 2.6 tensors with
    selection, 2.1 without (the float64 squares), against 7.9 and 7.0 when the T task vectors
    and the election's buffers were whole tensors; the output is the same, bit for bit.
    With `compute_dtype`, as mergekit evaluates it (`sce_rounded`)."""
    if compute_dtype is not None:
        return sce_rounded(base, experts, select_topk, compute_dtype)
    flat_base, flat_experts = flat_inputs(base, experts)
    keep = high_variance_mask(flat_base, flat_experts, select_topk) if select_topk < 1 else None
    weights = energy_weights(energies(flat_base, flat_experts, base.shape, keep))
    merged = torch.empty_like(flat_base)
    for a in range(0, flat_base.numel(), MERGE_BLOCK):
        tvs = block_task_vectors(flat_base, flat_experts, a, MERGE_BLOCK, keep)
        merged[a:a + MERGE_BLOCK] = disjoint_mean(tvs, elect_sign(tvs), weights).add_(
            flat_base[a:a + MERGE_BLOCK])
    return merged.view_as(base)


ENERGY_FLOOR = 1e-6  # mergekit: uniform ηi when Σi mean(τi²) is below this (compat only)
DIVISOR_FLOOR = 1e-6  # mergekit: Σ ηi over the agreeing experts floored here (compat only)


def sce_rounded(base: torch.Tensor, experts: list[torch.Tensor], select_topk: float,
                dtype: torch.dtype) -> torch.Tensor:
    """SCE as mergekit 0.1.5 evaluates it (`compat: mergekit`), on the stacked task vectors in
    `dtype`, each step rounded there: exactly k = ⌊d·(entries that vary)⌋ selected by torch's
    top-k (ties as it breaks them), + on an exactly even sign vote, ηi = mean(τ̂i²) / Σj mean(τ̂j²)
    but uniform when that sum is below 1e-6 (typical fine-tunes: |τ| ~ 1e-4), and the divisor
    Σ ηi over the agreeing experts floored at 1e-6."""
    theta0 = base.to(dtype)
    tvs = torch.stack([expert.to(dtype) - theta0 for expert in experts])
    if select_topk < 1:
        variance = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * select_topk) if select_topk > 0 else 0
        selected = torch.zeros_like(variance)
        if k > 0:
            selected.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True)[1]] = 1
        tvs = tvs * selected.unsqueeze(0)
    agree = tvs.sign() == break_ties(tvs.sum(dim=0).sign_(), "plus")
    energy = tvs.square().reshape(len(experts), -1).mean(dim=1)
    total = torch.sum(energy).item()
    eta = torch.ones_like(energy) / len(experts) if abs(total) < ENERGY_FLOOR else energy / total
    eta = eta.view(-1, *[1] * base.dim()) * agree
    return theta0 + (tvs * eta).sum(dim=0) / torch.sum(eta, dim=0).clamp(min=DIVISOR_FLOOR)
