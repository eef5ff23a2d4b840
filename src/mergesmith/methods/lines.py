"""LiNeS: layer-increasing network scaling (Wang et al. 2025, arXiv:2410.17146, §3).

After any merge with a base, scale the merged task vector of each block linearly with depth, so
the shallow layers, which hold general features, stay close to the base:

    θ = θ0 + s(l)·(θ_merged − θ0),   s(l) = α + β·l/(L − 1),   l = 0, …, L − 1

l is the index of the block in the output model, counted from 0 (the authors' code: block 0
gets α, block L − 1 gets α + β); a model of one block gets α. Tensors outside the blocks
(embeddings, final norm, output head) get α, as in the authors' code. The paper's multi-task
default α = ‖Σ τi‖ / (T·‖τ_MTL‖) needs whole-model norms; a recipe gives α and β directly.
"""

from __future__ import annotations

import torch

LINES_PAPER = ("Wang et al. 2025, LiNeS: post-training layer scaling prevents forgetting and "
               "enhances model merging (ICLR), arXiv:2410.17146")


def layer_scale(layer: int | None, num_layers: int | None, alpha: float, beta: float) -> float:
    """s(l) = α + β·l/(L − 1); α outside the blocks (layer None) and in a one-block model."""
    if layer is None or not num_layers or num_layers < 2:
        return alpha
    return alpha + beta * layer / (num_layers - 1)


def scale_task_vector(base: torch.Tensor, merged: torch.Tensor, scale: float) -> torch.Tensor:
    """θ0 + s·(θ_merged − θ0), as a new tensor (`merged` may be `base` itself); s = 1 gives
    `merged` bit for bit."""
    return torch.lerp(base, merged, scale)
