"""The generalized task-arithmetic family: TIES, DARE, breadcrumbs and DELLA, one core.

    τi = θi − θ0,    θ = θ0 + λ · combine(sparsify(τ1), …, sparsify(τn))

`sparsify` keeps part of each task vector: its top-d magnitudes (TIES), a band below the top-γ
outliers (breadcrumbs), a random d fraction (DARE), or a random fraction whose keep probability
rises with magnitude rank (DELLA). `combine` is the weighted sum Σ wi τi (÷ Σ wi with
`normalize`), or TIES' sign election and disjoint mean for ties, dare_ties, breadcrumbs_ties and
della. Method names, parameter names, defaults and scopes are mergekit 0.1.5's, and so are the
tensors where nothing is random: bitwise with sign election, within weighted_sum's fused
multiply-add (≤ 2 ulps at the terms' scale, as task_arithmetic) without. Where we differ from
mergekit, on purpose:

- `rescale` (undo the shrinkage of sparsification) takes "1/density" (divide each kept entry by
  its keep probability: DARE's 1/d and DELLA's 1/p(rank), the papers' unbiased rescale; 1/d for
  TIES and breadcrumbs), "l1" (mergekit's: restore each τi's L1 norm) or false / "none". `true`,
  what mergekit recipes say, means "1/density" for DARE and DELLA (the papers') and "l1" for TIES
  and breadcrumbs (mergekit's; their papers define none). Defaults are mergekit's: on for DARE
  and DELLA, off for TIES and breadcrumbs.
- Entries tied with a magnitude cut are all kept (mergekit's argsort keeps an arbitrary subset);
  thresholds come from an exact radix select (methods/kth.py), never a sort.
- An entry whose weighted votes sum to exactly 0 elects no sign and keeps the base value
  (mergekit elects +, so merge(−τ) ≠ −merge(τ)).
- breadcrumbs keeps at least one entry, like TIES' trim (mergekit keeps ⌊d·n⌋, none at all of
  a small tensor when d·n < 1); ⌊γ·n⌋ = 0 outliers drops none.
- DELLA ranks ties by column (mergekit's argsort: arbitrarily), gives a row of one entry the
  keep probability d (mergekit: NaN), ranks the rows of a >2-D tensor over all its trailing
  dimensions (mergekit: along dim 1 only), and accepts d ± ε at 0 or 1 (mergekit: only inside).
- `int8_mask` is accepted and does nothing: no mask tensor is ever materialized.

Under `compat: mergekit` (`mergekit_compat`) each method computes what mergekit 0.1.5 does
instead, bit for bit: every step in mergekit's compute dtype (the recipe's `dtype`, else the
inputs'), rounded as it rounds (`combine_rounded`, `l1_scales`); `rescale: true` as its L1
rescale for DARE and DELLA too; + on exact sign ties; its exact-count cuts by sort, ties at a cut
as torch's sort orders them, ⌊d·n⌋ and ⌊γ·n⌋ as it counts them (`exact_count_cuts`). What it
cannot give is mergekit's random masks (DARE and DELLA below density 1): mergekit draws them with
torch.bernoulli from torch's global generator, one stream shared by all tensors in the order its
task graph happens to run them (and unseeded unless --random-seed), so the draws of a tensor
depend on every tensor merged before it; here each tensor's come from its own stream. DELLA's
differences in ranking (ties, one-entry rows, >2-D tensors, d ± ε at 0 or 1) only change which
entries those draws keep, so they stay as above under compat.

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
order). A merge is done in small blocks of rows, so that every temporary is block-sized and
stays in cache.
Inputs may come in their stored 16-bit dtype (`stored_dtype_inputs`): each block is cast to
fp32 as it is read, which gives the same values as casting the whole tensor first, and the
engine keeps no fp32 copy of the inputs (half the memory of a whole-tensor merge).
Random draws come from one counter-based stream per expert (`ctx.stream(i)`): entry j of
expert i's task vector gets the j-th draw of the stream of (seed, tensor name, i), whatever the
blocks or chunks the tensor is merged in. So DARE, whose entries are independent, streams
through the engine in chunks like task arithmetic, and DELLA, which ranks within rows, in
chunks of whole rows. With `rescale: l1` a first pass over the chunks draws the same masks and
adds up each τi's L1 norms before and after exactly (`l1_sums`); under compat, where mergekit
sums the whole τi in its compute dtype, such a merge goes whole.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mergesmith.methods.blocks import (
    break_ties,
    disjoint_mean,
    drop_random,
    elect_sign,
    keep_magnitude_band,
    topk_count,
    weighted_sum,
)
from mergesmith.methods import kth
from mergesmith.methods.registry import Param, RandomStream, TensorContext, register
from mergesmith.methods.streamed import (
    EXPONENTS, bits_exponent_sums, exact_total, exponent_sums, repeated_exponent_sums,
)

# (rows of τi, the row-major index of their first entry) -> their kept part
Sparsify = Callable[[torch.Tensor, int], torch.Tensor]

# Entries per block of rows on the CPU: at most torch's grain size (32768), so that each of a
# block's ~35 operations runs on the calling thread. Larger blocks split every operation over
# the intra-op threads, and on 2 busy cores each split waits milliseconds for a core: 5-8x
# slower (measured); single-threaded and in cache, a block is as fast as a 4x larger one.
BLOCK_ELEMENTS = 1 << 15
# DELLA's blocks: its per-row sort makes a block compute-bound, and it runs on several threads
# (`in_parallel`, each op single-threaded), where each operation hands the GIL over: fewer,
# larger blocks pay. Per 8 MiB of rows with 3 experts on 2 cores: 180 ms at 2^15, 94 at 2^17.
RANKED_BLOCK_ELEMENTS = 1 << 17
L1_EPS = 1e-7  # mergekit's: no L1 rescale of a τi whose norm before or after is below this
RESCALE_CHOICES = (True, False, "1/density", "l1", "none")


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


def random_drop(density: float, stream: RandomStream, unbiased: bool) -> Sparsify:
    """DARE: keep each entry with probability d (Bernoulli), then ÷ d when `unbiased`."""
    return lambda tau, at: drop_random(tau, density, stream, rescale=unbiased, at=at)


def della_keep_probability(n: int, density: float, epsilon: float) -> np.ndarray:
    """p(r) = d − ε + 2ε·(r − 1)/(n − 1) for the r-th smallest |τ| of a row of n (d when n = 1),
    in fp32."""
    spread = np.arange(n, dtype=np.float64) / (n - 1) if n > 1 else np.full(1, 0.5)
    return (density - epsilon + 2 * epsilon * spread).astype(np.float32)


def magnitude_order(rows: torch.Tensor) -> torch.Tensor:
    """Per row, its columns by |x| ascending, ties by column (a stable argsort), as a sort of
    64-bit keys (|x|'s bit pattern, which orders like its value, above the column): a
    values-only sort, on the CPU numpy's vectorized one, 4x faster than torch's argsort."""
    cols = rows.shape[1]
    if rows.device.type == "cpu":
        # x's 32 bits shifted up by 33 leave the sign bit out of the 64: |x| above the column
        keys = np.left_shift(rows.float().contiguous().numpy().view(np.uint32), np.uint64(33),
                             dtype=np.uint64)
        keys |= np.arange(cols, dtype=np.uint64)
        keys.sort(axis=1)
        keys &= np.uint64((1 << 33) - 1)
        return torch.from_numpy(keys.view(np.int64))
    shift = max(1, (cols - 1).bit_length())  # torch has no uint64 arithmetic: |x| then column
    keys = rows.abs().float().view(torch.int32).to(torch.int64) << shift
    keys |= torch.arange(cols, device=rows.device)
    return keys.sort(dim=1).values & ((1 << shift) - 1)


def rank_drop(cols: int, density: float, epsilon: float, stream: RandomStream,
              unbiased: bool) -> Sparsify:
    """DELLA's MagPrune: in each row keep the r-th smallest |τ| with probability p(r), then
    ÷ p(r) when `unbiased`. The draws go down the row in rank order (iid, so the same law)."""
    if density >= 1:
        return lambda tau, at: tau
    if density <= 0:
        return lambda tau, at: torch.zeros_like(tau)
    keep_probability = della_keep_probability(cols, density, epsilon)
    if unbiased:  # ×(1/p), as fp32; 0 where p ≤ 0, where nothing is kept (not 0·∞ = NaN)
        positive = keep_probability > 0
        scale = np.divide(np.float32(1), keep_probability, where=positive,
                          out=np.zeros_like(keep_probability))
    else:
        scale = np.float32(1)

    def sparsify(tau: torch.Tensor, at: int) -> torch.Tensor:
        kept = stream.keep_at(at, tau.shape, keep_probability, scale).to(tau.dtype)  # by rank
        return tau.mul_(torch.empty_like(tau).scatter_(1, magnitude_order(tau), kept))

    return sparsify


# --------------------------------------------------------------------------------------------
# the core


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as a matrix: its first dimension by the rest (a vector or scalar is one row)."""
    return x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)


def row_blocks(rows: torch.Tensor, elements: int | None = None) -> list[slice]:
    """Blocks of at most `elements` (BLOCK_ELEMENTS) entries, or one row, on the CPU; one block
    on other devices, which want the whole tensor in one launch."""
    count, cols = rows.shape
    elements = elements or BLOCK_ELEMENTS
    step = count if rows.device.type != "cpu" else max(1, elements // max(cols, 1))
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def combine(taus: list[torch.Tensor], weights: list[float], consensus: bool,
            normalize: bool, sign_ties: str = "zero",
            rounding: torch.dtype | None = None) -> torch.Tensor:
    """TIES' disjoint mean over the elected signs, or Σ wi τi (÷ Σ wi unless it is ~0).
    With `rounding`, evaluated as mergekit does in that dtype (`combine_rounded`)."""
    if rounding is not None:
        return combine_rounded(taus, weights, consensus, normalize, sign_ties, rounding)
    if consensus:
        return disjoint_mean(taus, elect_sign(taus, weights, ties=sign_ties), weights, normalize)
    merged = weighted_sum(taus, weights)
    total = sum(weights)
    return merged.div_(total) if normalize and abs(total) >= 1e-8 else merged


def combine_rounded(taus: list[torch.Tensor], weights: list[float], consensus: bool,
                    normalize: bool, sign_ties: str, dtype: torch.dtype) -> torch.Tensor:
    """`combine` with mergekit 0.1.5's roundings (`compat: mergekit`), in `dtype`, its compute
    dtype: wi rounded to it, each wi·τi rounded, every sum over the experts a torch sum over
    the stacked terms (fp32 accumulation, one rounding), the sign vote on that rounded sum, the
    quotient by the rounded sum of the agreeing weights (1 where that is 0). These are
    mergekit's own operations, block by block: each entry depends on its own terms only, so the
    bits are those of its whole-tensor evaluation."""
    terms = torch.stack(taus)
    w = torch.tensor(weights, dtype=dtype, device=terms.device).view(-1, *[1] * taus[0].dim())
    terms.mul_(w)
    if consensus:
        sign = break_ties(terms.sum(dim=0).sign_(), sign_ties)
        agree = terms.sign() == sign
        merged = (terms * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = terms.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    return merged.div_(divisor) if normalize else merged


def l1_scales(base: torch.Tensor, experts: list[torch.Tensor], sparsifiers: list[Sparsify],
              compute_dtype: torch.dtype | None = None) -> list[float | torch.Tensor]:
    """mergekit's rescale: ||τi||₁ / ||sparsify(τi)||₁ (1 where either is below 1e-7), in a
    first pass over the blocks (drawing the same masks as the merge). With `compute_dtype`
    (`compat: mergekit`), as mergekit takes it: torch sums of the whole τi in that dtype, and
    their quotient there."""
    if compute_dtype is not None:
        theta0 = base.to(compute_dtype)
        scales: list[float | torch.Tensor] = []
        for expert, sparsify in zip(experts, sparsifiers):
            tau = expert.to(compute_dtype) - theta0
            before = tau.abs().sum()
            after = sparsify(tau, 0).abs().sum()
            small = bool(before < L1_EPS) or bool(after < L1_EPS)
            scales.append(1.0 if small else before / after)
        return scales
    return finish_l1(l1_sums(base, experts, sparsifiers))


def l1_sums(base: torch.Tensor, experts: list[torch.Tensor], sparsifiers: list[Sparsify]
            ) -> torch.Tensor:
    """Per τi, the exact sums of |τi| and of |sparsify(τi)| over these rows (methods/streamed.py:
    experts × 2 × EXPONENTS), block by block: added over any chunks, the sums of the whole."""
    sums = torch.zeros(len(experts), 2, EXPONENTS, dtype=torch.int64, device=base.device)
    cols = base.shape[1]
    for rows in row_blocks(base):
        for i, (expert, sparsify) in enumerate(zip(experts, sparsifiers)):
            tau = expert[rows].float() - base[rows].float()
            sums[i, 0] += exponent_sums(tau)  # of |τ|
            sums[i, 1] += exponent_sums(sparsify(tau, rows.start * cols))
    return sums


def finish_l1(sums: torch.Tensor) -> list[float]:
    """mergekit's rescale from `l1_sums`: ||τi||₁ / ||sparsify(τi)||₁, each norm exactly rounded
    (the same whatever the chunks), 1 where either is below 1e-7."""
    norms = [(exact_total(before), exact_total(after)) for before, after in sums]
    return [b / a if b >= L1_EPS and a >= L1_EPS else 1.0 for b, a in norms]


def merge_sparse(base: torch.Tensor, experts: list[torch.Tensor], sparsifiers: list[Sparsify], *,
                 weights: list[float], consensus: bool, normalize: bool, lambda_: float,
                 l1: bool = False, threads: bool = False,
                 block_elements: int | None = None, sign_ties: str = "zero",
                 compute_dtype: torch.dtype | None = None,
                 scales: list[float] | None = None) -> torch.Tensor:
    """θ0 + λ · combine(sparsify(τi)), block of rows by block of rows; with `threads`, the
    blocks shared out among threads (each block's result depends on that block alone), which
    pays where sparsifying is compute-bound (DELLA's per-row sort) and not where it is
    memory-bound (TIES, breadcrumbs: no faster, measured). With `compute_dtype`
    (`compat: mergekit`), every step is computed and rounded in that dtype as mergekit does,
    and the result is in it. `scales`: the L1 rescale's, found over the whole tensor, when
    these are only some of its rows."""
    base_rows, expert_rows = as_rows(base), [as_rows(e) for e in experts]
    if scales is None:
        scales = (l1_scales(base_rows, expert_rows, sparsifiers, compute_dtype) if l1
                  else [1.0] * len(experts))
    dtype = compute_dtype or torch.float32
    out = torch.empty(base_rows.shape, dtype=dtype, device=base.device)
    cols = base_rows.shape[1]

    def merge_blocks(blocks: list[slice]) -> None:
        for rows in blocks:
            theta0 = base_rows[rows].to(dtype)
            taus = [sparsify(expert[rows].to(dtype) - theta0, rows.start * cols)
                    for expert, sparsify in zip(expert_rows, sparsifiers)]
            taus = [tau if isinstance(scale, float) and scale == 1 else tau.mul_(scale)
                    for tau, scale in zip(taus, scales)]
            merged = combine(taus, weights, consensus, normalize, sign_ties, compute_dtype)
            if lambda_ != 1:
                merged.mul_(lambda_)
            torch.add(theta0, merged, out=out[rows])

    blocks = row_blocks(base_rows, block_elements)
    in_parallel(merge_blocks, blocks) if threads else merge_blocks(blocks)
    return out.view(base.shape)


# Blocks per thread below which one thread does all: handing a block to a thread costs less
# than a tenth of a block's work, but a thread with one block may wait for the other's.
MIN_BLOCKS_PER_THREAD = 2
_pool: tuple[ThreadPoolExecutor, int] | None = None  # with its number of threads
_pool_lock = threading.Lock()


def in_parallel(work: Callable[[list[slice]], None], blocks: list[slice]) -> None:
    """work(blocks) with the blocks split into contiguous runs, one per intra-op thread allowed
    (the engine allows one when it streams small tiles itself), on threads kept for the
    process. Each operation runs single-threaded meanwhile, on its block in cache; torch and
    numpy release the GIL in them."""
    global _pool
    threads = min(torch.get_num_threads(), len(blocks) // MIN_BLOCKS_PER_THREAD)
    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads <= 1:
            work(blocks)
            return
        with _pool_lock:
            if _pool is None or _pool[1] < threads:
                size = max(threads, os.cpu_count() or 1)
                _pool = ThreadPoolExecutor(size, thread_name_prefix="mergesmith-blocks"), size
            pool = _pool[0]
        step = -(-len(blocks) // threads)
        futures = [pool.submit(work, blocks[i:i + step]) for i in range(0, len(blocks), step)]
        wait(futures)  # all done before an error surfaces: none still writes into the result
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(intra_op)


def expert_streams(ctx: TensorContext | None, device: torch.device,
                   count: int) -> list[RandomStream]:
    """One random stream per expert, from (seed, tensor name, expert) and the chunk's offset."""
    if ctx is None:
        raise ValueError("a random method needs ctx, the tensor's context with its seed")
    return [ctx.stream(i, device) for i in range(count)]


def rescale_mode(rescale: bool | str, true_means: str) -> str:
    """"1/density", "l1" or "none" from a recipe's rescale (true: the method's own)."""
    if rescale is True:
        return true_means
    if rescale is False or rescale == "none":
        return "none"
    if rescale in ("1/density", "l1"):
        return rescale
    raise ValueError(f"rescale must be true, false, '1/density', 'l1' or 'none', got {rescale!r}")


def check_della(params: dict) -> None:
    """Each model's keep probabilities d ± ε must be probabilities (when 0 < d < 1)."""
    for density, epsilon in zip(params["densities"], params["epsilons"]):
        if 0 < density < 1 and not (epsilon <= density and density + epsilon <= 1):
            raise ValueError(f"density ± epsilon must lie in [0, 1], got density {density} "
                             f"and epsilon {epsilon}")


# --------------------------------------------------------------------------------------------
# the methods, registered under mergekit's names

TIES_PAPER = ("Yadav et al. 2023, TIES-Merging: Resolving interference when merging models, "
              "arXiv:2306.01708")
DARE_PAPER = ("Yu et al. 2024, Language models are Super Mario: absorbing abilities from "
              "homologous models as a free lunch, arXiv:2311.03099")
BREADCRUMBS_PAPER = ("Davari & Belilovsky 2024, Model breadcrumbs: scaling multi-task model "
                     "merging with sparse masks, arXiv:2312.06795")
DELLA_PAPER = ("Deep et al. 2024, DELLA-Merging: reducing interference in model merging "
               "through magnitude-based sampling, arXiv:2406.11617")

GAMMA = Param("gamma", default=0.01, per_model=True, arg="gammas", minimum=0.0, maximum=1.0,
              doc="fraction of the largest |τi| dropped as outliers")
EPSILON = Param("epsilon", default=0.15, per_model=True, arg="epsilons", minimum=0.0,
                maximum=1.0, doc="keep probabilities run from density − ε to density + ε by rank")


def mergekit_compat(*, consensus: bool, selection: bool = False):
    """The options that make a method of the family compute what mergekit 0.1.5 does (`compat:
    mergekit`): every step in its compute dtype, rounded as it rounds (`combine_rounded`);
    `rescale: true` as its L1 rescale, for DARE and DELLA too (it has no 1/density); + on
    exact sign ties; its exact-count selections by sort (TIES, breadcrumbs)."""

    def options(params: dict, compute_dtype: torch.dtype) -> dict:
        out = dict(params, compute_dtype=compute_dtype)
        if params["rescale"] is True:
            out["rescale"] = "l1"
        if consensus:
            out["sign_ties"] = "plus"
        if selection:
            out["selection"] = "exact"
        return out

    return options


def family_params(*, normalize: bool, rescale: bool, extra: tuple[Param, ...] = ()) -> tuple:
    return (
        Param("weight", per_model=True, arg="weights", doc="the model's coefficient wi"),
        Param("density", default=1.0, per_model=True, arg="densities", minimum=0.0, maximum=1.0,
              doc="fraction of τi's entries kept"),
        *extra,
        Param("lambda", default=1.0, arg="lambda_", doc="scale of the merged task vector"),
        Param("normalize", bool, default=normalize,
              doc="divide by the sum of the (agreeing) weights"),
        Param("rescale", object, default=rescale, choices=RESCALE_CHOICES,
              doc="'1/density', 'l1' or 'none'; true = the method's own (see the module)"),
        Param("int8_mask", bool, default=False, doc="accepted for mergekit recipes; no effect"),
    )


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


def l1_rescale(params: dict) -> bool:
    """mergekit's l1 rescale needs sums over the whole tensor before anything is kept."""
    return rescale_mode(params["rescale"], "1/density") == "l1"


def streamed_l1(params: dict) -> bool:
    """The l1 rescale's norms as exact sums, in a pass over the chunks before the merge; not
    under compat, where they are torch sums of the whole τi in the compute dtype."""
    return l1_rescale(params) and params.get("compute_dtype") is None


def dare_drops(ctx: TensorContext | None, device: torch.device, densities: list[float],
               unbiased: bool) -> list[Sparsify]:
    streams = expert_streams(ctx, device, len(densities))
    return [random_drop(d, g, unbiased) for d, g in zip(densities, streams)]


def della_drops(ctx: TensorContext | None, base: torch.Tensor, densities: list[float],
                epsilons: list[float], unbiased: bool) -> list[Sparsify]:
    check_della({"densities": densities, "epsilons": epsilons})
    streams = expert_streams(ctx, base.device, len(densities))
    cols = as_rows(base).shape[1]
    return [rank_drop(cols, d, eps, g, unbiased)
            for d, eps, g in zip(densities, epsilons, streams)]


def dare_l1_sums(base: torch.Tensor, experts: list[torch.Tensor], *, densities: list[float],
                 ctx: TensorContext, **_) -> torch.Tensor:
    """A chunk's exact L1 sums before and after DARE's drops, drawn at the chunk's offset
    (`ctx`) as the merge pass draws them."""
    drops = dare_drops(ctx, base.device, densities, unbiased=False)
    return l1_sums(as_rows(base), [as_rows(e) for e in experts], drops)


def della_l1_sums(base: torch.Tensor, experts: list[torch.Tensor], *, densities: list[float],
                  ctx: TensorContext, epsilons: list[float] | None = None, **_) -> torch.Tensor:
    """`dare_l1_sums` for DELLA's drops."""
    drops = della_drops(ctx, base, densities, epsilons or [EPSILON.default] * len(experts),
                        unbiased=False)
    return l1_sums(as_rows(base), [as_rows(e) for e in experts], drops)


# DARE's entries are independent given their draws, so it streams in chunks and tiles; DELLA's
# rows are, given theirs, so it streams in chunks of rows. With the l1 rescale, a pass of
# exact sums over the chunks first gives each τi's scale (`stats`).
L1_PASS = dict(finish=lambda stats, sums, **_: finish_l1(sums),
               passes=lambda params: int(streamed_l1(params)),
               whole_tensor_when=lambda params: l1_rescale(params) and not streamed_l1(params))
DARE_STREAMING = dict(elementwise=True, reduce=dare_l1_sums, **L1_PASS)
DELLA_STREAMING = dict(row_local=True, reduce=della_l1_sums, **L1_PASS)


def dare_merge(base, experts, *, weights, densities, lambda_, normalize, rescale, ctx, consensus,
               sign_ties="zero", compute_dtype=None, stats=None):
    mode = rescale_mode(rescale, true_means="1/density")
    drops = dare_drops(ctx, base.device, densities, mode == "1/density")
    return merge_sparse(base, experts, drops, weights=weights, consensus=consensus,
                        normalize=normalize, lambda_=lambda_, l1=mode == "l1",
                        sign_ties=sign_ties, compute_dtype=compute_dtype, scales=stats)


@register("dare_ties", compat=mergekit_compat(consensus=True),
          summary="Drop each task-vector entry with probability 1 − d, rescale the "
          "kept ones by 1/d, then TIES' sign election and disjoint merge.", paper=DARE_PAPER,
          needs_base=True, stored_dtype_inputs=True, **DARE_STREAMING,
          params=family_params(normalize=False, rescale=True))
def dare_ties(base, experts, *, weights, densities, lambda_=1.0, normalize=False, rescale=True,
              int8_mask=False, ctx=None, sign_ties="zero", compute_dtype=None, stats=None):
    """θ = θ0 + λ · disjoint_mean(drop(τi)/d, s)."""
    return dare_merge(base, experts, weights=weights, densities=densities, lambda_=lambda_,
                      normalize=normalize, rescale=rescale, ctx=ctx, consensus=True,
                      sign_ties=sign_ties, compute_dtype=compute_dtype, stats=stats)


@register("dare_linear", compat=mergekit_compat(consensus=False),
          summary="Drop each task-vector entry with probability 1 − d, rescale "
          "the kept ones by 1/d, add the weighted sum to the base.", paper=DARE_PAPER,
          needs_base=True, stored_dtype_inputs=True, **DARE_STREAMING,
          params=family_params(normalize=False, rescale=True))
def dare_linear(base, experts, *, weights, densities, lambda_=1.0, normalize=False, rescale=True,
                int8_mask=False, ctx=None, compute_dtype=None, stats=None):
    """θ = θ0 + λ · Σ wi drop(τi)/d."""
    return dare_merge(base, experts, weights=weights, densities=densities, lambda_=lambda_,
                      normalize=normalize, rescale=rescale, ctx=ctx, consensus=False,
                      compute_dtype=compute_dtype, stats=stats)


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


def della_merge(base, experts, *, weights, densities, epsilons, lambda_, normalize, rescale, ctx,
                consensus, sign_ties="zero", compute_dtype=None, stats=None):
    mode = rescale_mode(rescale, true_means="1/density")
    drops = della_drops(ctx, base, densities, epsilons, mode == "1/density")
    return merge_sparse(base, experts, drops, weights=weights, consensus=consensus,
                        normalize=normalize, lambda_=lambda_, l1=mode == "l1", threads=True,
                        block_elements=RANKED_BLOCK_ELEMENTS, sign_ties=sign_ties,
                        compute_dtype=compute_dtype, scales=stats)


@register("della", compat=mergekit_compat(consensus=True),
          summary="Drop task-vector entries at random, less often the larger they "
          "rank in their row; rescale; TIES' sign election and disjoint mean.", paper=DELLA_PAPER,
          needs_base=True, stored_dtype_inputs=True,
          params=family_params(normalize=True, rescale=True, extra=(EPSILON,)),
          validate=check_della, **DELLA_STREAMING)
def della(base, experts, *, weights, densities, epsilons=None, lambda_=1.0, normalize=True,
          rescale=True, int8_mask=False, ctx=None, sign_ties="zero", compute_dtype=None,
          stats=None):
    """θ = θ0 + λ · disjoint_mean(magprune(τi), s)."""
    return della_merge(base, experts, weights=weights, densities=densities,
                       epsilons=epsilons or [EPSILON.default] * len(experts), lambda_=lambda_,
                       normalize=normalize, rescale=rescale, ctx=ctx, consensus=True,
                       sign_ties=sign_ties, compute_dtype=compute_dtype, stats=stats)


@register("della_linear", compat=mergekit_compat(consensus=False),
          summary="DELLA's magnitude-ranked random drops, rescaled; add the "
          "weighted sum.", paper=DELLA_PAPER, needs_base=True, stored_dtype_inputs=True,
          params=family_params(normalize=False, rescale=True, extra=(EPSILON,)),
          validate=check_della, **DELLA_STREAMING)
def della_linear(base, experts, *, weights, densities, epsilons=None, lambda_=1.0,
                 normalize=False, rescale=True, int8_mask=False, ctx=None, compute_dtype=None,
                 stats=None):
    """θ = θ0 + λ · Σ wi magprune(τi)."""
    return della_merge(base, experts, weights=weights, densities=densities,
                       epsilons=epsilons or [EPSILON.default] * len(experts), lambda_=lambda_,
                       normalize=normalize, rescale=rescale, ctx=ctx, consensus=False,
                       compute_dtype=compute_dtype, stats=stats)
