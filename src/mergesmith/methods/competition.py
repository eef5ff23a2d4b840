"""Competition-balancing merges: per-parameter coefficients that weigh tasks against each other.

PCB-Merging scores each entry of each task vector by its importance within the task and its
agreement with the other tasks; WIDEN scores each column of a weight matrix by how far the
model moved it from the base, in magnitude and in direction. Both follow the authors' released
code where it and the paper's equations differ (noted at each function).
"""

from __future__ import annotations

import re

import torch

from mergesmith.methods.blocks import task_vectors
from mergesmith.methods.registry import Param, TensorContext, register

# Token-embedding tables, by name (the engine's layers.INPUT_EMBEDDINGS; methods may not import
# the engine). WIDEN treats their rows, one per token, as the columns of a linear layer.
TOKEN_EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")
OUTLIER_QUANTILE = 1e-4  # PCB's code clips |τ| to this quantile at both ends


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Norm(x) per row: (x − min) / (max − min); a constant row becomes zeros."""
    low = x.amin(dim=1, keepdim=True)
    spread = x.amax(dim=1, keepdim=True) - low
    return (x - low) / spread.clamp_min(torch.finfo(x.dtype).tiny)


def kth_smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of each row, by selection rather than sorting."""
    return torch.kthvalue(x, min(max(k, 1), x.shape[1]), dim=1, keepdim=True).values


def clip_outliers(magnitudes: torch.Tensor, quantile: float = OUTLIER_QUANTILE) -> torch.Tensor:
    """Clamp each row to its [q, 1 − q] quantiles, at the positions the authors' code reads
    from the sorted row (⌊d·q⌋ and ⌊d·(1 − q) − 1⌋, 0-based), so the largest entry is clipped
    to the next one whenever d·q is not a whole number."""
    d = magnitudes.shape[1]
    low = kth_smallest(magnitudes, int(d * quantile) + 1)
    high = kth_smallest(magnitudes, int(d * (1 - quantile) - 1) + 1)
    return torch.maximum(torch.minimum(magnitudes, high), low)


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
)
def pcb(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    weights: list[float] | None = None,
    density: float = 0.1,
    lambda_: float = 1.0,
    ctx: TensorContext | None = None,
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
    task (Norm of one value is 0/0): every task keeps it with β̂i = 1, θ = θ0 + λ·mean(wi τi)."""
    taus = torch.stack(task_vectors(base, experts)).reshape(len(experts), -1)
    tasks, d = taus.shape
    if d == 1:
        if weights is not None:
            taus = taus * torch.tensor(weights, dtype=taus.dtype, device=taus.device)[:, None]
        return taus.mean(dim=0).view_as(base).mul_(lambda_).add_(base)
    magnitudes = clip_outliers(taus.abs())
    intra = torch.exp(tasks * min_max(magnitudes) ** 2)
    inter = torch.tanh(taus * taus.sum(dim=0))
    balance = intra * inter
    # selection on the signed score: entries that fight the consensus rank lowest
    kept = min_max(torch.maximum(balance, kth_smallest(balance, int(d * (1 - density)) + 1)))
    clipped = taus.sign_().mul_(magnitudes)
    if weights is not None:
        clipped.mul_(torch.tensor(weights, dtype=clipped.dtype, device=clipped.device)[:, None])
    merged = (clipped * kept).sum(dim=0) / kept.sum(dim=0).clamp_min(1e-12)
    return merged.view_as(base).mul_(lambda_).add_(base)


def rank_within_model(shift: torch.Tensor) -> torch.Tensor:
    """Each entry's position in its row's ascending order, over the row length: values
    0, 1/n, …, (n − 1)/n (stable order for ties, as the code). Ranking needs the order of the
    whole row; rows are one value per column, so this sorts no more than a matrix's width."""
    n = shift.shape[1]
    order = shift.argsort(dim=1, stable=True)
    steps = torch.arange(n, device=shift.device, dtype=shift.dtype).div_(n)
    return torch.empty_like(shift).scatter_(1, order, steps.expand_as(shift))


def calibrated_scores(significance: torch.Tensor, above_average_value_ratio: float,
                      score_calibration_value: float) -> torch.Tensor:
    """Softmax over the models of each column's significance; where a model's significance is
    above its own mean × t, the score is set to the calibration value s (score calibration)."""
    scores = torch.softmax(significance, dim=0)
    above = significance > significance.mean(dim=1, keepdim=True) * above_average_value_ratio
    return scores.masked_fill_(above, score_calibration_value)


def widen_scores(base: torch.Tensor, experts: list[torch.Tensor], t: float, s: float
                 ) -> torch.Tensor:
    """WIDEN's per-column weights (T, in) of a matrix (out, in). Disentangle W = m ⊙ D into the
    column norms m and unit columns D; ΔM_i = |m_i − m_0|, ΔD_i = 1 − cos(D_i, D_0) per column
    (cos of unit columns is cos of the columns themselves); score each, ranked within its model,
    and average the two."""
    base_norm = torch.linalg.vector_norm(base, dim=0)
    magnitude = torch.stack([(torch.linalg.vector_norm(x, dim=0) - base_norm).abs_()
                             for x in experts])
    direction = torch.stack([1 - torch.cosine_similarity(x, base, dim=0) for x in experts])
    return 0.5 * (calibrated_scores(rank_within_model(magnitude), t, s)
                  + calibrated_scores(rank_within_model(direction), t, s))


@register(
    "widen",
    summary="Split weights into column magnitudes and directions, rank how far each model moved "
            "them from the base, and add each column's task vectors with softmax scores.",
    paper="Yu et al. 2024, Extend model merging from fine-tuned to pre-trained large language "
          "models via weight disentanglement, arXiv:2408.03092",
    needs_base=True,
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
) -> torch.Tensor:
    """θ = θ0 + Σi τi ⊙ scores_i, scores per column of a matrix (`widen_scores`; token
    embeddings per row, as the code transposes them). Tensors that are not matrices (norms,
    biases, 0-dim scalars) are scored per entry on the raw shift |τi| without ranking, as the
    code does vectors."""
    t, s = above_average_value_ratio, score_calibration_value
    taus = task_vectors(base, experts)
    if base.ndim != 2:
        shifts = torch.stack(taus).reshape(len(taus), -1).abs()  # a 0-dim tensor: one entry
        scores = calibrated_scores(shifts, t, s).view(len(taus), *base.shape)
    else:
        by_row = ctx is not None and TOKEN_EMBEDDING.search(ctx.name) is not None
        if by_row:
            scores = widen_scores(base.T, [x.T for x in experts], t, s)[:, :, None]
        else:
            scores = widen_scores(base, experts, t, s)[:, None, :]
    merged = base.clone()
    for tau, score in zip(taus, scores):
        merged.add_(tau * score)
    return merged
