"""Two-model fusions, which move the base toward one other model entry by entry: Arcee Fusion
(only the changes whose importance is an outlier) and NearSwap (every change, clipped to a step
of t).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import kth
from mergesmith.methods.blocks import task_vectors
from mergesmith.methods.registry import Param, TensorContext, register
from mergesmith.methods.sparse import row_blocks
from mergesmith.methods.streamed import reduce_in_parts

KL_EPS = 1e-8
QUARTILES = (0.25, 0.5, 0.75)
# Entries per block of rows: the importance's dozen temporaries (and the keys', int64) stay in
# cache, and the memory of a chunk of rows stays that of its inputs.
BLOCK_ELEMENTS = 1 << 17


def row_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) ‖ softmax(y)) of each row (last axis), ε added to both distributions."""
    p = torch.softmax(x, dim=-1) + KL_EPS
    q = torch.softmax(y, dim=-1) + KL_EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def importance(base: torch.Tensor, other: torch.Tensor, compute_dtype: torch.dtype | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ, s = |τ|·KL(softmax(θ1) ‖ softmax(θ0)) per row), in `compute_dtype` when given: of
    whole rows, each row's s depends on that row alone."""
    theta0 = base if compute_dtype is None else base.to(compute_dtype)
    other = other if compute_dtype is None else other.to(compute_dtype)
    tau = other - theta0
    return tau, tau.abs() * row_kl(other, theta0)


def quartile_ranks(n: int) -> list[int]:
    """The ranks k (1 = the smallest) of the lower quantiles: the ⌊q·(n − 1)⌋ + 1-th smallest."""
    return [int(q * (n - 1)) + 1 for q in QUARTILES]


@dataclass(frozen=True)
class QuartileSearch:
    """Between the passes: per quartile, where its entry lies (the top 16 bits of its key, its
    rank from the top among the entries that share them; methods/kth.py)."""

    found: list[tuple[int, int]]


def importance_counts(base: torch.Tensor, experts: list[torch.Tensor], *,
                      stats: QuartileSearch | None = None,
                      compute_dtype: torch.dtype | None = None, **_) -> torch.Tensor:
    """A chunk of whole rows' counts for the radix select of the quartiles of s: its high
    histogram (first pass), or each quartile's low histogram in the bin found for it (second,
    3 × LOW_BINS); block of rows by block of rows."""
    rows, other = as_rows(base), as_rows(experts[0])
    counts = 0
    for block in row_blocks(rows, BLOCK_ELEMENTS):
        keys = kth.order_keys(importance(rows[block], other[block], compute_dtype)[1])
        if stats is None:
            counts = counts + kth.high_histogram(keys, kth.ORDER_HIGH_BINS)
        else:
            highs = {high for high, _ in stats.found}  # quartiles may share a bin
            lows = {high: kth.low_histogram(keys, high) for high in highs}
            counts = counts + torch.stack([lows[high] for high, _ in stats.found])
    return counts


def finish_quartiles(stats: QuartileSearch | None, sums: torch.Tensor, **_
                     ) -> QuartileSearch | list[float]:
    """After the first pass where each quartile lies; after the second, their values."""
    if stats is None:
        n = int(sums.sum())
        return QuartileSearch([kth.locate(sums, n - k + 1) for k in quartile_ranks(n)])
    return [kth.key_value((high << 16) | kth.locate(lows, rank)[0])
            for (high, rank), lows in zip(stats.found, sums)]


@register(
    "arcee_fusion",
    summary="Take the expert's change only where its importance (|τ| × the row's softmax KL) "
            "is an outlier: above median + 1.5·IQR.",
    paper="Arcee AI 2025, Arcee Fusion (mergekit's arcee_fusion; no paper)",
    needs_base=True,
    min_models=1,
    max_models=1,
    params=(),
    # the quartiles by two counting passes over chunks of whole rows (each row's KL needs the
    # row), then each row is merged from itself
    reduce=importance_counts, finish=finish_quartiles, passes=lambda params: 2, row_local=True,
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
)
def arcee_fusion(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    ctx: TensorContext | None = None,
    stats: list[float] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ = θ0 + τ·[s ≥ median(s) + 1.5·(Q3(s) − Q1(s))], s = |τ|·KL(softmax(θ1) ‖ softmax(θ0))
    per row. The quartiles are exact lower quantiles (the ⌊q·(n − 1)⌋ + 1-th smallest s, as
    torch.kthvalue finds them), found by a radix select over the whole tensor (`stats`, from
    the engine's passes over chunks of rows, or found here over slabs of rows); mergekit
    estimates them from a random sample of 10⁶ entries on larger tensors, which makes its
    output change from run to run.

    With `compute_dtype` (`compat: mergekit`), τ, the importance, the quartiles and the
    threshold are computed there, as mergekit does (so in bf16 for bf16 recipes), and
    θ0 + τ·mask in fp32 (mergekit's mask is fp32)."""
    if stats is None:
        stats = reduce_in_parts(importance_counts, finish_quartiles, 2, [(base, experts)],
                                compute_dtype=compute_dtype)
    dtype = compute_dtype or base.dtype  # the importance's
    q1, median, q3 = (torch.tensor(q, dtype=dtype, device=base.device) for q in stats)
    threshold = median + 1.5 * (q3 - q1)
    rows, other = as_rows(base), as_rows(experts[0])
    out = torch.empty(rows.shape, dtype=torch.promote_types(base.dtype, torch.float32),
                      device=base.device)
    for block in row_blocks(rows, BLOCK_ELEMENTS):
        tau, scores = importance(rows[block], other[block], compute_dtype)
        torch.add(rows[block], tau.float() * (scores >= threshold), out=out[block])
    return out.view(base.shape)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as rows of its last axis, the rows of its softmax (a vector or scalar is one row)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)


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
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
)
def nearswap(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    t: float,
    ctx: TensorContext | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ = θ0 + w·τ with w = min(1, t/|τ|), that is θ = θ0 + clamp(τ, −t, t). With
    `compute_dtype` (`compat: mergekit`), mergekit's form in that dtype: θ = w·θ1 + (1 − w)·θ0,
    w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1) (θ1 itself only where that rounds to w = 1)."""
    if compute_dtype is not None:
        theta0, theta1 = base.to(compute_dtype), experts[0].to(compute_dtype)
        w = (t / (theta0 - theta1).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return w * theta1 + (1 - w) * theta0
    (tau,) = task_vectors(base, experts)
    return tau.clamp_(-t, t).add_(base)
