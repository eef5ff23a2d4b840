"""Twin-Merging: shared knowledge merged once, each expert's exclusive knowledge compressed, and
a router that mixes them per input (Lu et al. 2024, NeurIPS, arXiv:2406.15479, §3).

    shared:     θ* = a data-free merge of the experts (task arithmetic, or TIES)
    exclusive:  v_t = θ_t − θ*, compressed: a matrix to its r = ⌊ρ·min(m, n)⌋ largest singular
                triplets (v_t ≈ A_t B_t, A_t = U_r diag(σ_r), B_t = V_rᵀ), a vector kept whole
    inference:  θ(x) = θ* + Σ_t w_t(x) v_t,  w(x) = softmax(R(h(x))), h(x) the shared model's
                mean-pooled last hidden state and R a small classifier of which expert x is for

The merge writes θ*; the compressed v_t are side outputs (`twin_side`) stored beside it
(engine/side_outputs/twin.py), and the router is trained afterwards on the experts' calibration data
(calibrate/router.py). As the authors' code, tensors with more than two dimensions are
compressed as matrices of their first dimension by the rest. Unlike it, a matrix keeps at least
one direction: ⌊ρ·min(m, n)⌋ = 0 would keep none.
"""

from __future__ import annotations

import math

import torch

from mergesmith.methods.linear import task_arithmetic
from mergesmith.methods.registry import Param, TensorContext, register
from mergesmith.methods.magnitude_trim import ties
from mergesmith.methods.subspace import top_singular_triplets

TWIN_PAPER = ("Lu et al. 2024, Twin-Merging: dynamic integration of modular expertise in model "
              "merging (NeurIPS), arXiv:2406.15479")
SHARED_METHODS = ("task_arithmetic", "ties")


def shared_model(base: torch.Tensor, experts: list[torch.Tensor], *, weights: list[float],
                 densities: list[float], lambda_: float, shared: str,
                 ctx: TensorContext | None = None) -> torch.Tensor:
    """θ*: the experts' shared knowledge, by a data-free merge."""
    if shared == "ties":
        return ties(base, experts, weights=weights, densities=densities, lambda_=lambda_, ctx=ctx)
    return task_arithmetic(base, experts, weights=weights, lambda_=lambda_)


def compressed_rank(shape: torch.Size, rank_ratio: float) -> int:
    """r = ⌊ρ·min(m, n)⌋ of the tensor seen as a matrix, at least 1."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    return max(1, int(rank_ratio * min(rows, cols)))


def compress(delta: torch.Tensor, rank_ratio: float) -> tuple[torch.Tensor, ...]:
    """(A, B) with A B the best rank-r approximation of a matrix; (delta,) for a vector."""
    if delta.dim() < 2:
        return (delta,)
    matrix = delta.reshape(delta.shape[0], -1)
    r = compressed_rank(delta.shape, rank_ratio)
    u, sigma, vt = top_singular_triplets(matrix, r)
    a = matrix.new_zeros(matrix.shape[0], r)
    b = matrix.new_zeros(r, matrix.shape[1])
    kept = sigma.numel()  # fewer than r where the rest are rounding noise
    a[:, :kept] = (u * sigma).to(delta.dtype)
    b[:kept] = vt.to(delta.dtype)
    return a, b


def expand(part: tuple[torch.Tensor, ...], shape: torch.Size) -> torch.Tensor:
    """The exclusive part v_t as a tensor of the merged tensor's shape."""
    if len(part) == 1:
        return part[0].reshape(shape)
    a, b = part
    return (a @ b).reshape(shape)


def exclusive_parts(shared: torch.Tensor, experts: list[torch.Tensor],
                    rank_ratio: float) -> list[tuple[torch.Tensor, ...]]:
    """Each expert's compressed v_t = θ_t − θ*."""
    return [compress(expert - shared, rank_ratio) for expert in experts]


def routed(shared: torch.Tensor, parts: list[tuple[torch.Tensor, ...]],
           weights: list[float] | torch.Tensor) -> torch.Tensor:
    """θ* + Σ_t w_t v_t for one input's routing weights."""
    out = shared.clone()
    for w, part in zip([float(w) for w in weights], parts):
        if w != 0.0:
            out.add_(expand(part, shared.shape), alpha=w)
    return out


def twin_side(base: torch.Tensor, experts: list[torch.Tensor], *, weights: list[float],
              densities: list[float], lambda_: float = 1.0, shared: str = "task_arithmetic",
              rank_ratio: float = 0.1, ctx: TensorContext | None = None, **_
              ) -> list[tuple[torch.Tensor, ...]]:
    """The compressed exclusive parts of this tensor, one per expert."""
    theta = shared_model(base, experts, weights=weights, densities=densities, lambda_=lambda_,
                         shared=shared, ctx=ctx)
    return exclusive_parts(theta, experts, rank_ratio)


def _check(params: dict) -> None:
    if params["rank_ratio"] <= 0:
        raise ValueError("rank_ratio must be > 0: the exclusive parts would be empty")


@register(
    "twin",
    summary="Merge the shared knowledge (task arithmetic or TIES), keep each expert's difference "
            "from it compressed by SVD, and mix those per input with a router trained on the "
            "experts' calibration data (`mergesmith twin apply` / `route`).",
    paper=TWIN_PAPER,
    needs_base=True,
    params=(
        Param("weight", default=1.0, per_model=True, arg="weights",
              doc="the model's coefficient in the shared merge"),
        Param("density", default=1.0, per_model=True, arg="densities", minimum=0.0, maximum=1.0,
              doc="TIES' kept fraction of τi in the shared merge (shared: ties)"),
        Param("lambda", default=1.0, arg="lambda_", doc="scale of the shared merge's task vector"),
        Param("shared", str, default="task_arithmetic", choices=SHARED_METHODS,
              doc="the data-free merge that gives the shared model"),
        Param("rank_ratio", default=0.1, minimum=0.0, maximum=1.0,
              doc="fraction of each matrix's singular directions kept of v_t = θ_t − θ*"),
        Param("router_steps", int, default=300, minimum=1,
              doc="full-batch Adam steps training the router"),
        Param("router_lr", default=5e-4, minimum=0.0, doc="the router's learning rate"),
    ),
    validate=_check,
    side=twin_side,
    router=True,
)
def twin(base: torch.Tensor, experts: list[torch.Tensor], *, weights: list[float],
         densities: list[float], lambda_: float = 1.0, shared: str = "task_arithmetic",
         rank_ratio: float = 0.1, router_steps: int = 300, router_lr: float = 5e-4,
         ctx: TensorContext | None = None) -> torch.Tensor:
    """The shared model θ*."""
    return shared_model(base, experts, weights=weights, densities=densities, lambda_=lambda_,
                        shared=shared, ctx=ctx)
