"""Task negation (Ilharco et al., arXiv 2212.04089): θ = θ_target − λ·(θ_forget − θ0). As a merge it
is task_arithmetic with a negative weight; `mergesmith negate` (search/negation.py) sweeps λ and
chooses it by a floor on control tasks."""

from __future__ import annotations

from torch import Tensor

from mergesmith.methods.registry import register_operation

register_operation(
    "ta_negation", command="mergesmith negate FORGET OUT --base BASE --forget-task T --control-task T "
                           "(or task_arithmetic with a negative weight)",
    summary="forget a skill: θ_target − λτ_f, λ the largest keeping every control task at 95% of "
            "the original's score; a report of what the forget tasks lose and the controls keep",
    paper="Editing Models with Task Arithmetic, Ilharco et al. 2023 (arXiv 2212.04089)",
    needs="base, the base fine-tuned on what to remove, forget and control tasks")


def negated(target: Tensor, base: Tensor, forget: Tensor, lam: float) -> Tensor:
    """θ_target − λ(θ_forget − θ0), one tensor."""
    return target - lam * (forget - base)
