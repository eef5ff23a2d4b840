"""Model Stock: average the experts, then pull the average back toward the base by how little
the experts agree (Jang et al. 2024, arXiv:2403.19522, §3).

With k experts whose task vectors τi = θi − θ0 meet at a mean pairwise angle θ, the paper puts
the merge at θ = t·mean(θi) + (1 − t)·θ0 with t = k·cos θ / (1 + (k − 1)·cos θ): identical
experts (cos θ = 1) give their average, orthogonal ones (cos θ = 0) give the base.

Per tensor, all this needs to know about the whole tensor is the Gram matrix τi·τj, so the
engine streams it in row blocks: a first pass sums the Gram matrix (`stock_gram`), a second
applies the now fixed t entry by entry. Exact: a sum over rows is a sum over row blocks.
"""

from __future__ import annotations

import math

import torch

from mergesmith.methods.blocks import gram64, task_vectors, weighted_sum
from mergesmith.methods.registry import Param, TensorContext, register

SINGULAR = 1e-6  # |1 + (k − 1)·cos θ| below this: no finite ratio; keep the base (as mergekit)
NORM_FLOOR = 1e-6  # mergekit's floor on |τi||τj| in the cosine (`compat: mergekit` only)


def stock_gram(base: torch.Tensor, experts: list[torch.Tensor], **_) -> torch.Tensor:
    """G[i, j] = τi·τj in float64 over all entries: the whole-tensor part of Model Stock."""
    return gram64(list(torch.stack(experts).sub_(base)))  # the τi, in one buffer


def stock_ratio(gram: list[list[float]], clamp_t: bool = False) -> float:
    """t = k·cos θ / (1 + (k − 1)·cos θ), cos θ the mean over pairs i < j of τi·τj / (|τi||τj|).

    A zero task vector has cosine 0 with every other one. With `clamp_t`, a negative mean
    cosine counts as 0 (t = 0: the base) instead of extrapolating past the base.
    """
    k = len(gram)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(k)]
    cosines = [max(-1.0, min(1.0, gram[i][j] / (norms[i] * norms[j])))
               if norms[i] * norms[j] > 0 else 0.0
               for i in range(k) for j in range(i + 1, k)]
    cos = sum(cosines) / len(cosines)
    if clamp_t:
        cos = max(cos, 0.0)
    denominator = 1 + (k - 1) * cos
    return 0.0 if abs(denominator) < SINGULAR else k * cos / denominator


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The filters of `filter_wise`: vectors along the last axis (a 1-D tensor is one filter)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)


@register(
    "model_stock",
    summary="Average of the experts pulled toward the base by their mean pairwise cosine.",
    paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models, "
          "arXiv:2403.19522",
    needs_base=True,
    min_models=2,
    params=(
        Param("filter_wise", bool, default=False,
              doc="one ratio per row (last axis) instead of one per tensor"),
        Param("clamp_t", bool, default=False,
              doc="mergesmith: t ≥ 0, i.e. experts that disagree (mean cos < 0) give the base; "
                  "mergekit and the paper's formula extrapolate past it"),
    ),
    reduce=stock_gram,
    whole_tensor_when=lambda params: (params.get("filter_wise", False)
                                      or params.get("compute_dtype") is not None),
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
)
def model_stock(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    filter_wise: bool = False,
    clamp_t: bool = False,
    stats: torch.Tensor | None = None,
    ctx: TensorContext | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ = t·mean(θi) + (1 − t)·θ0, t = k·cos θ / (1 + (k − 1)·cos θ) (paper §3).
    With `compute_dtype`, as mergekit evaluates it (`stock_rounded`)."""
    k = len(experts)
    if k < 2:
        raise ValueError("model_stock needs at least two experts to measure their angle")
    if compute_dtype is not None:
        return stock_rounded(base, experts, filter_wise, clamp_t, compute_dtype)
    if filter_wise:
        average = weighted_sum(experts, [1.0] * k).div_(k)
        tvs = torch.stack([_rows(tv) for tv in task_vectors(base, experts)]).double()
        grams = torch.einsum("irc,jrc->rij", tvs, tvs).tolist()
        t = torch.tensor([stock_ratio(g, clamp_t) for g in grams], dtype=base.dtype,
                         device=base.device)[:, None]
        return (_rows(average) * t + _rows(base) * (1 - t)).reshape(base.shape)
    t = stock_ratio((stock_gram(base, experts) if stats is None else stats).tolist(), clamp_t)
    return weighted_sum(experts, [t / k] * k).add_(base, alpha=1 - t)


def stock_rounded(base: torch.Tensor, experts: list[torch.Tensor], filter_wise: bool,
                  clamp_t: bool, dtype: torch.dtype) -> torch.Tensor:
    """Model Stock as mergekit 0.1.5 evaluates it (`compat: mergekit`), on whole tensors in
    `dtype`: each cosine τi·τj / max(|τi||τj|, 1e-6) from torch's norms and sums in that dtype
    (the floor shrinks t for task vectors with |τi||τj| < 1e-6), the mean of the experts
    summed one by one, every step rounded there."""
    shape, k = base.shape, len(experts)
    if filter_wise:
        w0 = base.to(dtype).reshape(1, -1) if base.dim() < 2 else base.to(dtype)
    else:
        w0 = base.to(dtype).reshape(-1)
    ws = [e.to(dtype).reshape(w0.shape) for e in experts]
    offsets = [w - w0 for w in ws]
    cosines = [((a * b).sum(dim=-1)
                / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=NORM_FLOOR)).clamp(-1, 1)
               for i, a in enumerate(offsets) for b in offsets[i + 1:]]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    if clamp_t:
        cos = cos.clamp(min=0)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos),
                    (k * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)
