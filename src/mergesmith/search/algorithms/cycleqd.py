"""CycleQD: quality-diversity with cycling objectives (Kuroki et al.; arXiv 2410.14735, ICLR 2025).

Read against the authors' code (SakanaAI/CycleQD: main.py, crossover/model_linear.py,
mutation/gaussian_mutator.py, sampler/random_sampler.py, tasks/base.py, configs/).
The genome is a point x in [0, 1]^d of the search space instead of a model's task vector.

- One MAP-Elites archive per objective k: quality = score k; the cell is the tuple of the other
  objectives' bins (`bins` equal bins on `bc_range`, values outside go to the end bins).
- Child g (counted over the whole search, from 1) optimises q = g mod K: two distinct parents
  from archive q, drawn uniformly (the config's default) or, with `sampling: elite`, with
  probability ~ norm(quality) * prod norm(bin index), norm(v) = 0.5 + 0.8 (v - min) / (max - min)
  (1 when all are equal; this spans [0.5, 1.3], as the code has it, though 0.8 looks meant as
  the top); crossover w_i ~ N(1 + mu, sigma), child = sum w_i x_i / sum w_i
  (|sum w| < 1e-8 is redrawn, never divided by); Gaussian mutation N(0, mutation^2).
- Every scored child enters every archive whose cell is empty or holds a lower quality.

Ours, not the paper's: the first generation is space.start() and uniform points (the paper seeds
the archives with its experts); a child of an archive with fewer than two elites is a uniform
point; `mutation` is in units of the cube (the code's 0.0003 is in weight units); best() is the
Pareto set of everything scored. Not here: SVD mutation (needs the experts'
task vectors) and the optional per-task CMA-ES over the operators' parameters.
"""

from __future__ import annotations

import numpy as np

from mergesmith.errors import MergesmithError, RecipeError
from mergesmith.search.algorithms.common import (SeedAlgorithm, clip, generation_rng,
                                                 read_options, scores_of, start_points)
from mergesmith.search.optimizers import Front, register_optimizer

NAME = "cycleqd"
DEFAULTS = {"bins": 15, "bc_range": [0.0, 1.0], "mu": 0.0, "sigma": 0.01, "mutation": 0.05,
            "initial": None, "sampling": "uniform"}


def bin_id(value: float, low: float, high: float, bins: int) -> int:
    """The code's cell index: the bin (edges linspace(low, high, bins + 1)) with right-closed edges."""
    edges = np.linspace(low, high, bins + 1)
    return int(min(max(0, np.digitize(value, edges, right=True) - 1), bins - 1))


def cell(scores: np.ndarray, quality: int, low: float, high: float, bins: int) -> tuple[int, ...]:
    return tuple(bin_id(v, low, high, bins) for k, v in enumerate(scores) if k != quality)


def elite_weights(qualities: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The code's elite sampling probabilities over an archive's elites."""
    def norm(values):
        low, high = values.min(), values.max()
        return np.ones(len(values)) if low == high else 0.5 + (values - low) * (0.8 / (high - low))

    weights = norm(np.asarray(qualities, dtype=float))
    for column in np.atleast_2d(np.asarray(cells, dtype=float)).T:
        weights = weights * norm(column)
    return weights / weights.sum() if weights.sum() > 0 else np.full(len(weights), 1.0 / len(weights))


def linear_crossover(parents: list[np.ndarray], rng: np.random.Generator, mu: float = 0.0,
                     sigma: float = 0.01) -> np.ndarray:
    """sum w_i x_i / sum w_i with w_i ~ N(1 + mu, sigma); a near-zero sum is redrawn."""
    for _ in range(100):
        w = rng.normal(1.0 + mu, abs(sigma), size=len(parents))
        if abs(w.sum()) >= 1e-8:
            return np.tensordot(w, np.vstack(parents), axes=1) / w.sum()
    raise MergesmithError(f"cycleqd: crossover weights N(1 + {mu}, {sigma}) keep summing to 0",
                          hint="search.options.mu must not be -1 with a sigma of 0")


class CycleQD(SeedAlgorithm):
    def __init__(self, space, settings, seed: int):
        self.options = read_options(NAME, getattr(settings, "options", None), DEFAULTS)
        low, high = self.options["bc_range"]
        if not low < high or int(self.options["bins"]) < 1:
            raise RecipeError(f"search.options: bc_range {self.options['bc_range']} and bins "
                              f"{self.options['bins']} give no cells",
                              hint="bc_range is [low, high] with low < high, bins at least 1")
        if self.options["sampling"] not in ("uniform", "elite"):
            raise RecipeError(f"search.options.sampling: {self.options['sampling']!r} is not "
                              "uniform or elite",
                              hint="CycleQD draws parents uniformly or by elite sampling")
        self.dim, self.seed = len(space), seed
        self.children = int(getattr(settings, "population", None) or 8)
        self.first = start_points(space, int(self.options["initial"] or self.children),
                                  generation_rng(seed, NAME, 0))
        self.generation = 0
        self.archives: list[dict[tuple, tuple[float, np.ndarray]]] | None = None
        self.front = Front()

    def ask(self) -> list[np.ndarray]:
        if self.generation == 0:
            return [x.copy() for x in self.first]
        rng = generation_rng(self.seed, NAME, self.generation)
        first = (self.generation - 1) * self.children + 1
        return [self._child(rng, g) for g in range(first, first + self.children)]

    def quality_task(self, g: int) -> int:
        return g % len(self.archives)

    def _child(self, rng: np.random.Generator, g: int) -> np.ndarray:
        """Child g of the search (g of the paper, counted from 1 over all generations)."""
        if not self.archives:
            return rng.random(self.dim)
        archive = self.archives[self.quality_task(g)]
        elites = list(archive.values())
        if len(elites) < 2:
            return rng.random(self.dim)
        probs = None
        if self.options["sampling"] == "elite":
            probs = elite_weights(np.array([q for q, _ in elites]), np.array(list(archive)))
        pair = rng.choice(len(elites), size=2, replace=False, p=probs)
        o = self.options
        child = linear_crossover([elites[i][1] for i in pair], rng, o["mu"], o["sigma"])
        if o["mutation"]:
            child = child + rng.normal(0.0, o["mutation"], self.dim)
        return clip(child)

    def tell(self, xs, evaluations) -> None:
        for x, evaluation in zip(xs, evaluations):
            scores = scores_of(evaluation)
            self.front.add([clip(x)], [scores])
            if scores is not None:
                self._insert(clip(x), scores)
        self.generation += 1

    def _insert(self, x: np.ndarray, scores: np.ndarray) -> None:
        if self.archives is None:
            if len(scores) < 2:
                raise MergesmithError("cycleqd: needs two or more objectives, the fitness gives one",
                                      hint="set fitness.objectives: each with several tasks")
            self.archives = [{} for _ in scores]
        low, high = self.options["bc_range"]
        for k, archive in enumerate(self.archives):
            key = cell(scores, k, low, high, int(self.options["bins"]))
            if key not in archive or archive[key][0] < scores[k]:
                archive[key] = (float(scores[k]), x)


@register_optimizer(NAME, objectives="multi")
def make_cycleqd(space, settings, seed: int) -> CycleQD:
    return CycleQD(space, settings, seed)
