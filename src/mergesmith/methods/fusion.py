"""Two-model fusions, which move the base toward one other model entry by entry: Arcee Fusion
(only the changes whose importance is an outlier) and NearSwap (every change, clipped to a step
of t).
"""

from __future__ import annotations

import torch

from mergesmith.methods.blocks import task_vectors
from mergesmith.methods.registry import Param, TensorContext, register


KL_EPS = 1e-8


def row_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) ‖ softmax(y)) of each row (last axis), ε added to both distributions."""
    p = torch.softmax(x, dim=-1) + KL_EPS
    q = torch.softmax(y, dim=-1) + KL_EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def lower_quantiles(x: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """The ⌊q·(n − 1)⌋-th smallest entry of x for each q, found by selection (no sort)."""
    flat = x.flatten()
    return [torch.kthvalue(flat, int(q * (flat.numel() - 1)) + 1).values for q in qs]


@register(
    "arcee_fusion",
    summary="Take the expert's change only where its importance (|τ| × the row's softmax KL) "
            "is an outlier: above median + 1.5·IQR.",
    paper="Arcee AI 2025, Arcee Fusion (mergekit's arcee_fusion; no paper)",
    needs_base=True,
    min_models=1,
    max_models=1,
    params=(),
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
)
def arcee_fusion(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    ctx: TensorContext | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ = θ0 + τ·[s ≥ median(s) + 1.5·(Q3(s) − Q1(s))], s = |τ|·KL(softmax(θ1) ‖ softmax(θ0))
    per row. The quartiles are exact; mergekit estimates them from a random sample of 10⁶
    entries on larger tensors, which makes its output change from run to run.

    With `compute_dtype` (`compat: mergekit`), τ, the importance, the quartiles and the
    threshold are computed there, as mergekit does (so in bf16 for bf16 recipes), and
    θ0 + τ·mask in fp32 (mergekit's mask is fp32)."""
    (other,) = experts
    theta0 = base if compute_dtype is None else base.to(compute_dtype)
    other = other if compute_dtype is None else other.to(compute_dtype)
    tau = other - theta0
    importance = tau.abs() * row_kl(other, theta0)
    q1, median, q3 = lower_quantiles(importance, (0.25, 0.5, 0.75))
    keep = importance >= median + 1.5 * (q3 - q1)
    return base + tau.float() * keep


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
