"""DARE and DELLA: the task-arithmetic core (sparse.py) with random drops.

DARE keeps each entry of τi with probability d; DELLA with a probability that rises with the
entry's magnitude rank in its row (d − ε to d + ε).
Random draws come from one counter-based stream per expert (`ctx.stream(i)`): entry j of
expert i's task vector gets the j-th draw of the stream of (seed, tensor name, i), whatever the
blocks or chunks the tensor is merged in. So DARE, whose entries are independent, streams
through the engine in chunks like task arithmetic, and DELLA, which ranks within rows, in
chunks of whole rows. With `rescale: l1` a first pass over the chunks draws the same masks and
adds up each τi's L1 norms before and after exactly (`l1_sums`); under compat, where mergekit
sums the whole τi in its compute dtype, such a merge goes whole.
"""

from __future__ import annotations

import numpy as np
import torch

from mergesmith.methods.blocks import drop_random
from mergesmith.methods.registry import Param, RandomStream, TensorContext, register
from mergesmith.methods.sparse import (
    Sparsify, as_rows, family_params, finish_l1, l1_sums, merge_sparse, mergekit_compat,
    rescale_mode,
)

DARE_PAPER = ("Yu et al. 2024, Language models are Super Mario: absorbing abilities from "
              "homologous models as a free lunch, arXiv:2311.03099")
DELLA_PAPER = ("Deep et al. 2024, DELLA-Merging: reducing interference in model merging "
               "through magnitude-based sampling, arXiv:2406.11617")
EPSILON = Param("epsilon", default=0.15, per_model=True, arg="epsilons", minimum=0.0,
                maximum=1.0, doc="keep probabilities run from density − ε to density + ε by rank")
# DELLA's blocks: its per-row sort makes a block compute-bound, and it runs on several threads
# (`in_parallel`, each op single-threaded), where each operation hands the GIL over: fewer,
# larger blocks pay. Per 8 MiB of rows with 3 experts on 2 cores: 180 ms at 2^15, 94 at 2^17.
RANKED_BLOCK_ELEMENTS = 1 << 17



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


def expert_streams(ctx: TensorContext | None, device: torch.device,
                   count: int) -> list[RandomStream]:
    """One random stream per expert, from (seed, tensor name, expert) and the chunk's offset."""
    if ctx is None:
        raise ValueError("a random method needs ctx, the tensor's context with its seed")
    return [ctx.stream(i, device) for i in range(count)]


def check_della(params: dict) -> None:
    """Each model's keep probabilities d ± ε must be probabilities (when 0 < d < 1)."""
    for density, epsilon in zip(params["densities"], params["epsilons"]):
        if 0 < density < 1 and not (epsilon <= density and density + epsilon <= 1):
            raise ValueError(f"density ± epsilon must lie in [0, 1], got density {density} "
                             f"and epsilon {epsilon}")


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
DELLA_STREAMING = dict(row_local=True, own_threads=True, reduce=della_l1_sums, **L1_PASS)


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
