"""Shrinking an MoE by merging its experts (pure tensor maths; the program is moe/compress.py).

Three ways to choose which experts of a layer become one, all followed by a usage-weighted merge:
- mc_smoe (Li et al., arXiv 2310.01334): the K most used experts are dominant; every other
  expert joins the dominant one whose router-logit column it resembles most; members are aligned
  to their dominant expert by a permutation of hidden units before they are averaged.
- hc_smoe (Chen et al., arXiv 2410.08589): agglomerative clustering of the experts' mean outputs.
- sub_moe (Li et al., arXiv 2506.23266): k-means of the experts' outputs on cosine similarity,
  then each cluster merged in a joint SVD basis shared by its members.

Every function is deterministic given its inputs (k-means given its seed).
"""

from __future__ import annotations

import torch

from mergesmith.methods.registry import register_operation

COMMAND = "mergesmith moe-compress MOE OUT --method {} --experts K --data FILE"
LINKAGES = ("ward", "average", "complete", "single")

for _name, _summary, _paper in (
    ("mc_smoe", "merge experts around the most used ones, grouped by router logits and aligned by "
                "permutation; optional low-rank + sparse compression",
     "Li et al., Merge, Then Compress (arXiv 2310.01334)"),
    ("hc_smoe", "hierarchical clustering of the experts' outputs, then a usage-weighted merge",
     "Chen et al., Retraining-Free Merging of Sparse MoE via Hierarchical Clustering (arXiv 2410.08589)"),
    ("sub_moe", "k-means of the experts' outputs (cosine), then a merge in a joint SVD basis",
     "Li et al., Sub-MoE (arXiv 2506.23266)"),
):
    register_operation(_name, command=COMMAND.format(_name), summary=_summary, paper=_paper,
                       needs="an MoE + calibration data")


# ---- routing statistics -----------------------------------------------------------------------

def selection_counts(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """How often each expert is among a token's top-k router logits ([T, E] -> [E], float64)."""
    chosen = router_logits.topk(top_k, dim=-1).indices
    return torch.bincount(chosen.reshape(-1), minlength=router_logits.shape[-1]).to(torch.float64)


def usage_frequencies(counts: torch.Tensor) -> torch.Tensor:
    """f_e = count_e / Σ counts (uniform when no token was routed)."""
    counts = counts.to(torch.float64)
    total = counts.sum()
    return counts / total if total > 0 else torch.full_like(counts, 1.0 / len(counts))


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """cos(x_i, x_j) of the rows of [n, f] (a zero row is orthogonal to everything)."""
    unit = torch.nn.functional.normalize(features.to(torch.float64), dim=-1)
    return unit @ unit.T


def router_similarity(logit_gram: torch.Tensor) -> torch.Tensor:
    """MC-SMoE's expert similarity: (cos + 1) / 2 of the experts' router-logit columns over the
    calibration tokens, from their Gram matrix G = Lᵀ L (so the logits need not be kept)."""
    gram = logit_gram.to(torch.float64)
    norms = gram.diagonal().clamp(min=0).sqrt().clamp(min=1e-30)
    return (gram / norms[:, None] / norms[None, :] + 1) / 2


# ---- grouping ---------------------------------------------------------------------------------

def canonical(labels) -> torch.LongTensor:
    """Labels renumbered by first appearance: group g's first member precedes group g+1's, so
    K = E keeps every expert at its own index."""
    order: dict[int, int] = {}
    return torch.tensor([order.setdefault(int(x), len(order)) for x in labels], dtype=torch.long)


def layer_group_counts(frequencies: list[torch.Tensor], budget: int) -> list[int]:
    """MC-SMoE's adaptive group counts: `budget` dominant experts over all layers, each layer's
    most used expert counted first, the rest of the budget to the experts most used over all
    layers together (ties by layer, then index)."""
    if not len(frequencies) <= budget <= sum(len(f) for f in frequencies):
        raise ValueError(f"a budget of {budget} groups for {len(frequencies)} layers of "
                         f"{[len(f) for f in frequencies]} experts")
    counts = [1] * len(frequencies)
    rest = sorted(((-float(f[e]), layer, e) for layer, f in enumerate(frequencies)
                   for e in range(len(f)) if e != int(f.argmax())))
    for _, layer, _ in rest[:budget - len(frequencies)]:
        counts[layer] += 1
    return counts


def dominant_groups(usage: torch.Tensor, similarity: torch.Tensor, k: int) -> torch.LongTensor:
    """MC-SMoE grouping: the k most used experts are dominant (ties by index); every other expert
    joins its most similar dominant expert. An expert whose similarity to an already chosen
    dominant expert is 1 (a duplicate in routing) is passed over while others remain: two
    copies cannot be told apart by use, and as two groups they would merge nothing."""
    n = len(usage)
    order = sorted(range(n), key=lambda e: (-float(usage[e]), e))
    dominant: list[int] = []
    for e in order:
        if len(dominant) < k and all(similarity[e, d] < 1 - 1e-9 for d in dominant):
            dominant.append(e)
    dominant += [e for e in order if e not in dominant][:k - len(dominant)]
    labels = [dominant.index(e) if e in dominant else
              max(range(k), key=lambda g: (float(similarity[e, dominant[g]]), -g)) for e in range(n)]
    return canonical(labels)


def agglomerative_groups(outputs: torch.Tensor, k: int, linkage: str = "ward") -> torch.LongTensor:
    """HC-SMoE grouping: scipy's hierarchical clustering (Euclidean) of the experts' mean outputs,
    cut into exactly k clusters. No randomness."""
    from scipy.cluster.hierarchy import cut_tree, linkage as tree

    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {', '.join(LINKAGES)}, got {linkage!r}")
    n = outputs.shape[0]
    if k >= n:
        return torch.arange(n)
    merges = tree(outputs.to(torch.float64).cpu().numpy(), method=linkage, metric="euclidean")
    return canonical(cut_tree(merges, n_clusters=k).ravel())


def cosine_kmeans_groups(outputs: torch.Tensor, k: int, seed: int = 0, iterations: int = 100) -> torch.LongTensor:
    """Sub-MoE grouping: spherical k-means (k-means++ start drawn with `seed`) of the experts'
    outputs on cosine similarity. A cluster left empty takes the point farthest from its centre."""
    n = outputs.shape[0]
    if k >= n:
        return torch.arange(n)
    x = torch.nn.functional.normalize(outputs.to(torch.float64), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    centres = [int(torch.randint(n, (1,), generator=generator))]
    while len(centres) < k:
        distance = (1 - (x @ x[centres].T).max(dim=1).values).clamp(min=0)
        distance[centres] = 0
        if distance.sum() <= 0:  # the rest duplicate a centre: take the first unchosen
            centres.append(next(i for i in range(n) if i not in centres))
        else:
            centres.append(int(torch.multinomial(distance, 1, generator=generator)))
    centre = x[centres]
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        similarity = x @ centre.T
        new = similarity.argmax(dim=1)
        for g in range(k):
            if not (new == g).any():
                sizes = torch.bincount(new, minlength=k)
                fit = similarity[torch.arange(n), new].clone()
                fit[sizes[new] <= 1] = float("inf")  # never empty another cluster
                new[int(fit.argmin())] = g
        if torch.equal(new, labels):
            break
        labels = new
        centre = torch.nn.functional.normalize(
            torch.stack([x[labels == g].sum(0) for g in range(k)]), dim=-1)
    return canonical(labels.tolist())


def groups(labels: torch.Tensor) -> list[list[int]]:
    """The members of each group, in group order."""
    return [torch.nonzero(labels == g).flatten().tolist() for g in range(int(labels.max()) + 1)]


def member_weights(frequencies: torch.Tensor, members: list[int]) -> list[float]:
    """The merge weights of a group: its members' usage frequencies (equal when none was used)."""
    f = [float(frequencies[e]) for e in members]
    return f if sum(f) > 0 else [1.0] * len(members)


# ---- merging ----------------------------------------------------------------------------------

def weighted_merge(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """W = Σ f_i W_i / Σ f_i (fp32)."""
    total = sum(weights)
    return sum(w / total * t.float() for w, t in zip(weights, tensors))


def merged_router(rows: torch.Tensor, labels: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """One router row per group: the usage-weighted mean of its members' rows, so a group of
    identical rows keeps that row; a singleton keeps its row bitwise."""
    out = []
    for members in groups(labels):
        if len(members) == 1:
            out.append(rows[members[0]].float())
        else:
            out.append(weighted_merge([rows[e] for e in members], member_weights(frequencies, members)))
    return torch.stack(out).to(rows.dtype)


def unit_features(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Each hidden unit of a gated FFN as one row: its gate and up rows and its down column."""
    return torch.cat([w_gate.float(), w_up.float(), w_down.float().T], dim=1)


def joint_svd(weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """[W_1 … W_m] = U S [V_1ᵀ … V_mᵀ]: one basis U shared by the members (columns of the
    concatenation), each member's own V_i. W_i are [d, c_i] with the shared axis first."""
    stacked = torch.cat([w.to(torch.float64) for w in weights], dim=1)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    widths = [w.shape[1] for w in weights]
    return u, s, [part.T for part in torch.split(vh, widths, dim=1)]


def subspace_merge(weights: list[torch.Tensor], frequencies: list[float], rank: int | None = None) -> torch.Tensor:
    """Sub-MoE's merge of one cluster: W = U_r S_r V̄_rᵀ, V̄ = Σ f_i V_i / Σ f_i, U S V_iᵀ = W_i from
    the joint SVD. At full rank this is exactly Σ f_i W_i / Σ f_i; `rank` keeps the r largest
    directions of the members' shared basis."""
    u, s, vs = joint_svd(weights)
    total = sum(frequencies)
    v = sum(f / total * v_i for f, v_i in zip(frequencies, vs))
    r = len(s) if rank is None else min(rank, len(s))
    return ((u[:, :r] * s[:r]) @ v[:, :r].T).float()


def low_rank_plus_sparse(weight: torch.Tensor, rank: int, keep: float = 0.0) -> torch.Tensor:
    """MC-SMoE's compression of a merged expert, without its training: W ≈ L_r + S, L_r the
    rank-r truncated SVD of W and S the fraction `keep` of the residual's entries largest in
    magnitude (the rest zero). The paper then fine-tunes L and S; this does not."""
    w = weight.to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, len(s))
    low = (u[:, :r] * s[:r]) @ vh[:r]
    residual = w - low
    count = int(round(keep * residual.numel()))
    sparse = torch.zeros_like(residual)
    if count > 0:
        top = residual.abs().flatten().topk(count).indices
        sparse.view(-1)[top] = residual.view(-1)[top]
    return (low + sparse).float()
