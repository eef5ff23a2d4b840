"""RCP-Merging (Yang et al. 2025, arXiv:2508.03140, AAAI 2026): a domain model merged into a
long chain-of-thought reasoning model, the reasoning model's weights taken as the prior.

Read from the authors' code (ZeroNLP/RCP-Merging: RCP-Merging/calculate_fisher.py and
merge_models.py; λ = 1000 in merge.sh); the paper's own equations were not available to us, so
this is the code's rule. Models: θ0 the base both were fine-tuned from; the recipe's first model
θ_R, the reasoning model, calibrated on reasoning text; its second θ_D, the domain model, on
domain text. With ℓ(θ; x) the mean next-token cross-entropy of one text x:

    F   = mean over reasoning texts x of (∇ℓ(θ_R; x) ⊙ θ_R)²        reasoning preservation
    S_x = ∇ℓ(θ_D; x) ⊙ θ_D, for each domain text x                   domain sensitivity
    v   = Σ_x (+1 where S_x + λ F ⊙ (θ_R − θ_D)² ≤ 0, else −1)
    θ   = θ_R + m ⊙ (θ_D − θ0),   m = [v > 0]

so an entry takes the domain update when most domain texts find it sensitive enough (S_x
negative, beyond the Fisher-weighted cost of moving the reasoning model there). The votes are
per text: the calibration batches must hold one text each (`batch_size: 1`), as the code's.
The code runs the models in train mode (no dropout in the Qwen models it merges); here the
forward passes are calibrate/'s, in eval mode. Everything is held in memory (θ0, both task
vectors, F, the votes and one gradient), as the code holds its flattened vectors: for models
that fit in memory several times over.

The merge itself is stitch with the learned masks summed (methods/curvature.py):
θ = θ0 + 1·τ_R + m ⊙ τ_D.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from mergesmith.errors import MethodError
from mergesmith.methods.adaptive import Learned, MergeProblem, check_problem, split_outputs
from mergesmith.methods.curvature import stitch
from mergesmith.methods.registry import Param, register

RCP_PAPER = ("Yang et al. 2025, RCP-Merging: merging long chain-of-thought models with "
             "domain-specific models by considering reasoning capability as prior (AAAI 2026), "
             "arXiv:2508.03140")


def fisher_term(gradient: Tensor, theta: Tensor) -> Tensor:
    """(∇ℓ ⊙ θ)²: one text's share of the reasoning preservation indicator."""
    return (gradient * theta).square_()


def domain_votes(sensitivities: Iterable[Tensor], threshold: Tensor) -> Tensor:
    """Σ_x (+1 where S_x + T ≤ 0, else −1), T = λ F ⊙ (θ_R − θ_D)²."""
    votes = torch.zeros(threshold.shape, dtype=torch.int32, device=threshold.device)
    for s in sensitivities:
        votes += torch.where(s + threshold <= 0, 1, -1).to(torch.int32)
    return votes


def text_gradients(problem: MergeProblem, task: int, theta: dict[str, Tensor]
                   ) -> Iterator[dict[str, Tensor]]:
    """∇ℓ(θ; x) for each calibration text x of `task` (one per batch), one after the other."""
    params = {name: t.detach().clone().requires_grad_(True) for name, t in theta.items()}
    for batch in problem.batches[task]:
        logits, _ = split_outputs(problem.forward(params, task, batch.inputs))
        loss = F.cross_entropy(logits.float(), batch.targets)
        for p in params.values():
            p.grad = None
        loss.backward()
        yield {name: p.grad if p.grad is not None else torch.zeros_like(p)
               for name, p in params.items()}


def check_one_text_per_batch(problem: MergeProblem) -> None:
    for task, batches in enumerate(problem.batches):
        for batch in batches:
            texts = getattr(batch.inputs, "examples", None)  # calibrate/'s batches say
            if texts is not None and len(texts) != 1:
                raise MethodError(f"rcp_merging: model {task}'s calibration batches hold "
                                  f"{len(texts)} texts; its votes and Fisher are per text",
                                  hint="set calibration batch_size: 1")


def learn_rcp(problem: MergeProblem, *, lambda_: float = 1000.0) -> Learned:
    """The domain mask m of θ = θ_R + m ⊙ τ_D, as stitch's masks [1, m] with weights [1, 1]."""
    check_problem(problem, "rcp_merging", needs_targets=True)
    if len(problem.task_vectors) != 2:
        raise MethodError(f"rcp_merging merges a reasoning model and a domain model, got "
                          f"{len(problem.task_vectors)} models", hint="list exactly two models")
    check_one_text_per_batch(problem)
    base, (tau_r, tau_d) = problem.base, problem.task_vectors
    theta_r = {name: base[name] + tau_r[name] for name in base}
    fisher = {name: torch.zeros_like(t) for name, t in base.items()}
    texts = 0
    for gradient in text_gradients(problem, 0, theta_r):
        for name in fisher:
            fisher[name] += fisher_term(gradient[name], theta_r[name])
        texts += 1
    threshold = {name: fisher.pop(name).mul_(lambda_ / texts).mul_((tau_r[name] - tau_d[name]).square())
                 for name in list(fisher)}
    del theta_r
    theta_d = {name: base[name] + tau_d[name] for name in base}
    votes = {name: torch.zeros(t.shape, dtype=torch.int32, device=t.device) for name, t in base.items()}
    for gradient in text_gradients(problem, 1, theta_d):
        for name in votes:
            votes[name] += domain_votes([gradient[name] * theta_d[name]], threshold[name])
    masks = {name: [torch.ones_like(v, dtype=torch.bool).cpu(), (v > 0).cpu()]
             for name, v in votes.items()}
    return Learned(weights={name: [1.0, 1.0] for name in base}, masks=masks)


register(
    "rcp_merging",
    summary="Take a domain model's update into a reasoning model only where domain texts find "
            "it sensitive beyond the reasoning model's Fisher cost (RCP-Merging).",
    paper=RCP_PAPER,
    needs_base=True,
    min_models=2,
    max_models=2,
    params=(
        Param("lambda", default=1000.0, minimum=0.0, arg="lambda_",
              doc="weight of the reasoning model's Fisher cost against the domain sensitivity"),
    ),
    statistics=("mask",),
    learn=learn_rcp,
)(stitch)
