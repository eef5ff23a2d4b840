"""Permutation alignment: linear assignment of units, and weight matching (Git Re-Basin).

Two networks that differ only by a permutation of their hidden units compute the same function;
aligning one to the other before merging undoes that symmetry. `match` solves the linear
assignment problem (LAP) that every alignment method here reduces to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergesmith.methods.registry import register_operation

register_operation(
    "weight_matching", command="mergesmith align A B [C ...] OUT (or an align: recipe section)",
    summary="permute MLP units, attention heads and the residual stream onto a reference "
            "model (coordinate descent of LAPs; 3+ models against the others' mean)",
    paper="Git Re-Basin, Ainsworth et al. 2023 (arXiv 2209.04836)",
    needs="models of one architecture from different initialisations; no data")


def match(similarity: torch.Tensor) -> torch.LongTensor:
    """perm maximising Σ_i similarity[i, perm[i]] (a square LAP, solved exactly by scipy)."""
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"match needs a square similarity matrix, got shape {tuple(similarity.shape)}")
    cost = similarity.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(cost).all():
        raise ValueError("match got a similarity matrix with NaN or infinite entries")
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm


def match_units(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.LongTensor:
    """perm such that features_b[perm] best matches features_a, by inner product of unit rows."""
    if features_a.shape != features_b.shape or features_a.dim() != 2:
        raise ValueError(
            f"match_units needs two [units, features] matrices of one shape, got "
            f"{tuple(features_a.shape)} and {tuple(features_b.shape)}"
        )
    a = features_a.detach().to(torch.float64)
    b = features_b.detach().to(torch.float64)
    return match(a @ b.T)


# --- weight matching (Git Re-Basin, arXiv 2209.04836) ---------------------------------------


@dataclass(frozen=True)
class Axis:
    """One tensor axis moved by a permutation of `n` units: unit i owns the `block` consecutive
    entries from i·block (a head's rows), and the layout repeats `parts` times along the axis
    (GPT-2's fused q|k|v columns)."""

    perm: str
    block: int = 1
    parts: int = 1


@dataclass
class Spec:
    """Which tensor axes share which permutation: `sizes[p]` units for permutation p, and
    `axes[tensor][axis]` for every axis that p moves. A tensor with no moved axis is absent."""

    sizes: dict[str, int]
    axes: dict[str, dict[int, Axis]] = field(default_factory=dict)

    def touching(self, perm: str) -> list[tuple[str, int]]:
        return [(name, axis) for name, moved in self.axes.items()
                for axis, ax in moved.items() if ax.perm == perm]

    def only(self, families) -> "Spec":
        """The spec restricted to permutations whose name starts with one of `families`
        ("mlp" keeps "mlp.0", "mlp.1", ...); the others stay the identity."""
        keep = {p for p in self.sizes if p.split(".")[0] in set(families)}
        axes = {name: {a: ax for a, ax in moved.items() if ax.perm in keep}
                for name, moved in self.axes.items()}
        return Spec({p: n for p, n in self.sizes.items() if p in keep},
                    {name: moved for name, moved in axes.items() if moved})

    def identity(self) -> dict[str, torch.Tensor]:
        return {p: torch.arange(n) for p, n in self.sizes.items()}


def axis_index(ax: Axis, perm: torch.Tensor) -> torch.Tensor:
    """The index_select index that moves the axis's units by `perm`."""
    n = len(perm)
    unit = (perm[:, None] * ax.block + torch.arange(ax.block, device=perm.device)).reshape(-1)
    return torch.cat([unit + k * n * ax.block for k in range(ax.parts)])


def indices(spec: Spec, perms: dict[str, torch.Tensor], name: str) -> dict[int, torch.Tensor]:
    """{axis: index} that applies `perms` to tensor `name` (io/views.reindexed's argument)."""
    return {axis: axis_index(ax, perms[ax.perm]) for axis, ax in spec.axes.get(name, {}).items()}


def permute(spec: Spec, perms: dict[str, torch.Tensor], name: str, tensor: torch.Tensor,
            skip: int | None = None) -> torch.Tensor:
    """π(W): `tensor` with every moved axis but `skip` re-indexed by its permutation."""
    for axis, index in indices(spec, perms, name).items():
        if axis != skip:
            tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


def _units(tensor: torch.Tensor, axis: int, ax: Axis, n: int) -> torch.Tensor:
    """[n, everything else]: row i holds all entries of unit i along `axis`."""
    moved = tensor.movedim(axis, 0).reshape(ax.parts, n, ax.block, -1)
    return moved.transpose(0, 1).reshape(n, -1)


def cost(spec: Spec, perms: dict[str, torch.Tensor], perm: str, a: dict, b: dict) -> torch.Tensor:
    """C_p = Σ over tensors touching p of W_A (π_{−p}(W_B))ᵀ along p's axis (float64 sum of
    the tensors' products, each in their own dtype: copies of whole models in float64 would
    double the memory and the time)."""
    n = spec.sizes[perm]
    total = torch.zeros(n, n, dtype=torch.float64, device=perms[perm].device)
    for name, axis in spec.touching(perm):
        ax = spec.axes[name][axis]
        wa = _units(a[name], axis, ax, n)
        wb = _units(permute(spec, perms, name, b[name], skip=axis), axis, ax, n)
        total += (wa @ wb.T).double()
    return total


def objective(spec: Spec, perms: dict[str, torch.Tensor], a: dict, b: dict) -> float:
    """Σ_tensors ⟨W_A, π(W_B)⟩ over the tensors the spec moves (summed in float64)."""
    return sum(float((a[name] * permute(spec, perms, name, b[name])).sum(dtype=torch.float64))
               for name in spec.axes)


@dataclass
class Matching:
    perms: dict[str, torch.Tensor]  # b aligned = permute(spec, perms, name, b[name]) for each name
    objective: list[float]  # before the first sweep, then after each sweep
    sweeps: int


def weight_matching(spec: Spec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *,
                    max_sweeps: int = 100, seed: int = 0,
                    init: dict[str, torch.Tensor] | None = None) -> Matching:
    """Permutations of b's units maximising Σ ⟨W_A, π(W_B)⟩ by coordinate descent: each sweep
    solves one LAP per permutation, in a seeded random order, holding the others; it stops when
    a sweep changes nothing. Each step can only raise the objective (the old permutation is
    one of the LAP's candidates). The tensors may live on a GPU (the products are its work);
    the LAPs are solved on the CPU."""
    device = next(iter(a.values())).device
    perms = {p: t.to(device) for p, t in (init or spec.identity()).items()}
    names = sorted(spec.sizes)
    generator = torch.Generator().manual_seed(seed)
    history = [objective(spec, perms, a, b)]
    sweeps = 0
    while sweeps < max_sweeps:
        sweeps += 1
        changed = False
        for i in torch.randperm(len(names), generator=generator).tolist():
            p = names[i]
            c = cost(spec, perms, p, a, b).cpu()
            new, rows = match(c), torch.arange(len(c))
            # a tie (or rounding) must not count as progress, or a sweep could cycle
            if float(c[rows, new].sum()) > float(c[rows, perms[p].cpu()].sum()) + 1e-12:
                perms[p], changed = new.to(device), True
        history.append(objective(spec, perms, a, b))
        if not changed:
            break
    return Matching({p: t.cpu() for p, t in perms.items()}, history, sweeps)


def mean_of(spec: Spec, models: list[dict], perms: list[dict]) -> dict[str, torch.Tensor]:
    """The average of the models, each permuted by its permutations."""
    return {name: sum(permute(spec, p, name, m[name]) for m, p in zip(models, perms)) / len(models)
            for name in spec.axes}


def weight_matching_many(spec: Spec, models: list[dict], *, reference: int = 0,
                         scheme: str = "mean", max_sweeps: int = 100, max_rounds: int = 20,
                         seed: int = 0) -> list[Matching]:
    """Align 3+ models: each to the reference first; with scheme "mean", then repeatedly match
    each non-reference model against the mean of all the others as aligned so far (Git
    Re-Basin's MergeMany with the reference held fixed, which fixes the gauge), until a round
    changes nothing. Returns one Matching per model (the reference's is the identity)."""
    if scheme not in ("reference", "mean"):
        raise ValueError(f"unknown scheme {scheme!r}: use reference or mean")
    ref = models[reference]
    result = [Matching(spec.identity(), [objective(spec, spec.identity(), ref, ref)], 0) if k == reference
              else weight_matching(spec, ref, m, max_sweeps=max_sweeps, seed=seed + k)
              for k, m in enumerate(models)]
    if scheme == "reference" or len(models) < 3:
        return result
    for round_ in range(max_rounds):
        changed = False
        for k in range(len(models)):
            if k == reference:
                continue
            others = [j for j in range(len(models)) if j != k]
            target = mean_of(spec, [models[j] for j in others], [result[j].perms for j in others])
            found = weight_matching(spec, target, models[k], max_sweeps=max_sweeps,
                                    seed=seed + k + round_, init=result[k].perms)
            if any(not torch.equal(found.perms[p], result[k].perms[p]) for p in spec.sizes):
                changed = True
            result[k] = found
        if not changed:
            break
    return result
