"""Permutation alignment: linear assignment of units, and weight matching (Git Re-Basin).

Two networks that differ only by a permutation of their hidden units compute the same function;
aligning one to the other before merging undoes that symmetry. `match` solves the linear
assignment problem (LAP) that every alignment method here reduces to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

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
    from scipy.optimize import linear_sum_assignment  # scipy.optimize takes 0.4 s to import
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
    (GPT-2's fused q|k|v columns). `inner` names a second permutation that reorders each
    `inner_block` of a unit's entries, one order per unit of the model being permuted (a value
    head's dims: V rows, and O columns of each query head that reads it)."""

    perm: str
    block: int = 1
    parts: int = 1
    inner: str | None = None
    inner_block: int = 1


@dataclass
class Spec:
    """Which tensor axes share which permutation: `sizes[p]` entries for permutation p, and
    `axes[tensor][axis]` for every axis that p moves. A tensor with no moved axis is absent.
    An inner permutation (`inner[p]` = its unit permutation) is one order of `sizes[p]` per
    unit: a [units, sizes[p]] tensor."""

    sizes: dict[str, int]
    axes: dict[str, dict[int, Axis]] = field(default_factory=dict)
    inner: dict[str, str] = field(default_factory=dict)

    def touching(self, perm: str) -> list[tuple[str, int]]:
        return [(name, axis) for name, moved in self.axes.items()
                for axis, ax in moved.items() if perm in (ax.perm, ax.inner)]

    def only(self, families) -> "Spec":
        """The spec restricted to permutations whose name starts with one of `families`
        ("mlp" keeps "mlp.0", "mlp.1", ...); the others stay the identity. An inner permutation
        is kept only with its unit permutation."""
        keep = {p for p in self.sizes if p.split(".")[0] in set(families)}
        keep -= {p for p, outer in self.inner.items() if outer not in keep}
        axes = {name: {a: ax if ax.inner in keep else replace(ax, inner=None, inner_block=1)
                       for a, ax in moved.items() if ax.perm in keep}
                for name, moved in self.axes.items()}
        return Spec({p: n for p, n in self.sizes.items() if p in keep},
                    {name: moved for name, moved in axes.items() if moved},
                    {p: outer for p, outer in self.inner.items() if p in keep})

    def identity(self, perm: str | None = None):
        """The identity of one permutation, or of all of them (a dict)."""
        if perm is None:
            return {p: self.identity(p) for p in self.sizes}
        if perm in self.inner:
            return torch.arange(self.sizes[perm]).repeat(self.sizes[self.inner[perm]], 1)
        return torch.arange(self.sizes[perm])


def axis_index(ax: Axis, perms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The index_select index that moves the axis's units by `perms[ax.perm]` and, within each
    source unit u, its inner blocks by `perms[ax.inner][u]`."""
    perm = perms[ax.perm]
    n, device = len(perm), perm.device
    if ax.inner is None:
        within = torch.arange(ax.block, device=device).expand(n, -1)
    else:
        inner = perms[ax.inner].to(device)[perm]  # [n, inner_block]: the order of each unit moved to i
        subs = torch.arange(0, ax.block, ax.inner_block, device=device)
        within = (subs[None, :, None] + inner[:, None, :]).reshape(n, ax.block)
    unit = (perm[:, None] * ax.block + within).reshape(-1)
    return torch.cat([unit + k * n * ax.block for k in range(ax.parts)])


def indices(spec: Spec, perms: dict[str, torch.Tensor], name: str) -> dict[int, torch.Tensor]:
    """{axis: index} that applies `perms` to tensor `name` (io/views.reindexed's argument)."""
    return {axis: axis_index(ax, perms) for axis, ax in spec.axes.get(name, {}).items()}


def permute(spec: Spec, perms: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> torch.Tensor:
    """π(W): `tensor` with every moved axis re-indexed by its permutations."""
    for axis, index in indices(spec, perms, name).items():
        tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


def _units(tensor: torch.Tensor, axis: int, ax: Axis, n: int) -> torch.Tensor:
    """[n, everything else]: row i holds all entries of unit i along `axis`."""
    moved = tensor.movedim(axis, 0).reshape(ax.parts, n, ax.block, -1)
    return moved.transpose(0, 1).reshape(n, -1)


def _inner_units(tensor: torch.Tensor, axis: int, ax: Axis, n: int) -> torch.Tensor:
    """[n, inner_block, everything else]: entry t of unit i holds all of its inner position t."""
    moved = tensor.movedim(axis, 0).reshape(n, ax.block // ax.inner_block, ax.inner_block, -1)
    return moved.transpose(1, 2).reshape(n, ax.inner_block, -1)


def cost(spec: Spec, perms: dict[str, torch.Tensor], perm: str, a: dict, b: dict) -> torch.Tensor:
    """C_p = Σ over tensors touching p of W_A (π_{−p}(W_B))ᵀ along p's axis: [n, n], or for an
    inner permutation one [d, d] per unit position of A, [n, d, d]. Each product is in the
    tensors' dtype (float64 copies of whole models would double the memory and the time);
    the sum is float64."""
    free = {**perms, perm: spec.identity(perm).to(perms[perm].device)}
    total = None
    for name, axis in spec.touching(perm):
        ax = spec.axes[name][axis]
        n = spec.sizes[ax.perm]
        wb = permute(spec, free, name, b[name])
        if perm == ax.inner:
            wa, wb = _inner_units(a[name], axis, ax, n), _inner_units(wb, axis, ax, n)
            term = torch.bmm(wa, wb.transpose(1, 2))
        else:
            term = _units(a[name], axis, ax, n) @ _units(wb, axis, ax, n).T
        total = term.double() if total is None else total + term.double()
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
    rounds: int = 0  # 3+ models, scheme "mean": rounds against the others' mean


def _gain(c: torch.Tensor, perm: torch.Tensor) -> float:
    return float(c[torch.arange(len(c)), perm].sum())


def _solve(spec: Spec, perms: dict[str, torch.Tensor], p: str, c: torch.Tensor) -> torch.Tensor | None:
    """The LAP's answer for p where it beats p's current value (a tie or rounding must not count
    as progress, or sweeps could cycle), else None. An inner permutation solves one LAP per
    unit position i of A, for the unit of B that sits there."""
    current = perms[p].cpu()
    if p not in spec.inner:
        new = match(c)
        return new if _gain(c, new) > _gain(c, current) + 1e-12 else None
    new, changed = current.clone(), False
    for i, u in enumerate(perms[spec.inner[p]].cpu().tolist()):
        found = match(c[i])
        if _gain(c[i], found) > _gain(c[i], current[u]) + 1e-12:
            new[u], changed = found, True
    return new if changed else None


def weight_matching(spec: Spec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *,
                    max_sweeps: int = 100, seed: int = 0,
                    init: dict[str, torch.Tensor] | None = None,
                    on_sweep: Callable[[int, float], None] | None = None) -> Matching:
    """Permutations of b's units maximising Σ ⟨W_A, π(W_B)⟩ by coordinate descent: each sweep
    solves the LAPs of one permutation at a time, in a seeded random order, holding the others;
    it stops when a sweep changes nothing. Each step can only raise the objective (the old
    permutation is one of the LAP's candidates). The tensors may live on a GPU (the products
    are its work); the LAPs are solved on the CPU."""
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
            new = _solve(spec, perms, p, cost(spec, perms, p, a, b).cpu())
            if new is not None:
                perms[p], changed = new.to(device), True
        history.append(objective(spec, perms, a, b))
        if on_sweep:
            on_sweep(sweeps, history[-1])
        if not changed:
            break
    return Matching({p: t.cpu() for p, t in perms.items()}, history, sweeps)


def mean_of(spec: Spec, models: list[dict], perms: list[dict]) -> dict[str, torch.Tensor]:
    """The average of the models, each permuted by its permutations."""
    return {name: sum(permute(spec, p, name, m[name]) for m, p in zip(models, perms)) / len(models)
            for name in spec.axes}


def weight_matching_many(spec: Spec, models: list[dict], *, reference: int = 0,
                         scheme: str = "mean", max_sweeps: int = 100, max_rounds: int = 20,
                         seed: int = 0,
                         on_sweep: Callable[[int, int, float], None] | None = None) -> list[Matching]:
    """Align 3+ models: each to the reference first; with scheme "mean", then repeatedly match
    each non-reference model against the mean of all the others as aligned so far (Git
    Re-Basin's MergeMany with the reference held fixed, which fixes the gauge), until a round
    changes nothing. Returns one Matching per model (the reference's is the identity); its
    objective is against the reference: each sweep of the first step (also reported to
    on_sweep(model, sweep, objective)), then after the rounds."""
    if scheme not in ("reference", "mean"):
        raise ValueError(f"unknown scheme {scheme!r}: use reference or mean")
    ref = models[reference]
    result = [Matching(spec.identity(), [objective(spec, spec.identity(), ref, ref)], 0) if k == reference
              else weight_matching(spec, ref, m, max_sweeps=max_sweeps, seed=seed + k,
                                   on_sweep=_for(on_sweep, k))
              for k, m in enumerate(models)]
    if scheme == "reference" or len(models) < 3:
        return result
    rounds = 0
    for round_ in range(max_rounds):
        rounds, changed = rounds + 1, False
        for k in range(len(models)):
            if k == reference:
                continue
            others = [j for j in range(len(models)) if j != k]
            target = mean_of(spec, [models[j] for j in others], [result[j].perms for j in others])
            found = weight_matching(spec, target, models[k], max_sweeps=max_sweeps,
                                    seed=seed + k + round_, init=result[k].perms)
            if any(not torch.equal(found.perms[p], result[k].perms[p]) for p in spec.sizes):
                changed = True
            result[k] = Matching(found.perms, result[k].objective, result[k].sweeps + found.sweeps)
        if not changed:
            break
    for k, m in enumerate(models):
        if k != reference:
            history = result[k].objective + [objective(spec, result[k].perms, ref, m)]
            result[k] = Matching(result[k].perms, history, result[k].sweeps, rounds)
    return result


def _for(on_sweep, k: int):
    return None if on_sweep is None else (lambda sweeps, value: on_sweep(k, sweeps, value))
