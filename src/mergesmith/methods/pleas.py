"""PLeaS: partial permutations and least squares (Nasery, Hayase, Koh, Oh, arXiv 2407.02447,
CVPR 2025; code SewoongLab/PLeaS-Merging).

Two models of one architecture that do not share a basin are merged layer by layer:

1. **Partial matching.** The two models' hidden units of a layer are correlated on data; a
   linear assignment pairs every unit of A with one of B, and of those pairs only the `d − s`
   most correlated are merged into one unit. The other `s` units of each model are kept as
   they are, so the merged layer is `d + s` wide (d ≤ width ≤ 2d). Layout, as the authors'
   `get_blocks`: merged pairs first (in A's order), then A's kept units, then B's.
2. **Least squares.** The weights that read the merged units are chosen so that the merged
   layer's outputs, on the merged model's own inputs H (tokens × width), approximate both
   models' outputs: min_W ‖H Wᵀ − Y_A‖² + ‖H Wᵀ − Y_B‖², whose normal equations are
   (HᵀH) Wᵀ = Hᵀ (Y_A + Y_B) / 2. We solve them in closed form in float64 (Gram matrices are
   summed over batches, so the tokens are never held at once) with a small ridge relative to
   the Gram's mean diagonal, which keeps the solve defined when there are fewer tokens than
   units or dead units. The authors instead run Adam (lr 5e-4, cosine schedule) on the
   per-layer MSE with gradients masked to the block structure; the closed form is its optimum.

Differences from the authors' code, on purpose: their default correlation is taken from weight
matching's costs (or negative Euclidean distances of activations); we use the Pearson
correlation of activations on the calibration data, the activation-matching form the paper
describes. Their per-layer ratios come from a FLOP-budget QP; we take one `budget` for every
layer (transformers needs one `intermediate_size`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods.permutation import match
from mergesmith.methods.registry import register_operation

RIDGE = 1e-10  # relative to the Gram matrix's mean diagonal; float64 keeps it harmless

register_operation(
    "pleas", command="mergesmith align A B OUT --method pleas [--budget 1.5] [--data FILE]",
    summary="partial permutation matching of MLP units on data, then per-layer least squares",
    paper="PLeaS, Nasery et al. 2024 (arXiv 2407.02447)",
    needs="two models of one architecture + calibration text (or none: random tokens)")


@dataclass(frozen=True)
class Blocks:
    """Which units of A and B make up the merged layer: `merged_a[i]` and `merged_b[i]` become
    merged unit i; `only_a` and `only_b` are kept from their model, in that order after them."""

    merged_a: torch.LongTensor
    merged_b: torch.LongTensor
    only_a: torch.LongTensor
    only_b: torch.LongTensor

    @property
    def width(self) -> int:
        return len(self.merged_a) + len(self.only_a) + len(self.only_b)


def merged_width(units: int, budget: float) -> int:
    """The merged layer's width for a budget in [1, 2]: 1 merges every unit (d), 2 keeps both
    models' units apart (2d)."""
    if not 1.0 <= budget <= 2.0:
        raise ValueError(f"budget must lie in [1, 2], got {budget}")
    return units + round((budget - 1.0) * units)


class CorrelationSums:
    """Running float64 sums over tokens from which the Pearson correlation of every unit of A
    with every unit of B follows: n, Σa, Σb, Σa², Σb², Σ a bᵀ."""

    def __init__(self, units: int, device: torch.device | str = "cpu"):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.n, self.sa, self.sb = 0, zeros(units), zeros(units)
        self.saa, self.sbb, self.sab = zeros(units), zeros(units), zeros(units, units)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a, b: [tokens, units] activations of A and B on the same tokens."""
        a, b = (x.to(self.sab.device, torch.float64) for x in (a, b))
        self.n += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def correlation(self) -> torch.Tensor:
        """corr[i, j] between A's unit i and B's unit j; 0 where a unit is constant on the data
        (a dead unit correlates with nothing)."""
        n = max(self.n, 1)
        mean_a, mean_b = self.sa / n, self.sb / n
        cov = self.sab / n - torch.outer(mean_a, mean_b)
        std_a = (self.saa / n - mean_a ** 2).clamp(min=0).sqrt()
        std_b = (self.sbb / n - mean_b ** 2).clamp(min=0).sqrt()
        scale = torch.outer(std_a, std_b)
        return torch.where(scale > 0, cov / scale.clamp(min=1e-300), torch.zeros_like(cov)).cpu()


def partial_match(correlation: torch.Tensor, width: int) -> Blocks:
    """Pair A's units with B's by the LAP on `correlation` ([d, d], A by B), then merge the
    2d − width most correlated pairs (ties: lower A index first) and keep the rest apart."""
    correlation = correlation.detach().cpu()
    units = correlation.shape[0]
    if not units <= width <= 2 * units:
        raise ValueError(f"width must lie in [{units}, {2 * units}], got {width}")
    perm = match(correlation)
    paired = correlation[torch.arange(units), perm].to(torch.float64)
    order = sorted(range(units), key=lambda i: (-paired[i].item(), i))
    merged = torch.tensor(sorted(order[:2 * units - width]), dtype=torch.long)
    kept = torch.tensor(sorted(order[2 * units - width:]), dtype=torch.long)
    return Blocks(merged, perm[merged], kept, perm[kept])


def merged_rows(rows_a: torch.Tensor, rows_b: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """Weights that produce units (gate/up rows): merged pairs averaged, kept units as they are."""
    return torch.cat([(rows_a[blocks.merged_a] + rows_b[blocks.merged_b]) / 2,
                      rows_a[blocks.only_a], rows_b[blocks.only_b]])


class LeastSquaresSums:
    """Running float64 HᵀH and Hᵀ(Y_A + Y_B)/2 over tokens: the stacked objective's normal
    equations, so the tokens need not be held. Summed on `device` (the activations')."""

    def __init__(self, width: int, outputs: int, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.cross = torch.zeros(width, outputs, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, hidden: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor) -> None:
        h, y_a, y_b = (x.to(self.gram.device, torch.float64) for x in (hidden, target_a, target_b))
        self.n += h.shape[0]
        self.gram += h.T @ h
        self.cross += h.T @ ((y_a + y_b) / 2)

    def solve(self, ridge: float = RIDGE) -> torch.Tensor:
        return least_squares(self.gram, self.cross, ridge)


def least_squares(gram: torch.Tensor, cross: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """W [outputs, width] with (G + λI) Wᵀ = C, λ = ridge · mean(diag G), in float64."""
    gram, cross = gram.to(torch.float64), cross.to(torch.float64)
    scale = gram.diagonal().mean().clamp(min=1e-300)
    regularised = gram + ridge * scale * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(regularised, cross).T
