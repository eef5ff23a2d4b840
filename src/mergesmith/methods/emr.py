"""EMR-merging: Elect, Mask & Rescale (Huang et al. 2024, arXiv:2405.17461, §3.2).

    elect:    γ_uni = sign(Σ τi);  τ_uni = γ_uni ⊙ max_i(|τi| where τi agrees with γ_uni)
    mask:     M_i = (τi ⊙ τ_uni > 0)
    rescale:  λ_i = Σ|τi| / Σ|M_i ⊙ τ_uni|   (sums over every entry of the model)
    task i:   θ_i = θ0 + λ_i·M_i ⊙ τ_uni

The merge itself writes the unified model θ0 + τ_uni; the masks and the two sums per tensor
behind λ_i are side outputs (`emr_side`), which the engine stores beside the merge and adds up
over the model (engine/side_outputs/emr.py). The rescaler is the paper's: one per task, from sums over all
entries. The authors' code instead adds per-tensor means, Σ_t mean|τi,t| / Σ_t mean|M_i ⊙ τ_uni,t|,
which weighs small tensors (norms, biases) like large ones. An entry whose τi sum to exactly
zero elects no sign (sign(0) = 0, as the paper's sgn; the authors' code elects −) and joins no mask.
"""

from __future__ import annotations

import torch

from mergesmith.methods.blocks import elect_sign, task_vectors
from mergesmith.methods.registry import TensorContext, register

EMR_PAPER = ("Huang et al. 2024, EMR-Merging: tuning-free high-performance model merging "
             "(NeurIPS), arXiv:2405.17461")


def unified_task_vector(taus: list[torch.Tensor]) -> torch.Tensor:
    """τ_uni = γ_uni ⊙ max_i(|τi| where sign(τi) = γ_uni), γ_uni = sign(Σ τi)."""
    sign = elect_sign(taus)
    magnitude = torch.zeros_like(sign)
    for tau in taus:
        torch.maximum(magnitude, (tau * sign).clamp_(min=0), out=magnitude)
    return magnitude.mul_(sign)


def task_masks(taus: list[torch.Tensor], unified: torch.Tensor) -> list[torch.Tensor]:
    """M_i = (τi ⊙ τ_uni > 0): where task i points the way the unified vector does."""
    return [(tau * unified) > 0 for tau in taus]


def rescaler_sums(taus: list[torch.Tensor], unified: torch.Tensor,
                  masks: list[torch.Tensor]) -> torch.Tensor:
    """[[Σ|τi|]_i, [Σ|M_i ⊙ τ_uni|]_i] in float64: this tensor's share of λ_i's sums."""
    magnitude = unified.abs()
    return torch.tensor([
        [float(tau.abs().sum(dtype=torch.float64)) for tau in taus],
        [float(magnitude[mask].sum(dtype=torch.float64)) for mask in masks],
    ], dtype=torch.float64)


def rescalers(sums: torch.Tensor) -> list[float]:
    """λ_i = Σ|τi| / Σ|M_i ⊙ τ_uni| from the model-wide sums; 1 where the mask keeps nothing
    (then θ_i = θ0 whatever λ_i is)."""
    return [float(a / b) if b > 0 else 1.0 for a, b in zip(sums[0].tolist(), sums[1].tolist())]


def emr_side(base: torch.Tensor, experts: list[torch.Tensor],
             **_) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The masks M_i of this tensor (or rows of it) and its share of the rescalers' sums."""
    taus = task_vectors(base, experts)
    unified = unified_task_vector(taus)
    masks = task_masks(taus, unified)
    return masks, rescaler_sums(taus, unified, masks)


def task_model(base: torch.Tensor, unified_model: torch.Tensor, mask: torch.Tensor,
               rescaler: float) -> torch.Tensor:
    """θ_i = θ0 + λ_i·M_i ⊙ τ_uni, with τ_uni = (θ0 + τ_uni) − θ0 read back from the merge."""
    return (unified_model - base).mul_(mask).mul_(rescaler).add_(base)


@register(
    "emr",
    summary="Elect one unified task vector (sign of Σ τi, largest agreeing |τi|) and write it "
            "with per-task masks and rescalers; `mergesmith emr apply` rebuilds each task's model.",
    paper=EMR_PAPER,
    needs_base=True,
    params=(),
    elementwise=True,
    side=emr_side,
)
def emr(base: torch.Tensor, experts: list[torch.Tensor], *,
        ctx: TensorContext | None = None) -> torch.Tensor:
    """The unified model θ0 + τ_uni."""
    return unified_task_vector(task_vectors(base, experts)).add_(base)
