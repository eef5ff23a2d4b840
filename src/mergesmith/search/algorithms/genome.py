"""GENOME / GENOME+: population-based evolution (Zhang et al.; arXiv 2503.01155, 2025).

Defaults read from a GENOME implementation (dylan518/EVOLVE: src/genome/genome.py,
individual.py, config.py); the authors' own code is unconfirmed. A genome is a point x in
[0, 1]^d of the search space instead of a LoRA adapter; fitness is the mean of the scores.

- Crossover: population // 2 pairs, each with probability `cross_rate`: two distinct parents by
  roulette (probability ~ fitness), child = (f_a x_a + f_b x_b) / (f_a + f_b).
- Mutation: every individual (children included) with probability `individual_mutation` gives a
  mutant: each gene with probability `gene_mutation` gets + N(0, sigma^2).
- Selection: the best `elite` fraction, the rest by tournaments of 3 without replacement, down
  to `population`.
- GENOME+ succession (`plus: true`): each survivor also proposes x + lambda v with
  v <- (1/C)[r0 phi_in v + r1 phi_cog (p_best - x) + r2 phi_soc (g_best - x) - r3 phi_rep (g_worst - x)],
  C = sum r_k phi_k, r_k ~ U(0, 1); lambda = lambda0 * decay^(generation - 1). The ensemble of
  GENOME+ combines predictions at inference, not weights: not a search step, not here.

Ours: roulette weights are shifted to be >= 0 when a fitness is negative (a negated loss); the
first generation is space.start() and uniform points; points are clipped to the cube.
"""

from __future__ import annotations

import numpy as np

from mergesmith.search.algorithms.common import (SeedAlgorithm, clip, generation_rng,
                                                 read_options, scores_of, start_points)
from mergesmith.search.optimizers import Front, register_optimizer

NAME = "genome"
DEFAULTS = {"cross_rate": 0.8, "individual_mutation": 0.3, "gene_mutation": 0.5, "sigma": 0.1,
            "elite": 0.1, "tournament": 3, "plus": False, "phi": [0.2, 0.2, 0.2, 0.1],
            "lambda0": 0.5, "decay": 0.95}


class Individual:
    def __init__(self, x, fitness=None, velocity=None, best_x=None, best_fitness=-np.inf):
        self.x = clip(x)
        self.fitness = fitness
        self.velocity = np.zeros_like(self.x) if velocity is None else np.asarray(velocity, dtype=float)
        self.best_x = self.x if best_x is None else best_x
        self.best_fitness = best_fitness


def roulette_weights(fitness: np.ndarray) -> np.ndarray:
    """Probabilities ~ fitness; every individual keeps a sliver, so two distinct parents exist."""
    fitness = np.asarray(fitness, dtype=float)
    fitness = fitness - min(fitness.min(), 0.0) + 1e-12
    return fitness / fitness.sum()


def fitness_crossover(a: np.ndarray, b: np.ndarray, fa: float, fb: float) -> np.ndarray:
    """The parents' mean weighted by their (non-negative) fitness; equal weights when both are 0."""
    wa, wb = roulette_weights(np.array([fa, fb]))
    return wa * np.asarray(a) + wb * np.asarray(b)


def gene_mutation(x: np.ndarray, rng: np.random.Generator, rate: float, sigma: float) -> np.ndarray:
    mask = rng.random(len(x)) < rate
    return x + mask * rng.normal(0.0, sigma, len(x))


def succession(velocity, x, personal_best, global_best, global_worst, r, phi) -> np.ndarray:
    """GENOME+'s particle update; r are the four U(0, 1) draws, phi the four weights."""
    r, phi = np.asarray(r, dtype=float), np.asarray(phi, dtype=float)
    terms = [velocity, personal_best - x, global_best - x, -(global_worst - x)]
    weights = r * phi
    return sum(w * t for w, t in zip(weights, terms)) / weights.sum()


def tournament_select(fitness: np.ndarray, count: int, size: int,
                      rng: np.random.Generator) -> list[int]:
    """Indices of `count` tournament winners, each removed from the pool once chosen."""
    pool, chosen = list(range(len(fitness))), []
    while len(chosen) < count and pool:
        entrants = rng.choice(pool, size=min(size, len(pool)), replace=False)
        winner = int(max(entrants, key=lambda i: fitness[i]))
        chosen.append(winner)
        pool.remove(winner)
    return chosen


class Genome(SeedAlgorithm):
    def __init__(self, space, settings, seed: int):
        self.options = read_options(NAME, getattr(settings, "options", None), DEFAULTS)
        self.dim, self.seed = len(space), seed
        self.size = int(getattr(settings, "population", None) or 10)
        self.first = start_points(space, self.size, generation_rng(seed, NAME, 0))
        self.generation = 0
        self.population: list[Individual] = []
        self.pending: list[Individual] = []
        self.global_best: Individual | None = None
        self.global_worst: Individual | None = None
        self.front = Front()

    def ask(self) -> list[np.ndarray]:
        rng = generation_rng(self.seed, NAME, self.generation)
        if self.generation == 0:
            self.pending = [Individual(x) for x in self.first]
        elif not self.population:  # every candidate so far failed: start afresh
            self.pending = [Individual(rng.random(self.dim)) for _ in range(self.size)]
        else:
            self.pending = self._offspring(rng)
        return [ind.x.copy() for ind in self.pending]

    def _offspring(self, rng: np.random.Generator) -> list[Individual]:
        o, population = self.options, self.population
        fitness = np.array([ind.fitness for ind in population])
        children = []
        for _ in range(len(population) // 2):
            if rng.random() <= o["cross_rate"] and len(population) >= 2:
                i, j = rng.choice(len(population), size=2, replace=False, p=roulette_weights(fitness))
                children.append(Individual(fitness_crossover(population[i].x, population[j].x,
                                                             fitness[i], fitness[j])))
        mutants = [Individual(gene_mutation(ind.x, rng, o["gene_mutation"], o["sigma"]))
                   for ind in population + children if rng.random() <= o["individual_mutation"]]
        moved = self._succession(rng) if o["plus"] else []
        offspring = children + mutants + moved
        if not offspring:  # nothing drawn this time: one mutant keeps the search going
            parent = population[int(rng.choice(len(population), p=roulette_weights(fitness)))]
            offspring = [Individual(gene_mutation(parent.x, rng, 1.0, o["sigma"]))]
        return offspring

    def _succession(self, rng: np.random.Generator) -> list[Individual]:
        o = self.options
        step = o["lambda0"] * o["decay"] ** (self.generation - 1)
        moved = []
        for ind in self.population:
            v = succession(ind.velocity, ind.x, ind.best_x, self.global_best.x, self.global_worst.x,
                           rng.random(4), o["phi"])
            moved.append(Individual(ind.x + step * v, velocity=v, best_x=ind.best_x,
                                    best_fitness=ind.best_fitness))
        return moved

    def tell(self, xs, evaluations) -> None:
        scored = []
        pending = self.pending if len(self.pending) == len(xs) else [Individual(x) for x in xs]
        for ind, x, evaluation in zip(pending, xs, evaluations):
            scores = scores_of(evaluation)
            self.front.add([clip(x)], [scores])
            if scores is None:
                continue
            ind.fitness = float(scores.mean())
            if ind.fitness > ind.best_fitness:
                ind.best_x, ind.best_fitness = ind.x, ind.fitness
            scored.append(ind)
            if self.global_best is None or ind.fitness > self.global_best.fitness:
                self.global_best = ind
            if self.global_worst is None or ind.fitness < self.global_worst.fitness:
                self.global_worst = ind
        self.population = self._select(self.population + scored,
                                       generation_rng(self.seed, NAME, self.generation, stream=1))
        self.pending = []
        self.generation += 1

    def _select(self, individuals: list[Individual], rng: np.random.Generator) -> list[Individual]:
        if len(individuals) <= self.size:
            return individuals
        ranked = sorted(individuals, key=lambda ind: ind.fitness, reverse=True)
        elites = ranked[:int(self.options["elite"] * self.size)]
        rest = ranked[len(elites):]
        chosen = tournament_select(np.array([ind.fitness for ind in rest]), self.size - len(elites),
                                   int(self.options["tournament"]), rng)
        return elites + [rest[i] for i in chosen]


@register_optimizer(NAME, objectives="any")
def make_genome(space, settings, seed: int) -> Genome:
    return Genome(space, settings, seed)
