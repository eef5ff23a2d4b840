"""DAM: Differentiable Adaptive Merging (Arcee), read from the authors' code (arcee-ai/DAM,
dam/modeling/dam.py, dam/custom_trainer/dam_trainer.py, dam/merge.py). Not the backdoor
defense of the same acronym (arXiv:2410.13910), which is not implemented here.

Every merged tensor is a sum of the full models' tensors, each scaled by a learned vector:

    W = Σi f(ci) ⊙ Wi,     f = tanh (or sigmoid, relu, none)

ci has one entry per input column of a Linear weight [out, in] (broadcast over the rows), per
embedding dimension of an embedding [vocab, dim], per entry of a norm weight, and one scalar for
a bias. The code starts every ci at 1/N (so the start is tanh(1/N) Σ Wi, not the average);
`init: average` starts at f⁻¹(1/N), the uniform average (ours). Only the c's train, by

    Σi T²·KL(softmax(zi/T) ‖ softmax(z/T)) on model i's samples   (T = 2)
    + similarity · Σ_tensors mean_{i<j} cos(ci, cj)  (0.01, raw c's, not the biases' scalars)
    + l1 · Σ ‖ci‖₁ + l2 · Σ ‖ci‖₂                   (the code's 1e-6 each, off by default)

with Adam (the code: AdamW/MoFO, lr 1e-3). The code's embedding and norm coefficients stay at
their start unless asked (`train_embeddings`, `train_norms`), as here.

Where we differ on purpose: the KL is averaged over the real tokens (the code divides the
batch's token sum by the batch size and again by the token count); biases start like the
weights (the code starts their scalar at 1, which sums the biases); the base model cannot be
one of the merged models (the code's --use_base_model); a tensor the module does not read keeps
the base's value (the code takes everything it does not wrap from the base model too).

The merge after learning is `dam_fold`: θ = Σi ai ⊙ θi with the learned ai = f(ci), stored per
expert beside the recipe as the "coefficient" statistic, the shape of the tensor.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mergesmith.io.tensor_names import is_before_layers
from mergesmith.errors import MethodError
from mergesmith.methods.adaptive import (
    Learned,
    MergeProblem,
    alignment,
    backward_tasks,
    batch_schedule,
    check_problem,
    device_of,
    expert_outputs,
    minimize,
    split_outputs,
)
from mergesmith.methods.registry import Param, TensorContext, register

DAM_PAPER = ("Gauthier-Caron et al. 2024, Merging in a Bottle: Differentiable Adaptive Merging "
             "(DAM) and the Path from Averaging to Automation (Arcee), code arcee-ai/DAM")
NONLINEARITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "none": lambda c: c}
INVERSES: dict[str, Callable[[float], float]] = {
    "tanh": math.atanh, "sigmoid": lambda a: math.log(a / (1 - a)), "relu": lambda a: a,
    "none": lambda a: a}


def is_bias(name: str, tensor: Tensor) -> bool:
    return tensor.ndim == 1 and name.endswith("bias")


def coefficient_shape(name: str, tensor: Tensor) -> tuple[int, ...]:
    """The shape of ci, broadcast against the tensor: its last dimension (a Linear's inputs, an
    embedding's dimensions), every entry of a norm weight, one scalar for a bias."""
    if tensor.ndim >= 2:
        return (tensor.shape[-1],)
    if tensor.ndim == 0 or is_bias(name, tensor):
        return (1,) if tensor.ndim else ()
    return tuple(tensor.shape)


def trains(name: str, tensor: Tensor, *, train_embeddings: bool, train_norms: bool) -> bool:
    """Linear weights and biases always; embeddings and norms when asked (the code's flags)."""
    if tensor.ndim >= 2 and is_before_layers(name):
        return train_embeddings
    if tensor.ndim == 1 and not is_bias(name, tensor):
        return train_norms
    return True


def start_value(count: int, init: str, non_linearity: str) -> float:
    """The code's c = 1/N, or f⁻¹(1/N) so that Σi f(ci) Wi starts at the average."""
    if init == "code":
        return 1.0 / count
    if non_linearity in ("tanh", "sigmoid") and count == 1:
        raise MethodError(f"dam: init average needs {non_linearity}(c) = 1 for one model, which "
                          "no c gives", hint="use init: code, or non_linearity none or relu")
    return INVERSES[non_linearity](1.0 / count)


def folded(problem: MergeProblem, scales: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """Σi ai ⊙ (θ0 + τi) = (Σi ai) ⊙ θ0 + Σi ai ⊙ τi per tensor: no expert built whole."""
    out = {}
    for name, theta0 in problem.base.items():
        a = scales[name]
        out[name] = sum(a) * theta0 + sum(ai * tau[name] for ai, tau in zip(a, problem.task_vectors))
    return out


def similarity(coefficients: dict[str, list[Tensor]], names: list[str]) -> Tensor | float:
    """Σ over tensors of the mean pairwise cosine of the raw c's (vectors only)."""
    total: Tensor | float = 0.0
    for name in names:
        pairs = list(itertools.combinations(coefficients[name], 2))
        if pairs and coefficients[name][0].numel() > 1:
            total = total + torch.stack([F.cosine_similarity(a, b, dim=0) for a, b in pairs]).mean()
    return total


def learn_dam(problem: MergeProblem, *, non_linearity: str = "tanh", init: str = "code",
              temperature: float = 2.0, similarity_weight: float = 0.01, l1: float = 0.0,
              l2: float = 0.0, train_embeddings: bool = False, train_norms: bool = False,
              steps: int = 100, lr: float = 1e-3, seed: int = 0) -> Learned:
    """The c's minimising the KL of the merged model to each model on that model's batches,
    plus the code's regularisers (see the module's docstring)."""
    check_problem(problem, "dam")
    if non_linearity not in NONLINEARITIES:
        raise MethodError(f"dam: unknown non_linearity {non_linearity!r}",
                          hint=f"use one of {', '.join(NONLINEARITIES)}")
    f = NONLINEARITIES[non_linearity]
    count = len(problem.task_vectors)
    start = start_value(count, init, non_linearity)
    device = device_of(problem)
    coefficients = {name: [torch.full(coefficient_shape(name, t), start, device=device)
                           for _ in range(count)] for name, t in problem.base.items()}
    trained = [name for name, t in problem.base.items()
               if trains(name, t, train_embeddings=train_embeddings, train_norms=train_norms)]
    for name in trained:
        for c in coefficients[name]:
            c.requires_grad_(True)
    targets = [[logits for logits, _ in task] for task in expert_outputs(problem)]
    schedule = batch_schedule(problem.batches, steps, seed)

    def kl(task: int, index: int, out: Any) -> Tensor:
        # backward_tasks averages over the tasks; the code sums them
        return count * alignment(split_outputs(out)[0], targets[task][index], temperature)

    def objective(step: int) -> float:
        params = folded(problem, {n: [f(c) for c in cs] for n, cs in coefficients.items()})
        total = backward_tasks(problem, params, list(enumerate(schedule[step])), kl)
        trainable = [c for name in trained for c in coefficients[name]]
        penalty = (similarity_weight * similarity(coefficients, trained)
                   + sum(l1 * c.abs().sum() + l2 * c.norm() for c in trainable))
        if isinstance(penalty, Tensor) and penalty.requires_grad:
            penalty.backward()
        return total + float(penalty.detach() if isinstance(penalty, Tensor) else penalty)

    variables = [c for name in trained for c in coefficients[name]]
    losses = minimize(variables, objective, steps=steps, lr=lr) if variables else []
    scales = {name: [f(c.detach()).expand(problem.base[name].shape).contiguous().cpu() for c in cs]
              for name, cs in coefficients.items()}
    return Learned(coefficients=scales, method="dam_fold", losses=losses)


@register(
    "dam_fold",
    summary="θ = Σi ai ⊙ θi with stored per-entry coefficients, what dam learns (run dam); "
            "a tensor without them keeps the base's.",
    paper=DAM_PAPER,
    needs_base=True,
    params=(Param("weight", default=1.0, per_model=True, arg="weights",
                  doc="a factor on the model's coefficients (1: as learned)"),),
    statistics=("coefficient",),
    optional_statistics=True,
)
def dam_fold(base: Tensor, experts: list[Tensor], *, weights: list[float] | None = None,
             coefficient: list[Tensor] | None = None, ctx: TensorContext | None = None) -> Tensor:
    """Σi wi ai ⊙ θi; a tensor the learning did not see (the module does not read it) is the
    base's, as the code takes from the base model everything it does not wrap."""
    if coefficient is None:
        return base.clone()
    weights = weights if weights is not None else [1.0] * len(experts)
    return sum(w * a * x for w, a, x in zip(weights, coefficient, experts))


# the merge after learning applies the learned coefficients: dam_fold, with the recipe's
# parameters the learn step's
register(
    "dam",
    summary="Differentiable Adaptive Merging (Arcee): per-column coefficients of each full model, "
            "learned so that the merge's logits match each model's on that model's data.",
    paper=DAM_PAPER,
    needs_base=True,
    params=(
        Param("non_linearity", str, default="tanh", choices=tuple(NONLINEARITIES),
              doc="f applied to the coefficients (the code's layers: tanh; its CLI: none)"),
        Param("init", str, default="code", choices=("code", "average"),
              doc="c = 1/N (code) or f⁻¹(1/N), the uniform average (ours)"),
        Param("temperature", default=2.0, minimum=1e-6, doc="softmax temperature T of the KL"),
        Param("similarity", default=0.01, minimum=0.0, arg="similarity_weight",
              doc="weight of the mean pairwise cosine of the coefficients"),
        Param("l1", default=0.0, minimum=0.0, doc="weight of Σ‖c‖₁ (the code's 1e-6 when on)"),
        Param("l2", default=0.0, minimum=0.0, doc="weight of Σ‖c‖₂ (the code's 1e-6 when on)"),
        Param("train_embeddings", bool, default=False, doc="learn the embeddings' coefficients"),
        Param("train_norms", bool, default=False, doc="learn the norm weights' coefficients"),
        Param("steps", int, default=100, minimum=0, doc="optimizer steps"),
        Param("lr", default=1e-3, minimum=0.0, doc="Adam's learning rate"),
        Param("seed", int, default=0, doc="order of the calibration batches"),
    ),
    statistics=("coefficient",),
    learn=learn_dam,
)(dam_fold)
