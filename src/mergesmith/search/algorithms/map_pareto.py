"""MAP: amortized Pareto fronts by quadratic surrogates (Li et al.; arXiv 2406.07529, ICLR 2025).

1. sample K points c in the box ([0, 1]^d of the search space) and score every objective;
2. per objective fit M(c) = 1/2 c^T A c + b^T c + e by least squares ((d+1)(d+2)/2 unknowns;
   fewer successful samples than that is an error, never a minimum-norm fit);
3. find the surrogates' Pareto set with NSGA-III (the authors' code: DEAP selNSGA3) from pymoo,
   add each surrogate's own maximiser over the box, and evaluate `front` of those points for real.

Bayesian MAP (`variant: bayesian`, the authors' code MAP.py / utils.py): before the front,
`rounds` rounds of `per_round` more samples where the fit is worst. The directions of c are cut
into bins of their hyperspherical angles (each in [0, pi/2]; 4 bins per angle below 4
dimensions, else 2, as the code); a bin scores mean + lamba * std of its samples' squared
residuals (std over `std_sample` subsets, each dropping `std_percentage` % of the previous one's
points, as the code), an empty bin -inf; bins are drawn by softmax(score / temperature), angles
uniformly inside the bin. Ours: the residual is summed over the objectives, and the radius is
uniform along the direction up to the cube's face (the code draws it from a configured law).

The authors' code can also squash the quadratic through a sigmoid (accuracy) or softplus (loss)
and fit it by curve_fit; the paper's surrogate, the plain quadratic, is the one here.

Nested MAP (`variant: nested`, search/algorithms/map_nested.py): a binary tree of two-model
fits, the closest-scoring pair first, each chosen merge a new model of the pool; it needs the
space to be one `weight` per model of task_arithmetic and one objective per model.
"""

from __future__ import annotations

import itertools

import numpy as np

from mergesmith.errors import MergesmithError, RecipeError
from mergesmith.search.algorithms.common import (SeedAlgorithm, clip, generation_rng,
                                                 read_options, scores_of)
from mergesmith.search.optimizers import (
    SEARCH_EXTRA, Front, non_dominated, register_optimizer,
)

NAME = "map"
DEFAULTS = {"samples": None, "front": None, "algorithm": "nsga3", "generations": 150,
            "pop_size": 100, "variant": "plain", "rounds": 2, "per_round": None, "temperature": 0.07,
            "lamba": 0.5, "std_percentage": 20, "std_sample": 30, "preferences": None}


def unknowns(d: int) -> int:
    return (d + 1) * (d + 2) // 2


def quadratic_features(points: np.ndarray) -> np.ndarray:
    """Columns [c_i^2 (i), c_i c_j (i < j), c_i (i), 1], the authors' order."""
    points = np.atleast_2d(np.asarray(points, dtype=float))
    d = points.shape[1]
    rows, cols = np.triu_indices(d, k=1)
    return np.hstack([points ** 2, points[:, rows] * points[:, cols], points,
                      np.ones((len(points), 1))])


def fit_quadratic(points: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(A, b, e) of 1/2 c^T A c + b^T c + e, A symmetric, by least squares."""
    features = quadratic_features(points)
    d = np.atleast_2d(points).shape[1]
    if len(features) < unknowns(d) or np.linalg.matrix_rank(features) < unknowns(d):
        raise MergesmithError(
            f"MAP: {len(features)} scored samples do not determine a quadratic in {d} variables "
            f"({unknowns(d)} unknowns)", hint="raise search.options.samples or the evaluation budget")
    coef = np.linalg.lstsq(features, np.asarray(values, dtype=float), rcond=None)[0]
    A = np.zeros((d, d))
    rows, cols = np.triu_indices(d, k=1)
    A[np.arange(d), np.arange(d)] = 2.0 * coef[:d]
    A[rows, cols] = A[cols, rows] = coef[d:d + len(rows)]
    return A, coef[d + len(rows):d + len(rows) + d], float(coef[-1])


def surrogate(points: np.ndarray, A: np.ndarray, b: np.ndarray, e: float) -> np.ndarray:
    points = np.atleast_2d(points)
    return 0.5 * np.einsum("ki,ij,kj->k", points, A, points) + points @ b + e


def box_maximiser(A: np.ndarray, b: np.ndarray, start: np.ndarray) -> np.ndarray:
    """argmax over [0, 1]^d of one quadratic (L-BFGS-B from the best front point)."""
    from scipy.optimize import minimize

    result = minimize(lambda c: -(0.5 * c @ A @ c + b @ c), start, jac=lambda c: -(A @ c + b),
                      bounds=[(0.0, 1.0)] * len(b), method="L-BFGS-B")
    return np.clip(result.x, 0.0, 1.0)


def surrogate_front(fits: list, d: int, seed: int, algorithm: str = "nsga3",
                    generations: int = 150, pop_size: int = 100) -> np.ndarray:
    """Points of the surrogates' Pareto set over [0, 1]^d, with each surrogate's maximiser."""
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.algorithms.moo.nsga3 import NSGA3
        from pymoo.core.problem import Problem
        from pymoo.optimize import minimize
        from pymoo.util.ref_dirs import get_reference_directions
    except ImportError:
        raise MergesmithError("MAP: pymoo is not installed",
                              hint=f"install the search extra: {SEARCH_EXTRA}") from None

    class Surrogates(Problem):
        def __init__(self):
            super().__init__(n_var=d, n_obj=len(fits), xl=0.0, xu=1.0)

        def _evaluate(self, X, out, *args, **kwargs):
            out["F"] = -np.column_stack([surrogate(X, *fit) for fit in fits])  # pymoo minimises

    if algorithm == "nsga3" and len(fits) > 1:
        directions = get_reference_directions("das-dennis", len(fits), n_partitions=12)
        method = NSGA3(ref_dirs=directions, pop_size=max(pop_size, len(directions)))
    else:
        method = NSGA2(pop_size=pop_size)
    result = minimize(Surrogates(), method, ("n_gen", generations), seed=seed, verbose=False)
    points = np.atleast_2d(result.X)
    values = -np.atleast_2d(result.F)
    tops = [box_maximiser(A, b, points[int(np.argmax(values[:, k]))])
            for k, (A, b, _) in enumerate(fits)]
    points = np.vstack([tops, points])
    values = np.column_stack([surrogate(points, *fit) for fit in fits])
    return points[non_dominated(values)]


def to_angles(points: np.ndarray) -> np.ndarray:
    """Hyperspherical angles phi_1..phi_{d-1} of each row (the code's
    batch_cartesian_to_hyperspherical)."""
    points = np.atleast_2d(points)
    tails = np.cumsum(points[:, ::-1] ** 2, axis=1)[:, ::-1]
    return np.arctan2(np.sqrt(tails[:, 1:]), points[:, :-1])


def from_angles(angles: np.ndarray, radius: np.ndarray) -> np.ndarray:
    angles = np.atleast_2d(angles)
    sines = np.cumprod(np.sin(angles), axis=1)
    points = np.empty((len(angles), angles.shape[1] + 1))
    points[:, 0] = np.cos(angles[:, 0])
    points[:, 1:-1] = sines[:, :-1] * np.cos(angles[:, 1:])
    points[:, -1] = sines[:, -1]
    return radius[:, None] * points


def angle_bins(d: int) -> int:
    return 4 if d < 4 else 2


def bin_scores(angles: np.ndarray, losses: np.ndarray, bins: int, rng: np.random.Generator,
               lamba: float = 0.5, percentage: float = 20, subsets: int = 30) -> dict[tuple, float]:
    """Each bin of the angle grid: mean + lamba * std of the losses inside it (-inf when empty)."""
    width = (np.pi / 2) / bins
    index = np.minimum((angles // width).astype(int), bins - 1)
    scores = {}
    for key in itertools.product(range(bins), repeat=angles.shape[1]):
        inside = np.all(index == np.array(key), axis=1)
        if not inside.any():
            scores[key] = -np.inf
            continue
        mask, means = inside.copy(), []
        for _ in range(subsets):  # the code drops a share of what the previous subset kept
            kept = np.flatnonzero(mask)
            mask[rng.choice(kept, int(percentage / 100 * len(kept)), replace=False)] = False
            if mask.any():
                means.append(losses[mask].mean())
        scores[key] = float(losses[inside].mean() + lamba * np.std(means))
    return scores


def adaptive_samples(points: np.ndarray, losses: np.ndarray, count: int, rng: np.random.Generator,
                     temperature: float = 0.07, **score_options) -> np.ndarray:
    """`count` new points, in angle bins drawn by softmax(bin score / temperature)."""
    d = points.shape[1]
    if d == 1:  # no angles: every direction is the same
        return rng.random((count, 1))
    bins = angle_bins(d)
    scores = bin_scores(to_angles(points), losses, bins, rng, **score_options)
    keys = list(scores)
    values = np.array([scores[k] for k in keys])
    weights = np.exp((values - values.max()) / temperature)
    chosen = rng.choice(len(keys), size=count, p=weights / weights.sum())
    width = (np.pi / 2) / bins
    angles = (np.array([keys[i] for i in chosen]) + rng.random((count, d - 1))) * width
    directions = from_angles(angles, np.ones(count))
    reach = 1.0 / np.abs(directions).max(axis=1)  # where the ray leaves the cube
    return np.clip(directions * (rng.random(count) * reach)[:, None], 0.0, 1.0)


def spread(points: np.ndarray, count: int, objectives: int) -> np.ndarray:
    """`count` front points: the per-objective maximisers first, then evenly along objective 1."""
    if len(points) <= count:
        return points
    head = points[:objectives]
    rest = points[objectives:]
    take = np.linspace(0, len(rest) - 1, max(count - objectives, 0)).round().astype(int)
    return np.vstack([head, rest[np.unique(take)]])


def map_options(settings) -> dict:
    options = read_options(NAME, getattr(settings, "options", None), DEFAULTS)
    if options["algorithm"] not in ("nsga2", "nsga3"):
        raise RecipeError(f"search.options.algorithm: {options['algorithm']!r} is not nsga2 or "
                          "nsga3", hint="MAP finds the surrogate front with NSGA-III (default) or NSGA-II")
    if options["variant"] not in ("plain", "bayesian", "nested"):
        raise RecipeError(f"search.options.variant: {options['variant']!r} is not plain, "
                          "bayesian or nested")
    return options


class MAP(SeedAlgorithm):
    def __init__(self, space, settings, seed: int):
        self.options = map_options(settings)
        if self.options["preferences"] is not None:
            raise RecipeError("search.options.preferences: only nested MAP reads preferences",
                              hint="set variant: nested, or leave preferences out")
        self.rounds = int(self.options["rounds"]) if self.options["variant"] == "bayesian" else 0
        self.dim, self.seed = len(space), seed
        need = unknowns(self.dim)
        self.front_size = int(self.options["front"] or getattr(settings, "population", None) or 10)
        budget = getattr(settings, "evaluations", None)
        self.per_round = int(self.options["per_round"] or max(need // 2, 1))
        extra = self.front_size + self.rounds * self.per_round
        default = 2 * need if budget is None else max(need, budget - extra)
        self.samples = int(self.options["samples"] or default)
        if self.samples < need:
            raise RecipeError(
                f"search.options.samples: MAP fits a quadratic in {self.dim} variables, which needs "
                f"at least {need} samples, not {self.samples}",
                hint="raise samples (and the evaluation budget) or search fewer dimensions")
        self.generation = 0
        self.points: list[np.ndarray] = []  # successful samples and their scores, for the fit
        self.values: list[np.ndarray] = []
        self.fits: list | None = None
        self.rounds_done = 0
        self.proposed = False
        self.finished = False
        self.front = Front()

    def ask(self) -> list[np.ndarray]:
        rng = generation_rng(self.seed, NAME, self.generation)
        if self.generation == 0:
            return [rng.random(self.dim) for _ in range(self.samples)]
        missing = unknowns(self.dim) - len(self.points)
        if missing > 0:  # failed samples: draw replacements until the fit is determined
            return [rng.random(self.dim) for _ in range(missing)]
        points, values = np.vstack(self.points), np.vstack(self.values)
        self.fits = [fit_quadratic(points, values[:, k]) for k in range(values.shape[1])]
        if self.rounds_done < self.rounds:
            predicted = np.column_stack([surrogate(points, *fit) for fit in self.fits])
            o = self.options
            return list(adaptive_samples(points, ((predicted - values) ** 2).sum(axis=1), self.per_round,
                                         rng, o["temperature"], lamba=o["lamba"],
                                         percentage=o["std_percentage"], subsets=int(o["std_sample"])))
        front = surrogate_front(self.fits, self.dim, int(rng.integers(2**31)), self.options["algorithm"],
                                int(self.options["generations"]), int(self.options["pop_size"]))
        self.proposed = True
        return list(spread(front, self.front_size, len(self.fits)))

    def tell(self, xs, evaluations) -> None:
        for x, evaluation in zip(xs, evaluations):
            scores = scores_of(evaluation)
            self.front.add([clip(x)], [scores])
            if scores is not None and not self.proposed:
                self.points.append(np.asarray(x, dtype=float))
                self.values.append(scores)
        if self.fits is not None and not self.proposed:
            self.rounds_done += 1  # an adaptive round was told
        self.finished = self.finished or self.proposed
        self.generation += 1

    def done(self) -> bool:
        return self.finished


@register_optimizer(NAME, objectives="any")
def make_map(space, settings, seed: int):
    options = map_options(settings)
    if options["variant"] == "nested":
        from mergesmith.search.algorithms.map_nested import NestedMAP

        return NestedMAP(space, settings, seed, options)
    return MAP(space, settings, seed)
