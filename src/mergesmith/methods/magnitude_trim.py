"""TIES and breadcrumbs: the task-arithmetic core (sparse.py) with magnitude cuts.

TIES keeps each τi's top-d magnitudes, breadcrumbs a band of them below the top-γ outliers.
How it runs: the cuts of TIES and breadcrumbs need two k-th largest |τi| of the whole tensor,
which two counting passes find exactly (`cut_sums`: histograms of |τi|'s fp32 bits, added over
chunks); with mergekit's L1 rescale (`rescale: true`), the same two passes add up each τi's L1
norms before and after its cut (exact sums, so the same whatever the chunks: all |τi| in the
first; in the second those strictly between the cut bins, the cut bins' kept entries then
summed from their histograms, `kept_sums`). The engine
streams those passes and then the merge in chunks of rows, re-reading the inputs for each.
Under compat the exact-count cuts go whole: torch's sort is not stable, so which of the entries
tied at a cut it keeps depends on the whole tensor's layout, and no count over chunks gives it
(nor the sums mergekit takes in its compute dtype, whose rounding follows torch's summation
order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergesmith.methods import kth
from mergesmith.methods.blocks import keep_magnitude_band, topk_count
from mergesmith.methods.registry import Param, register
from mergesmith.methods.sparse import (
    Sparsify, as_rows, family_params, finish_l1, in_parallel, l1_sums, merge_sparse,
    mergekit_compat, rescale_mode, row_blocks,
)
from mergesmith.methods.streamed import EXPONENTS, bits_exponent_sums, repeated_exponent_sums

TIES_PAPER = ("Yadav et al. 2023, TIES-Merging: Resolving interference when merging models, "
              "arXiv:2306.01708")
BREADCRUMBS_PAPER = ("Davari & Belilovsky 2024, Model breadcrumbs: scaling multi-task model "
                     "merging with sparse masks, arXiv:2312.06795")
GAMMA = Param("gamma", default=0.01, per_model=True, arg="gammas", minimum=0.0, maximum=1.0,
              doc="fraction of the largest |τi| dropped as outliers")


# --------------------------------------------------------------------------------------------
# sparsifiers: each returns a function of successive blocks of rows of τi


def keep_band(low: float, high: float, divisor: float = 1.0) -> Sparsify:
    """Keep the entries with low ≤ |τ| ≤ high, divided by `divisor`: all of τ when low = 0 and
    high = ∞, none when low = ∞."""
    if low == math.inf:
        return lambda tau, at: torch.zeros_like(tau)
    if low == 0 and high == math.inf:
        return lambda tau, at: tau

    def sparsify(tau: torch.Tensor, at: int) -> torch.Tensor:
        kept = keep_magnitude_band(tau, low, high)
        return kept.div_(divisor) if divisor != 1 else kept

    return sparsify


# --------------------------------------------------------------------------------------------
# magnitude cuts: each τi's band, |τ| between two of its k-th largest values, found exactly by
# a radix select (methods/kth.py) in two counting passes over the tensor, chunk by chunk; the
# merge then needs only the two values. So TIES and breadcrumbs stream through the engine as
# DARE does, after two reading passes (`passes=CUT_PASSES`), and a whole-tensor merge holds no
# full-size |τ|.

CUT_PASSES = 2
# Entries per block whose |τ| bits are counted at once: in cache, and many times the cost of
# one histogram's zeroing (HIGH_BINS).
COUNT_BLOCK_ELEMENTS = 1 << 17
# Rows per slab when a merge given a whole tensor runs both passes itself: a slab's |τ| is
# scratch of a few MB, however large the tensor.
SLAB_ELEMENTS = 1 << 21


def band_ranks(n: int, density: float, gamma: float) -> list[int]:
    """The ranks k (1 = the largest |τ|) whose values bound τ's kept band: the k = topk_count(n,
    d) largest magnitudes after the ⌊γ·n⌋ largest (fewer outliers when d + γ > 1, so that k
    stay), i.e. [skip + keep] (the band's lower end) and skip + 1 (its upper end) where skip > 0;
    no rank when all or none are kept."""
    keep = topk_count(n, density)
    if keep in (0, n):
        return []
    skip = min(int(gamma * n), n - keep)
    return [skip + keep] + ([skip + 1] if skip else [])


def band(n: int, density: float, values: list[float]) -> tuple[float, float]:
    """(low, high) of the band from the values at `band_ranks`: (0, ∞) keeps all, (∞, ∞) none."""
    if not values:
        return (0.0, math.inf) if topk_count(n, density) else (math.inf, math.inf)
    low, *high = values
    return low, high[0] if high else math.inf


@dataclass(frozen=True)
class CutSearch:
    """Between the passes: the tensor's size, and per τi where each of its `band_ranks` lies,
    (the top 16 bits of its |τ|, its rank among the entries that share them)."""

    numel: int
    found: list[list[tuple[int, int]]]


@dataclass(frozen=True)
class L1CutSearch(CutSearch):
    """`CutSearch` for a merge with the L1 rescale: also each τi's exact Σ|τi| (`totals`,
    experts × EXPONENTS), taken in the first pass."""

    totals: torch.Tensor


def cut_sums(base: torch.Tensor, experts: list[torch.Tensor], *, densities: list[float],
             stats: CutSearch | None = None, l1: bool = False, **_) -> torch.Tensor:
    """One chunk's counts for the radix select of the cuts: in the first pass (no `stats`), each
    τi's high histogram (experts × HIGH_BINS); in the second, each cut's low histogram within
    the bin the first found for it (experts × 2 × LOW_BINS, zero where τi has fewer cuts).
    With `l1`, each row also ends with EXPONENTS exact sums (`streamed.py`) for the L1 rescale:
    of all |τi| in the first pass, of the |τi| strictly between its cut bins in the second
    (the cut bins' own kept entries are summed from their low histograms: `kept_sums`).
    Counting is compute-bound: the blocks are shared out among the intra-op threads allowed
    (`in_parallel`; one while the engine streams)."""
    base_rows, expert_rows = as_rows(base), [as_rows(e) for e in experts]
    bins = kth.HIGH_BINS if stats is None else 2 * kth.LOW_BINS
    parts = []  # one per thread

    def count(blocks: list[slice]) -> None:
        counts = torch.zeros(len(experts), bins + EXPONENTS * l1, dtype=torch.int64,
                             device=base.device)
        for rows in blocks:
            theta0 = base_rows[rows].float()
            for i, expert in enumerate(expert_rows):
                if stats is not None and not stats.found[i]:
                    continue
                bits = kth.magnitude_bits(expert[rows].float() - theta0)
                if stats is None:
                    counts[i, :bins] += kth.high_histogram(bits)
                    if l1:
                        counts[i, bins:] += bits_exponent_sums(bits)
                    continue
                for j, (high, _) in enumerate(stats.found[i]):
                    lows = counts[i, j * kth.LOW_BINS:(j + 1) * kth.LOW_BINS]
                    lows += kth.low_histogram(bits, high)
                if l1:
                    counts[i, bins:] += bits_exponent_sums(between_bins(bits, stats.found[i]))
        parts.append(counts)

    in_parallel(count, row_blocks(base_rows, COUNT_BLOCK_ELEMENTS))
    counts = sum(parts)
    if stats is None or l1:
        return counts
    return counts.view(len(experts), 2, kth.LOW_BINS)


def between_bins(bits: torch.Tensor, found: list[tuple[int, int]]) -> torch.Tensor:
    """`bits` with 0 in place of those whose high bin is not strictly between the band's cut
    bins (above the lower cut's; below the upper cut's, where the band has one)."""
    high = bits >> 16
    inside = high > found[0][0]
    if len(found) > 1:
        inside &= high < found[1][0]
    return torch.where(inside, bits, 0)


def kept_sums(found: list[tuple[int, int]], lows: torch.Tensor, between: torch.Tensor
              ) -> torch.Tensor:
    """The exact sums (EXPONENTS) of the |τ| a band keeps, from its cut bins' low histograms
    (`lows`, 2 × LOW_BINS) and the sums of the entries strictly between them: every entry of
    one low bin has the same value, so a cut bin's kept entries sum to Σ count × value."""
    low_bits = torch.arange(kth.LOW_BINS, dtype=torch.int64, device=lows.device)
    cuts = [kth.locate(lows[j], rank)[0] for j, (_, rank) in enumerate(found)]
    (low_high, low_cut), upper = (found[0][0], cuts[0]), found[1:]
    keep = low_bits >= low_cut
    if upper and upper[0][0] == low_high:  # both cuts in one bin: its entries between them
        keep &= low_bits <= cuts[1]
    elif upper:
        upper_keep = low_bits <= cuts[1]
        between = between + repeated_exponent_sums((upper[0][0] << 16) | low_bits,
                                                   lows[1] * upper_keep)
    return between + repeated_exponent_sums((low_high << 16) | low_bits, lows[0] * keep)


def finish_cuts(stats: CutSearch | None, sums: torch.Tensor, *, densities: list[float],
                gammas: list[float] | None = None, **_) -> CutSearch | list[tuple[float, float]]:
    """After the first pass, where each rank lies (`CutSearch`); after the second, each τi's
    band (low, high)."""
    gammas = gammas or [0.0] * len(densities)
    if stats is None:
        n = int(sums[0].sum())
        return CutSearch(n, [[kth.locate(sums[i], k) for k in band_ranks(n, d, g)]
                             for i, (d, g) in enumerate(zip(densities, gammas))])
    return [band(stats.numel, d, [kth.bits_value(h, kth.locate(sums[i, j], rank)[0])
                                  for j, (h, rank) in enumerate(found)])
            for i, (d, found) in enumerate(zip(densities, stats.found))]


def cut_passes(params: dict) -> int:
    """Counting passes the cuts need: none when every τi is kept whole or dropped whole."""
    return CUT_PASSES if any(0 < d < 1 for d in params["densities"]) else 0


def magnitude_cuts(base: torch.Tensor, experts: list[torch.Tensor], densities: list[float],
                   gammas: list[float] | None = None, *, unbiased: bool,
                   stats: list[tuple[float, float]] | None = None) -> list[Sparsify]:
    """TIES' trim (γ = 0) and breadcrumbs' band of each τi (`band_ranks`), ÷ d when `unbiased`:
    from the bands the engine found over the whole tensor (`stats`), or else found here over
    `base` and `experts` (the whole tensor), slab by slab."""
    if stats is None:
        params = dict(densities=densities, gammas=gammas)
        base_rows, expert_rows = as_rows(base), [as_rows(e) for e in experts]
        slabs = row_blocks(base_rows, SLAB_ELEMENTS)
        search = None
        for _ in range(cut_passes(params)):
            sums = sum(cut_sums(base_rows[s], [e[s] for e in expert_rows], densities=densities,
                                stats=search) for s in slabs)
            search = finish_cuts(search, sums, **params)
        stats = search or [band(base.numel(), d, []) for d in densities]
    return [keep_band(low, high, density if unbiased else 1.0)
            for (low, high), density in zip(stats, densities)]


def exact_count_cuts(base: torch.Tensor, experts: list[torch.Tensor], densities: list[float],
                     gammas: list[float] | None, dtype: torch.dtype,
                     unbiased: bool = False) -> list[Sparsify]:
    """mergekit's magnitude cuts (`compat: mergekit`): TIES keeps exactly k = max(1, ⌊d·n⌋)
    entries, breadcrumbs exactly ⌊d·n⌋ (none of a small tensor with d·n < 1) below the
    ⌊γ·n⌋ largest (fewer outliers when d + γ > 1), chosen by the sort mergekit calls (torch's
    argsort of |τi| in `dtype`, then as fp32), so that entries tied at a cut are kept or dropped
    as its sort orders them. Each mask is a whole-tensor 0/1 tensor in `dtype`; ÷ d when
    `unbiased`."""
    n = base.numel()
    theta0 = base.reshape(-1).to(dtype)
    cols = as_rows(base).shape[1]
    cuts = []
    for i, density in enumerate(densities):
        if density >= 1:
            cuts.append(lambda tau, at: tau)
            continue
        magnitude = (experts[i].reshape(-1).to(dtype) - theta0).abs()
        if magnitude.device.type == "cpu":
            magnitude = magnitude.float()
        mask = torch.zeros(n, dtype=dtype, device=base.device)
        if gammas is None:
            if density > 0:
                keep = max(1, int(density * n))
                mask[torch.argsort(magnitude, descending=True)[:keep]] = 1
        else:
            keep, outliers = int(density * n), int(gammas[i] * n)
            below = max(0, n - keep - outliers)
            mask[torch.sort(magnitude, descending=False).indices[below:below + keep]] = 1
        rows, divisor = mask.view(-1, cols), density if unbiased else 1.0
        cuts.append(lambda tau, at, rows=rows, divisor=divisor:
                    tau.mul_(rows[at // cols:at // cols + len(tau)]).div_(divisor))
    return cuts


def l1_cut_rescale(params: dict) -> bool:
    """TIES' and breadcrumbs' rescale: true means mergekit's l1, sums over the kept entries of
    the whole tensor (a pass after the cuts')."""
    return rescale_mode(params["rescale"], "l1") == "l1"


@dataclass(frozen=True)
class RescaledBands:
    """The statistics of a merge with the L1 rescale: each τi's band, and its scale."""

    bands: list[tuple[float, float]]
    scales: list[float]


def band_passes(params: dict) -> int:
    """The cuts' counting passes, which also take the L1 norms when the rescale is l1; one pass
    for the norms alone where there is no cut."""
    return cut_passes(params) or int(l1_cut_rescale(params))


def whole_bands(densities: list[float]) -> list[tuple[float, float]] | None:
    """The bands when every τi is kept whole or dropped whole (no cut to find), else None."""
    if cut_passes(dict(densities=densities)):
        return None
    return [band(1, d, []) for d in densities]


def band_sums(base: torch.Tensor, experts: list[torch.Tensor], *, densities: list[float],
              stats=None, **params) -> torch.Tensor:
    """A chunk's sums for the pass at hand: the cuts' counts (`cut_sums`, with the L1 norms'
    sums when the rescale is l1), or where there is no cut, the L1 norms (`l1_sums`)."""
    bands = whole_bands(densities)
    if bands is None:
        return cut_sums(base, experts, densities=densities, stats=stats,
                        l1=l1_cut_rescale(params))
    return l1_sums(as_rows(base), [as_rows(e) for e in experts],
                   [keep_band(low, high) for low, high in bands])


def finish_bands(stats, sums: torch.Tensor, *, densities: list[float], **params):
    """After each pass: the cuts' search, then the bands; with the l1 rescale, the bands with
    their scales (`RescaledBands`), from the exact sums of all |τi| (first pass) and of the
    kept |τi| (the entries between the cut bins in the second, and the cut bins' own)."""
    bands = whole_bands(densities)
    if bands is not None:  # the one pass of the L1 norms
        return RescaledBands(bands, finish_l1(sums))
    if not l1_cut_rescale(params):
        return finish_cuts(stats, sums, densities=densities, **params)
    histograms, exact = sums[:, :-EXPONENTS], sums[:, -EXPONENTS:]
    if stats is None:
        search = finish_cuts(None, histograms, densities=densities, **params)
        return L1CutSearch(search.numel, search.found, exact)
    lows = histograms.reshape(len(densities), 2, kth.LOW_BINS)
    bands = finish_cuts(stats, lows, densities=densities, **params)
    kept = [kept_sums(found, lows[i], exact[i]) if found
            else stats.totals[i] * (bands[i][0] == 0)  # kept whole, or dropped whole
            for i, found in enumerate(stats.found)]
    return RescaledBands(bands, finish_l1(torch.stack([stats.totals, torch.stack(kept)], 1)))


def band_stats(stats) -> tuple[list[tuple[float, float]] | None, list[float] | None]:
    """(bands, L1 scales) from the engine's statistics (None: find them here)."""
    if isinstance(stats, RescaledBands):
        return stats.bands, stats.scales
    return stats, None


# TIES' and breadcrumbs' entries are independent given their bands (and L1 scales), found by
# two counting passes; mergekit's exact counts (compat) keep the ties at a cut
# that its sort happens to put first (torch's sort is not stable: no count gives them), so
# they go whole
CUT_STREAMING = dict(reduce=band_sums, finish=finish_bands, passes=band_passes,
                     whole_tensor_when=lambda params: params.get("selection") == "exact")


@register("ties", compat=mergekit_compat(consensus=True, selection=True),
          summary="Trim each task vector to its top-d magnitudes, elect a sign per "
          "entry, average the agreeing entries.", paper=TIES_PAPER, needs_base=True,
          stored_dtype_inputs=True, params=family_params(normalize=True, rescale=False),
          **CUT_STREAMING)
def ties(base, experts, *, weights, densities, lambda_=1.0, normalize=True, rescale=False,
         int8_mask=False, ctx=None, stats=None, sign_ties="zero", selection="threshold",
         compute_dtype=None):
    """θ = θ0 + λ · disjoint_mean(trim(τi), s), s = sign(Σ wi trim(τi))."""
    mode = rescale_mode(rescale, true_means="l1")
    bands, scales = band_stats(stats)
    if selection == "exact":
        trims = exact_count_cuts(base, experts, densities, None, compute_dtype or torch.float32,
                                 unbiased=mode == "1/density")
    else:
        trims = magnitude_cuts(base, experts, densities, unbiased=mode == "1/density",
                               stats=bands)
    return merge_sparse(base, experts, trims, weights=weights, consensus=True,
                        normalize=normalize, lambda_=lambda_, l1=mode == "l1",
                        sign_ties=sign_ties, compute_dtype=compute_dtype, scales=scales)


def breadcrumbs_merge(base, experts, *, weights, densities, gammas, lambda_, normalize, rescale,
                      consensus, stats=None, sign_ties="zero", selection="threshold",
                      compute_dtype=None):
    mode = rescale_mode(rescale, true_means="l1")
    found, scales = band_stats(stats)
    if selection == "exact":
        bands = exact_count_cuts(base, experts, densities, gammas,
                                 compute_dtype or torch.float32, unbiased=mode == "1/density")
    else:
        bands = magnitude_cuts(base, experts, densities, gammas, unbiased=mode == "1/density",
                               stats=found)
    return merge_sparse(base, experts, bands, weights=weights, consensus=consensus,
                        normalize=normalize, lambda_=lambda_, l1=mode == "l1",
                        sign_ties=sign_ties, compute_dtype=compute_dtype, scales=scales)


@register("breadcrumbs", compat=mergekit_compat(consensus=False, selection=True),
          summary="Drop each task vector's top-γ outliers and its smallest "
          "entries, keeping a d fraction; add the weighted sum.", paper=BREADCRUMBS_PAPER,
          needs_base=True, stored_dtype_inputs=True,
          params=family_params(normalize=False, rescale=False, extra=(GAMMA,)), **CUT_STREAMING)
def breadcrumbs(base, experts, *, weights, densities, gammas=None, lambda_=1.0, normalize=False,
                rescale=False, int8_mask=False, ctx=None, stats=None, selection="threshold",
                compute_dtype=None):
    """θ = θ0 + λ · Σ wi band(τi)."""
    return breadcrumbs_merge(base, experts, weights=weights, densities=densities,
                             gammas=gammas or [0.01] * len(experts), lambda_=lambda_,
                             normalize=normalize, rescale=rescale, consensus=False, stats=stats,
                             selection=selection, compute_dtype=compute_dtype)


@register("breadcrumbs_ties", compat=mergekit_compat(consensus=True, selection=True),
          summary="Breadcrumbs' outlier-and-small-entry masks, then TIES' "
          "sign election and disjoint merge.", paper=BREADCRUMBS_PAPER, needs_base=True,
          stored_dtype_inputs=True, params=family_params(normalize=False, rescale=False, extra=(GAMMA,)),
          **CUT_STREAMING)
def breadcrumbs_ties(base, experts, *, weights, densities, gammas=None, lambda_=1.0,
                     normalize=False, rescale=False, int8_mask=False, ctx=None, stats=None,
                     sign_ties="zero", selection="threshold", compute_dtype=None):
    """θ = θ0 + λ · disjoint_mean(band(τi), s)."""
    return breadcrumbs_merge(base, experts, weights=weights, densities=densities,
                             gammas=gammas or [0.01] * len(experts), lambda_=lambda_,
                             normalize=normalize, rescale=rescale, consensus=True, stats=stats,
                             sign_ties=sign_ties, selection=selection,
                             compute_dtype=compute_dtype)
