"""Weighted averaging and task arithmetic."""

from __future__ import annotations

import torch

from mergesmith.methods.blocks import task_vectors, weighted_sum
from mergesmith.methods.registry import Param, TensorContext, register

WEIGHT = Param("weight", per_model=True, arg="weights", doc="the model's coefficient")


@register(
    "linear",
    summary="Weighted average of the models (model soup).",
    paper="Wortsman et al. 2022, Model soups, arXiv:2203.05482",
    needs_base=False,
    params=(
        WEIGHT,
        Param("normalize", bool, default=True, doc="divide by the sum of the weights"),
    ),
    elementwise=True,
)
def linear(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    *,
    weights: list[float],
    normalize: bool = True,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """θ = Σ wi θi / Σ wi, or Σ wi θi without normalization."""
    merged = weighted_sum(experts, weights)
    if normalize:
        total = sum(weights)
        if abs(total) < 1e-8:
            raise ValueError("the weights sum to zero; cannot normalize")
        merged.div_(total)
    return merged


@register(
    "task_arithmetic",
    summary="Add the weighted sum of task vectors to the base; negative weights remove a skill.",
    paper="Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089",
    needs_base=True,
    params=(
        WEIGHT,
        Param("lambda", default=1.0, arg="lambda_", doc="scale of the summed task vectors"),
        Param("normalize", bool, default=False, doc="divide the sum by the sum of the weights"),
    ),
    elementwise=True,
    # mergekit computes it in its compute dtype, rounding each step (methods/sparse.py)
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
)
def task_arithmetic(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    weights: list[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    ctx: TensorContext | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ = θ0 + λ Σ wi τi (divided by Σ wi when normalize is set); with `compute_dtype`,
    evaluated step by step in that dtype as mergekit does (`compat: mergekit`)."""
    if compute_dtype is not None:
        from mergesmith.methods.sparse import merge_sparse

        return merge_sparse(base, experts, [lambda tau, at: tau] * len(experts), weights=weights,
                            consensus=False, normalize=normalize, lambda_=lambda_,
                            compute_dtype=compute_dtype)
    merged = weighted_sum(task_vectors(base, experts), weights)
    if normalize and abs(sum(weights)) >= 1e-8:
        merged.div_(sum(weights))
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged.add_(base)
