"""Building blocks shared by the methods; each reads like the equation it implements."""

from __future__ import annotations

import torch


def task_vectors(base: torch.Tensor, experts: list[torch.Tensor]) -> list[torch.Tensor]:
    """τi = θi − θ0."""
    return [expert - base for expert in experts]


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ wi xi, accumulated in one buffer."""
    total = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor, alpha=weight)
    return total


def unit(x: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """x / ||x|| (over all entries) and ||x||; a zero vector stays zero."""
    norm = torch.linalg.vector_norm(x)
    return (x / norm if norm > eps else torch.zeros_like(x)), norm
