"""PEFT's `add_weighted_adapter` combination types, as pure functions of one module's factors.

Adapter i of a module has factors B_i (d_out × r_i), A_i (r_i × d_in) and scaling s_i, so
ΔW_i = s_i B_i A_i (PEFT's layout: a fan_in_fan_out or embedding module's ΔW is the transpose
of its base weight, as in PEFT). Each function returns the merged (B, A) with scaling 1.

Two modes:

- `exact` (default): combine the ΔW_i themselves, each scaling applied once, no cross terms.
  `cat` concatenates the factors (BA = Σ w_i ΔW_i, rank Σ r_i); `linear` is that same exact
  sum, truncated by SVD only when `svd_rank` asks for fewer ranks; `svd` is Σ w_i ΔW_i
  truncated to `svd_rank` (default: the largest r_i), found from the factors (QR of the stacked
  B_i and A_iᵀ, then an SVD of a Σr × Σr core: no d_out × d_in matrix). The pruning types
  (ties, dare_*, magnitude_prune) prune the ΔW_i, which have no meaning entry by entry in factor
  space, and truncate by SVD: `ties` and `ties_svd` are one merge here, and so on (DARE's
  masks from mergesmith's per-adapter streams, as methods/sparse.py draws them). That SVD
  (of a full d_out × d_in matrix, which pruning makes full-rank) is exact (methods/lowrank.py),
  or with `svd_solver: randomized` Halko et al.'s sketch: approximate, and far faster at LLM
  sizes (ties_svd of three rank-16 adapters on a 2048² module, one thread: 11.2 s exact, 0.8 s
  randomized; `svd` needs neither: its sum is low-rank, 27 ms, where peft_compat's full SVD
  takes 8.9 s).
- `peft_compat`: what PEFT 0.21.2 computes, tensor for tensor. Factor-space types (`linear`,
  `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`; equal ranks) combine the A_i with
  weights sign(w_i s_i)·√|w_i s_i| and the B_i with √|w_i s_i| separately, so BA has the cross
  terms Σ_{i≠j} b_i a_j B_i A_j (PEFT issue #3004); SVD types combine the ΔW_i (scaling once:
  0.21.2 no longer multiplies the weights by s_i again) and take a full SVD of the d_out × d_in
  result; one adapter is always `linear`. Random pruning draws torch.bernoulli from a generator
  seeded like PEFT's global one would be (`ctx.generator()`), A's then B's, adapter by adapter,
  each ΔW_i in its base's layout: seeded alike, a module's draws are PEFT's (PEFT's global
  generator runs on across modules and its new adapter's own initialisation, which no seed per
  module reproduces for a whole model). PEFT's new adapter also inherits
  `use_rslora` from the first adapter, so its scaling is √r, not 1: the engine writes that
  config too under this mode (engine/adapters.py).

The ops are PEFT's (peft/utils/merge_utils.py), in both modes: magnitude pruning keeps the
⌊d·n⌋ largest |x| of each tensor (none when that is 0; entries tied with the cut are all kept,
where torch.topk keeps an arbitrary subset); `ties` elects the sign of the unweighted pruned
tensors (`total`: of their sum, `frequency`: of their signs' sum; an exact tie elects +) and
divides the agreeing weighted entries by their count, not by the sum of their weights as
Part 1 TIES does; density ≥ 1 prunes nothing.

SVD types report the energy kept, Σ_{k≤r} S_k² / Σ S_k² (`info["energy"]`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from mergesmith.methods.blocks import (
    drop_random,
    elect_sign,
    keep_magnitude_band,
    kth_largest,
    weighted_sum,
)
from mergesmith.methods.lowrank import (NOISE_EPS, kept_energy, randomized_svd,
                                        top_singular_triplets)
from mergesmith.methods.registry import Param, TensorContext, register

# combination type -> the op merge_utils applies (to factors, or to the ΔW_i before an SVD)
FACTOR_SPACE = {"linear": "task_arithmetic", "ties": "ties", "dare_linear": "dare_linear",
                "dare_ties": "dare_ties", "magnitude_prune": "magnitude_prune"}
SVD_TYPES = {f"{name}_svd" if name != "linear" else "svd": op for name, op in FACTOR_SPACE.items()}
COMBINATION_TYPES = ("svd", "linear", "cat", *[t for t in FACTOR_SPACE if t != "linear"],
                     *[t for t in SVD_TYPES if t != "svd"])
PRUNING = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
MODES = ("exact", "peft_compat")

Factors = tuple[torch.Tensor, torch.Tensor]
# (index of the tensor among those drawn for this module, tensor) -> randomly pruned tensor
Drop = Callable[[int, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# merge_utils' ops on a list of same-shaped tensors


def keep_largest(x: torch.Tensor, density: float) -> torch.Tensor:
    """magnitude_based_pruning: the ⌊d·n⌋ largest |x| (and any tied with the smallest of them)."""
    if density >= 1:
        return x
    k = int(density * x.numel())
    if k == 0:
        return torch.zeros_like(x)
    (threshold,) = kth_largest(x.abs(), [k])
    return keep_magnitude_band(x, threshold)


def disjoint_count_mean(xs: list[torch.Tensor], weights: list[float],
                        sign: torch.Tensor) -> torch.Tensor:
    """Σ w_i x_i over the x_i whose own sign is the elected one, ÷ max(1, how many agree)."""
    agree = [(x.sign() == sign).to(x.dtype) for x in xs]
    total = weighted_sum([x * a for x, a in zip(xs, agree)], weights)
    return total.div_(torch.stack(agree).sum(0).clamp_(min=1))


def combine(op: str, xs: list[torch.Tensor], weights: list[float], *, density: float | None,
            majority_sign_method: str, drop: Drop, first: int = 0) -> torch.Tensor:
    """merge_utils' `op` of the x_i with weights w_i; `first`: the draw index of x_0."""
    if op in ("magnitude_prune", "ties"):
        xs = [keep_largest(x, density) for x in xs]
    elif op in ("dare_linear", "dare_ties"):
        xs = [drop(first + i, x) for i, x in enumerate(xs)]
    if op in ("ties", "dare_ties"):
        mode = {"total": "sum", "frequency": "count"}[majority_sign_method]
        return disjoint_count_mean(xs, weights, elect_sign(xs, None, mode=mode, ties="plus"))
    return weighted_sum(xs, weights)


def bernoulli_drop(density: float, generator: torch.Generator) -> Drop:
    """PEFT's random_pruning: x·Bernoulli(d)/d, drawn from one generator in call order."""
    def drop(index: int, x: torch.Tensor) -> torch.Tensor:
        if density >= 1:
            return x
        mask = torch.bernoulli(torch.full_like(x, density), generator=generator)
        return (x * mask) / density
    return drop


def stream_drop(density: float, ctx: TensorContext) -> Drop:
    """DARE's drop as mergesmith draws it (methods/blocks.py): tensor i from stream i."""
    return lambda index, x: drop_random(x, density, ctx.stream(index, x.device), at=0)


# --------------------------------------------------------------------------------------------
# SVD truncation


def truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int,
             clamp: float | None, total: torch.Tensor | None = None) -> tuple[Factors, float]:
    """B = U_r diag(S_r), A = Vh_r (PEFT's split: the scale on B), each clipped to [−q, q] with
    q the `clamp` quantile of their entries; and the energy kept, Σ_{k≤r} S_k² / Σ S_k² (S the
    whole spectrum, or `total` = ‖ΔW‖_F² when S is only its top)."""
    r = min(rank, S.numel())
    if r == 0:  # ΔW = 0 (the adapters cancel): one zero rank, since PEFT needs r ≥ 1
        return (U.new_zeros(U.shape[0], 1).float(), Vh.new_zeros(1, Vh.shape[1]).float()), 1.0
    B, A = (U[:, :r] @ torch.diag(S[:r])).float(), Vh[:r, :].float()
    if clamp is not None:
        q = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-q, q), A.clamp(-q, q)
    return (B, A), kept_energy(S, r, total)


def svd_of_product(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """U, S, Vh of B @ A (d_out × R times R × d_in) from QRs of B and Aᵀ and the SVD of the
    R × R core (methods/lowrank.py, float64): no d_out × d_in matrix."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.T.double())
    # below fp32's precision of the terms (‖B‖_F‖A‖_F bounds them all): rounding, not signal
    floor = NOISE_EPS * float(torch.linalg.norm(Rb) * torch.linalg.norm(Ra))
    u, S, vh = top_singular_triplets(Rb @ Ra.T, floor=floor)
    return Qb @ u, S, vh @ Qa.T


def concatenated(Bs: list[torch.Tensor], As: list[torch.Tensor],
                 coefficients: list[float]) -> Factors:
    """B = [B_1 … B_n], A = [c_1 A_1; …; c_n A_n]: BA = Σ c_i B_i A_i exactly."""
    return torch.cat(Bs, dim=1), torch.cat([c * A for c, A in zip(coefficients, As)], dim=0)


# --------------------------------------------------------------------------------------------
# the two modes


def transpose(x: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x.T if transposed else x


def peft_compat(Bs, As, scalings, weights, combination_type, rank, params, ctx,
                transposed=False) -> tuple:
    """add_weighted_adapter of PEFT 0.21.2 for one Linear module."""
    if len(Bs) == 1:
        combination_type = "linear"
    if combination_type == "cat":
        return concatenated(Bs, As, [w * s for w, s in zip(weights, scalings)]), {}
    drop = bernoulli_drop(params["density"] or 1.0, ctx.generator(Bs[0].device))
    ops = dict(density=params["density"], majority_sign_method=params["majority_sign_method"],
               drop=drop)
    if combination_type in FACTOR_SPACE:
        scaled = [w * s for w, s in zip(weights, scalings)]
        a = [math.copysign(math.sqrt(abs(c)), c) if c != 0 else 0.0 for c in scaled]
        b = [math.sqrt(abs(c)) for c in scaled]
        op = FACTOR_SPACE[combination_type]
        A = combine(op, As, a, **ops)
        B = combine(op, Bs, b, first=len(As), **ops)
        return (B, A), {}
    # get_delta_weight's rounding and layout: the base's, where the masks are drawn
    deltas = [transpose((B @ A) * s, transposed) for B, A, s in zip(Bs, As, scalings)]
    delta = transpose(combine(SVD_TYPES[combination_type], deltas, weights, **ops), transposed)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    factors, energy = truncate(U, S, Vh, rank, params["svd_clamp"])
    return factors, {"energy": energy}


def exact(Bs, As, scalings, weights, combination_type, rank, params, ctx,
          transposed=False) -> tuple:
    """Σ w_i s_i B_i A_i, or the op of the s_i B_i A_i, each scaling applied once."""
    coefficients = [w * s for w, s in zip(weights, scalings)]
    total_rank = sum(A.shape[0] for A in As)
    if combination_type == "cat" or (combination_type == "linear" and rank >= total_rank):
        return concatenated(Bs, As, coefficients), {}
    op = FACTOR_SPACE.get(combination_type) or SVD_TYPES[combination_type]
    if op == "task_arithmetic":  # a low-rank sum: its SVD from the factors
        U, S, Vh = svd_of_product(*concatenated(Bs, As, coefficients))
    else:
        # in the base's layout, as PEFT: the random draws follow its entries' order
        deltas = [transpose((B @ A).mul_(s), transposed) for B, A, s in zip(Bs, As, scalings)]
        delta = transpose(combine(op, deltas, weights, density=params["density"],
                                  majority_sign_method=params["majority_sign_method"],
                                  drop=stream_drop(params["density"] or 1.0, ctx)), transposed)
        if params["svd_solver"] == "randomized":  # approximate, seeded per module
            U, S, Vh = randomized_svd(delta, rank, seed=ctx.generator().initial_seed())
            total = delta.double().square().sum()
            return truncate(U, S, Vh, rank, params["svd_clamp"], total)[0], \
                {"energy": kept_energy(S, rank, total)}
        U, S, Vh = top_singular_triplets(delta)
    factors, energy = truncate(U, S, Vh, rank, params["svd_clamp"])
    return factors, {"energy": energy}


def output_rank(ranks: list[int], combination_type: str, svd_rank: int | None, mode: str) -> int:
    """PEFT's new rank: the common rank (factor-space types), Σ r_i (cat), svd_rank or the
    largest r_i (SVD types). In exact mode `linear` is the exact sum, rank Σ r_i unless
    svd_rank asks for fewer."""
    if combination_type == "cat":
        return sum(ranks)
    if combination_type == "linear" and mode == "exact":
        return svd_rank or sum(ranks)
    return svd_rank or max(ranks)


def needs_equal_ranks(params: dict) -> str | None:
    """PEFT's factor-space types add the A_i (and the B_i) entry by entry: one rank for all."""
    if params["mode"] == "peft_compat" and params["combination_type"] in FACTOR_SPACE:
        return (f"{params['combination_type']} under mode: peft_compat adds the factors entry by "
                "entry (use an SVD-based or cat combination, or mode: exact)")
    return None


def check(params: dict) -> None:
    kind = params["combination_type"]
    if params["density"] is None and any(p in kind for p in PRUNING):
        raise ValueError(f"combination_type {kind} prunes: give density (the fraction kept)")


@register("lora_combine", output="adapter", validate=check, equal_ranks_when=needs_equal_ranks,
          summary="Merge LoRA adapters into one adapter: PEFT add_weighted_adapter's types "
          "(linear, cat, svd, ties, dare, magnitude_prune, their _svd forms); exact by default, "
          "PEFT's own tensors with mode: peft_compat.",
          paper="PEFT LoraModel.add_weighted_adapter (huggingface/peft 0.21.2)", needs_base=False,
          params=(
              Param("weight", default=1.0, per_model=True, arg="weights",
                    doc="the adapter's coefficient (negative removes it)"),
              Param("combination_type", str, default="svd", choices=COMBINATION_TYPES),
              Param("svd_rank", int, default=None, minimum=1,
                    doc="output rank of the SVD types (default: the largest input rank)"),
              Param("svd_clamp", float, default=None, minimum=0, maximum=1,
                    doc="clip the SVD factors to this quantile of their entries"),
              Param("density", float, default=None, minimum=0, maximum=1,
                    doc="fraction of entries the pruning types keep"),
              Param("majority_sign_method", str, default="total", choices=("total", "frequency")),
              Param("mode", str, default="exact", choices=MODES,
                    doc="exact: combine the ΔW_i; peft_compat: PEFT 0.21.2's tensors"),
              Param("svd_solver", str, default="exact", choices=("exact", "randomized"),
                    doc="exact mode's SVD of a pruned ΔW: exact, or randomized (approximate, "
                    "fast at large d)"),
          ))
def lora_combine(Bs: list[torch.Tensor], As: list[torch.Tensor], scalings: list[float], *,
                 weights: list[float], ctx: TensorContext, combination_type: str = "svd",
                 svd_rank: int | None = None, svd_clamp: float | None = None,
                 density: float | None = None, majority_sign_method: str = "total",
                 mode: str = "exact", svd_solver: str = "exact", transposed: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One module's merged (B, A), scaling 1, and {"energy": kept fraction} for SVD types.
    `transposed`: the base stores ΔWᵀ (fan_in_fan_out, embeddings), where PEFT draws its masks."""
    params = dict(density=density, majority_sign_method=majority_sign_method,
                  svd_clamp=svd_clamp, svd_solver=svd_solver)
    rank = output_rank([A.shape[0] for A in As], combination_type, svd_rank, mode)
    run = peft_compat if mode == "peft_compat" else exact
    (B, A), info = run([B.float() for B in Bs], [A.float() for A in As], scalings, weights,
                       combination_type, rank, params, ctx, transposed)
    return B.contiguous(), A.contiguous(), info
