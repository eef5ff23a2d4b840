"""Merges weighted by statistics gathered from data or from training: Fisher merging, RegMean
(and RegMean++), OTA with Fast Fisher Grafting, and Localize-and-Stitch's stitching.

Each reads one kind of per-expert statistic (see `MethodSpec.statistics`), given as a list aligned
with the experts, or None for a tensor that has none (biases and norms have no Gram matrix); each
then falls back to a data-free merge, said below.

Fisher merging (Matena & Raffel 2022, §2.2, eq. 2): θ = Σ wi F̃i θi / Σ wi F̃i, F̃i = Fi + ε, with
Fi the diagonal Fisher of expert i. ε is added to every Fi as in the RegMean authors' code
(`fisher_smooth`), so that an entry no expert's Fisher sees is their weighted average. With
`normalize`, each Fi is first divided by its mean over the tensor (the RegMean code divides by its
L2 norm instead); ε = 1e-8 is then negligible, while raw Fisher entries of a large model can be
smaller than ε. No Fisher: the weighted average.

RegMean (Jin et al. 2023, §3.2-3.3): for a linear layer with input Gram matrices Gi = XiᵀXi / n,
the weight that minimizes Σi ||Xi W − Xi Wi||² is W = (Σ Gi)⁻¹ Σ Gi Wi, here in the [in, out]
layout. Off-diagonal entries of each Gi are scaled by α (Gi' = α Gi + (1 − α) Diag(Gi)), and the
per-model weight scales Gi, both as in the authors' code (bloomberg/dataless-model-merging). α is
tuned per setting there (off by default, i.e. α = 1); FusionBench's configs use 0.1 to 0.95; we
default to 0.9; α = 0 keeps only the diagonals (their `regmean_diag`). An input feature that no
calibration token activates (a zero row of Σ Gi) leaves its weight undetermined; it gets the
experts' weighted average. Tensors without a Gram matrix (biases, norms, embeddings) go to the
`fallback` method. RegMean++ (Nguyen et al. 2025) is the
same solve with Grams taken from the merged model's own activations; the pipeline computes them
(calibrate/sequential.py) and tells the two apart by name.

OTA and FFG (Mahdavinia et al. 2025, arXiv:2509.11167; definitions from the authors' code,
pmahdavi/ota-merge, mergekit/merge_methods/ota.py and ffg.py). Adam's second moment vi stands in
for the diagonal Fisher. Fast Fisher Grafting keeps, per tensor, the top-`density` fraction of the
saliency vi ⊙ τi² (ffg.py; the authors' OTA runs instead pass a threshold per model, found by
running FFG at a density). OTA then averages the kept entries with curvature weights:

    θ = θ0 + Σ mi ci τi / Σ mi ci,    ci = wi (vi^p + ε)    (θ0 where no expert keeps the entry)

which is the authors' Σ ci mi θi / Σ ci mi with `fallback_to_base`, as in the paper's configs (p =
0.5, ε = 1e-26, no normalization). `normalize` divides vi^p by its mean over the tensor (their
"global" mode); the per-model weight is their `scaling_factor`. With equal moments OTA is the
average of the grafted task vectors over the experts that keep each entry, and with density 1 it
is the plain average of the experts; p = 0 is their "OTA with linear" ablation. No second moments:
the same formula with vi = 1 (saliency τi², equal curvature). `ffg` alone grafts one expert.

Stitching (He et al. 2024, Localize-and-Stitch, §3.2; authors' code yifei-he/Localize-and-Stitch,
`Stitcher`): θ = θ0 + Σ wi γi ⊙ τi, γi = mi / Σj mj where masks overlap (`overlap: average`) or
γi = mi (`sum`). Without masks, their dataless localization: mi = the top-`density` fraction of
|τi|, per tensor here (their code ranks |τ| over all trainable tensors at once, 5% for language
models), ties with the cut kept. That cut streams as TIES' does (magnitude_trim.py: `cut_sums`, two
counting passes of an exact radix select), so the masks need no whole tensor.
"""

from __future__ import annotations

import torch

from mergesmith.methods.blocks import (
    float_below,
    kth_largest,
    task_vectors,
    topk_count,
)
from mergesmith.methods.registry import Param, TensorContext, get_method, register
from mergesmith.methods.magnitude_trim import band, cut_passes, cut_sums, finish_cuts
from mergesmith.methods.sparse import as_rows, row_blocks

FISHER_PAPER = ("Matena & Raffel 2022, Merging models with Fisher-weighted averaging (NeurIPS), "
                "arXiv:2111.09832")
REGMEAN_PAPER = ("Jin et al. 2023, Dataless knowledge fusion by merging weights of language models "
                 "(ICLR), arXiv:2212.09849")
REGMEAN_PLUSPLUS_PAPER = ("Nguyen et al. 2025, RegMean++: enhancing effectiveness and "
                          "generalization of regression mean for model merging, arXiv:2508.03121")
OTA_PAPER = ("Mahdavinia et al. 2025, Harnessing optimization dynamics for curvature-informed "
             "model merging, arXiv:2509.11167")
STITCH_PAPER = ("He et al. 2024, Localize-and-Stitch: efficient model merging via sparse task "
                "arithmetic, arXiv:2408.13656")

WEIGHT = Param("weight", default=1.0, per_model=True, arg="weights", minimum=0.0,
               doc="the model's coefficient")

# transformers' Conv1D layers (GPT-2, OpenAI GPT) store their weight as [in, out]; nn.Linear as
# [out, in]. A square weight fits its Gram either way, so the module name decides.
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# Solve RegMean in float64 while its matrices stay small (a 4096² float64 matrix is 128 MiB);
# beyond, float32, which α < 1 keeps well conditioned.
FLOAT64_MAX_INPUTS = 4096


def _check_statistics(kind: str, stats: list[torch.Tensor], experts: list[torch.Tensor],
                      same_shape: bool = True) -> None:
    if len(stats) != len(experts):
        raise ValueError(f"{len(stats)} {kind} statistics for {len(experts)} models")
    for stat, expert in zip(stats, experts):
        if same_shape and stat.shape != expert.shape:
            raise ValueError(f"{kind} statistic of shape {list(stat.shape)} for a tensor of "
                             f"shape {list(expert.shape)}")


# --------------------------------------------------------------------------------------------
# Fisher merging


def fisher_merge(experts: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float],
                 epsilon: float, normalize: bool) -> torch.Tensor:
    """Σ ci θi / Σ ci, ci = wi (F̂i + ε), F̂i = Fi, or Fi / mean(Fi) with `normalize`."""
    total = torch.zeros_like(experts[0])
    norm = torch.zeros_like(experts[0])
    for expert, fisher_i, weight in zip(experts, fishers, weights):
        mean = float(fisher_i.mean()) if normalize else 0.0
        c = fisher_i / mean if mean > 0 else fisher_i.clone()
        c.add_(epsilon).mul_(weight)
        total.addcmul_(c, expert)
        norm.add_(c)
    unseen = norm == 0  # only with ε = 0, where no expert's Fisher sees the entry
    if unseen.any():
        average = sum(w * x for w, x in zip(weights, experts)) / sum(weights)
        total = torch.where(unseen, average, total)
        norm.masked_fill_(unseen, 1.0)
    return total.div_(norm)


@register(
    "fisher",
    summary="Average weighted entry by entry by each expert's diagonal Fisher information.",
    paper=FISHER_PAPER,
    needs_base=False,
    optional_base=True,  # a recipe's base_model is not averaged in: it has no Fisher of its own
    params=(
        WEIGHT,
        Param("epsilon", default=1e-8, minimum=0.0, doc="added to every Fisher entry"),
        Param("normalize", bool, default=False,
              doc="divide each expert's Fisher by its mean over the tensor first"),
    ),
    elementwise=True,
    whole_tensor_when=lambda params: params.get("normalize", False),
    statistics=("fisher",),
)
def fisher(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    *,
    weights: list[float],
    epsilon: float = 1e-8,
    normalize: bool = False,
    fisher: list[torch.Tensor] | None = None,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """θ = Σ wi (Fi + ε) θi / Σ wi (Fi + ε); without Fisher, Σ wi θi / Σ wi."""
    if sum(weights) <= 0:
        raise ValueError("the weights sum to zero; give some model a positive weight")
    if fisher is None:
        return get_method("linear").fn(None, experts, weights=weights, ctx=ctx)
    _check_statistics("fisher", fisher, experts)
    return fisher_merge(experts, fisher, weights, epsilon, normalize)


# --------------------------------------------------------------------------------------------
# RegMean


def input_axis(weight_shape: torch.Size, gram_shape: torch.Size, name: str = "") -> int:
    """The axis of a 2-D weight that its Gram's inputs index: 1 for nn.Linear ([out, in]), 0 for
    transformers' Conv1D ([in, out])."""
    if len(gram_shape) != 2 or gram_shape[0] != gram_shape[1]:
        raise ValueError(f"a Gram matrix must be square, got shape {list(gram_shape)}")
    if len(weight_shape) != 2:
        raise ValueError(f"a Gram matrix {list(gram_shape)} for a {len(weight_shape)}-D tensor "
                         f"of shape {list(weight_shape)}; RegMean merges 2-D weights")
    size = gram_shape[0]
    rows, cols = weight_shape
    if rows == size and cols == size:
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        return 0 if module in CONV1D_MODULES else 1
    if cols == size:
        return 1
    if rows == size:
        return 0
    raise ValueError(f"Gram matrix of shape {list(gram_shape)} fits neither axis of the weight "
                     f"of shape {list(weight_shape)}")


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G' = α G + (1 − α) Diag(G): off-diagonal entries times α, the diagonal kept (in place)."""
    diagonal = gram.diagonal().clone()
    gram.mul_(alpha).diagonal().copy_(diagonal)
    return gram


def regmean_solve(grams: list[torch.Tensor], inputs_first: list[torch.Tensor], weights: list[float],
                  alpha: float) -> torch.Tensor:
    """W = (Σ wi Gi')⁻¹ Σ wi Gi' Wi for weights Wi laid out [in, out].

    An input feature that no expert's data activates has a zero row and column in every Gi, so
    its row of W is free; it is set to Σ wi Wi / Σ wi."""
    size = grams[0].shape[0]
    dtype = torch.float64 if size <= FLOAT64_MAX_INPUTS else torch.float32
    lhs = torch.zeros(size, size, dtype=dtype, device=grams[0].device)
    rhs = torch.zeros(inputs_first[0].shape, dtype=dtype, device=grams[0].device)
    average = torch.zeros_like(rhs)
    for gram, weight_matrix, w in zip(grams, inputs_first, weights):
        scaled = scale_off_diagonal(gram.to(dtype, copy=True), alpha)
        w_matrix = weight_matrix.to(dtype)
        rhs.add_(scaled @ w_matrix, alpha=w)
        lhs.add_(scaled, alpha=w)
        average.add_(w_matrix, alpha=w)
    unseen = lhs.diagonal() == 0
    if unseen.any():
        lhs.diagonal()[unseen] = 1.0
        rhs[unseen] = average[unseen] / sum(weights)
    try:
        solution = torch.linalg.solve(lhs, rhs)
    except torch.linalg.LinAlgError:
        raise ValueError("the summed Gram matrix is singular (fewer calibration tokens than input "
                         "features?); use alpha < 1 or more calibration samples") from None
    return solution.float()


def regmean_fallback(name: str, base: torch.Tensor | None, experts: list[torch.Tensor],
                     weights: list[float], ctx: TensorContext | None) -> torch.Tensor:
    if name == "task_arithmetic" and base is None:
        raise ValueError("fallback task_arithmetic needs a base model for the tensors without a "
                         "Gram matrix; add base_model, or use fallback: linear")
    return get_method(name).fn(base, experts, weights=weights, ctx=ctx)


REGMEAN_PARAMS = (
    WEIGHT,
    Param("alpha", default=0.9, minimum=0.0, maximum=1.0,
          doc="scale of the Gram matrices' off-diagonal entries (1: exact least squares, "
              "0: one weighted average per input feature)"),
    Param("fallback", str, default="linear", choices=("linear", "task_arithmetic"),
          doc="method for the tensors without a Gram matrix (biases, norms, embeddings)"),
)


def regmean(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    *,
    weights: list[float],
    alpha: float = 0.9,
    fallback: str = "linear",
    gram: list[torch.Tensor] | None = None,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """W = (Σ wi Gi')⁻¹ Σ wi Gi' Wi per linear weight; other tensors by `fallback`."""
    if gram is None:
        return regmean_fallback(fallback, base, experts, weights, ctx)
    if sum(weights) <= 0:
        raise ValueError("the weights sum to zero; give some model a positive weight")
    _check_statistics("gram", gram, experts, same_shape=False)
    axis = input_axis(experts[0].shape, gram[0].shape, ctx.name if ctx else "")
    for g in gram[1:]:
        if g.shape != gram[0].shape:
            raise ValueError(f"Gram matrices of shapes {list(gram[0].shape)} and {list(g.shape)}")
    inputs_first = [expert.t() if axis == 1 else expert for expert in experts]
    merged = regmean_solve(gram, inputs_first, weights, alpha)
    return merged.t().contiguous() if axis == 1 else merged


for _name, _summary, _paper in (
    ("regmean", "Per linear layer, the weight closest to every expert's outputs on its own "
                "calibration inputs (closed-form least squares over input Gram matrices).",
     REGMEAN_PAPER),
    ("regmean_plusplus", "RegMean with each layer's Gram matrices taken from the merged model's "
                         "own activations (the layers below already merged).",
     REGMEAN_PLUSPLUS_PAPER),
):
    register(_name, summary=_summary, paper=_paper, needs_base=False, optional_base=True,
             params=REGMEAN_PARAMS, statistics=("gram",))(regmean)


# --------------------------------------------------------------------------------------------
# OTA and Fast Fisher Grafting

KEEP_ALL, KEEP_NONE = float("-inf"), float("inf")  # FFG cuts at densities 1 and 0


def saliency(tau: torch.Tensor, moment: torch.Tensor | None) -> torch.Tensor:
    """FFG's saliency v ⊙ τ² (τ² without a second moment: equal curvature)."""
    score = tau.square()
    return score.mul_(moment) if moment is not None else score


def ffg_cut(score: torch.Tensor, density: float) -> float:
    """The k-th largest score, k = topk_count(n, d): FFG keeps the scores ≥ it. Reorders
    `score` (a scratch tensor)."""
    k = topk_count(score.numel(), density)
    if k == 0 or k == score.numel():
        return KEEP_NONE if k == 0 else KEEP_ALL
    (cut,) = kth_largest(score, [k])
    return cut


def keep_above(score: torch.Tensor, cut: float) -> torch.Tensor:
    """1.0 where score ≥ cut (ties kept), else 0.0, in place; a zero score is never kept by a
    positive density's cut (it carries no saliency). Float passes, score − cut⁻ > 0, as
    blocks.keep_magnitude_band: a bool mask costs several times more on the CPU."""
    if cut == KEEP_ALL or cut == KEEP_NONE:
        return score.fill_(1.0 if cut == KEEP_ALL else 0.0)
    below = float_below(cut, score.dtype) if cut > 0 else 0.0
    return score.sub_(below).sign_().clamp_(min=0)


def top_fraction_mask(score: torch.Tensor, density: float) -> torch.Tensor:
    """1.0 on the top-d fraction of `score` (ties with the cut kept), 0.0 elsewhere."""
    return keep_above(score, ffg_cut(score.clone(), density))


def raise_to(x: torch.Tensor, power: float) -> torch.Tensor:
    """x^p in place; the paper's p = 1/2 by sqrt, cheaper than a general power."""
    if power == 0.5:
        return x.sqrt_()
    return x if power == 1 else x.pow_(power)


def curvature(moment: torch.Tensor | None, like: torch.Tensor, weight: float, power: float,
              epsilon: float, mean: float | None) -> torch.Tensor:
    """c = w (v^p / mean + ε) (no division without `normalize`); v = 1 when there is none."""
    if moment is None:
        return torch.full_like(like, weight * (1.0 + epsilon))
    c = raise_to(moment.clamp(min=0), power)
    if mean is not None:
        c.div_(mean + epsilon)
    return c.add_(epsilon).mul_(weight)


def ota_block(base: torch.Tensor, experts: list[torch.Tensor], moments: list, weights: list[float],
              cuts: list[float] | None, means: list, power: float, epsilon: float) -> torch.Tensor:
    """θ0 + Σ mi ci τi / Σ mi ci on a block of rows, θ0 where Σ mi ci = 0."""
    total = torch.zeros_like(base)
    norm = torch.zeros_like(base)
    for i, (expert, moment, weight) in enumerate(zip(experts, moments, weights)):
        tau = expert - base
        c = curvature(moment, tau, weight, power, epsilon, means[i])
        if cuts is not None:
            c.mul_(keep_above(saliency(tau, moment), cuts[i]))
        total.addcmul_(c, tau)
        norm.add_(c)
    no_expert = norm == 0
    return total.div_(norm.masked_fill_(no_expert, 1.0)).add_(base)


def ota_merge(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float], density: float,
              ffg: bool, power: float, epsilon: float, normalize: bool,
              moments: list[torch.Tensor] | None) -> torch.Tensor:
    """The whole-tensor parts first (each expert's FFG cut, the means of v^p), then the merge in
    blocks of rows that stay in cache (as sparse.py)."""
    moments = moments if moments is not None else [None] * len(experts)
    cuts = ([ffg_cut(saliency(e - base, v), density) for e, v in zip(experts, moments)]
            if ffg else None)
    means = [float(raise_to(v.clamp(min=0), power).mean()) if normalize and v is not None else None
             for v in moments]
    base_rows = as_rows(base)
    out = torch.empty_like(base_rows)
    expert_rows = [as_rows(e) for e in experts]
    moment_rows = [as_rows(v) if v is not None else None for v in moments]
    for block in row_blocks(base_rows):
        out[block] = ota_block(base_rows[block], [e[block] for e in expert_rows],
                               [v[block] if v is not None else None for v in moment_rows],
                               weights, cuts, means, power, epsilon)
    return out.reshape(base.shape)


DENSITY = Param("density", default=0.1, minimum=0.0, maximum=1.0,
                doc="FFG: fraction of each task vector kept, by saliency v·τ²")


@register(
    "ota",
    summary="Average of the FFG-pruned task vectors weighted entry by entry by Adam's second "
            "moments (curvature), per Optimization Trajectory Aware merging.",
    paper=OTA_PAPER,
    needs_base=True,
    params=(
        WEIGHT,
        DENSITY,
        Param("ffg", bool, default=True,
              doc="prune each task vector with Fast Fisher Grafting first"),
        Param("power", default=0.5, minimum=0.0, doc="curvature weight v^power (0: plain average)"),
        Param("epsilon", default=1e-26, minimum=0.0, doc="added to every curvature weight"),
        Param("normalize", bool, default=False,
              doc="divide each expert's v^power by its mean over the tensor"),
    ),
    elementwise=True,
    whole_tensor_when=lambda params: (params.get("ffg", True) and params.get("density", 0.1) < 1
                                      or params.get("normalize", False)),
    statistics=("second_moment",),
)
def ota(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    weights: list[float],
    density: float = 0.1,
    ffg: bool = True,
    power: float = 0.5,
    epsilon: float = 1e-26,
    normalize: bool = False,
    second_moment: list[torch.Tensor] | None = None,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """θ = θ0 + Σ mi ci τi / Σ mi ci, ci = wi (vi^p + ε), mi the FFG mask (all ones without ffg)."""
    if second_moment is not None:
        _check_statistics("second_moment", second_moment, experts)
    return ota_merge(base, experts, weights, density, ffg, power, epsilon, normalize, second_moment)


@register(
    "ffg",
    summary="Fast Fisher Grafting: the expert's task vector kept only where Adam's second moment "
            "times its square is largest.",
    paper=OTA_PAPER,
    needs_base=True,
    params=(DENSITY,),
    min_models=1,
    max_models=1,
    elementwise=True,
    whole_tensor_when=lambda params: params.get("density", 0.1) < 1,
    statistics=("second_moment",),
)
def ffg(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    density: float = 0.1,
    second_moment: list[torch.Tensor] | None = None,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """θ = θ0 + m ⊙ τ, m the top-d fraction of v ⊙ τ² (of τ² without second moments)."""
    if len(experts) != 1:
        raise ValueError(f"ffg grafts one expert onto the base; got {len(experts)}")
    if second_moment is not None:
        _check_statistics("second_moment", second_moment, experts)
    (tau,) = task_vectors(base, experts)
    score = saliency(tau, second_moment[0] if second_moment is not None else None)
    return tau.mul_(top_fraction_mask(score, density)).add_(base)


# --------------------------------------------------------------------------------------------
# Localize-and-Stitch: the stitching step


def binary_masks(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The given masks as 0/1 floats; anything else is refused."""
    out = []
    for mask in masks:
        mask = mask.float()
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("mask statistics must be 0/1 (or bool) entries")
        out.append(mask)
    return out


def overlap_shares(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """γi = mi / Σj mj (0 where mi = 0): entries claimed by k masks give each 1/k."""
    claims = torch.zeros_like(masks[0])
    for mask in masks:
        claims.add_(mask)
    claims.clamp_(min=1)
    return [mask / claims for mask in masks]


def stitch_sums(base: torch.Tensor, experts: list[torch.Tensor], *, density: float,
                stats=None, **_) -> torch.Tensor:
    """One chunk's counts for the dataless masks' cuts: TIES' trim at one density for all."""
    return cut_sums(base, experts, densities=[density] * len(experts), stats=stats)


def finish_stitch(stats, sums: torch.Tensor, *, density: float, **_):
    return finish_cuts(stats, sums, densities=[density] * sums.shape[0])


def stitch_passes(params: dict) -> int:
    return cut_passes({"densities": [params["density"]]})


def stitch_cuts(base: torch.Tensor, experts: list[torch.Tensor], density: float
                ) -> list[tuple[float, float]]:
    """Each τi's cut (the k-th largest |τi|, k = topk_count(n, d)) over a whole tensor: the
    engine's passes, run here."""
    stats = None
    for _ in range(stitch_passes({"density": density})):
        stats = finish_stitch(stats, stitch_sums(base, experts, density=density, stats=stats),
                              density=density)
    return stats or [band(base.numel(), density, [])] * len(experts)


@register(
    "stitch",
    summary="Localize-and-Stitch: each task vector kept only on its localized entries (its "
            "mask, or its largest magnitudes), averaged where the masks overlap.",
    paper=STITCH_PAPER,
    needs_base=True,
    params=(
        Param("weight", default=1.0, per_model=True, arg="weights", doc="the model's coefficient"),
        Param("overlap", str, default="average", choices=("average", "sum"),
              doc="where k masks overlap, each task vector counts 1/k (average) or fully (sum)"),
        Param("density", default=0.05, minimum=0.0, maximum=1.0,
              doc="without masks: fraction of each task vector kept, by magnitude"),
    ),
    statistics=("mask",),
    optional_statistics=True,
    reduce=stitch_sums,
    passes=stitch_passes,
    finish=finish_stitch,
)
def stitch(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    weights: list[float],
    overlap: str = "average",
    density: float = 0.05,
    mask: list[torch.Tensor] | None = None,
    ctx: TensorContext | None = None,
    stats: list[tuple[float, float]] | None = None,
) -> torch.Tensor:
    """θ = θ0 + Σ wi γi ⊙ τi, γi = mi / Σj mj (average) or mi (sum). Without masks,
    mi = |τi| ≥ its cut, from the engine's counting passes (`stats`) or found here."""
    if overlap not in ("average", "sum"):
        raise ValueError(f"overlap must be average or sum, got {overlap!r}")
    taus = task_vectors(base, experts)
    if mask is not None:
        _check_statistics("mask", mask, experts)
        masks = binary_masks(mask)
    else:
        cuts = stats or stitch_cuts(base, experts, density)
        masks = [(tau.abs() >= low).float() for tau, (low, _) in zip(taus, cuts)]
    shares = overlap_shares(masks) if overlap == "average" else masks
    merged = base.clone()
    for tau, share, weight in zip(taus, shares, weights):
        merged.addcmul_(share, tau, value=weight)
    return merged
