"""Permutation alignment: linear assignment of units, and weight matching (Git Re-Basin).

Two networks that differ only by a permutation of their hidden units compute the same function;
aligning one to the other before merging undoes that symmetry. `match` solves the linear
assignment problem (LAP) that every alignment method here reduces to.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def match(similarity: torch.Tensor) -> torch.LongTensor:
    """perm maximising Σ_i similarity[i, perm[i]] (a square LAP, solved exactly by scipy)."""
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"match needs a square similarity matrix, got shape {tuple(similarity.shape)}")
    cost = similarity.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(cost).all():
        raise ValueError("match got a similarity matrix with NaN or infinite entries")
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm


def match_units(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.LongTensor:
    """perm such that features_b[perm] best matches features_a, by inner product of unit rows."""
    if features_a.shape != features_b.shape or features_a.dim() != 2:
        raise ValueError(
            f"match_units needs two [units, features] matrices of one shape, got "
            f"{tuple(features_a.shape)} and {tuple(features_b.shape)}"
        )
    a = features_a.detach().to(torch.float64)
    b = features_b.detach().to(torch.float64)
    return match(a @ b.T)
