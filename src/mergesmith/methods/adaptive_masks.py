"""Masks learned from data through the merged model: Concrete subspace masks (one mask shared by
every task vector, by entropy) and Localize-and-Stitch's localize step (one sparse mask per
expert, from its labeled batches). Protocol and shared pieces: methods/adaptive.py.

Both learn one logit per entry of the model, so their state is the size of the model (Adam
keeps two more; a step holds ~13 model-sized tensors in all, measured): meant for the small
models they target, not for billions of parameters.

Where we differ from the authors' code, on purpose:
- Concrete: the final mask is each entry's most likely value, σ(s) ≥ ½; FusionBench draws one
  more sample, so two runs of the same recipe would merge differently.
- Localize: Adam on the logits, where the authors take hand-written SGD steps with a learning
  rate scaled to the model (~10⁷ for CLIP); the sparsity penalty is averaged over the model's
  entries, l1·mean σ(S) (the paper's λ‖σ(S)‖₁ with λ = l1/n), so one default fits any size; and
  the mask is binarised to exactly the top-density entries (a budget the user sets), where the
  authors round σ(S), whose kept fraction drifts with training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mergesmith.methods.adaptive import (
    Learned,
    MergeProblem,
    backward_tasks,
    batch_schedule,
    check_problem,
    device_of,
    entropy,
    masked_params,
    minimize,
    split_outputs,
)
from mergesmith.methods.blocks import kth_largest, topk_count, weighted_sum
from mergesmith.methods.curvature import stitch
from mergesmith.methods.registry import Param, register

CONCRETE_PAPER = ("Tang et al. 2023, Concrete subspace learning based interference elimination "
                  "for multi-task model fusion, arXiv:2312.06173")
LOCALIZE_PAPER = ("He et al. 2024, Localize-and-Stitch: efficient model merging via sparse "
                  "task arithmetic, arXiv:2408.13656")


# --------------------------------------------------------------------------------------------
# Concrete subspace masks


def relaxed_bernoulli(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """A binary-concrete (Gumbel-sigmoid) sample: σ((logits + log(u / (1 − u))) / T),
    u ~ U(0, 1); differentiable in the logits, a Bernoulli(σ(logits)) draw as T → 0."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device)
    return torch.sigmoid((logits + torch.logit(u, eps=1e-6)) / temperature)


def learn_concrete(problem: MergeProblem, *, lambda_: float = 0.3, temperature: float = 0.5,
                   init_logit: float = 0.0, rescale: bool = True, steps: int = 500,
                   lr: float = 1e-3, seed: int = 0) -> Learned:
    """One mask m shared by every τi, m ~ Concrete(σ(s), T), its logits s learned by minimising
    the merged model's prediction entropy over every task's unlabeled batches, where
    θ = θ0 + λ Σi (m/mean(m)) ⊙ τi (each tensor's mask rescaled to mean 1, as FusionBench).

    The final mask is each entry's most likely value, σ(s) ≥ ½; the weights λ / mean(m) per
    tensor carry the rescale into the merge, stitch's θ0 + Σi wi (m ⊙ τi).
    """
    check_problem(problem, "concrete_ta")
    device = device_of(problem)
    logits = {name: torch.full_like(theta0, init_logit, requires_grad=True)
              for name, theta0 in problem.base.items()}
    lambdas = [lambda_] * len(problem.task_vectors)
    deltas = {name: weighted_sum([tau[name] for tau in problem.task_vectors], lambdas)
              for name in problem.base}
    generator = torch.Generator(device=device).manual_seed(seed)
    schedule = batch_schedule(problem.batches, steps, seed)

    def objective(step: int) -> float:
        masks = {name: relaxed_bernoulli(s, temperature, generator) for name, s in logits.items()}
        if rescale:
            masks = {name: m / m.mean() for name, m in masks.items()}
        params = masked_params(problem.base, deltas, masks)
        return backward_tasks(problem, params, list(enumerate(schedule[step])),
                              lambda task, index, out: entropy(split_outputs(out)[0]))

    losses = minimize(list(logits.values()), objective, steps=steps, lr=lr)
    masks, weights = {}, {}
    for name, s in logits.items():
        mask = (s.detach() >= 0).cpu()
        kept = float(mask.float().mean())
        scale = (lambda_ / kept if kept > 0 else 0.0) if rescale else lambda_
        masks[name] = [mask] * len(problem.task_vectors)
        weights[name] = [scale] * len(problem.task_vectors)
    return Learned(weights=weights, masks=masks, losses=losses)


# --------------------------------------------------------------------------------------------
# Localize-and-Stitch: localize


def top_entries(scores: dict[str, Tensor], tiebreak: dict[str, Tensor],
                density: float) -> dict[str, Tensor]:
    """Masks keeping exactly k = topk_count(n, density) entries over all tensors together (n all
    their entries): the largest scores, ties at the cut broken by the larger `tiebreak`."""
    flat = torch.cat([s.detach().reshape(-1) for s in scores.values()])
    k = topk_count(flat.numel(), density)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        (cut,) = kth_largest(flat.clone(), [k])
        chosen = flat > cut
        tied = (flat == cut).nonzero().squeeze(1)
        order = torch.cat([t.detach().reshape(-1) for t in tiebreak.values()])[tied]
        chosen[tied[torch.topk(order, k - int(chosen.sum())).indices]] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


def localize(problem: MergeProblem, task: int, schedule: list[list[int]], *, density: float,
             sigmoid_bias: float, l1: float, steps: int,
             lr: float) -> tuple[dict[str, Tensor], list[float]]:
    """Expert `task`'s mask logits S = argmin CE(f(x; θ0 + σ(S) ⊙ τ), y) + l1·mean σ(S) over its
    labeled batches, from S = ±sigmoid_bias on (off) the top-density entries of |τ|."""
    tau = problem.task_vectors[task]
    magnitude = {name: t.abs() for name, t in tau.items()}
    start = top_entries(magnitude, magnitude, density)
    logits = {name: torch.where(m, sigmoid_bias, -sigmoid_bias).float().requires_grad_()
              for name, m in start.items()}
    total = sum(s.numel() for s in logits.values())

    def cross_entropy(task: int, index: int, out) -> Tensor:
        targets = problem.batches[task][index].targets
        return F.cross_entropy(split_outputs(out)[0].flatten(0, -2).float(), targets.reshape(-1))

    def objective(step: int) -> float:
        fractions = {name: torch.sigmoid(s) for name, s in logits.items()}
        params = masked_params(problem.base, tau, fractions)
        loss = backward_tasks(problem, params, [(task, schedule[step][task])], cross_entropy)
        penalty = l1 * sum(f.sum() for f in fractions.values()) / total
        penalty.backward()
        return loss + float(penalty.detach())

    losses = minimize(list(logits.values()), objective, steps=steps, lr=lr)
    return logits, losses


def learn_localize(problem: MergeProblem, *, density: float = 0.01, sigmoid_bias: float = 3.0,
                   l1: float = 1.0, steps: int = 100, lr: float = 0.1, seed: int = 0) -> Learned:
    """Per expert, the localize step's sparse mask: its learned logits, binarised to exactly the
    top-density fraction of the model's entries (ties by |τi|). Losses: expert 0's steps, then
    expert 1's, ..."""
    check_problem(problem, "localize_stitch", needs_targets=True)
    schedule = batch_schedule(problem.batches, steps, seed)
    masks: dict[str, list[Tensor]] = {name: [] for name in problem.base}
    losses: list[float] = []
    for task, tau in enumerate(problem.task_vectors):
        logits, task_losses = localize(problem, task, schedule, density=density,
                                       sigmoid_bias=sigmoid_bias, l1=l1, steps=steps, lr=lr)
        chosen = top_entries(logits, {name: t.abs() for name, t in tau.items()}, density)
        for name, mask in chosen.items():
            masks[name].append(mask.cpu())
        losses += task_losses
    return Learned(masks=masks, losses=losses)


# --------------------------------------------------------------------------------------------
# registration: the merge after learning is stitch (methods/curvature.py), the learned masks
# reaching it as the "mask" statistic: the masked τi summed with the learned weights (concrete),
# or averaged where masks overlap (localize)

SEED = Param("seed", int, default=0, doc="order of the calibration batches (and any noise)")


register(
    "concrete_ta",
    summary="Learn one mask over the task vectors' entries (a Concrete relaxation, by entropy on "
            "unlabeled inputs), then task arithmetic on the masked task vectors.",
    paper=CONCRETE_PAPER,
    needs_base=True,
    params=(
        Param("lambda", default=0.3, arg="lambda_", doc="scale of every task vector"),
        Param("temperature", default=0.5, minimum=1e-6, doc="Concrete temperature T"),
        Param("init_logit", default=0.0, doc="mask logits at the start (0: keep probability ½)"),
        Param("rescale", bool, default=True, doc="divide each tensor's mask by its mean"),
        Param("steps", int, default=500, minimum=0, doc="optimizer steps"),
        Param("lr", default=1e-3, minimum=0.0, doc="Adam's learning rate"),
        SEED,
    ),
    statistics=("mask",),
    learn=learn_concrete,
)(stitch)


register(
    "localize_stitch",
    summary="Localize each expert's skill in a sparse mask learned on its labeled data, then "
            "stitch the masked task vectors (averaged where masks overlap).",
    paper=LOCALIZE_PAPER,
    needs_base=True,
    params=(
        Param("density", default=0.01, minimum=0.0, maximum=1.0,
              doc="fraction of the model's entries each expert's mask keeps"),
        Param("sigmoid_bias", default=3.0, minimum=0.0,
              doc="mask logits start at ± this on (off) the top-density |τi|"),
        Param("l1", default=1.0, minimum=0.0, doc="weight of the sparsity penalty mean σ(S)"),
        Param("steps", int, default=100, minimum=0, doc="optimizer steps per expert"),
        Param("lr", default=0.1, minimum=0.0, doc="Adam's learning rate"),
        SEED,
    ),
    statistics=("mask",),
    learn=learn_localize,
)(stitch)
