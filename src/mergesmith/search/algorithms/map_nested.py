"""Nested MAP (`map` with `variant: nested`; Li et al., arXiv 2406.07529, the authors' code
run_MAP.py run_MAP_nested, evaluation.py evaluate_scalings_nested, utils.py
find_closest_datasets and get_scaling_from_pf): task arithmetic θ(c) = θ0 + Σ c_i τ_i merged
as a binary tree of two-model MAP fits.

1. The pool: one entry per model, its task vector, its tasks [i] and its score. The authors
   hard-code the fine-tuned models' accuracies; here each model is evaluated alone (weights
   one-hot) and scored on its own objective.
2. While the pool holds more than one entry: the pair with the closest scores (the first in
   pool order, pairs i < j). `samples` merges θ0 + c_a τ_a + c_b τ_b, (c_a, c_b) in [0, 1]^2;
   entry g's objective is the preference-weighted mean of its tasks' scores (preferences
   normalised within the entry). One quadratic per objective (map_pareto.fit_quadratic), the
   surrogates' Pareto set (map_pareto.surrogate_front), and on it the point maximising
   Σ_g p̂_g M̃_g(c), p̂ = P/‖P‖₂, P_g the sum of entry g's preferences. The merge at that point
   is evaluated once more; it joins the end of the pool with τ = c_a τ_a + c_b τ_b, both task
   lists, and as score the preference-weighted mean over all its tasks.
3. The last entry is the result: N + (N − 1)(samples + 1) evaluations.

Every entry's τ is Σ_i w_i τ_i, w_i the product of the coefficients on model i's path, so each
candidate is a point of the ordinary search space: the flat weights, encoded. Hence the space
must be one linear `weight` per model of task_arithmetic (no normalize, lambda 1) whose range
holds [0, 1], and the fitness `objectives: each` with objective k belonging to the k-th model
of the recipe (the base model left out), in recipe order.

The tree (pairs merged, chosen coefficients, flat weights, scores) is `tree` on the optimizer,
pickled in OUT/state.pkl after each generation. The result, the tree's last merge (also the last
candidate of candidates.jsonl), is `outcome()`: OUT/result.yaml, and the tree under `result` in
OUT/summary.json. best.yaml and pareto.json stay those of every evaluated candidate.

Ours, not the authors': the samples are uniform in [0, 1]^2 as plain MAP draws them (the code
mixes one-hot, isotropic and grid points); failed samples are left out of the fit and, where
fewer than the quadratic's 6 unknowns remain, replaced by new draws, as plain MAP does; a model
alone or a chosen merge that fails to score is an error (its score places it in the tree).
"""

from __future__ import annotations

import itertools

import numpy as np

from mergesmith.errors import MergesmithError, RecipeError
from mergesmith.search.algorithms.common import SeedAlgorithm, clip, generation_rng, scores_of
from mergesmith.search.algorithms.map_pareto import (fit_quadratic, surrogate, surrogate_front,
                                                     unknowns)
from mergesmith.search.optimizers import Front

NAME = "map-nested"
SAMPLES = 20  # the authors' nested default (get_scalings total_points=20)
HINT = ("nested MAP searches search.parameters.weight {low: 0, high: 1, per_model: true} of "
        "merge_method: task_arithmetic, with fitness objectives: each (one per model)")


def closest_pair(scores: list[float]) -> tuple[int, int]:
    """The pair (i < j) with the smallest |s_i - s_j|, the first in pool order (strict <, as
    find_closest_datasets)."""
    return min(itertools.combinations(range(len(scores)), 2),
               key=lambda p: abs(scores[p[0]] - scores[p[1]]))


def preferred(fits: list, front: np.ndarray, totals: list[float]) -> np.ndarray:
    """The front point maximising Σ_g p̂_g M̃_g(c), p̂ = P / ‖P‖₂ (get_scaling_from_pf)."""
    predicted = np.column_stack([surrogate(front, *fit) for fit in fits])
    weights = np.asarray(totals, dtype=float) / np.linalg.norm(totals)
    return front[int(np.argmax(predicted @ weights))]


def weight_models(space, settings) -> list[str]:
    """The models whose weights the space varies, in recipe order; a RecipeError unless the
    space is one linear `weight` per model of task_arithmetic, its range holding [0, 1]."""
    from mergesmith.search.parameter_space import ParameterSpace

    if not isinstance(space, ParameterSpace):
        raise RecipeError("search.options.variant: 'nested' varies the per-model weights of task "
                          "arithmetic; this search has no search.parameters space", hint=HINT)
    recipe = space.base
    if space.methods != ["task_arithmetic"]:
        at = ("search", "method") if space.dimensions[0].name == "merge_method" else ("merge_method",)
        raise RecipeError(f"{recipe.where(*at)}: search.options.variant 'nested' merges by "
                          f"task_arithmetic, not {', '.join(space.methods)}", hint=HINT)
    models = recipe.models or []
    for i, holder in [(None, recipe.parameters), *enumerate(m.parameters for m in models)]:
        holder = holder or {}
        if holder.get("normalize") not in (None, False) or holder.get("lambda") not in (None, 1):
            at = ("parameters",) if i is None else ("models", i, "parameters")
            raise RecipeError(f"{recipe.where(*at)}: search.options.variant 'nested' needs "
                              "θ0 + Σ w_i τ_i as it is: no normalize, lambda 1",
                              hint="leave normalize and lambda out of the recipe")
    targets = space.targets
    plain = all(t.param == "weight" and t.model is not None and t.spec.layer_groups == 1
                and not t.spec.filters and not t.spec.ends for t in targets)
    if not targets or not plain or len(space.dimensions) != len(targets):
        raise RecipeError(f"{recipe.where('search', 'parameters')}: search.options.variant "
                          "'nested' needs exactly one weight per model, nothing else varying",
                          hint=HINT)
    for dim in space.dimensions:
        if dim.kind != "float" or dim.scale != "linear" or dim.low > 0 or dim.high < 1:
            raise RecipeError(f"{recipe.where('search', 'parameters', 'weight')}: search.options."
                              f"variant 'nested' needs a linear weight range holding [0, 1], not "
                              f"[{dim.low:g}, {dim.high:g}] ({dim.scale})",
                              hint="products of coefficients in [0, 1] must stay representable")
    if len(targets) < 2:
        raise RecipeError(f"{recipe.where('models')}: search.options.variant 'nested' merges at "
                          f"least 2 models, the space varies {len(targets)}", hint=HINT)
    fitness = getattr(settings, "fitness", None) or {}
    if not isinstance(fitness, dict) or fitness.get("objectives") != "each":
        raise RecipeError(f"{recipe.where('search', 'fitness')}: search.fitness.objectives must be "
                          "each for search.options.variant 'nested': objective k scores model k",
                          hint=HINT)
    fidelity = getattr(settings, "fidelity", None) or {}
    if fidelity.get("start", 1.0) != 1.0:
        raise RecipeError(f"{recipe.where('search', 'fidelity')}: search.options.variant 'nested' "
                          "needs every candidate's full-fidelity scores", hint="leave fidelity out")
    return [recipe.models[t.model].model for t in targets]


class NestedMAP(SeedAlgorithm):
    def __init__(self, space, settings, seed: int, options: dict):
        self.models = weight_models(space, settings)
        # the dimensions encode flat weights; the space itself stays out of the pickled state
        self.dimensions = list(space.dimensions)
        self.seed, self.options = seed, options
        self.samples = int(options["samples"] or SAMPLES)
        if self.samples < unknowns(2):
            raise RecipeError(f"search.options.samples: each node of nested MAP fits a quadratic "
                              f"in 2 variables, which needs at least {unknowns(2)} samples, not "
                              f"{self.samples}", hint=f"raise samples (default {SAMPLES})")
        n, budget = len(self.models), getattr(settings, "evaluations", None)
        if budget is not None and budget < n + (n - 1) * (self.samples + 1):
            raise RecipeError(f"search.evaluations: {budget} do not complete nested MAP's tree over "
                              f"{n} models: N + (N - 1)(samples + 1) = "
                              f"{n + (n - 1) * (self.samples + 1)}",
                              hint="raise evaluations or lower search.options.samples")
        self.preferences = self._preferences(options["preferences"])
        self.pool: list[dict] = []  # {"tasks": [model indices], "weights": flat w, "score": s}
        self.pair: tuple[int, int] | None = None  # pool indices of the node being fitted
        self.asked: list[np.ndarray] = []  # the coefficients (c_a, c_b) of the last generation
        self.points: list[np.ndarray] = []  # the node's successful samples and objectives
        self.values: list[list[float]] = []
        self.sampled = False
        self.chosen: np.ndarray | None = None
        self.tree: list[dict] = []
        self.generation = 0
        self.front = Front()

    def _preferences(self, given) -> np.ndarray:
        n = len(self.models)
        if given is None:
            return np.ones(n)
        values = np.asarray(given, dtype=float) if isinstance(given, (list, tuple)) else None
        if (values is None or values.shape != (n,) or not np.all(np.isfinite(values))
                or not np.all(values > 0)):
            raise RecipeError(f"search.options.preferences: {given!r} is not {n} positive numbers, "
                              "one per objective (model)", hint="e.g. preferences: "
                              + str([1] * n))
        return values

    # the flat weights of entries and candidates

    def _point(self, weights: np.ndarray) -> np.ndarray:
        return np.array([d.unit(w) for d, w in zip(self.dimensions, weights)])

    def _merge(self, c: np.ndarray) -> np.ndarray:
        a, b = (self.pool[k] for k in self.pair)
        return c[0] * a["weights"] + c[1] * b["weights"]

    def _mean(self, row: np.ndarray, tasks: list[int]) -> float:
        """The preference-weighted mean of these tasks' scores (preferences normalised)."""
        p = self.preferences[tasks]
        return float(p @ row[tasks] / p.sum())

    def _rows(self, evaluations) -> list[np.ndarray | None]:
        rows = [scores_of(e) for e in evaluations]
        for row in rows:
            if row is not None and len(row) != len(self.models):
                raise RecipeError(f"search.fitness: nested MAP needs one objective per model "
                                  f"({len(self.models)}: {', '.join(self.models)}), the fitness "
                                  f"gives {len(row)}", hint=HINT)
        return rows

    # ask / tell

    def ask(self) -> list[np.ndarray]:
        rng = generation_rng(self.seed, NAME, self.generation)
        if not self.pool:  # every model alone
            return [self._point(w) for w in np.eye(len(self.models))]
        if not self.sampled:
            self.asked = list(rng.random((self.samples, 2)))
        elif len(self.points) < unknowns(2):  # failed samples: draw replacements
            self.asked = list(rng.random((unknowns(2) - len(self.points), 2)))
        else:
            self.asked = [self._choose(rng)]
            self.chosen = self.asked[0]
        return [self._point(self._merge(c)) for c in self.asked]

    def _choose(self, rng: np.random.Generator) -> np.ndarray:
        points, values = np.vstack(self.points), np.array(self.values)
        fits = [fit_quadratic(points, values[:, g]) for g in range(2)]
        o = self.options
        front = surrogate_front(fits, 2, int(rng.integers(2**31)), o["algorithm"],
                                int(o["generations"]), int(o["pop_size"]))
        totals = [float(self.preferences[self.pool[k]["tasks"]].sum()) for k in self.pair]
        return preferred(fits, front, totals)

    def tell(self, xs, evaluations) -> None:
        rows = self._rows(evaluations)
        self.front.add([clip(x) for x in xs], rows)
        if not self.pool:
            self._start(rows)
        elif self.chosen is None:
            entries = [self.pool[k] for k in self.pair]
            for c, row in zip(self.asked, rows):
                if row is not None:
                    self.points.append(np.asarray(c, dtype=float))
                    self.values.append([self._mean(row, e["tasks"]) for e in entries])
            self.sampled = True
        else:
            self._join(rows[0])
        self.generation += 1

    def _start(self, rows: list) -> None:
        for i, row in enumerate(rows):
            if row is None:
                raise MergesmithError(f"nested MAP: {self.models[i]} alone failed to score; its "
                                      "score decides where it joins the tree",
                                      hint="see the error in candidates.jsonl")
            self.pool.append({"tasks": [i], "weights": np.eye(len(self.models))[i],
                              "score": float(row[i])})
        self.pair = closest_pair([e["score"] for e in self.pool])

    def _join(self, row: np.ndarray | None) -> None:
        """The chosen merge becomes a pool entry; the next pair is chosen."""
        if row is None:
            raise MergesmithError(f"nested MAP: the chosen merge of node {len(self.tree) + 1} "
                                  "failed to score", hint="see the error in candidates.jsonl")
        a, b = (self.pool[k] for k in self.pair)
        tasks = a["tasks"] + b["tasks"]
        entry = {"tasks": tasks, "weights": self._merge(self.chosen),
                 "score": self._mean(row, tasks)}
        self.tree.append({
            "merged": [[self.models[t] for t in a["tasks"]], [self.models[t] for t in b["tasks"]]],
            "coefficients": [float(v) for v in self.chosen],
            "weights": {self.models[i]: float(w) for i, w in enumerate(entry["weights"]) if i in tasks},
            "score": entry["score"], "samples": len(self.points)})
        self.pool = [e for k, e in enumerate(self.pool) if k not in self.pair] + [entry]
        self.pair = closest_pair([e["score"] for e in self.pool]) if len(self.pool) > 1 else None
        self.points, self.values, self.sampled, self.chosen = [], [], False, None

    def done(self) -> bool:
        return len(self.pool) == 1

    def result(self) -> dict[str, float] | None:
        """The nested merge's flat weights by model, once the tree is complete."""
        if not self.done():
            return None
        return {m: float(w) for m, w in zip(self.models, self.pool[0]["weights"])}

    def outcome(self) -> tuple[np.ndarray, dict] | None:
        """The search's own answer, which is the tree's last merge rather than the best-scored
        candidate: its point and what to report (search/outputs.py writes result.yaml)."""
        if not self.done():
            return None
        return self._point(self.pool[0]["weights"]), {"weights": self.result(), "tree": self.tree}

