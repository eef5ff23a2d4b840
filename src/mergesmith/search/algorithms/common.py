"""What the seed search algorithms share: seeded generators, options, the log, Pareto sets.

Every algorithm works on points x in [0, 1]^d (the search space decodes them) and maximises.
Randomness comes only from `generation_rng(seed, name, generation)`, so a pickled optimizer
resumes with the same draws the uninterrupted one would have made.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from mergesmith.errors import RecipeError
from mergesmith.search.optimizers import Front


def generation_rng(seed: int, name: str, generation: int, stream: int = 0) -> np.random.Generator:
    """The one generator for (global seed, algorithm, generation); `stream` separates ask from tell."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode()), int(generation),
                                  int(stream)])


def read_options(name: str, options: dict | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's options over its defaults; an unknown name is an error, not ignored."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise RecipeError(f"search.options: {unknown[0]!r} is not an option of the {name} optimizer",
                          hint="known options: " + ", ".join(sorted(defaults)))
    return {**defaults, **options}


def scores_of(evaluation) -> np.ndarray | None:
    """An evaluation's objective vector, or None when it failed (no scores, or a NaN) or was
    scored on a subsample only: the driver's successive halving caps those below the kept ones,
    which would bend MAP's fit, and their per-example scores cover other examples than M2N2's."""
    scores = getattr(evaluation, "scores", None)
    if scores is None or getattr(evaluation, "fidelity", 1.0) < 1.0:
        return None
    scores = np.asarray(scores, dtype=float).reshape(-1)
    return None if scores.size == 0 or not np.all(np.isfinite(scores)) else scores


def clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(x, dtype=float), 0.0, 1.0)


class SeedAlgorithm:
    """best() from the Front of what the algorithm was told; no stopping rule of its own unless
    it overrides done() (MAP stops after scoring its front), so the driver's budgets end it."""

    front: Front

    def done(self) -> bool:
        return False

    def best(self) -> list[np.ndarray]:
        return self.front.best()


def start_points(space, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """space.start() (the recipe's own values) first, then uniform points: a first generation."""
    d = len(space)
    first = [clip(space.start())] if count > 0 else []
    return first + [rng.random(d) for _ in range(count - len(first))]
