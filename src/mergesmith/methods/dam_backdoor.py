"""Defense-Aware Merging against backdoors (Yang et al., ICLR 2025, arXiv:2410.13910), read from the
authors' code (Yangjinluan/DAM, fusion_bench/method/concrete_subspace/
clip_safe_concrete_adamerging.py, task-wise; config clip_safe_concrete_*.yaml). Not Arcee's DAM
(methods/dam.py).

One Concrete mask m (logits ℓ, shared by every task vector) and task-wise λ, on unlabeled data:

    θ(ℓ, λ) = θ0 + Σi λi (m/mean(m)) ⊙ τi,       m ~ Concrete(σ(ℓ), T), mean per tensor

Each step: (1) λ restarts at its initial value and takes one Adam step (lr `base_lr`, the
optimizer's state kept across steps) on the merged model's prediction entropy, the mask held
fixed; (2) one Adam step (lr `adv_lr`) on a universal trigger δt per task, raising the
cross-entropy of the merged model's predictions on x + δt against its own predictions on x
(a backdoor-like shortcut the merge still carries); (3) one Adam step (lr `lr`) on ℓ for
H(f(x)) + adv_weight·H(f(x + δt)): entropy on clean and on triggered inputs, so entries that
make the trigger work are dropped. After the steps a final mask is drawn, rescaled, and λ is
learned again by AdaMerging (`adamerging_steps`, `adamerging_lr`) with the mask fixed.

Ours, where the code cannot be followed:
- the code's trigger is an image perturbation (3×224×224 pixels, clamped to [0, 1]); here δt is a
  vector added to every token's input embedding (the row-wise offset of the input-embedding
  tensor, whose effect on a tied output head cancels in the softmax), with no clamp;
- the final mask is binary: a seeded Bernoulli(σ(ℓ)) draw (FusionBench's `discrete`) or
  σ(ℓ) > ½; the authors' default draws one continuous Concrete sample, which they expect to
  perform alike;
- the tasks' losses are averaged where the code sums them (Adam's steps barely depend on it);
  the losses recorded are the mask steps', then the final AdaMerging's.

The merge after learning is stitch: θ0 + Σi wi (m ⊙ τi) with wi = λi / mean(m) per tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mergesmith.io.tensor_names import INPUT_EMBEDDINGS
from mergesmith.errors import MethodError
from mergesmith.methods.adaptive import (
    Learned,
    MergeProblem,
    backward_tasks,
    batch_schedule,
    check_problem,
    device_of,
    entropy,
    minimize,
    split_outputs,
)
from mergesmith.methods.adaptive_masks import relaxed_bernoulli
from mergesmith.methods.curvature import stitch
from mergesmith.methods.registry import Param, register
from mergesmith.methods.somf import EXPORTS, export_mask, rescaled

DAM_BACKDOOR_PAPER = ("Yang et al. 2025, Mitigating the backdoor effect for multi-task model merging "
                      "via safety-aware subspace (ICLR), arXiv:2410.13910")


def input_embedding(problem: MergeProblem) -> str:
    """The tensor whose rows are the tokens' input embeddings: where the trigger is added."""
    found = [name for name in problem.base if INPUT_EMBEDDINGS.search(name)]
    if not found:
        raise MethodError("dam_backdoor: the model has no input-embedding tensor to add the trigger to",
                          hint="its trigger is a vector added to every token's input embedding "
                               "(embed_tokens / word_embeddings / wte)")
    return found[0]


def merged(problem: MergeProblem, lambdas: Tensor, masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """θ0 + m ⊙ Σi λi τi per tensor (one mask shared by every τi)."""
    return {name: theta0 + masks[name] * sum(lam.to(theta0.dtype) * tau[name]
                                             for lam, tau in zip(lambdas, problem.task_vectors))
            for name, theta0 in problem.base.items()}


def triggered(params: dict[str, Tensor], embedding: str, trigger: Tensor) -> dict[str, Tensor]:
    """The same model with `trigger` added to every token's input embedding."""
    return {**params, embedding: params[embedding] + trigger}


def entropies(problem, params, work, embedding, triggers, adv_weight) -> Any:
    def loss(task: int, index: int, out: Any) -> Tensor:
        x = problem.batches[task][index].inputs
        adv = problem.forward(triggered(params, embedding, triggers[task]), task, x)
        return entropy(split_outputs(out)[0]) + adv_weight * entropy(split_outputs(adv)[0])
    return backward_tasks(problem, params, work, loss)


def trigger_step(problem: MergeProblem, params: dict[str, Tensor], work, embedding: str,
                 triggers: Tensor) -> None:
    """Gradient of −CE(f(x + δt), argmax f(x)) for δ, on the merge held fixed."""
    frozen = {name: p.detach() for name, p in params.items()}
    for task, index in work:
        x = problem.batches[task][index].inputs
        with torch.no_grad():
            labels = split_outputs(problem.forward(frozen, task, x))[0].flatten(0, -2).argmax(-1)
        adv = split_outputs(problem.forward(triggered(frozen, embedding, triggers[task]), task, x))[0]
        (-F.cross_entropy(adv.flatten(0, -2).float(), labels) / len(work)).backward()


def learn_dam_backdoor(problem: MergeProblem, *, lambda_: float = 0.3, temperature: float = 0.5,
                       init_logit: float = 0.0, adv_weight: float = 0.1, adv_lr: float = 1e-4,
                       base_lr: float = 1.0, lr: float = 1e-3, steps: int = 100,
                       adamerging_steps: int = 100, adamerging_lr: float = 1e-3,
                       export: str = "sample", seed: int = 0) -> Learned:
    """The mask, the triggers and λ learned as the module's docstring says; the final binary mask
    and the AdaMerging λ as stitch's masks and weights."""
    check_problem(problem, "dam_backdoor")
    if export not in EXPORTS:
        raise MethodError(f"dam_backdoor: unknown export {export!r}", hint="use sample or threshold")
    embedding = input_embedding(problem)
    device, count = device_of(problem), len(problem.task_vectors)
    logits = {name: torch.full_like(theta0, init_logit, requires_grad=True)
              for name, theta0 in problem.base.items()}
    lambdas = torch.full((count,), lambda_, dtype=torch.float64, device=device, requires_grad=True)
    triggers = torch.zeros(count, problem.base[embedding].shape[-1], device=device, requires_grad=True)
    lambda_opt = torch.optim.Adam([lambdas], lr=base_lr)
    trigger_opt = torch.optim.Adam([triggers], lr=adv_lr)
    mask_opt = torch.optim.Adam(list(logits.values()), lr=lr)
    noise = torch.Generator(device=device).manual_seed(seed)
    schedule = batch_schedule(problem.batches, 3 * steps, seed)  # fresh batches for each phase
    clean = lambda task, index, out: entropy(split_outputs(out)[0])  # noqa: E731
    losses = []
    for step in range(steps):
        masks = {name: rescaled(relaxed_bernoulli(s, temperature, noise)) for name, s in logits.items()}
        with torch.no_grad():
            lambdas.fill_(lambda_)
        lambda_opt.zero_grad(set_to_none=True)
        fixed = {name: m.detach() for name, m in masks.items()}
        backward_tasks(problem, merged(problem, lambdas, fixed),
                       list(enumerate(schedule[3 * step])), clean)
        lambda_opt.step()
        params = merged(problem, lambdas.detach(), masks)
        trigger_opt.zero_grad(set_to_none=True)
        trigger_step(problem, params, list(enumerate(schedule[3 * step + 1])), embedding, triggers)
        trigger_opt.step()
        mask_opt.zero_grad(set_to_none=True)
        losses.append(entropies(problem, params, list(enumerate(schedule[3 * step + 2])), embedding,
                                triggers.detach(), adv_weight))
        mask_opt.step()
    draw = torch.Generator(device=device).manual_seed(seed + 1)
    binary = {name: export_mask(s.detach(), export, draw) for name, s in logits.items()}
    kept = {name: float(m.float().mean()) for name, m in binary.items()}
    fixed = {name: m.float() / kept[name] if kept[name] > 0 else m.float()
             for name, m in binary.items()}
    with torch.no_grad():
        lambdas.fill_(lambda_)
    ada_schedule = batch_schedule(problem.batches, adamerging_steps, seed + 2)
    losses += minimize([lambdas], lambda step: backward_tasks(
        problem, merged(problem, lambdas, fixed), list(enumerate(ada_schedule[step])), clean),
        steps=adamerging_steps, lr=adamerging_lr)
    final = lambdas.detach().cpu().tolist()
    return Learned(weights={name: [lam / kept[name] if kept[name] > 0 else 0.0 for lam in final]
                            for name in binary},
                   masks={name: [m.cpu()] * count for name, m in binary.items()}, losses=losses)


register(
    "dam_backdoor",
    summary="Defense-Aware Merging: one Concrete mask over the task vectors learned with task-wise "
            "λ against a learned input trigger, dropping what carries backdoors (unlabeled data).",
    paper=DAM_BACKDOOR_PAPER,
    needs_base=True,
    params=(
        Param("lambda", default=0.3, arg="lambda_",
              doc="λ at the start of every step (the code's 0.3)"),
        Param("temperature", default=0.5, minimum=1e-6, doc="Concrete temperature T"),
        Param("init_logit", default=0.0, doc="mask logits at the start (keep ½)"),
        Param("adv_weight", default=0.1, minimum=0.0, doc="weight of the triggered inputs' entropy"),
        Param("adv_lr", default=1e-4, minimum=0.0, doc="Adam's learning rate for the triggers"),
        Param("base_lr", default=1.0, minimum=0.0, doc="Adam's learning rate for λ's one step"),
        Param("lr", default=1e-3, minimum=0.0, doc="Adam's learning rate for the mask logits"),
        Param("steps", int, default=100, minimum=0, doc="mask steps (the code: 1000-2000)"),
        Param("adamerging_steps", int, default=100, minimum=0, doc="final λ steps (the code: 1000)"),
        Param("adamerging_lr", default=1e-3, minimum=0.0, doc="Adam's learning rate for the final λ"),
        Param("export", str, default="sample", choices=EXPORTS,
              doc="final mask: a seeded Bernoulli(σ(ℓ)) draw or σ(ℓ) > ½"),
        Param("seed", int, default=0, doc="batch order, Concrete noise and the final draw"),
    ),
    statistics=("mask",),
    learn=learn_dam_backdoor,
)(stitch)
