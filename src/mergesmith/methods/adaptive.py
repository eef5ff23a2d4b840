"""Merges learned from data through the merged model: AdaMerging and Expert Merging learn
coefficients; Concrete masks and Localize-and-Stitch learn masks (methods/adaptive_masks.py).
This module holds their protocol and the pieces all four share.

    θ(λ, m) = θ0 + Σi λi (m ⊙ τi),     τi = θi − θ0

A method learns λ (per expert, and per tensor or block) or masks m by forward passes through
θ(λ, m) on calibration batches; the merge itself is then a registered per-tensor function (task
arithmetic, stitch, ...). Both steps stay pure: the pipeline (calibrate/) builds a `MergeProblem`
from model folders and data, calls the method's `learn(problem, **params)` with the recipe's
parameters, then merges each tensor with `spec.fn(base, experts, ctx=ctx,
**learned.for_tensor(name))`: only the learned keywords reach `fn`, the recipe's parameters are
the learn step's.

Memory: each step builds one merged copy of the model, differentiable in λ (and m) only: θ0 and
the τi are constants, so autograd keeps references to them, not copies. Each task's loss is
back-propagated before the next task's forward, so one task's activations are alive at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mergesmith.errors import MethodError
from mergesmith.methods.linear import task_arithmetic
from mergesmith.methods.registry import Param, register

ADAMERGING_PAPER = ("Yang et al. 2024, AdaMerging: adaptive model merging for multi-task "
                    "learning (ICLR), arXiv:2310.02575")
EXPERT_MERGING_PAPER = ("Zhang et al. 2025, Expert Merging: model merging with unsupervised "
                        "expert alignment and importance-guided layer chunking, arXiv:2509.25712")


# --------------------------------------------------------------------------------------------
# the protocol


@dataclass
class Batch:
    inputs: Any  # opaque here: handed back to `forward`
    targets: Tensor | None = None  # [n] class ids of the rows `forward` returns, when known


@dataclass
class MergeProblem:
    base: dict[str, Tensor]  # θ0, fp32, the tensors to merge (float tensors only)
    task_vectors: list[dict[str, Tensor]]  # τi = θi − θ0, same keys
    layer_of: dict[str, int | None]  # block index of each tensor (None: embeddings, final norm)
    # (params, task index, batch.inputs) -> logits [n, C], or (logits, [hidden states]) where
    # the model exposes them cheaply (Expert Merging aligns those too)
    forward: Callable[[dict[str, Tensor], int, Any], Any]
    batches: list[list[Batch]]  # per task i: its calibration batches


@dataclass
class Learned:
    weights: dict[str, list[float]] | None = None  # tensor -> λi per expert: θ = θ0 + Σ λi τi
    masks: dict[str, list[Tensor]] | None = None  # tensor -> bool mask per expert
    losses: list[float] = field(default_factory=list)  # objective per step
    # tensor -> float tensor per expert, its shape, stored as the "coefficient" statistic for
    # `method`, the per-tensor merge that applies them (DAM's dam_fold)
    coefficients: dict[str, list[Tensor]] | None = None
    method: str | None = None

    def for_tensor(self, name: str) -> dict[str, Any]:
        """The keywords of the method's per-tensor merge for this tensor: task arithmetic's
        weights; with masks, stitch's, which sums the masked τi (learned weights) or averages
        them where masks overlap (masks alone, weights 1): as calibrate/'s resolved recipe."""
        if self.coefficients is not None:
            return {"coefficient": self.coefficients.get(name)}
        if self.masks is None:
            return {"weights": self.weights[name]}
        count = len(self.masks[name])
        weights = self.weights[name] if self.weights is not None else [1.0] * count
        return {"weights": weights, "mask": self.masks[name],
                "overlap": "sum" if self.weights is not None else "average"}


def check_problem(problem: MergeProblem, method: str, *, needs_targets: bool = False) -> None:
    """Fail before any forward pass when the problem's pieces do not fit together."""
    count = len(problem.task_vectors)
    if count == 0:
        raise MethodError(f"{method}: no experts to merge",
                          hint="give at least one fine-tuned model")
    if len(problem.batches) != count:
        raise MethodError(f"{method}: {len(problem.batches)} tasks of calibration batches for "
                          f"{count} experts",
                          hint="give each expert its own task's batches, in order")
    for name, theta0 in problem.base.items():
        if not theta0.is_floating_point():
            raise MethodError(f"{method}: tensor {name!r} is {theta0.dtype}, not a float",
                              hint="leave integer buffers out of the merge problem")
    for i, tau in enumerate(problem.task_vectors):
        for name in problem.base.keys() - tau.keys():
            raise MethodError(f"{method}: expert {i} has no task vector for tensor {name!r}",
                              hint="every expert needs every merged tensor")
        for name, theta0 in problem.base.items():
            if tau[name].shape != theta0.shape:
                raise MethodError(f"{method}: tensor {name!r} of expert {i} has shape "
                                  f"{list(tau[name].shape)}, the base {list(theta0.shape)}")
    for i, batches in enumerate(problem.batches):
        if not batches:
            raise MethodError(f"{method}: task {i} has no calibration batches",
                              hint="raise the calibration samples")
        if needs_targets and any(batch.targets is None for batch in batches):
            raise MethodError(f"{method}: task {i} has calibration batches without labels",
                              hint="set the calibration's label_field")


# --------------------------------------------------------------------------------------------
# shared pieces


def coefficient_rows(problem: MergeProblem, granularity: str) -> tuple[dict[str, int], int]:
    """Which row of λ (one λ per expert in each row) each tensor uses, and how many rows.

    "task": one row for the whole model. "layer": one row per tensor, as the AdaMerging
    authors' layer-wise code (and FusionBench's), where every parameter tensor is a "layer".
    "block": one row per block of `layer_of`; a tensor outside the blocks gets its own row.
    """
    if granularity not in ("task", "layer", "block"):
        raise MethodError(f"unknown granularity {granularity!r}", hint="use task, layer or block")
    groups: dict[Any, int] = {}
    rows = {}
    for name in problem.base:
        layer = problem.layer_of.get(name)
        group = (0 if granularity == "task" else
                 ("block", layer) if granularity == "block" and layer is not None else name)
        rows[name] = groups.setdefault(group, len(groups))
    return rows, len(groups)


class WeightedTaskSum(torch.autograd.Function):
    """θ = θ0 + Σi λi τi for constant θ0 and τi, differentiable in λ: ∂L/∂λi = ⟨∂L/∂θ, τi⟩.

    One output buffer in the forward and one dot product per τi in the backward, where
    autograd's own graph would hold each λi τi and each ∂L/∂θ ⊙ τi as a tensor-sized temporary.
    """

    @staticmethod
    def forward(ctx, lambdas: Tensor, base: Tensor, *taus: Tensor) -> Tensor:
        ctx.save_for_backward(*taus)  # references to the constants, not copies
        merged = base.clone()
        for lam, tau in zip(lambdas.tolist(), taus):
            merged.add_(tau, alpha=lam)
        return merged

    @staticmethod
    def backward(ctx, grad: Tensor):
        taus = ctx.saved_tensors
        flat = grad.reshape(-1)
        dots = torch.stack([torch.dot(flat, tau.reshape(-1)) for tau in taus])
        return (dots.to(torch.float64), None, *([None] * len(taus)))


def merged_params(base: dict[str, Tensor], taus: list[dict[str, Tensor]],
                  lambdas_of: Callable[[str], Tensor]) -> dict[str, Tensor]:
    """θ = θ0 + Σi λi τi per tensor, λ = lambdas_of(name) (float64, one per expert)."""
    return {name: WeightedTaskSum.apply(lambdas_of(name), theta0, *(tau[name] for tau in taus))
            for name, theta0 in base.items()}


def masked_params(base: dict[str, Tensor], deltas: dict[str, Tensor],
                  masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """θ = θ0 + m ⊙ δ per tensor, for a constant δ (Σi λi τi with fixed λ) and learned masks."""
    return {name: theta0 + masks[name] * deltas[name] for name, theta0 in base.items()}


def batch_schedule(batches: list[list[Batch]], steps: int, seed: int) -> list[list[int]]:
    """[step][task] -> index of the task's batch for that step: each task walks through its
    batches in a fresh random order per pass, drawn from `seed` alone."""
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for task_batches in batches:
        order: list[int] = []
        while len(order) < steps:
            order += torch.randperm(len(task_batches), generator=generator).tolist()
        orders.append(order[:steps])
    return [list(column) for column in zip(*orders)] if steps else []


def split_outputs(output: Any) -> tuple[Tensor, list[Tensor]]:
    """(logits, hidden states) from what `forward` returned: logits alone, or both."""
    if isinstance(output, (tuple, list)):
        logits, hidden = output
        return logits, list(hidden)
    return output, []


def entropy(logits: Tensor) -> Tensor:
    """H(p) = −Σc p_c log p_c with p = softmax(logits), averaged over the rows."""
    log_p = F.log_softmax(logits.flatten(0, -2).float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def backward_tasks(problem: MergeProblem, params: dict[str, Tensor],
                   work: list[tuple[int, int]],
                   loss: Callable[[int, int, Any], Tensor]) -> float:
    """Back-propagate the mean over `work`, pairs (task, batch index), of loss(task, index,
    forward output), one task at a time (its activations are freed before the next forward);
    the mean's value."""
    total = 0.0
    for task, index in work:
        output = problem.forward(params, task, problem.batches[task][index].inputs)
        value = loss(task, index, output) / len(work)
        value.backward(retain_graph=True)  # the merged params' graph serves every task
        total += float(value.detach())
        del output, value  # this task's activations go before the next task's forward
    return total


def minimize(variables: list[Tensor], objective: Callable[[int], float], *, steps: int,
             lr: float, project: Callable[[], Any] | None = None) -> list[float]:
    """Adam on `variables`; objective(step) back-propagates and returns the loss; `project`
    (clamping into bounds) runs after every step. The loss of each step, before its update."""
    optimizer = torch.optim.Adam(variables, lr=lr)
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        losses.append(objective(step))
        optimizer.step()
        if project is not None:
            with torch.no_grad():
                project()
    return losses


def weights_by_tensor(lambdas: Tensor, rows: dict[str, int]) -> dict[str, list[float]]:
    table = lambdas.detach().cpu().tolist()
    return {name: table[row] for name, row in rows.items()}


def device_of(problem: MergeProblem) -> torch.device:
    return next(iter(problem.base.values())).device


# --------------------------------------------------------------------------------------------
# AdaMerging


def learn_adamerging(problem: MergeProblem, *, granularity: str = "layer", init: float = 0.3,
                     lower: float = 0.0, upper: float = 1.0, steps: int = 500, lr: float = 1e-3,
                     seed: int = 0) -> Learned:
    """λ = argmin over the tasks' unlabeled batches of the mean prediction entropy
    H(softmax(f(x; θ0 + Σi λi τi))), task-wise or layer-wise, by Adam from λ = init, with λ
    clamped into [lower, upper] after every step. Each step takes one batch of every task and
    averages their entropies (the paper sums them; Adam's steps hardly depend on the scale)."""
    check_problem(problem, "adamerging")
    if not lower <= init <= upper:
        raise MethodError(f"adamerging: {bounds_error(init, lower, upper)}")
    rows, count = coefficient_rows(problem, granularity)
    # float64, so that clamping holds the bounds exactly (0.6 in float32 is above 0.6)
    lambdas = torch.full((count, len(problem.task_vectors)), float(init), dtype=torch.float64,
                         device=device_of(problem), requires_grad=True)
    schedule = batch_schedule(problem.batches, steps, seed)

    def objective(step: int) -> float:
        params = merged_params(problem.base, problem.task_vectors, lambda name: lambdas[rows[name]])
        return backward_tasks(problem, params, list(enumerate(schedule[step])),
                              lambda task, index, out: entropy(split_outputs(out)[0]))

    losses = minimize([lambdas], objective, steps=steps, lr=lr,
                      project=lambda: lambdas.clamp_(lower, upper))
    return Learned(weights=weights_by_tensor(lambdas, rows), losses=losses)


def bounds_error(init: float, lower: float, upper: float) -> str:
    return f"init {init} must lie in [min, max] = [{lower}, {upper}]"


def check_bounds(params: dict[str, Any]) -> None:
    """Plan-time check of a recipe's adamerging parameters."""
    if not params["lower"] <= params["init"] <= params["upper"]:
        raise ValueError(bounds_error(params["init"], params["lower"], params["upper"]))


# --------------------------------------------------------------------------------------------
# Expert Merging


def alignment(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the rows: the authors'
    soft-target cross-entropy less the teacher's entropy (a constant), so 0 when aligned."""
    s = F.log_softmax(student.flatten(0, -2).float() / temperature, dim=-1)
    t = F.log_softmax(teacher.flatten(0, -2).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_alignment(student: list[Tensor], teacher: list[Tensor]) -> Tensor | float:
    """Mean over the exposed layers of the MSE between hidden states."""
    if not student:
        return 0.0
    return sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)) / len(student)


@torch.no_grad()
def expert_outputs(problem: MergeProblem) -> list[list[tuple[Tensor, list[Tensor]]]]:
    """Each expert θi = θ0 + τi on each of its own task's batches: the targets of alignment.
    One expert's copy of the model exists at a time."""
    outputs = []
    for task, tau in enumerate(problem.task_vectors):
        expert = {name: theta0 + tau[name] for name, theta0 in problem.base.items()}
        outputs.append([split_outputs(problem.forward(expert, task, batch.inputs))
                        for batch in problem.batches[task]])
        del expert
    return outputs


def learn_expert_merging(problem: MergeProblem, *, granularity: str = "layer",
                         init: float = 0.1, temperature: float = 1.0, hidden_weight: float = 0.1,
                         hidden_layers: str = "middle", regularization: float = 0.1,
                         steps: int = 100, lr: float = 1e-2, seed: int = 0) -> Learned:
    """λ = σ(w) ∈ (0, 1) (the authors' sigmoid) minimising, over each task k's unlabeled batches,
    T²·KL(p_k ‖ p_merged) + hidden_weight·MSE(h_merged, h_k) + regularization·Σ|λ − init| / rows:
    the merged model's outputs pulled toward expert k's on expert k's inputs. The hidden states
    aligned are the middle block's output (the paper's example subset S), or every block's."""
    check_problem(problem, "expert_merging")
    if not 0 < init < 1:
        raise MethodError(f"expert_merging: init must lie strictly between 0 and 1, got {init}")
    rows, count = coefficient_rows(problem, granularity)
    raw = torch.full((count, len(problem.task_vectors)), math.log(init / (1 - init)),
                     dtype=torch.float64, device=device_of(problem), requires_grad=True)
    def chosen(hidden: list[Tensor]) -> list[Tensor]:
        return hidden[len(hidden) // 2:len(hidden) // 2 + 1] if hidden_layers == "middle" else hidden

    targets = [[(logits, chosen(hidden)) for logits, hidden in task]
               for task in expert_outputs(problem)]
    schedule = batch_schedule(problem.batches, steps, seed)

    def align(task: int, index: int, out: Any) -> Tensor:
        logits, hidden = split_outputs(out)
        teacher_logits, teacher_hidden = targets[task][index]
        return (alignment(logits, teacher_logits, temperature)
                + hidden_weight * hidden_alignment(chosen(hidden), teacher_hidden))

    def objective(step: int) -> float:
        lambdas = torch.sigmoid(raw)
        params = merged_params(problem.base, problem.task_vectors, lambda name: lambdas[rows[name]])
        total = backward_tasks(problem, params, list(enumerate(schedule[step])), align)
        penalty = regularization * (lambdas - init).abs().sum() / count
        penalty.backward()
        return total + float(penalty.detach())

    losses = minimize([raw], objective, steps=steps, lr=lr)
    return Learned(weights=weights_by_tensor(torch.sigmoid(raw), rows), losses=losses)


# --------------------------------------------------------------------------------------------
# registration: the merge after learning is task arithmetic with the learned per-tensor λ

GRANULARITY = Param("granularity", str, default="layer", choices=("task", "layer", "block"),
                    doc="one λ per expert for the model (task), per tensor (layer) or per block")
STEPS = Param("steps", int, default=500, minimum=0, doc="optimizer steps")
SEED = Param("seed", int, default=0, doc="order of the calibration batches (and any noise)")


def learning_rate(default: float) -> Param:
    return Param("lr", default=default, minimum=0.0, doc="Adam's learning rate")


register(
    "adamerging",
    summary="Learn task-wise or layer-wise task-arithmetic coefficients by minimising the "
            "entropy of the merged model's predictions on unlabeled inputs.",
    paper=ADAMERGING_PAPER,
    needs_base=True,
    params=(
        GRANULARITY,
        Param("init", default=0.3, doc="λ at the start (the paper's 0.3)"),
        Param("min", default=0.0, arg="lower", doc="λ is clamped to at least this"),
        Param("max", default=1.0, arg="upper", doc="λ is clamped to at most this"),
        STEPS,
        learning_rate(1e-3),
        SEED,
    ),
    validate=check_bounds,
    learn=learn_adamerging,
)(task_arithmetic)

register(
    "expert_merging",
    summary="Learn layer-wise task-arithmetic coefficients that align the merged model's "
            "outputs with each expert's on that expert's unlabeled inputs.",
    paper=EXPERT_MERGING_PAPER,
    needs_base=True,
    params=(
        GRANULARITY,
        Param("init", default=0.1, minimum=0.0, maximum=1.0,
              doc="λ at the start, in (0, 1) (the authors' 0.1)"),
        Param("temperature", default=1.0, minimum=1e-6, doc="softmax temperature T of alignment"),
        Param("hidden_weight", default=0.1, minimum=0.0,
              doc="weight of the MSE between hidden states (real tokens)"),
        Param("hidden_layers", str, default="middle", choices=("middle", "all"),
              doc="the blocks whose output hidden states are aligned"),
        Param("regularization", default=0.1, minimum=0.0,
              doc="weight of the mean |λ − init| penalty"),
        Param("steps", int, default=100, minimum=0, doc="optimizer steps"),
        learning_rate(1e-2),
        SEED,
    ),
    learn=learn_expert_merging,
)(task_arithmetic)
