"""SOMF: safety realignment by subspace-oriented model fusion (Yi et al. 2024). One Concrete mask,
shared by every task vector δi = θi − θ_safe, is trained on safety data so that the merged model
is safe again; the mask then decides which entries of each δi survive:

    θ = θ_safe + λ Σi δi ⊙ m / mean(m)      (mean per tensor)

Read from the authors' code (xinykou/safety_realignment, llmtuner/model/concrete_mask.py and
modeling.py): during training m ~ RelaxedBernoulli(T = 0.5, logits ℓ) by rsample, the logits
start at 0 (modeling.py passes init_value=0; the class default 5.0 is not used), and only ℓ
trains, by the language-model loss of the merged model on the safety data. The export draws
m_b = (RelaxedBernoulli sample > 0.5), i.e. one Bernoulli(σ(ℓ)) draw per entry.

Ours, where we differ on purpose:
- the export draw comes from the recipe's seed, so the same recipe merges the same model (the
  code draws from the global generator); `export: threshold` keeps σ(ℓ) > ½ instead, no draw;
- λ: the code adds one realigned δ as it is (λ = 1) and combines several with its task
  arithmetic (0.3 each) or an average; here λ is one parameter for all of them;
- the loss is the cross-entropy of the calibration objective (next tokens of every real
  position for an LM, class labels for a classifier), where the code trains on the responses of
  its SFT data only, or by DPO (not here);
- a tensor whose exported mask keeps nothing gets θ_safe there (the code divides 0 by 0).

The merge after learning is stitch (methods/curvature.py) with the shared mask for every expert
and the weight λ / mean(m_b) per tensor: stitch's sum θ0 + Σi wi (m ⊙ δi) is the formula above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mergesmith.errors import MethodError
from mergesmith.methods.adaptive import (
    Learned,
    MergeProblem,
    backward_tasks,
    check_problem,
    device_of,
    minimize,
    split_outputs,
)
from mergesmith.methods.adaptive_masks import relaxed_bernoulli
from mergesmith.methods.blocks import weighted_sum
from mergesmith.methods.curvature import stitch
from mergesmith.methods.registry import Param, register

SOMF_PAPER = ("Yi et al. 2024, A safety realignment framework via subspace-oriented model fusion "
              "for large language models, arXiv:2405.09055")
EXPORTS = ("sample", "threshold")


def rescaled(mask: Tensor) -> Tensor:
    """m / mean(m) over this tensor alone (the code's per-tensor rescale)."""
    return mask / mask.mean()


def safety_schedule(problem: MergeProblem, steps: int, seed: int) -> list[tuple[int, int]]:
    """One (task, batch) per step from all the calibration batches pooled: the safety data is one
    set, which each expert's calibration entry may repeat; a fresh random order per pass."""
    pool = [(task, index) for task, batches in enumerate(problem.batches)
            for index in range(len(batches))]
    generator = torch.Generator().manual_seed(seed)
    order: list[tuple[int, int]] = []
    while len(order) < steps:
        order += [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
    return order[:steps]


def export_mask(logits: Tensor, export: str, generator: torch.Generator) -> Tensor:
    """The binary mask: a Bernoulli(σ(ℓ)) draw, as the code's (RelaxedBernoulli sample > ½), or
    σ(ℓ) > ½."""
    if export == "threshold":
        return logits > 0
    u = torch.rand(logits.shape, generator=generator, device=logits.device)
    return logits + torch.logit(u, eps=1e-6) > 0  # σ((ℓ + logit u)/T) > ½ for every T > 0


def learn_somf(problem: MergeProblem, *, lambda_: float = 1.0, temperature: float = 0.5,
               init_logit: float = 0.0, export: str = "sample", steps: int = 100,
               lr: float = 1e-3, seed: int = 0) -> Learned:
    """ℓ = argmin of the merged model's cross-entropy on the safety batches, where the merged
    model is θ_safe + λ Σi δi ⊙ m/mean(m), m ~ Concrete(σ(ℓ), T) shared by every δi; then the
    exported binary mask per tensor (see the module's docstring)."""
    check_problem(problem, "somf", needs_targets=True)
    if export not in EXPORTS:
        raise MethodError(f"somf: unknown export {export!r}", hint="use sample or threshold")
    device = device_of(problem)
    count = len(problem.task_vectors)
    logits = {name: torch.full_like(theta0, init_logit, requires_grad=True)
              for name, theta0 in problem.base.items()}
    delta = {name: weighted_sum([tau[name] for tau in problem.task_vectors], [lambda_] * count)
             for name in problem.base}
    generator = torch.Generator(device=device).manual_seed(seed)
    schedule = safety_schedule(problem, steps, seed)

    def cross_entropy(task: int, index: int, out) -> Tensor:
        targets = problem.batches[task][index].targets
        return F.cross_entropy(split_outputs(out)[0].flatten(0, -2).float(), targets.reshape(-1))

    def objective(step: int) -> float:
        params = {name: theta0 + rescaled(relaxed_bernoulli(logits[name], temperature, generator))
                  * delta[name] for name, theta0 in problem.base.items()}
        return backward_tasks(problem, params, [schedule[step]], cross_entropy)

    losses = minimize(list(logits.values()), objective, steps=steps, lr=lr)
    draw = torch.Generator(device=device).manual_seed(seed + 1)  # the export's own stream
    masks, weights = {}, {}
    for name, s in logits.items():
        mask = export_mask(s.detach(), export, draw).cpu()
        kept = float(mask.float().mean())
        masks[name] = [mask] * count
        weights[name] = [lambda_ / kept if kept > 0 else 0.0] * count
    return Learned(weights=weights, masks=masks, losses=losses)


register(
    "somf",
    summary="Safety realignment (SOMF): one Concrete mask over the fine-tunes' task vectors, "
            "trained on safety data through the merged model, keeps the entries that stay safe.",
    paper=SOMF_PAPER,
    needs_base=True,
    params=(
        Param("lambda", default=1.0, arg="lambda_",
              doc="scale of every task vector (the code: 1 for one fine-tune)"),
        Param("temperature", default=0.5, minimum=1e-6, doc="Concrete temperature T (the code's 0.5)"),
        Param("init_logit", default=0.0, doc="mask logits at the start (the code's 0: keep ½)"),
        Param("export", str, default="sample", choices=EXPORTS,
              doc="final mask: a seeded Bernoulli(σ(ℓ)) draw (the code's) or σ(ℓ) > ½"),
        Param("steps", int, default=100, minimum=0, doc="optimizer steps"),
        Param("lr", default=1e-3, minimum=0.0, doc="Adam's learning rate"),
        Param("seed", int, default=0,
              doc="order of the safety batches, the Concrete noise, the export draw"),
    ),
    statistics=("mask",),
    learn=learn_somf,
)(stitch)
