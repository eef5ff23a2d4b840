"""Scores, normalized scores, forgetting, and paired bootstrap intervals.

A TaskResult keeps every example's outcome, so any score can be recomputed on a resample of the
examples: the bootstrap draws one matrix of indices per task and applies it to every model (and
to the task's expert), which is what makes the intervals *paired*.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TaskResult:
    """One model on one task split.

    per_example: 1/0 correctness (classification, multiple choice), or each example's mean
    token loss (perplexity; `tokens` then holds how many tokens each one scored). For any metric
    but macro_f1 and perplexity, the score is the mean of per_example (accuracy, lm-eval's acc).
    """

    task: str
    metric: str
    score: float
    per_example: torch.Tensor
    n: int
    higher_is_better: bool
    predictions: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def resampled(self, idx: np.ndarray) -> np.ndarray:
        """The metric on each row of example indices `idx` [B, n] -> [B]."""
        if self.metric == "macro_f1":
            return macro_f1(self.predictions.numpy()[idx], self.labels.numpy()[idx])
        if self.metric == "perplexity":
            return perplexity(self.per_example.double().numpy()[idx], self.tokens.numpy()[idx])
        return self.per_example.double().numpy()[idx].mean(axis=-1)

    def to_dict(self) -> dict:
        data = {"task": self.task, "metric": self.metric, "score": self.score, "n": self.n,
                "higher_is_better": self.higher_is_better}
        for key in ("per_example", "predictions", "labels", "tokens"):
            value = getattr(self, key)
            data[key] = None if value is None else value.tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TaskResult":
        dtypes = {"per_example": torch.float32, "predictions": torch.long, "labels": torch.long,
                  "tokens": torch.long}
        tensors = {k: None if data.get(k) is None else torch.tensor(data[k], dtype=dt)
                   for k, dt in dtypes.items()}
        return cls(data["task"], data["metric"], data["score"], n=data["n"],
                   higher_is_better=data["higher_is_better"], **tensors)


def accuracy(predictions, labels) -> float:
    """Share of examples whose predicted label equals the true one."""
    return float((np.asarray(predictions) == np.asarray(labels)).mean())


def macro_f1(predictions, labels) -> np.ndarray | float:
    """Unweighted mean over classes of F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c), over the classes
    that occur among the labels or the predictions (scikit-learn's average="macro").

    Works on [n] arrays (-> float) or on [B, n] resamples (-> [B]), through one confusion
    matrix per row built with a single bincount.
    """
    pred, true = np.atleast_2d(np.asarray(predictions)), np.atleast_2d(np.asarray(labels))
    rows, classes = pred.shape[0], int(max(pred.max(), true.max())) + 1
    cell = (np.arange(rows)[:, None] * classes + true) * classes + pred
    confusion = np.bincount(cell.ravel(), minlength=rows * classes * classes).reshape(rows, classes, classes)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    fn = confusion.sum(axis=2) - tp
    fp = confusion.sum(axis=1) - tp
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    f1 = np.where(present, 2 * tp / np.maximum(denominator, 1), 0.0)
    scores = f1.sum(axis=1) / present.sum(axis=1)
    return float(scores[0]) if np.ndim(predictions) == 1 else scores


def perplexity(losses, tokens) -> np.ndarray | float:
    """exp(Σ_i loss_i·tokens_i / Σ_i tokens_i): corpus perplexity from per-example mean losses."""
    losses, tokens = np.asarray(losses, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    scores = np.exp((losses * tokens).sum(axis=-1) / np.maximum(tokens.sum(axis=-1), 1))
    return float(scores) if np.ndim(scores) == 0 else scores


def normalized_score(score, expert_score, higher_is_better: bool = True):
    """The model's score as a share of the task expert's: score / expert, or expert / score when
    lower is better (perplexity), so that 1 means "as good as the expert" either way."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(score, expert_score) if higher_is_better else np.divide(expert_score, score)


def forgetting(score, base_score, higher_is_better: bool = True):
    """How much worse than the base the model does, in the metric's units (positive = worse):
    base − score, or score − base when lower is better."""
    return base_score - score if higher_is_better else score - base_score


def bootstrap_indices(n: int, n_bootstrap: int, seed: int, stream: str = "") -> np.ndarray:
    """[n_bootstrap, n] example indices drawn with replacement from numpy's PCG64, seeded by
    (seed, crc32(stream)): the same task gets the same resamples in every run and for every model."""
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode())])
    return rng.integers(0, n, size=(n_bootstrap, n))


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap samples (numpy's linear percentiles).

    Resamples where the statistic is undefined (a ratio whose expert scored 0 on that resample)
    are left out.
    """
    samples = np.asarray(samples, dtype=np.float64)
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)
