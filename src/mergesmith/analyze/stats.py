"""The figures of a merge analysis: pure functions of one tensor's task vectors τi = θi − θ0.

Per tensor, `tensor_sums` keeps raw sums that add over tensors (Gram matrices, entry counts,
kept energies), so a layer's or the model's figures are those of its tensors' sums, exactly;
`figures` turns sums into the numbers shown:

- norms ‖τi‖ and cosines ⟨τi, τj⟩ / (‖τi‖‖τj‖), from one float64 Gram matrix (blocks.gram64);
- sign conflicts: entries where some τi > 0 and some τj < 0 (and per pair, τi·τj < 0), as a
  count and a share of the entries;
- the Jaccard overlap |Mi ∩ Mj| / |Mi ∪ Mj| of the top-d magnitude masks Mi (keep_topk_mask's
  cut, entries tied with it kept; zero entries never count as kept);
- per method, how much sparsification drops: the share of its non-zero entries and of ‖τi‖²
  each τi loses in
  TIES' trim, after TIES' sign election (entries whose sign disagrees with the elected one), in
  breadcrumbs' band, in DARE's and DELLA's random drops (the same draws as a merge of this
  recipe and seed: the methods' own sparsifiers; DELLA's only when asked, `della=True`: its
  per-row ranking costs as much as all the other figures together);
- for 2-D tensors, singular values and the effective rank exp(−Σ pk log pk), pk = σk / Σσ
  (Roy & Vetterli 2007), and the stable rank ‖τ‖²_F / σ1²; spectra of matrices larger than
  `max_rank` are the top `max_rank` values of a randomized SVD (methods/lowrank.py), so their
  effective rank is that of the truncated spectrum (marked `exact: false`);
- against a merge θ* (δ = θ* − θ0): ‖δ‖, cos(δ, τi), the least-squares coefficients c of
  δ ≈ Σ ci τi (c = λ·wi for task arithmetic), each task's share ci⟨τi, δ⟩ / ‖δ‖² of δ's energy
  (the shares add up to 1 − residual), the residual share outside the span of the τi, and the
  share of τi's non-zero entries that δ moves the other way. These last definitions are ours.
"""

from __future__ import annotations

import math

import torch

from mergesmith.methods.blocks import elect_sign, gram64, keep_magnitude_band, topk_count
from mergesmith.methods.kth import MagnitudeSelect
from mergesmith.methods.lowrank import RangeSketch
from mergesmith.methods.magnitude_trim import band, band_ranks, keep_band
from mergesmith.methods.random_drop import dare_drops, della_drops
from mergesmith.methods.registry import TensorContext
from mergesmith.methods.sparse import as_rows, in_parallel, row_blocks

DEFAULT_DENSITY = 0.2  # the masks' and drops' density when the recipe sets none
DEFAULT_GAMMA = 0.01  # breadcrumbs' outlier share (mergekit's default)
DEFAULT_EPSILON = 0.15  # DELLA's spread (its default)
DEFAULT_MAX_RANK = 32
OVERSAMPLE = 10  # randomized_svd's; below max_rank + this the spectrum is computed whole
BLOCK_ELEMENTS = 1 << 18  # entries of each τi handled at once: scratch stays small
DROPS = ("ties_trim", "ties_elect", "breadcrumbs", "dare", "della")


class TensorSums:
    """The additive sums of one tensor (see the module), its task vectors (and δ) given block
    of rows by block of rows, pass by pass, so that memory holds one block of each whatever the
    tensor's size: `add(start, taus, merged)` every block of a pass (start: its first row),
    then `end_pass()`, `passes` times; then `result()`.

    Pass 0 adds up the Gram matrix and counts the cuts' high bits (methods/kth.py); pass 1
    their low bits; pass 2 counts and sums element-wise, against the cuts now known; the
    spectra's sketches (lowrank.RangeSketch: one product with the tensor per pass, 2 + 2q of
    them) run alongside from pass 0 on. Whole tensors are one block (`tensor_sums`)."""

    def __init__(self, shape, experts: int, *, merged: bool = False, densities: list[float],
                 weights: list[float] | None = None, gammas: list[float] | None = None,
                 epsilons: list[float] | None = None, ctx: TensorContext | None = None,
                 max_rank: int = DEFAULT_MAX_RANK, della: bool = True, threads: int = 1):
        self.shape, self.n, self.merged = torch.Size(shape), experts, merged
        self.numel = math.prod(self.shape)
        self.densities = densities
        self.weights = weights or [1.0] * experts
        self.epsilons = (epsilons or [DEFAULT_EPSILON] * experts) if della else None
        self.ctx, self.threads = ctx or TensorContext("tensor"), threads
        gammas = gammas or [DEFAULT_GAMMA] * experts
        self.bands = [band_ranks(self.numel, d, g) for d, g in zip(densities, gammas)]
        self.tops = [topk_count(self.numel, d) for d in densities]
        self.selects = [MagnitudeSelect(sorted({k, *ranks}) if 0 < k < self.numel else ranks)
                        for k, ranks in zip(self.tops, self.bands)]
        self.sketches = ([matrix_sketch(self.shape, max_rank) for _ in range(experts + merged)]
                         if len(self.shape) == 2 and self.numel else [])
        self.passes = max([3] + [s.passes for s in self.sketches])
        self.step, self.gram, self.cuts, self.drops, self.parts = 0, None, None, None, []

    def add(self, start: int, taus: list[torch.Tensor], merged: torch.Tensor | None = None
            ) -> None:
        vectors = taus + ([merged] if merged is not None else [])
        if self.step == 0:
            part = gram64(vectors)
            self.gram = part if self.gram is None else self.gram.add_(part)
        if self.step < 2:
            for select, tau in zip(self.selects, taus):
                if select.ks:
                    select.count(tau)
        if self.step == 2:
            self.parts.append(self._elementwise(start, taus, merged))
        for sketch, x in zip(self.sketches, vectors):  # on the caller's one thread: see
            if self.step < sketch.passes:  # run.py's _one_thread
                sketch.add(start, x.float())

    def end_pass(self) -> None:
        for select in self.selects:
            select.end_pass()
        for sketch in self.sketches:
            if self.step < sketch.passes:
                sketch.end_pass()
        self.step += 1
        if self.step == 2:
            self.cuts = [self._cuts(top, ranks, density, dict(zip(select.ks, select.values()))
                                    if select.ks else {})
                         for top, ranks, density, select
                         in zip(self.tops, self.bands, self.densities, self.selects)]

    def result(self) -> dict:
        """The sums, once every pass is done."""
        acc = {key: sum(part[key] for part in self.parts) for key in self.parts[0]}
        sums = {"numel": self.numel, "gram": self.gram.tolist(),
                "conflicts": int(acc["conflicts"]), "pair_conflicts": _symmetric(acc["pair"]),
                "mask_overlap": _symmetric(acc["overlap"]), "nonzero": acc["nonzero"].tolist(),
                "kept": {name: acc[name].tolist() for name in DROPS
                         if name != "della" or self.drops[1] is not None}}
        if self.merged:
            sums["against"] = acc["against"].tolist()
        if self.sketches:
            sums["spectra"] = [spectrum_figures(s.values().double(), s.exact,
                                                float(self.gram[i, i]))
                               for i, s in enumerate(self.sketches)]
        return sums

    def _cuts(self, k: int, ranks: list[int], density: float, values: dict[int, float]
              ) -> dict:
        """τ's magnitude thresholds: the top-k cut (TIES, the masks; entries tied with it
        kept) and breadcrumbs' band (magnitude_trim.band)."""
        top = 0.0 if k == self.numel else math.inf if k == 0 else values[k]
        return {"top": top, "band": band(self.numel, density, [values[r] for r in ranks])}

    def _elementwise(self, start: int, taus: list[torch.Tensor], merged: torch.Tensor | None
                     ) -> dict:
        """Counts and kept energies of a block of rows, in blocks of BLOCK_ELEMENTS (each
        one's own scratch) shared out among `threads` threads, each adding up its own
        (sparse.in_parallel)."""
        n = self.n
        rows = [as_rows(t) for t in taus]
        delta = as_rows(merged) if merged is not None else None
        cols = rows[0].shape[1]
        if self.drops is None:  # the merge's own draws, at each entry's offset in the tensor
            d, e = self.densities, self.epsilons
            della = (della_drops(self.ctx, rows[0], d, e, unbiased=False) if e and
                     all(not 0 < x < 1 or (y <= x and x + y <= 1) for x, y in zip(d, e))
                     else None)  # not asked for, or d ± ε outside [0, 1]: DELLA refuses these
            self.drops = (dare_drops(self.ctx, rows[0].device, d, unbiased=False), della)
        parts = []

        def count(blocks: list[slice]) -> None:
            acc = {"conflicts": torch.zeros((), dtype=torch.int64),
                   "pair": torch.zeros(n, n, dtype=torch.int64),
                   "overlap": torch.zeros(n, n, dtype=torch.int64),
                   "nonzero": torch.zeros(n, dtype=torch.int64),
                   "against": torch.zeros(n, dtype=torch.int64),
                   **{name: torch.zeros(n, 2, dtype=torch.float64) for name in DROPS}}
            for block in blocks:
                xs = [r[block].float() for r in rows]
                d = delta[block].float() if delta is not None else None
                _block(acc, xs, d, (start + block.start) * cols, self.cuts, self.weights,
                       *self.drops)
            parts.append(acc)

        intra_op = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # in_parallel's count of threads
        try:
            in_parallel(count, row_blocks(rows[0], BLOCK_ELEMENTS))
        finally:
            torch.set_num_threads(intra_op)
        return {key: sum(part[key] for part in parts) for key in parts[0]}


def tensor_sums(taus: list[torch.Tensor], merged: torch.Tensor | None = None, **options
                ) -> dict:
    """TensorSums of whole tensors (one block per pass); `merged` is δ = θ* − θ0; `options`
    those of TensorSums (densities required)."""
    sums = TensorSums(taus[0].shape, len(taus), merged=merged is not None, **options)
    for _ in range(sums.passes):
        sums.add(0, taus, merged)
        sums.end_pass()
    return sums.result()


def _block(acc: dict, xs: list[torch.Tensor], delta: torch.Tensor | None, at: int, cuts,
           weights, dare, della) -> None:
    """One block of rows of each τi (entry `at` on) into the sums `acc`."""
    n = len(xs)
    signs = [x.sign() for x in xs]
    acc["conflicts"] += ((sum(s > 0 for s in signs) > 0) & (sum(s < 0 for s in signs) > 0)).sum()
    masks = [(x.abs() >= cut["top"]) & (x != 0) for x, cut in zip(xs, cuts)]
    for i in range(n):
        acc["nonzero"][i] += torch.count_nonzero(xs[i])
        for j in range(i, n):
            acc["pair"][i, j] += (signs[i] * signs[j] < 0).sum()
            acc["overlap"][i, j] += (masks[i] & masks[j]).sum()
        if delta is not None:
            acc["against"][i] += (signs[i] * delta.sign() < 0).sum()
    trimmed = [keep_magnitude_band(x, cut["top"]) if cut["top"] > 0 else
               x.clone() if cut["top"] == 0 else torch.zeros_like(x)
               for x, cut in zip(xs, cuts)]
    elected = elect_sign(trimmed, weights)
    _add(acc["ties_trim"], trimmed)
    _add(acc["ties_elect"], [t * ((t * w * elected) > 0) for t, w in zip(trimmed, weights)])
    _add(acc["breadcrumbs"], [keep_band(*cut["band"])(x, at) for x, cut in zip(xs, cuts)])
    _add(acc["dare"], [drop(x.clone(), at) for x, drop in zip(xs, dare)])
    if della is not None:
        _add(acc["della"], [drop(x.clone(), at) for x, drop in zip(xs, della)])


def _add(total: torch.Tensor, kept: list[torch.Tensor]) -> None:
    """Per τi: how many entries it keeps, and their Σ τ² (a block's in fp32, added in float64)."""
    for i, x in enumerate(kept):
        flat = x.reshape(-1)
        total[i, 0] += int(torch.count_nonzero(flat))
        total[i, 1] += float(torch.dot(flat, flat))


def _symmetric(upper: torch.Tensor) -> list[list[int]]:
    """The full matrix from its upper triangle (a few entries: plain Python)."""
    rows = upper.tolist()
    return [[rows[min(i, j)][max(i, j)] for j in range(len(rows))] for i in range(len(rows))]


def spectrum(x: torch.Tensor, max_rank: int = DEFAULT_MAX_RANK, energy: float | None = None
             ) -> dict:
    """The figures of x's singular values: all of them, or the top `max_rank` of a seeded
    randomized SVD when x is larger (TensorSums' sketch, x one block); `energy`: ‖x‖²_F."""
    sketch = matrix_sketch(x.shape, max_rank)
    for _ in range(sketch.passes):
        sketch.add(0, x.float())
        sketch.end_pass()
    energy = float(gram64([x])[0, 0]) if energy is None else energy
    return spectrum_figures(sketch.values().double(), sketch.exact, energy)


def matrix_sketch(shape, max_rank: int) -> RangeSketch:
    """The sketch of a matrix's spectrum: exact up to max_rank + OVERSAMPLE singular values."""
    side = min(shape)
    k = side if side <= max_rank + OVERSAMPLE else max_rank
    return RangeSketch(shape, k, oversample=OVERSAMPLE, exact=k == side)


def spectrum_figures(sigma: torch.Tensor, exact: bool, energy: float) -> dict:
    """The figures of the singular values σ (float64) of a matrix x with ‖x‖²_F = energy:
    all of them (`exact`), or its top ones."""
    return {"sigma": sigma.tolist(), "exact": exact,
            "effective_rank": effective_rank(sigma),
            "stable_rank": energy / float(sigma[0]) ** 2 if len(sigma) and sigma[0] > 0 else 0.0,
            "energy_kept": float(sigma.square().sum() / energy) if energy > 0 else 1.0}


def effective_rank(sigma: torch.Tensor) -> float:
    """exp(H(p)), p = σ / Σσ over the non-zero σ (Roy & Vetterli 2007): k for k equal values."""
    sigma = sigma[sigma > 0].double()
    if not len(sigma):
        return 0.0
    p = sigma / sigma.sum()
    return float(torch.exp(-(p * p.log()).sum()))


# --------------------------------------------------------------------------------------------
# sums -> figures


def add_sums(total: dict | None, sums: dict) -> dict:
    """Two tensors' (or groups') additive sums added; spectra are left out (not additive)."""
    if total is None:
        return {k: v for k, v in sums.items() if k != "spectra"}
    return {key: _plus(total[key], sums[key]) for key in total if key != "spectra"}


def _plus(a, b):
    if isinstance(a, dict):
        return {k: _plus(a[k], b[k]) for k in a if k in b}
    if isinstance(a, list):
        return [_plus(x, y) for x, y in zip(a, b)]
    return a + b


def figures(sums: dict, experts: int) -> dict:
    """The numbers shown for a tensor or a group, from its sums (None where undefined)."""
    g = torch.tensor(sums["gram"], dtype=torch.float64)
    norms = g.diagonal().clamp(min=0).sqrt()
    n, numel = experts, sums["numel"]
    out = {"norms": norms[:n].tolist(),
           "cosine": [[_ratio(g[i, j], norms[i] * norms[j]) for j in range(n)] for i in range(n)],
           "sign_conflict_rate": sums["conflicts"] / numel,
           "pair_conflict_rate": [[c / numel for c in row] for row in sums["pair_conflicts"]],
           "jaccard": [[_ratio(sums["mask_overlap"][i][j], sums["mask_overlap"][i][i]
                               + sums["mask_overlap"][j][j] - sums["mask_overlap"][i][j])
                        for j in range(n)] for i in range(n)],
           "dropped": {name: {"entries": [_ratio(z - c, z)
                                          for (c, _), z in zip(kept, sums["nonzero"])],
                              "energy": [_ratio(float(g[i, i]) - e, g[i, i])
                                         for i, (_, e) in enumerate(kept)]}
                       for name, kept in sums["kept"].items()}}
    if len(g) > n:
        out["merged"] = merged_figures(g, n, sums)
    if "spectra" in sums:
        out["effective_rank"] = [s["effective_rank"] for s in sums["spectra"]]
        out["stable_rank"] = [s["stable_rank"] for s in sums["spectra"]]
    return out


def merged_figures(g: torch.Tensor, n: int, sums: dict) -> dict:
    """δ (the last row of the Gram matrix) against the τi: see the module."""
    tt, td, dd = g[:n, :n], g[:n, n], g[n, n]
    norms = tt.diagonal().clamp(min=0).sqrt()
    coefficients = torch.linalg.lstsq(tt, td[:, None], driver="gelsd").solution[:, 0]
    explained = coefficients * td
    return {"norm": float(dd.clamp(min=0).sqrt()),
            "cosine": [_ratio(td[i], norms[i] * dd.clamp(min=0).sqrt()) for i in range(n)],
            "coefficients": coefficients.tolist(),
            "share": [_ratio(e, dd) for e in explained],
            "residual": _ratio(dd - explained.sum(), dd),
            "against": [_ratio(a, z) for a, z in zip(sums["against"], sums["nonzero"])]}


def _ratio(a, b) -> float | None:
    a, b = float(a), float(b)
    return a / b if b > 0 else None
