"""Metrics-weighted averaging (MWA) of one training run's checkpoints.

Choi & Yu 2025, Parameter-Efficient Checkpoint Merging via Metrics-Weighted Averaging,
arXiv:2504.18580: θ = Σ_k w_k θ_k with Σ w = 1, the weights a function of each checkpoint's
training loss or step and of one penalty factor p. The paper's exact formula could not be read
(METHODS.md: unconfirmed); mergesmith uses the power form

    by loss:  w_k ∝ m_k^(-p)        (lower loss, larger weight)
    by step:  w_k ∝ t_k^(+p)        (later step, larger weight)

which has the properties the paper asks of its penalty: p = 0 is the uniform average, p → ∞
keeps only the best checkpoint, and one parameter serves any number of checkpoints. A power of
the metric is also blind to its unit: multiplying every loss (or step) by c > 0 leaves the
weights unchanged.
"""

from __future__ import annotations

import math
from typing import Sequence

from mergesmith.errors import MethodError

BY = ("uniform", "step", "loss")


def mwa_weights(metrics: Sequence[float], penalty: float, *, lower_is_better: bool) -> list[float]:
    """w_k = m_k^(∓p) / Σ_j m_j^(∓p), computed as a softmax of ∓p·log m_k (no overflow for
    large p); p = inf splits the weight evenly among the best checkpoints."""
    if not metrics:
        raise MethodError("no checkpoints to weight")
    if not penalty >= 0:  # also NaN
        raise MethodError(f"the penalty must be >= 0, got {penalty}")
    bad = next((m for m in metrics if not (math.isfinite(m) and m > 0)), None)
    if bad is not None:
        raise MethodError(f"MWA's power weights need positive, finite metrics; got {bad}",
                          hint="weight by step, or uniformly, when the loss can be zero or negative")
    sign = -1.0 if lower_is_better else 1.0
    if math.isinf(penalty):
        best = min(metrics) if lower_is_better else max(metrics)
        winners = [m == best for m in metrics]
        return [float(w) / sum(winners) for w in winners]
    logits = [sign * penalty * math.log(m) for m in metrics]
    top = max(logits)
    raw = [math.exp(v - top) for v in logits]
    return [r / sum(raw) for r in raw]


def checkpoint_weights(by: str, penalty: float, *, steps: Sequence[float] | None = None,
                       losses: Sequence[float] | None = None, count: int | None = None) -> list[float]:
    """The averaging weights of a run's checkpoints: uniform, by step, or by training loss."""
    if by == "uniform":
        k = count if count is not None else len(steps or losses or ())
        if k < 1:
            raise MethodError("no checkpoints to weight")
        return [1.0 / k] * k
    if by == "step":
        return mwa_weights(list(steps or ()), penalty, lower_is_better=False)
    if by == "loss":
        return mwa_weights(list(losses or ()), penalty, lower_is_better=True)
    raise MethodError(f"unknown weighting {by!r}", hint=f"one of {', '.join(BY)}")
