"""Merges from the LLM and reasoning literature: FuseChat's VaRM, activation-informed merging
(AIM) and OptMerge.

VaRM (Wan et al. 2024, FuseChat, §3.3, eq. 6): K target models fine-tuned from one pivot θ_p are
averaged per parameter matrix m with weights set by how far each moved:
w_{j,m} = mean(Δθ_{j,m}²) / Σ_k mean(Δθ_{k,m}²), Δθ_{j,m} = θ_{j,m} − θ_{p,m}, θ_m = Σ_j w_{j,m} θ_{j,m}.
A tensor no model changed (0/0) gets the uniform average, which is every model's value there.
The weights need only one sum per model over the tensor, so the engine streams it (reduce pass).

AIM (Nobari et al. 2025, arXiv:2502.02421; read from the authors' code, ahnobari/
ActivationAwareRelaxation, MergeModels/ActivationMerging/_utils.py, `apply_relaxation`): the
merged update of each module with a weight, embeddings aside, is relaxed toward the base on the
input channels the base uses most: a_c = mean over calibration tokens of |x_c| at the module's
input in θ0; imp = a / max(a); r_c = 1 − imp_c (1 − ω); θ = θ0 + r ⊙ Σ wi τi (r along the
input axis). With one model and weight 1 (the default) this is their `relax_on_merged` of an
existing merge θ_m; with several, their `merge` (task arithmetic, their λ is the weight, then
the relaxation). ω = 0.4 as in the paper's runs (the function's default is 0.2). Tensors
without a statistic (biases, embeddings) keep the whole update, as in that code. A channel no
token reaches (a_c = 0) keeps its whole update; a module that sees only zeros keeps all of it.
The base runs on each model entry's calibration data (the code: one set, pile-val); where the
entries give different data, a is the mean of the per-set means.

OptMerge (Wei et al. 2025, arXiv:2505.19892; read from the authors' code, WalkerWorldPeace/
MLLMerging, LLaMA-Factory/model_merging.py, `wudi_merging2`, the script's default method): per
2-D weight (not the output head), each task vector is truncated to its top k = ⌊min(m, n)/N⌋
singular triplets, τ̂i = Ui Si Viᵀ, and the merged task vector x, started at mean(τi) (not
truncated), minimises

    L(x) = Σi ‖(x − τ̂i) Vi Si‖²_F / ‖τi‖²_F   ( = Σi ‖(x − τ̂i) τ̂iᵀ‖²_F / ‖τi‖²_F )

by 300 steps of SGD (lr 1e-4, momentum 0.9); θ = θ0 + λ·x. Other tensors: θ0 + λ·mean(τi).
The gradient 2 Σi (x − τ̂i) Ci Ciᵀ / ‖τi‖², Ci = Vi Si, is taken in closed form with the Ci
side by side: one (m × n) by (n × Σk) product and its transpose per step, never an n × n matrix.
The code runs in the models' float16; here fp32 (the SVD in float64, methods/lowrank.py).
A task vector that is zero adds nothing to the loss (the code would divide 0 by 0).
"""

from __future__ import annotations

import re

import torch

from mergesmith.methods.blocks import task_vectors, weighted_sum
from mergesmith.methods.curvature import input_axis
from mergesmith.methods.lowrank import top_singular_triplets
from mergesmith.methods.registry import Param, TensorContext, register

VARM_PAPER = ("Wan et al. 2024, Knowledge fusion of chat LLMs: a preliminary technical report "
              "(FuseChat), arXiv:2402.16107")
AIM_PAPER = ("Nobari et al. 2025, Activation-informed merging of large language models, "
             "arXiv:2502.02421")
OPTMERGE_PAPER = ("Wei et al. 2025, OptMerge: unifying multimodal LLM capabilities and "
                  "modalities via model merging (ICLR 2026), arXiv:2505.19892")

EMBEDDING = re.compile(r"embed")  # AIM's code: every module with a weight but these
OUTPUT_HEAD = re.compile(r"lm_head")  # OptMerge's code averages it instead


# --------------------------------------------------------------------------------------------
# VaRM


def varm_sums(base: torch.Tensor, experts: list[torch.Tensor], **_) -> torch.Tensor:
    """Σ Δθj² of each model over (a part of) the tensor, in float64."""
    return torch.stack([(e - base).square().sum(dtype=torch.float64) for e in experts])


def varm_weights(sums: torch.Tensor) -> list[float]:
    """w_j = mean(Δθj²) / Σ_k mean(Δθk²) (the means share one count); uniform when all are 0."""
    total = float(sums.sum())
    if total == 0.0:
        return [1.0 / len(sums)] * len(sums)
    return [float(s) / total for s in sums]


@register(
    "varm",
    summary="Average weighted per tensor by each model's share of the squared change from the "
            "pivot (FuseChat's VaRM).",
    paper=VARM_PAPER,
    needs_base=True,
    min_models=1,
    params=(),
    reduce=varm_sums,
)
def varm(base: torch.Tensor, experts: list[torch.Tensor], *, stats: torch.Tensor | None = None,
         ctx: TensorContext | None = None) -> torch.Tensor:
    """θ = Σ_j w_j θ_j, w_j = mean(Δθj²) / Σ_k mean(Δθk²)."""
    weights = varm_weights(varm_sums(base, experts) if stats is None else stats)
    return weighted_sum(experts, weights)


# --------------------------------------------------------------------------------------------
# AIM


def relaxation(activation: torch.Tensor, omega: float) -> torch.Tensor:
    """r = 1 − (a / max a)(1 − ω): ω on the most active channel, 1 on a silent one."""
    peak = activation.abs().max()
    importance = activation.abs() / peak if peak > 0 else torch.zeros_like(activation)
    return 1.0 - importance * (1.0 - omega)


def along_inputs(factor: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """The per-input-channel `factor` shaped to broadcast over a weight of `shape`: along the
    columns of nn.Linear's [out, in], the rows of Conv1D's [in, out]; entry by entry where it
    has one entry per entry (a norm's weight, a scalar)."""
    if factor.shape == shape or (len(shape) == 1 and factor.numel() == shape[0]):
        return factor.reshape(shape)
    if len(shape) != 2:
        raise ValueError(f"a per-channel statistic of {factor.numel()} entries for a tensor of "
                         f"shape {list(shape)}")
    axis = input_axis(shape, torch.Size([factor.numel()] * 2), name)
    return factor[:, None] if axis == 0 else factor[None, :]


@register(
    "aim",
    summary="Relax a merge toward the base on the input channels the base activates most "
            "(activation-informed merging).",
    paper=AIM_PAPER,
    needs_base=True,
    min_models=1,
    params=(
        Param("weight", default=1.0, per_model=True, arg="weights",
              doc="coefficient of the model's task vector (1 for an existing merge)"),
        Param("omega", default=0.4, minimum=0.0, maximum=1.0,
              doc="share of the update kept on the most active channel (1: no relaxation)"),
    ),
    statistics=("act_abs",),
    statistics_from="base",
)
def aim(base: torch.Tensor, experts: list[torch.Tensor], *, weights: list[float],
        omega: float = 0.4, act_abs: list[torch.Tensor] | None = None,
        ctx: TensorContext | None = None) -> torch.Tensor:
    """θ = θ0 + r ⊙ Σ wi τi, r_c = 1 − (a_c / max a)(1 − ω), a = θ0's mean |x| per input channel."""
    update = weighted_sum(task_vectors(base, experts), weights)
    name = ctx.name if ctx is not None else ""
    if act_abs is not None and not EMBEDDING.search(name):
        activation = torch.stack(act_abs).mean(0)  # one entry per model's calibration data
        update.mul_(along_inputs(relaxation(activation, omega), base.shape, name))
    return update.add_(base)


# --------------------------------------------------------------------------------------------
# OptMerge


def truncated(tau: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ̂, C): τ's best rank-`rank` approximation U S Vᵀ and C = V S (n × rank), in float64."""
    u, s, vh = top_singular_triplets(tau, rank)
    return (u * s) @ vh, vh.mT * s


def optmerge_matrix(taus: list[torch.Tensor], *, rank_ratio: float | None, steps: int,
                    lr: float, momentum: float) -> torch.Tensor:
    """argmin over x of Σi ‖(x − τ̂i) Ci‖² / ‖τi‖² by SGD with momentum from mean(τi)."""
    ratio = 1.0 / len(taus) if rank_ratio is None else rank_ratio
    rank = int(min(taus[0].shape) * ratio)
    sides, targets = [], []
    for tau in taus:
        norm = float(torch.linalg.vector_norm(tau, dtype=torch.float64))
        if rank == 0 or norm == 0.0:
            continue
        approx, c = truncated(tau, rank)
        sides.append(c / norm)
        targets.append(approx @ sides[-1])
    x = torch.stack(taus).mean(0)
    if not sides:
        return x
    c = torch.cat(sides, dim=1).float()
    p = torch.cat(targets, dim=1).float()
    velocity = None
    for _ in range(steps):
        gradient = ((x @ c).sub_(p) @ c.mT).mul_(2.0)
        velocity = gradient if velocity is None else velocity.mul_(momentum).add_(gradient)
        x = x - lr * velocity
    return x


@register(
    "optmerge",
    summary="Task vectors denoised by truncated SVD, then a merged task vector optimised "
            "against their interactions (OptMerge, data-free).",
    paper=OPTMERGE_PAPER,
    needs_base=True,
    min_models=1,
    params=(
        Param("lambda", default=1.0, arg="lambda_", doc="scale of the merged task vector"),
        Param("rank_ratio", default=None, minimum=0.0, maximum=1.0,
              doc="share of min(m, n) singular triplets kept of each task vector "
                  "(default 1/N, N models)"),
        Param("steps", int, default=300, minimum=0, doc="SGD steps per matrix"),
        Param("lr", default=1e-4, minimum=0.0, doc="SGD learning rate"),
        Param("momentum", default=0.9, minimum=0.0, maximum=1.0, doc="SGD momentum"),
    ),
)
def optmerge(base: torch.Tensor, experts: list[torch.Tensor], *, lambda_: float = 1.0,
             rank_ratio: float | None = None, steps: int = 300, lr: float = 1e-4,
             momentum: float = 0.9, ctx: TensorContext | None = None) -> torch.Tensor:
    """θ = θ0 + λ·x, x optimised per 2-D weight; elsewhere x = mean(τi)."""
    taus = task_vectors(base, experts)
    name = ctx.name if ctx is not None else ""
    if base.dim() == 2 and not OUTPUT_HEAD.search(name):
        x = optmerge_matrix(taus, rank_ratio=rank_ratio, steps=steps, lr=lr, momentum=momentum)
    else:
        x = torch.stack(taus).mean(0)
    return base + lambda_ * x
