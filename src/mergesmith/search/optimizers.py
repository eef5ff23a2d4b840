"""Optimizers for merge search: one protocol, one registry, and the library-backed searches.

Every optimizer works in the unit cube [0, 1]^d (the search space decodes points into recipe
values) and maximizes; the libraries that minimize are told negated scores. An optimizer is
asked for one generation at a time and told that generation's evaluations; the whole object is
pickled into the search's checkpoint after each generation, so it keeps its own random state.

Failed candidates (`scores=None`, or a score that is not finite) are told FAILED_SCORE on every
objective: worse than any real score, yet finite, so that rank-based updates (CMA-ES, TPE) and
pymoo's crowding distances stay defined.

Here: "cma" (the `cma` library), "nsga2" (pymoo), "tpe" (optuna), "random". The seed algorithms
that no library has register themselves from mergesmith.search.algorithms.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import numpy as np

from mergesmith.errors import MergesmithError

FAILED_SCORE = -1e9
KINDS = ("single", "multi", "any")
SEARCH_EXTRA = "pip install 'mergesmith[search]'"


class Optimizer(Protocol):
    def ask(self) -> list[np.ndarray]: ...
    def tell(self, xs: list[np.ndarray], evaluations: list) -> None: ...
    def done(self) -> bool: ...
    def best(self) -> list[np.ndarray]: ...


Factory = Callable[..., Optimizer]  # factory(space, settings, seed) -> Optimizer
_REGISTRY: dict[str, tuple[Factory, str]] = {}


def register_optimizer(name: str, *, objectives: str = "single") -> Callable[[Factory], Factory]:
    """Register `factory(space, settings, seed) -> Optimizer` under `name`; `objectives` says
    whether it optimizes one score ("single"), several ("multi") or either ("any")."""
    if objectives not in KINDS:
        raise ValueError(f"objectives must be one of {KINDS}, not {objectives!r}")

    def add(factory: Factory) -> Factory:
        _REGISTRY[name] = (factory, objectives)
        return factory

    return add


def _load_algorithms() -> None:
    # The seed algorithms register on import; they live above this module, so import them late.
    try:
        import mergesmith.search.algorithms  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "mergesmith.search.algorithms":
            raise


def optimizer_names() -> list[str]:
    _load_algorithms()
    return sorted(_REGISTRY)


def get_optimizer(name: str) -> Factory:
    """The factory registered as `name` (optimizer_objectives(name) says how many objectives)."""
    return _entry(name)[0]


def optimizer_objectives(name: str) -> str:
    """"single", "multi" or "any": how many objectives the optimizer `name` handles."""
    return _entry(name)[1]


def _entry(name: str) -> tuple[Factory, str]:
    _load_algorithms()
    if name not in _REGISTRY:
        raise MergesmithError(f"search.optimizer: unknown optimizer {name!r}",
                              hint=f"choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def told_scores(evaluations: Sequence) -> np.ndarray:
    """(n, k) scores to tell, higher is better; a failed evaluation gets FAILED_SCORE throughout.
    k is the length of the successful scores (1 when every evaluation failed)."""
    rows = [_finite(e.scores) for e in evaluations]
    k = next((len(r) for r in rows if r is not None), 1)
    return np.array([r if r is not None else [FAILED_SCORE] * k for r in rows], dtype=float)


def _finite(scores) -> list[float] | None:
    if scores is None or not all(math.isfinite(s) for s in scores):
        return None
    return [float(s) for s in scores]


def sub_seed(seed: int, name: str) -> int:
    """A positive 31-bit seed drawn from (search seed, optimizer name); cma reads 0 as "time"."""
    words = np.random.SeedSequence([seed & 0xFFFFFFFF, *name.encode()]).generate_state(1)
    return int(words[0] % (2**31 - 2)) + 1


def _options(settings) -> dict:
    return dict(getattr(settings, "options", None) or {})


class Front:
    """The best points told so far, the one keeper behind every optimizer's best(): for one
    objective the first point with the highest score; for several, the non-dominated set
    (points with equal scores all stay). Failed candidates (no scores, or FAILED_SCORE) are
    never kept."""

    def __init__(self) -> None:
        self.points: list[np.ndarray] = []
        self.values = np.zeros((0, 1))

    def add(self, xs: Sequence, scores: Sequence) -> None:
        """Each x with its row of scores (None for a failed candidate)."""
        for x, row in zip(xs, scores):
            if row is None or max(row) <= FAILED_SCORE:
                continue
            row = np.asarray(row, dtype=float).reshape(1, -1)
            if row.shape[1] == 1:
                if not self.points or row[0, 0] > self.values[0, 0]:
                    self.points, self.values = [np.array(x, dtype=float)], row
                continue
            points = self.points + [np.array(x, dtype=float)]
            values = np.vstack([self.values, row]) if self.points else row
            keep = non_dominated(values)
            self.points, self.values = [points[i] for i in keep], values[keep]

    def best(self) -> list[np.ndarray]:
        return [p.copy() for p in self.points]


class _Normal:
    """cma's `randn` option from our own generator, so that the random state is pickled with
    the optimizer (cma's default draws from numpy's global state)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CMAES:
    """CMA-ES (Hansen's `cma` library) in the unit cube; `cma` minimizes, so it is told −score.

    settings.options: sigma0 (default 1/6, mergekit-evolve's), and any of cma's own options
    (CMAOptions) by name; settings.population is cma's popsize (default: cma's 4 + 3 ln d)."""

    def __init__(self, space, settings, seed: int):
        import cma

        options = _options(settings)
        sigma0 = float(options.pop("sigma0", 1 / 6))
        unknown = sorted(set(options) - set(cma.CMAOptions()))
        if unknown:
            raise MergesmithError(f"search.options: {unknown[0]!r} is not a cma option",
                                  hint="give sigma0 or one of cma.CMAOptions()")
        seed = sub_seed(seed, "cma")
        options.update(bounds=[0, 1], seed=seed, verbose=-9, verb_log=0, verb_disp=0,
                       randn=_Normal(np.random.default_rng(seed)))
        if settings.population:
            options["popsize"] = int(settings.population)
        x0 = np.clip(np.asarray(space.start(), dtype=float), 0.0, 1.0)
        self.es = cma.CMAEvolutionStrategy(x0, sigma0, options)
        self.front = Front()

    def ask(self) -> list[np.ndarray]:
        return [np.asarray(x, dtype=float) for x in self.es.ask()]

    def tell(self, xs: list[np.ndarray], evaluations: list) -> None:
        scores = told_scores(evaluations)
        self.es.tell(xs, list(-scores.mean(axis=1)))
        self.front.add(xs, scores)

    def done(self) -> bool:
        return bool(self.es.stop())

    def best(self) -> list[np.ndarray]:
        return self.front.best()


class _Deferred:
    """For libraries that must know the number of objectives before their first ask: the first
    generation is a seeded uniform sample, and the library is set up once a generation with a
    successful evaluation has been told (as pymoo's and optuna's own first samples are uniform)."""

    def __init__(self, space, settings, seed: int, name: str, population: int):
        self.d = len(space)
        self.population = int(settings.population or population)
        self.rng = np.random.default_rng(sub_seed(seed, name))
        self.ready = False
        self.pending: list[tuple[np.ndarray, np.ndarray | None]] = []  # told before set-up
        self.front = Front()

    def ask(self) -> list[np.ndarray]:
        if not self.ready:
            return list(self.rng.random((self.population, self.d)))
        return self._ask()

    def tell(self, xs: list[np.ndarray], evaluations: list) -> None:
        scores = told_scores(evaluations)
        self.front.add(xs, scores)
        if self.ready:
            return self._tell(xs, scores)
        self.pending += [(np.asarray(x, dtype=float), row) for x, row in zip(xs, scores)]
        if scores.max() > FAILED_SCORE:
            self.ready = True
            self._setup(scores.shape[1], xs, scores)
            self.pending = []

    def done(self) -> bool:
        return False

    def best(self) -> list[np.ndarray]:
        return self.front.best()


def non_dominated(scores: np.ndarray) -> list[int]:
    """Indices of the rows no other row dominates (maximizing: ≥ everywhere, > somewhere)."""
    scores = np.asarray(scores, dtype=float)
    keep = []
    for i, row in enumerate(scores):
        dominated = np.any(np.all(scores >= row, axis=1) & np.any(scores > row, axis=1))
        if not dominated:
            keep.append(i)
    return keep


class NSGA2(_Deferred):
    """NSGA-II (pymoo) for one or several objectives; pymoo minimizes, so it is told −scores.
    settings.population: pymoo's pop_size (default 20); options go to pymoo's NSGA2."""

    def __init__(self, space, settings, seed: int):
        _require("pymoo", "nsga2")
        super().__init__(space, settings, seed, "nsga2", population=20)
        self.options = _options(settings)
        self.seed = sub_seed(seed, "nsga2")

    def _setup(self, k: int, xs: list[np.ndarray], scores: np.ndarray) -> None:
        from pymoo.algorithms.moo.nsga2 import NSGA2 as PymooNSGA2
        from pymoo.core.problem import Problem

        X = np.array(xs, dtype=float)
        try:
            self.algorithm = PymooNSGA2(pop_size=len(X), sampling=X, **self.options)
        except TypeError as exc:
            raise MergesmithError(f"search.options: not an NSGA2 option: {exc}") from None
        self.algorithm.setup(Problem(n_var=self.d, n_obj=k, xl=0.0, xu=1.0), seed=self.seed,
                             verbose=False)
        self.pop = self.algorithm.ask()  # the sample just told, as pymoo's first population
        self._tell(xs, scores)

    def _ask(self) -> list[np.ndarray]:
        self.pop = self.algorithm.ask()
        return [np.clip(x, 0.0, 1.0) for x in self.pop.get("X")]

    def _tell(self, xs: list[np.ndarray], scores: np.ndarray) -> None:
        self.pop.set("F", -scores)
        self.algorithm.tell(infills=self.pop)


class TPE(_Deferred):
    """TPE (optuna's TPESampler, seeded, constant liar for a generation asked at once), one or
    several objectives. settings.population: points per generation (default 8); options go to
    TPESampler (n_startup_trials, ...)."""

    def __init__(self, space, settings, seed: int):
        _require("optuna", "tpe")
        super().__init__(space, settings, seed, "tpe", population=8)
        self.options = {"constant_liar": True, **_options(settings)}
        self.seed = sub_seed(seed, "tpe")

    def _setup(self, k: int, xs: list[np.ndarray], scores: np.ndarray) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            sampler = optuna.samplers.TPESampler(seed=self.seed, **self.options)
        except TypeError as exc:
            raise MergesmithError(f"search.options: not a TPESampler option: {exc}") from None
        self.study = optuna.create_study(directions=["maximize"] * k, sampler=sampler)
        self.space = {f"x{i}": optuna.distributions.FloatDistribution(0.0, 1.0)
                      for i in range(self.d)}
        for x, row in self.pending:
            values = row if row.max() > FAILED_SCORE else np.full(k, FAILED_SCORE)
            self.study.add_trial(optuna.trial.create_trial(
                params=self._params(x), distributions=self.space, values=list(values)))

    def _params(self, x: np.ndarray) -> dict[str, float]:
        return {f"x{i}": float(v) for i, v in enumerate(x)}

    def _ask(self) -> list[np.ndarray]:
        self.trials = [self.study.ask(self.space) for _ in range(self.population)]
        return [np.array([t.params[f"x{i}"] for i in range(self.d)]) for t in self.trials]

    def _tell(self, xs: list[np.ndarray], scores: np.ndarray) -> None:
        for trial, row in zip(self.trials, scores):
            self.study.tell(trial, list(row))


class RandomSearch(_Deferred):
    """Uniform samples in the unit cube (seeded); settings.population per generation (default 10)."""

    def __init__(self, space, settings, seed: int):
        super().__init__(space, settings, seed, "random", population=10)

    def _setup(self, k: int, xs: list[np.ndarray], scores: np.ndarray) -> None:
        pass

    def _ask(self) -> list[np.ndarray]:
        return list(self.rng.random((self.population, self.d)))

    def _tell(self, xs: list[np.ndarray], scores: np.ndarray) -> None:
        pass


def _require(module: str, name: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MergesmithError(f"search.optimizer {name!r} needs {module}, which is not installed",
                              hint=f"install the search extra: {SEARCH_EXTRA}")


register_optimizer("cma", objectives="single")(CMAES)
register_optimizer("nsga2", objectives="any")(NSGA2)
register_optimizer("tpe", objectives="any")(TPE)
register_optimizer("random", objectives="any")(RandomSearch)
