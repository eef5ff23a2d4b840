"""The seed search algorithms (search/algorithms/): the papers' formulas on hand-computed cases,
synthetic objectives over the unit cube against random search, seeding and pickling."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field

import numpy as np
import pytest

from mergesmith.errors import MergesmithError, RecipeError
from mergesmith.search.algorithms import cycleqd, genome, m2n2, map_pareto
from mergesmith.search.optimizers import get_optimizer, non_dominated

ALGORITHMS = ["m2n2", "map", "cycleqd", "genome"]


class Space:  # what the optimizers read of a SearchSpace: its size and its start point
    def __init__(self, d: int):
        self.d = d

    def __len__(self) -> int:
        return self.d

    def start(self) -> np.ndarray:
        return np.full(self.d, 0.5)


@dataclass
class Settings:
    population: int | None = None
    evaluations: int | None = None
    options: dict = field(default_factory=dict)
    seed: int = 0


@dataclass
class Evaluation:
    id: int
    scores: list | None
    per_example: list | None = None
    fidelity: float = 1.0


def make(name: str, d: int, seed: int = 0, **settings):
    return get_optimizer(name)(Space(d), Settings(**settings), seed)


def run(optimizer, objective, budget: int) -> list[tuple[np.ndarray, list]]:
    """ask/tell until `budget` evaluations or done(); the log of (x, scores)."""
    log = []
    while len(log) < budget and not optimizer.done():
        xs = optimizer.ask()[: budget - len(log)]
        evaluations = []
        for x in xs:
            scores, per_example = objective(x)
            evaluations.append(Evaluation(len(log), scores, per_example))
            log.append((x, scores))
        optimizer.tell(xs, evaluations)
    return log


# synthetic objectives over the unit cube (maximised)
RNG = np.random.default_rng(123)
TARGET = RNG.uniform(0.2, 0.8, 8)
A_POINT, B_POINT = RNG.uniform(0.1, 0.9, 6), RNG.uniform(0.1, 0.9, 6)


def niches(x):
    """Four examples, each solved by getting one pair of coordinates right: the mean, per example."""
    per_example = [float(np.exp(-np.sum((x[i:i + 2] - TARGET[i:i + 2]) ** 2) / 0.02))
                   for i in range(0, 8, 2)]
    return [float(np.mean(per_example))], per_example


def sphere(x):
    return [float(-np.sum((x - TARGET) ** 2))], None


def two_peaks(x):
    return [float(np.exp(-np.sum((x - p) ** 2) / 0.3)) for p in (A_POINT, B_POINT)], None


def hypervolume(points) -> float:
    """Area dominated by 2-objective points in [0, 1]^2 above the origin."""
    area, reached = 0.0, 0.0
    for first, second in sorted(points, key=lambda p: -p[0]):
        if second > reached:
            area += first * (second - reached)
            reached = second
    return area


def mean_best(name, objective, d, budget, measure, seeds=range(4), **settings):
    return float(np.mean([measure(run(make(name, d, seed, evaluations=budget, **settings), objective,
                                      budget)) for seed in seeds]))


def best_mean_score(log):
    return max(np.mean(scores) for _, scores in log)


def front_volume(log):
    return hypervolume([scores for _, scores in log])


# ---- M2N2: the paper's formulas (SakanaAI/natural_niches) on hand-computed cases ----

def test_m2n2_specialist_displaces_a_more_accurate_generalist():
    archive = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=float)
    specialist = np.array([0, 0, 0, 0, 1, 1], dtype=float)  # accuracy 1/3 against the third's 1/2
    # z = (3, 3, 3, 2, 1, 1): f = 1.5, 1.5, 1.0 and 2.0 for the specialist
    fitness, _ = m2n2.competition(np.vstack([archive, specialist]))
    assert fitness == pytest.approx([1.5, 1.5, 1.0, 2.0])
    assert m2n2.replacement(archive, specialist) == 2
    assert m2n2.replacement(archive, np.array([1, 0, 0, 0, 0, 0], dtype=float)) is None  # least fit


def test_m2n2_unsolved_example_divides_by_one():
    fitness, shared = m2n2.competition(np.array([[1, 0], [1, 0]], dtype=float))
    assert np.all(np.isfinite(shared)) and fitness == pytest.approx([0.5, 0.5])


def test_m2n2_attraction_ignores_models_p1_covers():
    scores = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=float)
    _, shared = m2n2.competition(scores)
    # z = (2, 1, 1, 0 -> 1): model 1 solves a subset of model 0's examples, model 2 one it lacks
    assert m2n2.attraction(shared, 0) == pytest.approx([0.0, 0.0, 1.0])
    seconds = {m2n2.choose_parents(scores, np.random.default_rng(s))[1] for s in range(200)
               if m2n2.choose_parents(scores, np.random.default_rng(s))[0] == 0}
    assert seconds == {2}


def test_m2n2_crossover_split_point_and_global_angle():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])  # angle pi/2 over the whole vectors
    child = m2n2.split_crossover(a, b, 0.25, 1)
    # t = (0.25, 0.75): child_0 = sin(0.75 pi/2) a_0, child_1 = sin(0.75 pi/2) b_1; a segment's
    # own angle would be undefined (b_0 = 0) and give the linear 0.75 instead
    assert child == pytest.approx([math.sin(3 * math.pi / 8)] * 2, abs=1e-12)
    a, b, w = np.array([2.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]), 0.3
    omega = math.acos(1 / (math.sqrt(5) * math.sqrt(2)))

    def slerp(t):
        return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)

    assert m2n2.split_crossover(a, b, w, 0) == pytest.approx(slerp(1 - w), abs=1e-12)
    assert m2n2.split_crossover(a, b, w, 3) == pytest.approx(slerp(w), abs=1e-12)
    assert m2n2.split_crossover(a, 2 * a, w, 1) == pytest.approx([2.6, 0, 1.7])  # colinear: (1 + t) a


def test_m2n2_beats_random_search_with_per_example_scores():
    ours = mean_best("m2n2", niches, 8, 200, best_mean_score)
    random = mean_best("random", niches, 8, 200, best_mean_score)
    assert ours > random + 0.3, (ours, random)


# ---- MAP ----

def exact_quadratics(d: int):
    rng = np.random.default_rng(7)
    fits = []
    for _ in range(2):
        M = rng.normal(size=(d, d))
        fits.append((-(M @ M.T) - np.eye(d), rng.normal(size=d), float(rng.normal())))
    return fits


def test_map_recovers_an_exact_quadratic_and_returns_a_non_dominated_front():
    d = 3
    truth = exact_quadratics(d)
    optimizer = make("map", d, seed=1, options={"samples": 14, "front": 6, "generations": 40})

    def objective(x):
        return [float(map_pareto.surrogate(x, *fit)[0]) for fit in truth], None

    log = run(optimizer, objective, 100)
    assert len(log) == 14 + 6 and optimizer.done()
    for (A, b, e), (A_true, b_true, e_true) in zip(optimizer.fits, truth):
        assert np.abs(A - A_true).max() < 1e-8 and np.abs(b - b_true).max() < 1e-8
        assert abs(e - e_true) < 1e-8
    front = np.vstack([x for x, _ in log[14:]])
    values = np.column_stack([map_pareto.surrogate(front, *fit) for fit in truth])
    assert len(non_dominated(values)) == len(front)
    grid = np.random.default_rng(0).random((20000, d))
    for k, fit in enumerate(truth):  # each objective's maximiser over the box is on the front
        assert values[:, k].max() >= map_pareto.surrogate(grid, *fit).max() - 1e-6
    best = np.vstack(optimizer.best())
    best_values = np.array([objective(x)[0] for x in best])
    assert len(non_dominated(best_values)) == len(best)


def test_map_needs_enough_samples_for_the_quadratic():
    with pytest.raises(RecipeError, match="samples"):
        make("map", 3, options={"samples": 9})  # 10 unknowns in 3 variables
    points = np.random.default_rng(0).random((9, 3))
    with pytest.raises(MergesmithError, match="10 unknowns"):
        map_pareto.fit_quadratic(points, points.sum(axis=1))


def test_map_draws_replacements_for_failed_and_subsampled_samples():
    optimizer = make("map", 2, options={"samples": 6, "front": 3, "generations": 5})
    xs = optimizer.ask()
    # one failed, one scored at fidelity 0.5 (capped by successive halving): neither is fitted
    optimizer.tell(xs, [Evaluation(i, None if i == 0 else [float(x.sum())],
                                   fidelity=0.5 if i == 1 else 1.0) for i, x in enumerate(xs)])
    assert len(optimizer.ask()) == 2 and not optimizer.done()


def test_map_hyperspherical_angles_as_the_code():
    angles = map_pareto.to_angles(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))
    assert angles == pytest.approx(np.array([[0, 0], [np.pi / 2, np.pi / 2], [np.pi / 4, 0]]))
    x = np.random.default_rng(0).random((6, 4))
    back = map_pareto.from_angles(map_pareto.to_angles(x), np.linalg.norm(x, axis=1))
    assert np.abs(back - x).max() < 1e-12


def test_bayesian_map_samples_where_the_fit_is_worst():
    # 2 angle dims, 4 bins each; one point in bin (0, 0) with loss 1, one in bin (3, 3) with loss 3
    points = np.array([[0.9, 0.05, 0.01], [0.01, 0.02, 0.9]])
    angles = map_pareto.to_angles(points)
    assert [tuple((a // (np.pi / 8)).astype(int)) for a in angles] == [(0, 0), (3, 3)]
    scores = map_pareto.bin_scores(angles, np.array([1.0, 3.0]), 4, np.random.default_rng(0))
    assert scores[(0, 0)] == 1.0 and scores[(3, 3)] == 3.0  # one point: no spread, mean alone
    assert sum(np.isinf(list(scores.values()))) == 14  # empty bins are never drawn
    new = map_pareto.adaptive_samples(points, np.array([1.0, 3.0]), 50, np.random.default_rng(1))
    bins = {tuple(np.minimum((a // (np.pi / 8)).astype(int), 3)) for a in map_pareto.to_angles(new)}
    assert bins == {(3, 3)} and np.all((new >= 0) & (new <= 1))


def test_bayesian_map_adds_rounds_before_the_front():
    optimizer = make("map", 3, seed=2, options={"variant": "bayesian", "samples": 12, "rounds": 2,
                                                "per_round": 5, "front": 4, "generations": 20})
    sizes = []
    while not optimizer.done():
        xs = optimizer.ask()
        sizes.append(len(xs))
        optimizer.tell(xs, [Evaluation(i, two_peaks(np.r_[x, x])[0]) for i, x in enumerate(xs)])
    assert sizes[:3] == [12, 5, 5] and len(sizes) == 4 and 1 <= sizes[3] <= 4
    assert len(optimizer.points) == 22


# ---- CycleQD ----

def test_cycleqd_bins_as_the_code():
    # 15 bins on [0, 0.75], right-closed edges, outside values in the end bins
    assert [cycleqd.bin_id(v, 0.0, 0.75, 15) for v in (-1, 0.0, 0.05, 0.0501, 0.1, 0.74, 0.75, 2)] == \
        [0, 0, 0, 1, 1, 14, 14, 14]


def test_cycleqd_crossover_is_the_weighted_mean_and_rejects_zero_sums():
    parents = [np.array([0.2, 0.4]), np.array([0.6, 1.0])]
    mean = cycleqd.linear_crossover(parents, np.random.default_rng(0), sigma=0.0)
    assert mean == pytest.approx([0.4, 0.7])

    class Draws:  # first a pair that sums to 0 (redrawn), then (1, 3)
        def __init__(self):
            self.draws = [np.array([0.5, -0.5]), np.array([1.0, 3.0])]

        def normal(self, *args, **kwargs):
            return self.draws.pop(0)

    assert cycleqd.linear_crossover(parents, Draws()) == pytest.approx([0.5, 0.85])
    with pytest.raises(MergesmithError, match="sum"):
        cycleqd.linear_crossover(parents, np.random.default_rng(0), mu=-1.0, sigma=0.0)


def test_cycleqd_cycles_the_quality_task_and_fills_every_archive():
    optimizer = make("cycleqd", 2, population=3, options={"sigma": 0.0, "mutation": 0.0, "bins": 2})
    first = optimizer.ask()
    # three objectives; the elites differ only in task 1's archive cells
    optimizer.tell(first[:2], [Evaluation(0, [0.1, 0.9, 0.1]), Evaluation(1, [0.1, 0.2, 0.9])])
    assert [len(archive) for archive in optimizer.archives] == [2, 2, 2]
    # a child worse on every task still fills the empty cell (0, 0) of task 0's archive; in the
    # other archives its cell holds a better elite, which stays
    optimizer.tell([np.array([0.3, 0.3])], [Evaluation(2, [0.05, 0.1, 0.1])])
    assert [len(archive) for archive in optimizer.archives] == [3, 2, 2]
    assert [optimizer.quality_task(g) for g in (1, 2, 3, 4)] == [1, 2, 0, 1]
    children = optimizer.ask()  # children g = 4, 5, 6 of generation 2: q = 1, 2, 0
    elites = [x for _, x in optimizer.archives[1].values()]
    assert children[0] == pytest.approx(np.mean(elites, axis=0))


def test_cycleqd_elite_sampling_as_the_code():
    qualities = np.array([0.2, 0.6, 0.4])
    cells = np.array([[0, 3], [2, 3], [4, 1]])
    # norm(q) = 0.5 + 0.8 (q - 0.2) / 0.4 = (0.5, 1.3, 0.9); bins (0.5, 0.9, 1.3) and (1.3, 1.3, 0.5)
    weights = np.array([0.5 * 0.5 * 1.3, 1.3 * 0.9 * 1.3, 0.9 * 1.3 * 0.5])
    assert cycleqd.elite_weights(qualities, cells) == pytest.approx(weights / weights.sum())
    assert cycleqd.elite_weights(np.ones(3), np.ones((3, 2))) == pytest.approx([1 / 3] * 3)
    optimizer = make("cycleqd", 3, seed=1, options={"sampling": "elite"})
    run(optimizer, two_peaks_3d, 40)
    assert len(optimizer.archives[0]) >= 2


def two_peaks_3d(x):
    return two_peaks(np.r_[x, x])


def test_cycleqd_needs_two_objectives():
    optimizer = make("cycleqd", 2)
    xs = optimizer.ask()
    with pytest.raises(MergesmithError, match="two or more objectives"):
        optimizer.tell(xs, [Evaluation(i, [0.5]) for i in range(len(xs))])


# ---- GENOME / GENOME+ ----

def test_genome_plus_succession_formula():
    x, v = np.array([0.2, 0.8]), np.array([0.3, -0.1])
    p_best, g_best, g_worst = np.array([0.5, 0.5]), np.array([0.9, 0.1]), np.array([0.0, 0.0])
    moved = genome.succession(v, x, p_best, g_best, g_worst, [0.7, 0.4, 0.9, 0.2], [0, 0, 0.3, 0])
    assert x + moved == pytest.approx(g_best)  # only the social term: one step lands on g_best
    r, phi = [0.7, 0.4, 0.9, 0.2], np.array([0.2, 0.2, 0.2, 0.1])
    assert genome.succession(v, x, p_best, g_best, g_worst, r, 3 * phi) == \
        pytest.approx(genome.succession(v, x, p_best, g_best, g_worst, r, phi))
    # by hand: weights r*phi = (.14, .08, .18, .02), C = 0.42
    expected = (0.14 * v + 0.08 * (p_best - x) + 0.18 * (g_best - x) - 0.02 * (g_worst - x)) / 0.42
    assert genome.succession(v, x, p_best, g_best, g_worst, r, phi) == pytest.approx(expected)


def test_genome_operators_identities():
    x = np.array([0.1, 0.7, 0.4])
    assert genome.fitness_crossover(x, x, 0.3, 0.9) == pytest.approx(x)
    assert genome.fitness_crossover(x, 0 * x, 3.0, 1.0) == pytest.approx(0.75 * x)
    assert np.array_equal(genome.gene_mutation(x, np.random.default_rng(0), 1.0, 0.0), x)
    assert genome.roulette_weights(np.array([-1.0, 0.0, 1.0])) == pytest.approx([0, 1 / 3, 2 / 3],
                                                                                abs=1e-9)


def test_genome_keeps_the_elite():
    optimizer = make("genome", 2, population=4, options={"elite": 0.25})
    xs = optimizer.ask()
    optimizer.tell(xs, [Evaluation(i, [float(i)]) for i in range(len(xs))])
    extra = [np.full(2, 0.1 * i) for i in range(6)]
    optimizer.pending = []
    optimizer.tell(extra, [Evaluation(10 + i, [-1.0 - i]) for i in range(6)])
    fitness = sorted(ind.fitness for ind in optimizer.population)
    assert len(optimizer.population) == 4 and fitness[-1] == 3.0


# ---- every algorithm: better than random search, seeding, pickling, failures ----

@pytest.mark.parametrize("name, settings", [("genome", {}), ("genome", {"options": {"plus": True}})])
def test_genome_beats_random_search(name, settings):
    ours = mean_best(name, sphere, 8, 200, best_mean_score, **settings)
    random = mean_best("random", sphere, 8, 200, best_mean_score)
    assert ours > random + 0.05, (ours, random)


@pytest.mark.parametrize("name", ["cycleqd", "m2n2"])
def test_multi_objective_front_beats_random_search(name):
    ours = mean_best(name, two_peaks, 6, 200, front_volume)
    random = mean_best("random", two_peaks, 6, 200, front_volume)
    assert ours > random + 0.15, (ours, random)


SMALL = {"map": {"options": {"samples": 30, "front": 4, "generations": 10, "pop_size": 20}}}


def asked(optimizer, objective, generations: int) -> list[np.ndarray]:
    points = []
    for _ in range(generations):
        if optimizer.done():
            break
        xs = optimizer.ask()
        points += xs
        optimizer.tell(xs, [Evaluation(i, objective(x)[0]) for i, x in enumerate(xs)])
    return points


@pytest.mark.parametrize("name", ALGORITHMS)
def test_same_seed_same_points_and_pickled_optimizer_continues_identically(name):
    settings = SMALL.get(name, {})
    one = asked(make(name, 6, seed=3, **settings), two_peaks, 6)
    two = asked(make(name, 6, seed=3, **settings), two_peaks, 6)
    assert len(one) == len(two) > 0 and all(np.array_equal(a, b) for a, b in zip(one, two))
    assert all(np.all((x >= 0) & (x <= 1)) for x in one)
    other = asked(make(name, 6, seed=4, **settings), two_peaks, 6)
    assert not np.array_equal(one[0], other[0]) or not np.array_equal(one[-1], other[-1])

    optimizer = make(name, 6, seed=3, **settings)
    head = asked(optimizer, two_peaks, 2)
    restored = pickle.loads(pickle.dumps(optimizer))
    tail = asked(restored, two_peaks, 4)
    assert all(np.array_equal(a, b) for a, b in zip(head + tail, one)) and len(head + tail) == len(one)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_failed_candidates_are_skipped(name):
    optimizer = make(name, 6, seed=0, **SMALL.get(name, {}))
    for generation in range(3):
        if optimizer.done():
            break
        xs = optimizer.ask()
        # every third candidate fails; the rest score two objectives
        optimizer.tell(xs, [Evaluation(i, None if i % 3 == 0 else two_peaks(x)[0])
                            for i, x in enumerate(xs)])
    best = optimizer.best()
    assert best and all(np.all((x >= 0) & (x <= 1)) for x in best)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_unknown_option_is_named(name):
    with pytest.raises(RecipeError, match="'sigma_zero' is not an option"):
        make(name, 3, options={"sigma_zero": 0.1})


# ---- through the search driver: its checkpoint holds our optimizers, resume ends the same ----

@pytest.mark.parametrize("name", ["m2n2", "map"])  # an archive; an optimizer that ends itself
def test_driver_resume_ends_where_the_uninterrupted_search_ends(tmp_path, name):
    from test_search_driver import Killed, Worker, log_of, problem, run as drive, two_wells

    options = {"samples": 12, "front": 4, "generations": 10, "pop_size": 20} if name == "map" else {}
    settings = dict(optimizer=name, evaluations=30, population=5, options=options)
    whole = drive(tmp_path, "whole", problem(**settings), score=two_wells)
    with pytest.raises(Killed):
        drive(tmp_path, "cut", problem(**settings), worker=Worker(two_wells, kill=14))
    resumed = drive(tmp_path, "cut", problem(**settings), worker=Worker(two_wells), resume=True)
    assert log_of(tmp_path / "cut") == log_of(tmp_path / "whole")
    assert len(log_of(tmp_path / "whole")) == (16 if name == "map" else 30)
    assert resumed.best == whole.best


def test_m2n2_recovers_the_toy_merge_weights(zoo, tmp_path):
    """The whole path on toy models (space, in-memory candidates, callable fitness): the target
    is task arithmetic at known weights, fitness -||merged - target||^2."""
    import mergesmith
    from test_search_driver import TARGET_WEIGHTS, toy_search

    path = toy_search(zoo, tmp_path, optimizer="m2n2", evaluations=80)
    result = mergesmith.search(path, tmp_path / "out", progress=False)
    weights = [result.best["params"][name] for name in sorted(result.best["params"])]
    assert np.abs(np.array(weights) - TARGET_WEIGHTS).max() < 0.03, result.best


def test_bad_option_values_are_refused():
    with pytest.raises(RecipeError, match="crossover: 'uniform'"):
        make("m2n2", 3, options={"crossover": "uniform"})
    with pytest.raises(RecipeError, match="bc_range"):
        make("cycleqd", 3, options={"bc_range": [1.0, 0.0]})
    with pytest.raises(RecipeError, match="variant: 'tree'"):
        make("map", 3, options={"variant": "tree"})


def test_map_finds_the_toy_merge_weights_from_a_few_merges(zoo, tmp_path):
    """-||merged - target||^2 of a task-arithmetic merge is a quadratic in its weights: MAP's
    surrogate is exact up to rounding, so 8 samples and its maximiser find the target."""
    import mergesmith
    from test_search_driver import TARGET_WEIGHTS, toy_search

    path = toy_search(zoo, tmp_path, optimizer="map", evaluations=10, population=None,
                      options={"samples": 8, "front": 1, "generations": 30})
    result = mergesmith.search(path, tmp_path / "out", progress=False)
    weights = [result.best["params"][name] for name in sorted(result.best["params"])]
    assert result.candidates == 9 and np.abs(np.array(weights) - TARGET_WEIGHTS).max() < 0.01, result.best
