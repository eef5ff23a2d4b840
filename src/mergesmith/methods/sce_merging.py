"""SCE (Wan et al. 2024, FuseChat): select the entries the experts disagree on most, calculate
each expert's weight from its energy, erase the minority signs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import kth
from mergesmith.methods.blocks import break_ties, disjoint_mean, elect_sign, task_vectors
from mergesmith.methods.registry import Param, TensorContext, register
from mergesmith.methods.streamed import exact_total, exponent_sums, reduce_in_parts

# SCE never holds the T task vectors whole: each pass recomputes τi = θi − θ0 block by block
# from the inputs (the same subtraction, so the same values); what spans the tensor (the
# variance's threshold, the energies) is found in reduce passes over the chunks (the engine
# streams them, or `sce` makes them itself over a tensor given whole): the threshold by a radix
# select (methods/kth.py), the energies as exact sums (methods/streamed.py).
MERGE_BLOCK = 1 << 18  # entries per block of a tensor given whole (any size: the same bytes)


def flat_inputs(base: torch.Tensor, experts: list[torch.Tensor]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return base.reshape(-1), [expert.reshape(-1) for expert in experts]


def variance(tvs: list[torch.Tensor]) -> torch.Tensor:
    """σ²(τ1..τk) per entry (population variance), by the steps of torch.var on the CPU
    (Welford's, in float64, then rounded to fp32: the same bits, tested), 13x faster than
    torch.var over the stacked τi, whose strided reduction was most of SCE's time; the same on
    any device, and per entry, whatever the block."""
    mean = torch.zeros(tvs[0].shape, dtype=torch.float64, device=tvs[0].device)
    m2 = torch.zeros_like(mean)
    for count, tv in enumerate(tvs, 1):
        x = tv.double()
        delta = x - mean
        mean += delta / count
        m2 += delta * x.sub_(mean)
    return m2.div_(len(tvs)).float()


def selected(base: torch.Tensor, experts: list[torch.Tensor], threshold: float | None
             ) -> list[torch.Tensor]:
    """τ̂i: τi where the variance across the experts reaches `threshold` (all of τi when None),
    0 elsewhere."""
    tvs = task_vectors(base, experts)
    if threshold is None:
        return tvs
    keep = variance(tvs) >= threshold
    return [tv.mul_(keep) for tv in tvs]


@dataclass(frozen=True)
class Select:
    """SCE's select between passes: k = ⌊d·(entries that vary)⌋, then where the k-th largest
    variance lies (its top 16 bits, its rank among the entries that share them), then its
    value (∞ when k = 0: nothing is selected)."""

    k: int
    found: tuple[int, int] | None = None
    threshold: float | None = None


def sce_passes(params: dict) -> int:
    """The variance's two counting passes (with selection), then the energies."""
    return 3 if params["select_topk"] < 1 else 1


def sce_sums(base: torch.Tensor, experts: list[torch.Tensor], *, select_topk: float,
             stats: Select | None = None, **_) -> torch.Tensor:
    """A chunk's part of SCE's whole-tensor statistics: the variance's high histogram and its
    zeros (first pass with selection), its low histogram in the bin found (second), or each τ̂i²'s
    exponent sums (experts × EXPONENTS, last)."""
    flat_base, flat_experts = flat_inputs(base, experts)
    if select_topk < 1 and (stats is None or stats.threshold is None):
        bits = kth.magnitude_bits(variance(task_vectors(flat_base, flat_experts)))
        if stats is None:
            zeros = (bits == 0).sum().view(1)
            return torch.cat([kth.high_histogram(bits), zeros])
        if stats.found is None:
            return torch.zeros(kth.LOW_BINS, dtype=torch.int64, device=bits.device)
        return kth.low_histogram(bits, stats.found[0])
    threshold = stats.threshold if stats is not None else None
    return torch.stack([exponent_sums(tv.mul_(tv))  # τ̂i² rounded to fp32, summed exactly
                        for tv in selected(flat_base, flat_experts, threshold)])


def finish_sce(stats: Select | None, sums: torch.Tensor, *, select_topk: float, **_
               ) -> Select | tuple[float | None, list[float]]:
    """After each pass, the next `Select`; after the last, (threshold, ηi)."""
    if select_topk < 1 and stats is None:
        n, zeros = int(sums[:-1].sum()), int(sums[-1])
        # as int(torch.count_nonzero(variance) * d) counts, in fp32 (mergekit's count too)
        k = int(torch.tensor(n - zeros) * select_topk)
        return Select(k, kth.locate(sums[:-1], k)) if k else Select(0, threshold=float("inf"))
    if select_topk < 1 and stats.threshold is None:
        high, rank = stats.found
        return Select(stats.k, stats.found, kth.bits_value(high, kth.locate(sums, rank)[0]))
    threshold = stats.threshold if stats is not None else None
    return threshold, energy_weights([exact_total(s) for s in sums])


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
    # element-wise once the threshold and the energies are known; mergekit's top-k breaks ties
    # at the threshold as torch.topk does, which only the whole tensor gives
    reduce=sce_sums, finish=finish_sce, passes=sce_passes,
    whole_tensor_when=lambda params: params.get("compute_dtype") is not None,
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
)
def sce(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    ctx: TensorContext | None = None,
    stats: tuple[float | None, list[float]] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Select, calculate, erase: θ = θ0 + Σ ηi·τ̂i / Σ ηi over the τ̂i whose sign is that of
    Σ τ̂i, with τ̂i = τi on the selected entries (the top-d fraction of the entries that vary,
    by the variance across the experts: those at or above the k-th largest variance, k = ⌊d·
    (entries that vary)⌋) and ηi = Σ τ̂i² / Σj Σ τ̂j², exact sums of τ̂i² in fp32.

    `stats` (threshold, ηi) come from the engine's passes over the chunks of the tensor, or
    are found here over the tensor, block by block; then the sign election and disjoint mean,
    block by block. With `compute_dtype`, as mergekit evaluates it (`sce_rounded`)."""
    if compute_dtype is not None:
        return sce_rounded(base, experts, select_topk, compute_dtype)
    flat_base, flat_experts = flat_inputs(base, experts)
    blocks = [slice(a, a + MERGE_BLOCK) for a in range(0, flat_base.numel(), MERGE_BLOCK)]
    if stats is None:
        stats = reduce_in_parts(sce_sums, finish_sce, sce_passes({"select_topk": select_topk}),
                                [(flat_base[b], [e[b] for e in flat_experts]) for b in blocks],
                                select_topk=select_topk)
    threshold, weights = stats
    merged = torch.empty_like(flat_base)
    for b in blocks:
        tvs = selected(flat_base[b], [e[b] for e in flat_experts], threshold)
        merged[b] = disjoint_mean(tvs, elect_sign(tvs), weights).add_(flat_base[b])
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
