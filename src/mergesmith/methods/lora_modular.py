"""Modular LoRA merges on one module's factors: LoRA-LEGO, KnOTS and orthogonal adaptation.

Adapter methods (see methods/registry.py, `output="adapter"`): each is a pure function
fn(Bs, As, scalings, *, weights, ctx, **params) -> (B, A) of N LoRAs on one module, in PEFT's
layout (B_i: d_out × r_i, A_i: r_i × d_in, ΔW_i = s_i·B_i A_i), returning one LoRA whose
scaling is 1 (every s_i and weight folded into the factors).

lora_lego — Zhao et al. 2025 (ICLR), arXiv:2409.16167. Every rank-1 unit (b_j, a_j) (column j
of B_i, row j of A_i) is a "minimal semantic unit": reordering units leaves BA unchanged and
concatenating LoRAs sums their ΔW. The units of all N LoRAs are pooled (w_i·s_i folded into b),
clustered by k-means into k clusters, and the merged LoRA has one unit per centroid (rank k).
Choices of ours where the paper's text and code could not be checked:
  - a unit is only defined up to (b, a) ≡ (−b, −a) ≡ (cb, a/c): each is first put in a canonical
    form, ‖a‖ = ‖b‖ and the largest-|·| entry of a positive, and clustered as the point [a; b];
  - the pool is sorted lexicographically before k-means++ (seeded by the merge's seed and the
    module's name) so the result does not depend on the units' order inside an input;
  - the paper's dual reweighting is not reproduced (its formulas are unconfirmed); `reweight`
    offers "norm" (default: each centroid's a and b rescaled to the mean norms of its members,
    undoing the norm decay of averaging units that are not parallel), "sum" (each centroid
    times its cluster's size: clusters of coinciding units then sum exactly, as concatenation
    does) and "none" (the plain centroids); `lambda` scales the result.

knots — Stoica et al. 2025 (ICLR), arXiv:2410.19735, checked against gstoica27/KnOTS
(task_merger.py, masking_ops.py). M = [ΔW_1 … ΔW_N] (the ΔW_i side by side along the input
axis) = U S Vᵀ, Vᵀ split into N blocks so that ΔW_i = U S V_iᵀ exactly; a merge rule combines
the blocks S V_iᵀ entrywise (the code's default `s_on_V`: S is folded into the blocks before
they are trimmed); ΔW = U · merged. M is never formed: with the stacked B's = Q R and each
s_i A_iᵀ = P_i T_i (QR), M = Q [R_i T_iᵀ]_i blockdiag(P_iᵀ), so the SVD of the small core
[R_i T_iᵀ]_i (≤ Σr_i square) gives U = Q W and S V_iᵀ = Wᵀ R_i T_iᵀ P_iᵀ. Components at the
fp32 noise floor are dropped (the code: S ≤ 1e-5). Rules (ties, dare_ties and dare_linear on
the blocks): "ties" (trim to the top-`density` magnitudes of each block, elect signs, disjoint
mean),
"dare_ties", "dare_linear", "mean" (Σ w_i X_i / Σ w_i) and "sum". Differences from the code: it
trims each task's blocks over the whole model at once (we trim per module), and breaks exact
sign ties by the majority sign (we leave such entries at zero, as our TIES does).

orthogonal_lora_sum — Po et al. 2024 (CVPR), arXiv:2312.02432: LoRAs trained with frozen,
mutually orthogonal down-projections A_i, summed: ΔW = Σ λ_i s_i B_i A_i, written exactly as
the concatenation B = [B_1 … B_N], A = [λ_i s_i A_i] (rank Σ r_i). `orthogonal_down_projections`
samples such A_i; `cross_orthogonality` measures ‖A_iA_jᵀ‖_F / (‖A_i‖_F‖A_j‖_F) to predict
crosstalk before summing (0: none).
"""

from __future__ import annotations

import numpy as np
import torch

from mergesmith.methods.lowrank import kept_energy, noise_floor, top_singular_triplets
from mergesmith.methods.registry import Param, TensorContext, get_method, register, seeded_generator

KMEANS_ITERATIONS = 100

# --------------------------------------------------------------------------------------------
# shared


def folded(Bs: list[torch.Tensor], scalings: list[float],
           weights: list[float]) -> list[torch.Tensor]:
    """w_i·s_i·B_i in float64: each LoRA's whole coefficient on its B."""
    return [b.to(torch.float64) * (w * s) for b, s, w in zip(Bs, scalings, weights)]


def concatenated(Bs: list[torch.Tensor],
                 As: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B_1 … B_N], [A_1; …; A_N]: the LoRA whose BA is Σ B_i A_i exactly (rank Σ r_i)."""
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def as_output(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return b.to(torch.float32).contiguous(), a.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------
# LoRA-LEGO


def canonical_units(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Units (rows of b: n × d_out, rows of a: n × d_in, b_j a_jᵀ each) rescaled to ‖a_j‖ = ‖b_j‖
    and signed so that a_j's largest-|·| entry (the first of equals) is positive; b_j a_jᵀ is
    unchanged. A unit with a zero factor contributes nothing and becomes zero."""
    norm_b, norm_a = b.norm(dim=1), a.norm(dim=1)
    live = (norm_a > 0) & (norm_b > 0)
    c = torch.where(live, (norm_b / torch.where(live, norm_a, 1)).sqrt(), 0)
    sign = torch.gather(a, 1, a.abs().argmax(dim=1, keepdim=True)).squeeze(1).sign()
    sign = torch.where(sign == 0, 1, sign)
    scale_a = c * sign
    scale_b = torch.where(live, sign / torch.where(live, c, 1), 0)
    return b * scale_b[:, None], a * scale_a[:, None]


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator,
           iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns each point's cluster (0..k−1). An emptied
    cluster takes the point farthest from its centroid."""
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [first]
    nearest = (points - points[first]).square().sum(dim=1)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total <= 0:  # every point coincides with a center: any further one will do
            pick = next(i for i in range(n) if i not in centers)
        else:
            pick = int(torch.multinomial(nearest / total, 1, generator=generator))
        centers.append(pick)
        nearest = torch.minimum(nearest, (points - points[pick]).square().sum(dim=1))
    centroids = points[centers].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        distances = torch.cdist(points, centroids)
        new = distances.argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = labels == c
            if members.any():
                centroids[c] = points[members].mean(dim=0)
            else:
                far = int(distances.min(dim=1).values.argmax())
                centroids[c], labels[far] = points[far], c
    return labels


def lexicographic_order(points: torch.Tensor) -> torch.Tensor:
    """The rows' lexicographic order (first column first): the same pool in any input order."""
    return torch.from_numpy(np.lexsort(points.numpy().T[::-1]).copy())


@register(
    "lora_lego",
    summary="Pool every rank-1 unit of the LoRAs, cluster them by k-means into `rank` clusters, "
            "and build one LoRA from the centroids (LoRA-LEGO).",
    paper="Zhao et al. 2025, Merging LoRAs like playing LEGO: pushing the modularity of LoRA to "
          "extremes through rank-wise clustering (ICLR), arXiv:2409.16167",
    needs_base=False,
    output="adapter",
    params=(
        Param("weight", default=1.0, per_model=True, arg="weights",
              doc="factor on the LoRA's ΔW before its units are pooled"),
        Param("rank", int, default=None, minimum=1,
              doc="k, the merged rank (clusters); default the largest input rank"),
        Param("reweight", str, default="norm", choices=("norm", "sum", "none"),
              doc="centroid scale: members' mean norms, times the cluster size, or as is"),
        Param("lambda", default=1.0, arg="lambda_", doc="scale of the merged ΔW"),
    ),
)
def lora_lego(Bs: list[torch.Tensor], As: list[torch.Tensor], scalings: list[float], *,
              weights: list[float], ctx: TensorContext | None = None, rank: int | None = None,
              reweight: str = "norm", lambda_: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = λ Σ_c g_c b̄_c ā_cᵀ over k clusters c of the canonical units; b̄_c, ā_c the centroid's
    parts, g_c its reweighting. With k ≥ Σ r_i each unit is its own cluster: ΔW = λ Σ w_i ΔW_i."""
    # on the CPU whatever the inputs' device: the pool is small, and its order and k-means
    # draws come from numpy and a CPU generator
    b, a = canonical_units(torch.cat(folded(Bs, scalings, weights), dim=1).mT.cpu(),
                           torch.cat([x.to("cpu", torch.float64) for x in As], dim=0))
    points = torch.cat([a, b], dim=1)
    order = lexicographic_order(points)
    points, a, b = points[order], a[order], b[order]
    k = max(x.shape[0] for x in As) if rank is None else rank
    if k >= points.shape[0]:
        merged_b, merged_a = b, a
    else:
        generator = (ctx or TensorContext(name="")).generator()
        labels = kmeans(points, k, generator)
        merged_b, merged_a = cluster_units(b, a, labels, k, reweight)
    return as_output(merged_b.mT, merged_a * lambda_)


def cluster_units(b: torch.Tensor, a: torch.Tensor, labels: torch.Tensor, k: int,
                  reweight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cluster's centroid unit (rows), reweighted."""
    out_b = b.new_zeros(k, b.shape[1])
    out_a = a.new_zeros(k, a.shape[1])
    for c in range(k):
        members = labels == c
        if not members.any():
            continue
        mean_b, mean_a = b[members].mean(dim=0), a[members].mean(dim=0)
        if reweight == "norm":
            mean_b = _rescaled(mean_b, b[members].norm(dim=1).mean())
            mean_a = _rescaled(mean_a, a[members].norm(dim=1).mean())
        elif reweight == "sum":
            mean_b = mean_b * int(members.sum())
        out_b[c], out_a[c] = mean_b, mean_a
    return out_b, out_a


def _rescaled(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    current = x.norm()
    return x * (norm / current) if current > 0 else x


# --------------------------------------------------------------------------------------------
# KnOTS


def shared_basis(Bs: list[torch.Tensor], As: list[torch.Tensor], scalings: list[float]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """U (d_out × R') and the blocks S V_iᵀ (R' × d_in) of the SVD of
    M = [s_1 B_1 A_1 … s_N B_N A_N], so that U S V_iᵀ = s_i B_i A_i, in float64; M is never
    formed (module docstring)."""
    q, r = torch.linalg.qr(torch.cat([b.to(torch.float64) for b in Bs], dim=1))
    cores, rows = [], []
    start = 0
    for b, a, s in zip(Bs, As, scalings):
        p, t = torch.linalg.qr(a.to(torch.float64).mT * s)  # s A_iᵀ = P_i T_i
        cores.append(r[:, start:start + b.shape[1]] @ t.mT)  # R_i T_iᵀ
        rows.append(p.mT)
        start += b.shape[1]
    w, sigma, _ = top_singular_triplets(torch.cat(cores, dim=1))
    d_out, d_in = Bs[0].shape[0], As[0].shape[1]
    keep = int((sigma > noise_floor(sigma[:1], (d_out, d_in * len(Bs)))).sum()) if len(sigma) else 0
    w = w[:, :keep]
    return q @ w, [(w.mT @ core) @ row for core, row in zip(cores, rows)]


def merge_blocks(blocks: list[torch.Tensor], weights: list[float], rule: str, density: float,
                 ctx: TensorContext | None) -> torch.Tensor:
    """Combine the blocks S V_iᵀ entry by entry with one of the task-vector rules (the registered
    ties, dare_ties, dare_linear functions, given a zero base so that their θ0 + merge is the
    merge; dare_ties divides by the agreeing weights, as KnOTS' disjoint mean does)."""
    blocks = [x.to(torch.float32) for x in blocks]
    if rule in ("sum", "mean"):
        total = sum(x * w for x, w in zip(blocks, weights))
        return total / sum(weights) if rule == "mean" else total
    options = {"normalize": True} if rule == "dare_ties" else {}
    return get_method(rule).fn(torch.zeros_like(blocks[0]), blocks, weights=weights,
                               densities=[density] * len(blocks),
                               ctx=ctx or TensorContext(name=""), **options)


@register(
    "knots",
    summary="Align the LoRAs in the shared SVD basis of their side-by-side ΔW's, merge their "
            "task-specific blocks with TIES, DARE or a mean, and map back (KnOTS).",
    paper="Stoica et al. 2025, Model merging with SVD to tie the KnOTS (ICLR), arXiv:2410.19735",
    needs_base=False,
    output="adapter",
    params=(
        Param("weight", default=1.0, per_model=True, arg="weights",
              doc="the LoRA's weight in the merge rule"),
        Param("merge", str, default="ties",
              choices=("ties", "dare_ties", "dare_linear", "mean", "sum"),
              doc="rule applied to the aligned blocks S V_iᵀ"),
        Param("density", default=0.2, minimum=0.0, maximum=1.0,
              doc="fraction of each block's entries kept (ties: by magnitude, dare: at random)"),
        Param("rank", int, default=None, minimum=1,
              doc="truncate the merged ΔW to this rank (SVD); default all, at most Σ r_i"),
        Param("lambda", default=1.0, arg="lambda_", doc="scale of the merged ΔW"),
    ),
)
def knots(Bs: list[torch.Tensor], As: list[torch.Tensor], scalings: list[float], *,
          weights: list[float], ctx: TensorContext | None = None, merge: str = "ties",
          density: float = 0.2, rank: int | None = None,
          lambda_: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = λ·U·rule({S V_iᵀ}, w): B = U (rank ≤ Σ r_i), A = λ·rule(…); with `rank`, the rank-k
    truncation of that product and the energy it keeps, Σ_{≤k} σ² / ‖ΔW‖_F² (info["energy"])."""
    u, blocks = shared_basis(Bs, As, scalings)
    if not blocks or u.shape[1] == 0:  # every ΔW_i is zero
        return as_output(Bs[0].new_zeros(Bs[0].shape[0], 1), As[0].new_zeros(1, As[0].shape[1]))
    merged = merge_blocks(blocks, weights, merge, density, ctx).to(torch.float64) * lambda_
    if rank is not None and rank < merged.shape[0]:
        left, sigma, right = top_singular_triplets(merged, rank)  # U·merged = (U·left)σ right
        energy = kept_energy(sigma, rank, total=merged.square().sum())
        return (*as_output(u @ (left * sigma), right), {"energy": energy})
    return as_output(u, merged)


# --------------------------------------------------------------------------------------------
# orthogonal adaptation


@register(
    "orthogonal_lora_sum",
    summary="Sum LoRAs trained with mutually orthogonal down-projections, exactly, as one LoRA "
            "of rank Σ r_i (orthogonal adaptation).",
    paper="Po et al. 2024, Orthogonal adaptation for modular customization of diffusion models "
          "(CVPR), arXiv:2312.02432",
    needs_base=False,
    output="adapter",
    params=(
        Param("weight", default=1.0, per_model=True, arg="weights", doc="λ_i, the LoRA's factor"),
    ),
)
def orthogonal_lora_sum(Bs: list[torch.Tensor], As: list[torch.Tensor], scalings: list[float], *,
                        weights: list[float], ctx: TensorContext | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ΔW = Σ λ_i s_i B_i A_i as B = [B_1 … B_N], A = [λ_1 s_1 A_1; …; λ_N s_N A_N]; under
    info["side"] the A_i's cross-orthogonality, which the engine reports beside the merge
    (engine/side_outputs/orthogonality.py)."""
    scaled = [a.to(torch.float64) * (w * s) for a, s, w in zip(As, scalings, weights)]
    b, a = as_output(*concatenated([b.to(torch.float64) for b in Bs], scaled))
    return b, a, {"side": cross_orthogonality(As)}


def cross_orthogonality(As: list[torch.Tensor]) -> torch.Tensor:
    """C[i, j] = ‖A_i A_jᵀ‖_F / (‖A_i‖_F ‖A_j‖_F) (float64, N × N; 0 where a factor is zero): how
    much LoRA j's down-projection sees of LoRA i's input subspace. Off the diagonal, 0 means no
    crosstalk when the LoRAs are summed."""
    a = [x.to(torch.float64) for x in As]
    norms = [x.norm() for x in a]
    out = torch.zeros(len(a), len(a), dtype=torch.float64)
    for i in range(len(a)):
        for j in range(len(a)):
            if norms[i] > 0 and norms[j] > 0:
                out[i, j] = (a[i] @ a[j].mT).norm() / (norms[i] * norms[j])
    return out


def orthogonal_down_projections(d_in: int, ranks: list[int], *, seed: int = 0,
                                module: str = "") -> list[torch.Tensor]:
    """Frozen down-projections A_i (r_i × d_in, fp32) for orthogonal adaptation: the rows of a
    random orthonormal basis of R^{d_in}, disjoint across adapters, from (seed, module) alone.
    When Σ r_i > d_in the rows come from several independent random bases, d_in rows each:
    orthonormal within a basis, nearly orthogonal across them (the paper's fallback)."""
    generator = seeded_generator(f"{seed}\0orthogonal_lora\0{module}")
    total = sum(ranks)
    rows = []
    while sum(x.shape[0] for x in rows) < total:
        take = min(d_in, total - sum(x.shape[0] for x in rows))
        gaussian = torch.randn(d_in, take, generator=generator, dtype=torch.float64)
        rows.append(torch.linalg.qr(gaussian).Q.mT)
    stacked = torch.cat(rows).to(torch.float32)
    return list(stacked.split(ranks))
