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

How it runs: A merge is done in small blocks of rows, so that every temporary is block-sized and
stays in cache.
Inputs may come in their stored 16-bit dtype (`stored_dtype_inputs`): each block is cast to
fp32 as it is read, which gives the same values as casting the whole tensor first, and the
engine keeps no fp32 copy of the inputs (half the memory of a whole-tensor merge).
The sparsifiers and the methods: TIES' and breadcrumbs' magnitude cuts in magnitude_trim.py,
DARE's and DELLA's random drops in random_drop.py; this module is what they share.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

import torch

from mergesmith.methods.blocks import break_ties, disjoint_mean, elect_sign, weighted_sum
from mergesmith.methods.registry import Param
from mergesmith.methods.streamed import EXPONENTS, exact_total, exponent_sums

# (rows of τi, the row-major index of their first entry) -> their kept part
Sparsify = Callable[[torch.Tensor, int], torch.Tensor]

# Entries per block of rows on the CPU: at most torch's grain size (32768), so that each of a
# block's ~35 operations runs on the calling thread. Larger blocks split every operation over
# the intra-op threads, and on 2 busy cores each split waits milliseconds for a core: 5-8x
# slower (measured); single-threaded and in cache, a block is as fast as a 4x larger one.
BLOCK_ELEMENTS = 1 << 15
L1_EPS = 1e-7  # mergekit's: no L1 rescale of a τi whose norm before or after is below this
RESCALE_CHOICES = (True, False, "1/density", "l1", "none")


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


def rescale_mode(rescale: bool | str, true_means: str) -> str:
    """"1/density", "l1" or "none" from a recipe's rescale (true: the method's own)."""
    if rescale is True:
        return true_means
    if rescale is False or rescale == "none":
        return "none"
    if rescale in ("1/density", "l1"):
        return rescale
    raise ValueError(f"rescale must be true, false, '1/density', 'l1' or 'none', got {rescale!r}")


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
