"""Interpolation on the sphere: SLERP, NuSLERP, multi-model SLERP and the weighted Karcher mean."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mergesmith.methods.blocks import gram64, task_vectors, weighted_sum
from mergesmith.methods.registry import Param, TensorContext, register

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_sums(base: torch.Tensor, experts: list[torch.Tensor], **_) -> torch.Tensor:
    """Σa², Σb², Σab in float64: all SLERP needs to know about the whole tensor."""
    gram = gram64([base, experts[0]])
    return torch.stack([gram[0, 0], gram[1, 1], gram[0, 1]])


def slerp_coefficients(sums: torch.Tensor, t: float,
                       dot_threshold: float = DOT_THRESHOLD) -> tuple[float, float]:
    """(ca, cb) with slerp(a, b) = ca·a + cb·b; linear when |â·b̂| > dot_threshold."""
    sum_aa, sum_bb, sum_ab = sums.tolist()
    norm_a, norm_b = (math.sqrt(max(s, 0.0)) for s in (sum_aa, sum_bb))
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    dot = min(1.0, max(-1.0, sum_ab / (norm_a * norm_b)))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    omega = math.acos(dot)
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)



@register(
    "slerp",
    summary="Spherical interpolation between the base and one other model (t=0 gives the base).",
    paper="Shoemake 1985, Animating rotation with quaternion curves (used by mergekit)",
    needs_base=True,
    min_models=1,
    max_models=1,
    params=(Param("t", minimum=0.0, maximum=1.0, doc="position from base (0) to model (1)"),),
    reduce=slerp_sums,
)
def slerp(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    t: float,
    stats: torch.Tensor | None = None,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b with cos Ω = â·b̂; linear when |â·b̂| > 0.9995."""
    (other,) = experts
    ca, cb = slerp_coefficients(slerp_sums(base, experts) if stats is None else stats, t)
    return base * ca + other * cb


NUSLERP_DOT_THRESHOLD = 1 - 2**-24  # past this, SLERP and linear agree to fp32 precision


def nuslerp_t(weights: list[float]) -> float:
    """t = w2 / (w1 + w2): the second model's share; 0.5 when the weights cancel (as mergekit)."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _nuslerp_endpoints(base: torch.Tensor | None,
                       experts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The two points NuSLERP interpolates: the models, or their task vectors given a base."""
    return experts if base is None else task_vectors(base, experts)


def nuslerp_sums(base: torch.Tensor | None, experts: list[torch.Tensor], **_) -> torch.Tensor:
    """Σa², Σb², Σab of the two endpoints, in float64."""
    a, b = _nuslerp_endpoints(base, experts)
    return slerp_sums(a, [b])


def _slerp_vectors(a: torch.Tensor, b: torch.Tensor, t: float, dim: int) -> torch.Tensor:
    """SLERP of each pair of vectors along `dim` (a 1-D tensor is a single vector)."""
    a_v, b_v = a.movedim(dim, -1), b.movedim(dim, -1)
    a64, b64 = a_v.double(), b_v.double()
    sums = torch.stack([(a64 * a64).sum(-1), (b64 * b64).sum(-1), (a64 * b64).sum(-1)])
    pairs = [slerp_coefficients(s, t, NUSLERP_DOT_THRESHOLD) for s in sums.reshape(3, -1).T]
    ca, cb = (torch.tensor(c, dtype=a.dtype, device=a.device).view(*a_v.shape[:-1], 1)
              for c in zip(*pairs))
    return (a_v * ca + b_v * cb).movedim(-1, dim)


@register(
    "nuslerp",
    summary="SLERP of two models by their weights (t = w2/(w1+w2)); of their task vectors "
            "around the base when one is given.",
    paper="Goddard 2024, NuSLERP (mergekit's nuslerp; no paper)",
    needs_base=False,
    optional_base=True,
    min_models=2,
    max_models=2,
    params=(
        Param("weight", per_model=True, arg="weights", doc="the model's share of t"),
        Param("nuslerp_flatten", bool, default=True, arg="flatten",
              doc="one SLERP over the whole tensor; false: one per row"),
        Param("nuslerp_row_wise", bool, default=False, arg="row_wise",
              doc="with nuslerp_flatten false: one SLERP per column instead of per row"),
    ),
    reduce=nuslerp_sums,
    whole_tensor_when=lambda params: (not params.get("flatten", True)
                                      or params.get("compute_dtype") is not None),
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
)
def nuslerp(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    *,
    weights: list[float],
    flatten: bool = True,
    row_wise: bool = False,
    stats: torch.Tensor | None = None,
    ctx: TensorContext | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """slerp(a, b; t) with t = w2/(w1+w2) and (a, b) the models, or θ0 + slerp(τ1, τ2; t).
    With `compute_dtype`, as mergekit evaluates it (`nuslerp_rounded`)."""
    t = nuslerp_t(weights)
    if compute_dtype is not None:
        theta0 = None if base is None else base.to(compute_dtype)
        a, b = _nuslerp_endpoints(theta0, [e.to(compute_dtype) for e in experts])
        merged = nuslerp_rounded(a, b, t, dim=0 if row_wise else -1, flatten=flatten)
        return merged if theta0 is None else theta0 + merged
    if not flatten:
        a, b = _nuslerp_endpoints(base, experts)
        merged = _slerp_vectors(a, b, t, dim=0 if row_wise else -1)
        return merged if base is None else merged.add_(base)
    sums = nuslerp_sums(base, experts) if stats is None else stats
    ca, cb = slerp_coefficients(sums, t, NUSLERP_DOT_THRESHOLD)
    if base is None:
        return weighted_sum(experts, [ca, cb])
    return weighted_sum([base, *experts], [1 - ca - cb, ca, cb])  # θ0 + ca·τ1 + cb·τ2


def multislerp_rounded(base: torch.Tensor | None, experts: list[torch.Tensor],
                       weights: list[float], normalize_weights: bool, eps: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """Multi-SLERP as mergekit 0.1.5 evaluates it (`compat: mergekit`), in `dtype`: the same
    steps as `multislerp`, with its sums as elementwise products summed (no matrix products)
    and no special case for models that all sit at the origin."""
    theta0 = None if base is None else base.to(dtype)
    points = torch.stack([x.to(dtype) if theta0 is None else x.to(dtype) - theta0
                          for x in experts])
    flat = points.view(len(experts), -1)
    w = torch.tensor(weights, dtype=dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(experts) != 2:
            raise ValueError("the weighted mean of the models' directions is zero (antipodal inputs)")
        result = (points[0] * w[0] + points[1] * w[1]).view(points.shape[1:])
        return result if theta0 is None else result + theta0
    mean = mean / mean_norm
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
    angle = torch.norm(tangent) + eps
    result = (mean * torch.cos(angle) + tangent * (torch.sin(angle) / angle))
    result = (result * (norms.squeeze(-1) * w).sum()).view(points.shape[1:])
    return result if theta0 is None else result + theta0


def karcher_rounded(points: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean as mergekit 0.1.5 evaluates it (`compat: mergekit`): equal weights
    (it ignores the recipe's), norms in fp32 but the unit vectors, their mean and each step
    rounded to the points' dtype, torch.dot for the cosines."""
    if len(points) == 1:
        return points[0]
    wide = torch.float64 if points[0].dtype == torch.float64 else torch.float32
    alphas = [1.0 / len(points)] * len(points)
    norms = [torch.linalg.vector_norm(x.to(wide)) for x in points]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype)
             for x, n in zip(points, norms)]
    live = [i for i, n in enumerate(norms) if n.item() > tol]
    if not live:
        return sum(x * 0 for x in points)
    total = sum(alphas[i] for i in live)
    live = [(alphas[i] / total, units[i]) for i in live]
    mean = torch.zeros_like(live[0][1])
    for a, u in live:
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(wide))
    mean = live[0][1].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in live:
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
        step = torch.linalg.vector_norm(tangent.to(wide))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(wide))
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def nuslerp_rounded(a: torch.Tensor, b: torch.Tensor, t: float, dim: int,
                    flatten: bool) -> torch.Tensor:
    """SLERP of a and b (whole, or per vector along `dim`) as mergekit 0.1.5 evaluates it
    (`compat: mergekit`), in their dtype: unit vectors by norms floored at 1e-7, cos Ω summed
    from them, Ω = acos, and the linear mix where 1 − cos²Ω ≤ 1e-16."""
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif dim != -1:
        a, b = a.transpose(dim, -1), b.transpose(dim, -1)
    a_u = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    b_u = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(a_u * b_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-8 ** 2
    omega = torch.acos(torch.where(colinear, 0, cos))
    mixed = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    mixed = torch.where(colinear, (1 - t) * a + t * b, mixed)
    if dim != -1 and not flatten:
        mixed = mixed.transpose(dim, -1)
    return mixed.reshape(shape)


# --------------------------------------------------------------------------------------------
# Multi-SLERP and the Karcher mean stream: every norm and dot product they take over the whole
# tensor is one of the Gram matrix of the models (of their task vectors, given a base), which a
# reduce pass adds up over chunks; the merge is then, entry by entry, a combination of the
# models with scalars found from it. The Karcher mean's iterates all lie in the span of the
# unit models, so its fixed-point iteration runs on their coefficients, from the Gram matrix
# alone: one pass, however many iterations. The Gram matrix is summed in float64 from exact
# products, so its entries differ between chunkings only far below fp32's precision; the
# scalars are those of a whole-tensor fp32 evaluation up to that evaluation's own rounding.

GRAM_ELEMENTS = 1 << 16  # entries per model whose float64 products are summed at once


def gram_sums(vectors: list[torch.Tensor]) -> torch.Tensor:
    """G[i, j] = Σ vi·vj over all entries, in float64 from exact products of the fp32 values."""
    flat = [v.reshape(-1) for v in vectors]
    gram = torch.zeros(len(flat), len(flat), dtype=torch.float64, device=flat[0].device)
    for start in range(0, flat[0].numel(), GRAM_ELEMENTS):
        block = torch.stack([v[start:start + GRAM_ELEMENTS] for v in flat]).double()
        gram += block @ block.T
    return gram


def sphere_points(base: torch.Tensor | None, experts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The points on whose sphere Multi-SLERP interpolates: the models, or their task vectors."""
    return [x if base is None else x - base for x in experts]


def multislerp_sums(base: torch.Tensor | None, experts: list[torch.Tensor], **_) -> torch.Tensor:
    return gram_sums(sphere_points(base, experts))


@dataclass(frozen=True)
class SlerpScalars:
    """What Multi-SLERP knows about the whole tensor (fp32, as a whole-tensor evaluation holds
    them): the weights w, the norms |pi|, |m| of the weighted mean m = Σ wi ui of the unit
    points ui = pi / (|pi| + ε), each ui·m̂, and the tangent step's angle |t| + ε."""

    weights: torch.Tensor
    norms: torch.Tensor
    mean_norm: torch.Tensor
    dots: torch.Tensor
    angle: torch.Tensor


def finish_multislerp(stats, gram: torch.Tensor, *, weights: list[float],
                      normalize_weights: bool = True, eps: float = 1e-8, **_) -> SlerpScalars:
    """The scalars from the Gram matrix G of the points: ui·uj = Gij / ((|pi| + ε)(|pj| + ε)).
    The tangent t = Σ wi (ui − (ui·m̂) m̂) = m − |m| m̂ is zero in exact arithmetic, |t| =
    ||m| − Σ wi ui·m̂|; a whole-tensor evaluation's |t| is its rounding, far below where
    cos(|t| + ε) and sin(|t| + ε)/(|t| + ε) leave 1 in fp32."""
    w = torch.tensor(weights, dtype=torch.float32, device=gram.device)
    if normalize_weights:
        w = w / w.sum()
    norms = gram.diagonal().sqrt().float()
    scale = (norms + eps).double()
    units = gram / scale[:, None] / scale[None, :]
    along = units @ w.double()  # ui·m
    mean_norm = along.dot(w.double()).clamp_min(0).sqrt()
    dots = along / mean_norm if mean_norm > 0 else torch.zeros_like(along)
    angle = (mean_norm - dots.dot(w.double())).abs().float() + eps
    return SlerpScalars(w, norms, mean_norm.float(), dots.float(), angle)


@register(
    "multislerp",
    summary="Barycentric SLERP of any number of models (around the base's origin when given).",
    paper="Goddard 2025, Multi-SLERP (mergekit's multislerp)",
    needs_base=False,
    optional_base=True,
    min_models=2,
    params=(
        Param("weight", per_model=True, arg="weights", doc="the model's coefficient"),
        Param("normalize_weights", bool, default=True, doc="make the weights sum to one"),
        Param("eps", default=1e-8, minimum=0.0, doc="numerical floor for norms"),
    ),
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
    reduce=multislerp_sums,
    finish=finish_multislerp,
    whole_tensor_when=lambda params: params.get("compute_dtype") is not None,
)
def multislerp(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    *,
    weights: list[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
    ctx: TensorContext | None = None,
    compute_dtype: torch.dtype | None = None,
    stats: SlerpScalars | None = None,
) -> torch.Tensor:
    """Project unit vectors onto the tangent space at their weighted mean, average, map back.
    Where the weighted mean of the directions is zero, two models are interpolated linearly (as
    mergekit does); more are refused. A scalar's "sphere" is {−1, 1}: same-signed scalars give
    their weighted mean. The sums over the whole tensor come from the engine's reduce pass
    (`stats`), or else are taken here. With `compute_dtype`, as mergekit evaluates it
    (`multislerp_rounded`, whole tensors)."""
    if compute_dtype is not None:
        return multislerp_rounded(base, experts, weights, normalize_weights, eps, compute_dtype)
    if stats is None:
        stats = finish_multislerp(None, multislerp_sums(base, experts), weights=weights,
                                  normalize_weights=normalize_weights, eps=eps)
    # reshape, not flatten(1): a 0-dim tensor (CLIP's logit_scale) stacks to one dimension only
    points = torch.stack(sphere_points(base, experts)).reshape(len(experts), -1)
    w, norms = stats.weights, stats.norms[:, None]
    units = points / (norms + eps)
    if bool((norms <= eps).all()):  # every model sits at the origin (e.g. a tensor no expert tuned)
        return experts[0].clone() if base is None else base.clone()
    if stats.mean_norm < eps:
        if len(experts) == 2:
            result = (points * w[:, None]).sum(0).view(experts[0].shape)
            return result if base is None else result + base
        raise ValueError("the weighted mean of the models' directions is zero (antipodal inputs)")
    mean = (units * w[:, None]).sum(0) / stats.mean_norm
    tangent = ((units - stats.dots[:, None] * mean) * w[:, None]).sum(0)
    angle = stats.angle
    result = (mean * torch.cos(angle) + tangent * (torch.sin(angle) / angle)) * (norms[:, 0] @ w)
    result = result.view(experts[0].shape)
    return result if base is None else result + base


def karcher_sums(base: None, experts: list[torch.Tensor], **_) -> torch.Tensor:
    return gram_sums(experts)


def karcher_coefficients(gram: torch.Tensor, *, weights: list[float] | None = None,
                         max_iter: int = 10, tol: float = 1e-5, **_) -> np.ndarray:
    """c with Σ ci xi the weighted Karcher mean × Σ ŵi |xi| (none: every model is ~0). The
    iteration of `karcher`, on coefficients over the models: vectors a = Σ ai xi, with
    a·b = aᵀ G b, G the models' Gram matrix."""
    weights = [1.0] * len(gram) if weights is None else weights
    total = sum(weights)
    if total <= 0:
        raise ValueError("karcher weights must sum to a positive number")
    g = gram.double().cpu().numpy()
    alphas = [w / total for w in weights]
    norms = np.sqrt(np.maximum(np.diag(g), 0))
    scale = sum(a * n for a, n in zip(alphas, norms))

    def dot(a, b):
        return float(a @ g @ b)

    def unit(a):  # blocks.unit's x / |x|, zero where |x| ≤ 1e-8
        norm = math.sqrt(max(dot(a, a), 0.0))
        return (a / norm if norm > 1e-8 else np.zeros_like(a)), norm

    basis = np.eye(len(g))
    live = [(a, unit(basis[i])[0]) for i, a in enumerate(alphas) if norms[i] > tol and a != 0]
    if not live:
        return np.zeros(0)
    live_total = sum(a for a, _ in live)
    live = [(a / live_total, u) for a, u in live]
    mean, norm = unit(sum(a * u for a, u in live))
    if norm < tol:
        mean = live[0][1].copy()
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for a, u in live:
            cos = min(1.0, max(-1.0, dot(mean, u)))
            theta = math.acos(cos)
            if theta > tol:
                tangent += a * (theta / math.sin(theta)) * (u - cos * mean)
        step = math.sqrt(max(dot(tangent, tangent), 0.0))
        if step < tol:
            break
        mean, _ = unit(math.cos(step) * mean + math.sin(step) * (tangent / step))
    return mean * scale


@register(
    "karcher",
    summary="Weighted Riemannian (Karcher) mean of the models on the sphere, rescaled by mean norm.",
    paper="Karcher 1977; as a merge: mergekit's karcher (which ignores weights; we honour them)",
    needs_base=False,
    min_models=1,
    params=(
        Param("weight", per_model=True, arg="weights", default=1.0, doc="the model's coefficient"),
        Param("max_iter", int, default=10, minimum=1, doc="fixed-point iterations"),
        Param("tol", default=1e-5, minimum=0.0, doc="stop when the tangent step is this small"),
    ),
    compat=lambda params, compute_dtype: dict(params, compute_dtype=compute_dtype),
    reduce=karcher_sums,
    finish=lambda stats, gram, **params: karcher_coefficients(gram, **params),
    whole_tensor_when=lambda params: params.get("compute_dtype") is not None,
)
def karcher(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    *,
    weights: list[float] | None = None,
    max_iter: int = 10,
    tol: float = 1e-5,
    ctx: TensorContext | None = None,
    compute_dtype: torch.dtype | None = None,
    stats: np.ndarray | None = None,
) -> torch.Tensor:
    """argmin_m Σ ŵi d(m, x̂i)² on the unit sphere by Riemannian gradient steps; × Σ ŵi ||xi||
    (`karcher_coefficients`, from the models' Gram matrix: the engine's reduce pass, or taken
    here; the engine's `stats` are the coefficients). With `compute_dtype`, as mergekit
    evaluates it (`karcher_rounded`: equal weights, whole tensors)."""
    if compute_dtype is not None:
        return karcher_rounded([x.to(compute_dtype) for x in experts], max_iter, tol)
    if stats is None:
        stats = karcher_coefficients(karcher_sums(None, experts), weights=weights,
                                     max_iter=max_iter, tol=tol)
    if not len(stats):
        return torch.zeros_like(experts[0])
    return weighted_sum(experts, [float(c) for c in stats])
