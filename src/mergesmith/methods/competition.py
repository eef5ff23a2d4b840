"""Competition-balancing merges: per-parameter coefficients that weigh tasks against each other.

PCB-Merging scores each entry of each task vector by its importance within the task and its
agreement with the other tasks; WIDEN scores each column of a weight matrix by how far the
model moved it from the base, in magnitude and in direction. Both follow the authors' released
code where it and the paper's equations differ (noted at each function).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from mergesmith.methods import kth
from mergesmith.methods.blocks import task_vectors
from mergesmith.methods.registry import Param, TensorContext, register
from mergesmith.methods.sparse import row_blocks

# Token-embedding tables, by name (the engine's layers.INPUT_EMBEDDINGS; methods may not import
# the engine). WIDEN treats their rows, one per token, as the columns of a linear layer.
TOKEN_EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")
OUTLIER_QUANTILE = 1e-4  # PCB's code clips |τ| to this quantile at both ends
TINY = torch.finfo(torch.float32).tiny


def min_max(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Norm(x) per row: (x − min) / (max − min), given each row's min and max (a constant row
    becomes zeros)."""
    return (x - low) / (high - low).clamp_min(TINY)


# --------------------------------------------------------------------------------------------
# PCB streams: its order statistics (each task's clip quantiles of |τi|, the cut and the max of
# its scores β) are exact k-th values over the whole tensor, found by kth.py's radix select in
# counting passes, chunk by chunk; given them, every entry is merged from its own column of τ.
# Norm's min and max over a row need nothing more: |τi| clipped to [low, high] has min low and
# max high, and max(βi, cut) has min cut and max βi's max, all values the row attains. So the
# same values as a selection and amin/amax over the whole tensor, the same bytes.

PCB_PASSES = 4  # |τi|'s high counts, their low counts; then the same for the scores β


def selection_ranks(n: int, smallest: list[int]) -> list[int]:
    """Ranks from the top (1 = largest) of the k-th smallest of n, each k clamped to [1, n]."""
    return [n - min(max(k, 1), n) + 1 for k in smallest]


def clip_ranks(n: int, quantile: float = OUTLIER_QUANTILE) -> list[int]:
    """The sorted positions the authors' code clips |τi| to, ⌊n·q⌋ and ⌊n·(1 − q) − 1⌋
    (0-based), so the largest entry is clipped to the next one whenever n·q is not whole."""
    return selection_ranks(n, [int(n * quantile) + 1, int(n * (1 - quantile) - 1) + 1])


def score_ranks(n: int, density: float) -> list[int]:
    """β's value at sorted position ⌊n·(1 − r)⌋, and its largest value."""
    return selection_ranks(n, [int(n * (1 - density)) + 1, n])


def key_counts(rows: torch.Tensor, found: list | None = None, signed: bool = True
               ) -> torch.Tensor:
    """Per row: its values' keys (`kth.order_keys`, or |x|'s `kth.magnitude_bits` unless
    `signed`: half the bins, and cheaper) counted by their top 16 bits (rows × bins), or, given
    where each wanted rank lies (`found`, per row [(high bin, rank in it)]), by their low 16
    bits within each such bin (rows × ranks × LOW_BINS)."""
    counts = []
    for i, row in enumerate(rows):
        keys = kth.order_keys(row) if signed else kth.magnitude_bits(row)
        if found is None:
            counts.append(kth.high_histogram(keys, kth.ORDER_HIGH_BINS if signed
                                             else kth.HIGH_BINS))
        else:
            counts.append(torch.stack([kth.low_histogram(keys, high) for high, _ in found[i]]))
    return torch.stack(counts)


def found_values(found: list, lows: torch.Tensor, device, signed: bool = True
                 ) -> tuple[torch.Tensor, ...]:
    """The values the second counting pass pins down, as one (rows, 1) fp32 column per rank."""
    def value(high: int, low: int) -> float:
        return kth.key_value((high << 16) | low) if signed else kth.bits_value(high, low)

    values = [[value(high, kth.locate(lows[i, j], rank)[0])
               for j, (high, rank) in enumerate(row)] for i, row in enumerate(found)]
    table = torch.tensor(values, dtype=torch.float32, device=device)
    return tuple(table[:, j:j + 1] for j in range(table.shape[1]))


@dataclass(frozen=True)
class PcbStats:
    """What the counting passes found so far: the tensor's size; where the clip quantiles of
    |τi| lie, then their values (low, high); where β's cut and max lie, then their values."""

    numel: int
    clip_found: list = field(default_factory=list)
    clips: tuple[torch.Tensor, torch.Tensor] | None = None
    score_found: list = field(default_factory=list)
    cuts: tuple[torch.Tensor, torch.Tensor] | None = None


def task_rows(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """τ as a (tasks, entries) matrix."""
    return torch.stack(task_vectors(base, experts)).reshape(len(experts), -1)


def balance(taus: torch.Tensor, clips: tuple[torch.Tensor, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(|τi| clipped to its quantiles, β_i = β_intra,i · β_inter,i), entry by entry."""
    low, high = clips
    magnitudes = torch.maximum(torch.minimum(taus.abs(), high), low)
    intra = torch.exp(taus.shape[0] * min_max(magnitudes, low, high) ** 2)
    inter = torch.tanh(taus * taus.sum(dim=0))
    return magnitudes, intra * inter


def pcb_sums(base: torch.Tensor, experts: list[torch.Tensor], *, stats: PcbStats | None = None,
             **_) -> torch.Tensor:
    """One chunk's counts for the pass after `stats`: |τi|'s, then β's, high then low counts."""
    taus = task_rows(base, experts)
    if stats is None or stats.clips is None:  # |τi|
        return key_counts(taus, stats.clip_found if stats else None, signed=False)
    scores = balance(taus, stats.clips)[1]
    return key_counts(scores, stats.score_found or None)


def finish_pcb(stats: PcbStats | None, sums: torch.Tensor, *, density: float, **_) -> PcbStats:
    if stats is None:
        n = int(sums[0].sum())
        return PcbStats(n, clip_found=[[kth.locate(row, k) for k in clip_ranks(n)] for row in sums])
    if stats.clips is None:
        return replace(stats, clips=found_values(stats.clip_found, sums, sums.device,
                                                 signed=False))
    if not stats.score_found:
        ranks = score_ranks(stats.numel, density)
        return replace(stats, score_found=[[kth.locate(row, k) for k in ranks] for row in sums])
    return replace(stats, cuts=found_values(stats.score_found, sums, sums.device))


def pcb_statistics(base: torch.Tensor, experts: list[torch.Tensor], density: float) -> PcbStats:
    """The passes over a whole tensor at once."""
    stats = None
    for _ in range(PCB_PASSES):
        stats = finish_pcb(stats, pcb_sums(base, experts, stats=stats), density=density)
    return stats


@register(
    "pcb",
    summary="Parameter competition balancing: weigh each entry of each task vector by its "
            "importance in its task and agreement across tasks, keep the top ones, average.",
    paper="Du et al. 2024, Parameter competition balancing for model merging (NeurIPS), "
          "arXiv:2410.02396",
    needs_base=True,
    params=(
        Param("weight", default=1.0, per_model=True, arg="weights",
              doc="the task's coefficient (the paper's λi, searched there by evolution)"),
        Param("density", default=0.1, minimum=0.0, maximum=1.0,
              doc="fraction of each task's entries kept (the paper's ratio r)"),
        Param("lambda", default=1.0, arg="lambda_", doc="scale of the merged task vector"),
    ),
    reduce=pcb_sums,
    passes=lambda params: PCB_PASSES,
    finish=finish_pcb,
)
def pcb(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    weights: list[float] | None = None,
    density: float = 0.1,
    lambda_: float = 1.0,
    ctx: TensorContext | None = None,
    stats: PcbStats | None = None,
) -> torch.Tensor:
    """Per tensor, with T tasks and d entries (the code's pcb-merging.py, per tensor, not per
    flattened model):
      intra-balancing  β_intra,i = exp(T·Norm(|τi|)²), the paper's Softmax(T·Norm(τi⊙τi))
                       up to its normalizing constant, which the final Norm cancels;
      inter-balancing  β_inter,i = tanh(τi ⊙ Σj τj) = tanh(Σj τi⊙τj), the code's form of the
                       paper's sum over j of normalized products; negative where τi
                       fights the consensus;
      drop             β_i raised to its value at sorted position ⌊d·(1 − r)⌋, then Norm: the
                       top fraction r keeps weight (linear in β), the rest gets 0;
      merge            θ = θ0 + λ·Σi wi β̂i τ̃i / Σi β̂i, τ̃i = τi with |τi| clipped to its
                       1e-4 quantiles.
    A one-entry tensor (a 0-dim scalar such as CLIP's logit_scale) has no ranking within its
    task (Norm of one value is 0/0): every task keeps it with β̂i = 1, θ = θ0 + λ·mean(wi τi).
    The order statistics over the whole tensor come from the engine's counting passes
    (`stats`), or else from the same passes here."""
    taus = task_rows(base, experts)
    if taus.shape[1] == 1 and stats is None:
        if weights is not None:
            taus = taus * torch.tensor(weights, dtype=taus.dtype, device=taus.device)[:, None]
        return taus.mean(dim=0).view_as(base).mul_(lambda_).add_(base)
    stats = stats or pcb_statistics(base, experts, density)
    magnitudes, scores = balance(taus, stats.clips)
    cut, top = stats.cuts
    # selection on the signed score: entries that fight the consensus rank lowest
    kept = min_max(torch.maximum(scores, cut), cut, top)
    clipped = taus.sign_().mul_(magnitudes)
    if weights is not None:
        clipped.mul_(torch.tensor(weights, dtype=clipped.dtype, device=clipped.device)[:, None])
    merged = (clipped * kept).sum(dim=0) / kept.sum(dim=0).clamp_min(1e-12)
    return merged.view_as(base).mul_(lambda_).add_(base)


def rank_within_model(shift: torch.Tensor) -> torch.Tensor:
    """Each entry's position in its row's ascending order, over the row length: fp32 values
    0, 1/n, …, (n − 1)/n (stable order for ties, as the code). Ranking needs the order of the
    whole row; rows are one value per column, so this sorts no more than a matrix's width."""
    n = shift.shape[1]
    order = shift.argsort(dim=1, stable=True)
    steps = torch.arange(n, device=shift.device, dtype=torch.float32).div_(n)
    return torch.empty_like(shift, dtype=torch.float32).scatter_(1, order, steps.expand_as(shift))


def calibrated_scores(significance: torch.Tensor, above_average_value_ratio: float,
                      score_calibration_value: float,
                      mean: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the models of each column's significance; where a model's significance is
    above its own mean (over all its entries; given, or taken here) × t, the score is set to the
    calibration value s (score calibration)."""
    scores = torch.softmax(significance, dim=0)
    mean = significance.mean(dim=1, keepdim=True) if mean is None else mean
    above = significance > mean * above_average_value_ratio
    return scores.masked_fill_(above, score_calibration_value)


# --------------------------------------------------------------------------------------------
# WIDEN streams: its scores need, per column of a matrix (per row of a token embedding), the
# sums Σb², Σxi², Σxi·b over the other axis, and for other tensors each model's Σ|τi|. One
# reduce pass adds them up over chunks of whole rows, in float64 from exact fp32 products: the
# ranks then follow the exact norms and cosines (exact ties, such as the columns a fine-tune did
# not touch, stay exact ties, whatever the chunks), where a single fp32 reduction over the whole
# tensor ordered columns within its rounding. Given the scores, every row merges on its own.
# Both passes read the stored 16-bit rows and cast a block of rows at a time, so that every
# temporary is block-sized.

SUM_BLOCK_ELEMENTS = 1 << 16  # entries whose float64 products are summed at once: in cache
COSINE_EPS = 1e-8  # torch.cosine_similarity's floor for each norm


@dataclass
class WidenSums:
    """One reduce pass's sums. A matrix: `columns` (1 + 2T, in) and `rows` (1 + 2T, out), the
    sums Σb², Σxi², Σxi·b over rows and along each row; other tensors: `columns` (T,) Σ|τi|.
    Chunks of rows add: their columns add up, their rows follow one another."""

    columns: torch.Tensor
    rows: torch.Tensor | None
    count: int
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __add__(self, other: "WidenSums") -> "WidenSums":
        rows = None if self.rows is None else torch.cat([self.rows, other.rows], dim=1)
        return WidenSums(self.columns + other.columns, rows, self.count + other.count)

    def scores(self, by_row: bool, t: float, s: float) -> torch.Tensor:
        """WIDEN's (T, in) column weights, or (T, out) row weights (`widen_scores`), once."""
        key = (by_row, t, s)
        if key not in self.cache:
            sums = self.rows if by_row else self.columns
            self.cache[key] = widen_scores(sums, t, s)
        return self.cache[key]


def widen_sums(base: torch.Tensor, experts: list[torch.Tensor], **_) -> WidenSums:
    """One chunk of rows' sums (`WidenSums`)."""
    if base.ndim != 2:
        theta0 = base.float()
        shifts = [(x.float() - theta0).abs().sum(dtype=torch.float64) for x in experts]
        return WidenSums(torch.stack(shifts), None, base.numel())
    columns = torch.zeros(1 + 2 * len(experts), base.shape[1], dtype=torch.float64,
                          device=base.device)
    along = []
    for rows in row_blocks(base, SUM_BLOCK_ELEMENTS):
        b = base[rows].double()
        xs = [x[rows].double() for x in experts]
        products = torch.stack([b * b, *(x * x for x in xs), *(x * b for x in xs)])
        columns += products.sum(dim=1)
        along.append(products.sum(dim=2))
    empty = torch.zeros(len(columns), 0, dtype=torch.float64, device=base.device)
    return WidenSums(columns, torch.cat(along, dim=1) if along else empty, base.numel())


def widen_scores(sums: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """WIDEN's weights (T, n) of the n columns (or rows) whose sums (1 + 2T, n) are given.
    Disentangle W = m ⊙ D into the column norms m and unit columns D; ΔM_i = |m_i − m_0|,
    ΔD_i = 1 − cos(D_i, D_0) per column (cos of unit columns is cos of the columns themselves,
    each norm floored at 1e-8 as torch.cosine_similarity does); score each, ranked within its
    model, and average the two."""
    tasks = (len(sums) - 1) // 2
    bb, xx, xb = sums[0], sums[1:1 + tasks], sums[1 + tasks:]
    magnitude = (xx.sqrt() - bb.sqrt()).abs_()
    # √(a·b), not √a·√b: a column equal to the base's has cos exactly 1
    floor = COSINE_EPS ** 2
    direction = 1 - xb / (xx.clamp_min(floor) * bb.clamp_min(floor)).sqrt()
    return 0.5 * (calibrated_scores(rank_within_model(magnitude), t, s)
                  + calibrated_scores(rank_within_model(direction), t, s))


@register(
    "widen",
    summary="Split weights into column magnitudes and directions, rank how far each model moved "
            "them from the base, and add each column's task vectors with softmax scores.",
    paper="Yu et al. 2024, Extend model merging from fine-tuned to pre-trained large language "
          "models via weight disentanglement, arXiv:2408.03092",
    needs_base=True,
    reduce=widen_sums,
    row_local=True,
    stored_dtype_inputs=True,
    params=(
        Param("above_average_value_ratio", default=1.0, minimum=0.0,
              doc="t: a column whose ranked shift exceeds t × its model's mean gets score s"),
        Param("score_calibration_value", default=1.0,
              doc="s: the score given to those important columns"),
    ),
)
def widen(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    above_average_value_ratio: float = 1.0,
    score_calibration_value: float = 1.0,
    ctx: TensorContext | None = None,
    stats: WidenSums | None = None,
) -> torch.Tensor:
    """θ = θ0 + Σi τi ⊙ scores_i, scores per column of a matrix (`widen_scores`; token
    embeddings per row, as the code transposes them). Tensors that are not matrices (norms,
    biases, 0-dim scalars) are scored per entry on the raw shift |τi| without ranking, as the
    code does vectors. The sums over the whole tensor come from the engine's reduce pass
    (`stats`; for a chunk of rows, `ctx.offset` says where it starts), or else are taken here."""
    t, s = above_average_value_ratio, score_calibration_value
    stats = stats if stats is not None else widen_sums(base, experts)
    if base.ndim != 2:
        theta0, experts = base.float(), [x.float() for x in experts]
        shifts = torch.stack(task_vectors(theta0, experts)).reshape(len(experts), -1).abs()
        mean = (stats.columns / stats.count).float().to(shifts.device)[:, None]
        scores = calibrated_scores(shifts, t, s, mean).view(len(experts), *base.shape)
        return add_scored(theta0, experts, scores)
    if ctx is not None and TOKEN_EMBEDDING.search(ctx.name) is not None:
        first = ctx.offset // base.shape[1]
        scores = stats.scores(True, t, s)[:, first:first + base.shape[0], None]
    else:
        scores = stats.scores(False, t, s)[:, None, :].expand(-1, base.shape[0], -1)
    merged = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    for rows in row_blocks(base, SUM_BLOCK_ELEMENTS):  # of the stored rows, cast block by block
        merged[rows] = add_scored(base[rows].float(), [x[rows].float() for x in experts],
                                  scores[:, rows])
    return merged


def add_scored(base: torch.Tensor, experts: list[torch.Tensor], scores: torch.Tensor
               ) -> torch.Tensor:
    """θ0 + Σi τi ⊙ scores_i."""
    merged = base.clone()
    for expert, score in zip(experts, scores):
        merged.add_((expert - base) * score)
    return merged
