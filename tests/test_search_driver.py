"""The search driver and the library optimizers (search/driver.py, search/optimizers.py).

The driver runs on a synthetic problem whose optimum is known, with an in-test worker in place
of SearchWorker (no model is merged), so that each test takes about a second; test_search_run.py
runs the whole path on toy models (space, in-memory candidates, fitness, CLI, Ray, the demo).
"""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from mergesmith.errors import MergesmithError
from mergesmith.recipe import load_recipe
from mergesmith.search.candidates import Evaluation
from mergesmith.search.driver import _halving, candidate_seed, read_log, search
from mergesmith.search.optimizers import (FAILED_SCORE, get_optimizer, non_dominated,
                                          optimizer_names)
from test_search_run import TARGET_WEIGHTS, toy_search  # noqa: F401 (test_search_algorithms.py's)


# --- a synthetic problem: points of [0, 1]^d, scored by a known function -----------------------

@dataclass
class Settings:
    optimizer: str = "cma"
    seed: int = 0
    evaluations: int | None = 60
    seconds: float | None = None
    population: int | None = None
    fitness: dict = field(default_factory=dict)
    fidelity: dict | None = None
    options: dict = field(default_factory=dict)


class Space:
    """d weights of a linear merge, each in [0, 1]."""

    def __init__(self, d: int):
        self.d = d

    def __len__(self) -> int:
        return self.d

    def decode(self, x) -> dict:
        return {f"weight[m{i}]": float(v) for i, v in enumerate(x)}

    def recipe(self, x):
        return load_recipe({"merge_method": "linear", "models": [
            {"model": f"m{i}", "parameters": {"weight": float(v)}} for i, v in enumerate(x)]})

    def start(self) -> np.ndarray:
        return np.full(self.d, 0.5)


@dataclass
class Problem:
    space: Space
    settings: Settings

    def to_dict(self) -> dict:
        return {"d": len(self.space), "search": vars(self.settings)}


def problem(d: int = 3, **settings) -> Problem:
    return Problem(Space(d), Settings(**settings))


A = np.array([0.2, 0.7, 0.4])
B = np.array([0.8, 0.3, 0.6])


def near_a(x, fidelity=1.0):
    return [-float(np.sum((np.asarray(x) - A[:len(x)]) ** 2))]


def two_wells(x, fidelity=1.0):
    x = np.asarray(x)
    return [-float(np.sum((x - A) ** 2)), -float(np.sum((x - B) ** 2))]


class Worker:
    """Scores candidates with `score(x, fidelity)`; counts calls; raises Killed at call `kill`."""

    def __init__(self, score, kill: int | None = None):
        self.score, self.kill, self.calls = score, kill, 0

    def __call__(self, candidate) -> Evaluation:
        self.calls += 1
        if self.kill is not None and self.calls == self.kill:
            raise Killed()
        return Evaluation(candidate.id, self.score(candidate.x, candidate.fidelity),
                          fidelity=candidate.fidelity)


class Killed(BaseException):
    """The process dies: nothing on the way catches it."""


class Executor:
    """Runs the tasks in this process; `shuffle` reports them in a scrambled completion order,
    as several workers would."""

    def __init__(self, worker, shuffle: bool = False):
        self.worker, self.shuffle = worker, shuffle

    def run(self, tasks, on_result=None):
        order = list(range(len(tasks)))
        if self.shuffle:
            random.Random(len(tasks)).shuffle(order)
        results = [None] * len(tasks)
        for i in order:
            results[i] = self.worker(tasks[i])
            if on_result is not None:
                on_result(i, results[i])
        return results

    def close(self):
        pass


def run(tmp_path, name, the_problem, score=near_a, **kwargs):
    worker = kwargs.pop("worker", None) or Worker(score)
    executor = Executor(worker, kwargs.pop("shuffle", False))
    return search(the_problem, tmp_path / name, executor=executor, progress=False, **kwargs)


def log_of(out: Path) -> list[dict]:
    """The log without timings, in id order (completion order depends on the workers)."""
    records = read_log(out / "candidates.jsonl")
    for r in records:
        r.pop("seconds")
    return sorted(records, key=lambda r: (r["id"], r["fidelity"]))


# --- optimizers ----------------------------------------------------------------------------------

def test_cma_finds_the_maximum_not_the_minimum(tmp_path):
    result = run(tmp_path, "cma", problem(evaluations=240, population=12))
    best = np.array(result.best["x"])
    assert np.abs(best - A).max() < 0.02, best  # a flipped sign would run to a corner
    assert result.best["scores"][0] > -1e-3
    assert result.candidates == 240 and result.stopped == "evaluations"
    assert (tmp_path / "cma" / "best.yaml").exists() and (tmp_path / "cma" / "convergence.png").exists()


@pytest.mark.parametrize("name, budget, tolerance", [("nsga2", 400, 0.05), ("tpe", 80, 0.12),
                                                     ("random", 200, 0.25)])
def test_other_optimizers_approach_the_maximum(tmp_path, name, budget, tolerance):
    result = run(tmp_path, name, problem(optimizer=name, evaluations=budget))
    assert np.abs(np.array(result.best["x"]) - A).max() < tolerance


def test_best_yaml_is_the_space_recipe_of_the_best_point(tmp_path):
    result = run(tmp_path, "r", problem(optimizer="random", evaluations=30))
    log = read_log(tmp_path / "r" / "candidates.jsonl")
    top = max(log, key=lambda r: r["scores"][0])
    assert result.best["id"] == top["id"] and result.best["x"] == top["x"]
    written = load_recipe(tmp_path / "r" / "best.yaml")
    assert written == Space(3).recipe(top["x"])


def test_pareto_set_is_non_dominated_and_covers_the_front(tmp_path):
    result = run(tmp_path, "mo", problem(optimizer="nsga2", evaluations=300, population=20),
                 score=two_wells)
    front = np.array([p["scores"] for p in result.pareto])
    assert len(front) >= 5
    for i, row in enumerate(front):  # no member dominates another
        others = np.delete(front, i, axis=0)
        assert not np.any(np.all(others >= row, axis=1) & np.any(others > row, axis=1))
    everyone = np.array([r["scores"] for r in read_log(tmp_path / "mo" / "candidates.jsonl")])
    for row in everyone:  # and every candidate is dominated by, or equal to, a member
        assert np.any(np.all(front >= row, axis=1))
    # the true front is the segment from A to B: the set found lies close to it
    for p in result.pareto:
        x = np.array(p["x"])
        t = np.clip(np.dot(x - A, B - A) / np.dot(B - A, B - A), 0, 1)
        assert np.linalg.norm(x - (A + t * (B - A))) < 0.15
    saved = json.loads((tmp_path / "mo" / "pareto.json").read_text())
    assert [p["id"] for p in saved] == [p["id"] for p in result.pareto]
    assert (tmp_path / "mo" / "front.png").exists()


def test_non_dominated_by_hand():
    scores = np.array([[1, 0], [0, 1], [0.5, 0.5], [0.4, 0.4], [1, 0]])
    assert non_dominated(scores) == [0, 1, 2, 4]  # equal points both stay


@pytest.mark.parametrize("name", ["cma", "nsga2", "tpe", "random"])
def test_optimizer_pickles_mid_search_and_continues_identically(name):
    space, settings = Space(3), Settings(optimizer=name, population=6)
    optimizer = get_optimizer(name)(space, settings, 4)
    for _ in range(2):
        xs = optimizer.ask()
        assert all(0 <= v <= 1 for x in xs for v in x)
        optimizer.tell(xs, [Evaluation(i, two_wells(x)[:1]) for i, x in enumerate(xs)])
    copy = pickle.loads(pickle.dumps(optimizer))
    np.random.seed(99)  # cma's default would draw from numpy's global state
    first = optimizer.ask()
    np.random.rand(7)
    assert np.array_equal(np.array(first), np.array(copy.ask()))


def test_failed_candidates_are_told_the_worst_score():
    from mergesmith.search.optimizers import told_scores

    told = told_scores([Evaluation(0, [0.5, 0.1]), Evaluation(1, None, "boom"),
                        Evaluation(2, [float("nan"), 0.2])])
    assert told.tolist() == [[0.5, 0.1], [FAILED_SCORE] * 2, [FAILED_SCORE] * 2]


def test_missing_library_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pymoo" else real(name, *a))
    with pytest.raises(MergesmithError) as info:
        get_optimizer("nsga2")(Space(2), Settings(optimizer="nsga2"), 0)
    assert "pip install 'mergesmith[search]'" in str(info.value)


def test_registry_lists_the_library_optimizers_and_refuses_unknown_names():
    assert {"cma", "nsga2", "tpe", "random"} <= set(optimizer_names())
    with pytest.raises(MergesmithError, match="unknown optimizer 'cmaes'"):
        get_optimizer("cmaes")


def test_cma_refuses_an_unknown_option():
    with pytest.raises(MergesmithError, match="'sigma' is not a cma option"):
        get_optimizer("cma")(Space(2), Settings(options={"sigma": 0.3}), 0)


# --- the driver ----------------------------------------------------------------------------------

def test_same_seed_same_search_whatever_the_completion_order(tmp_path):
    one = run(tmp_path, "one", problem(evaluations=40))
    two = run(tmp_path, "two", problem(evaluations=40), shuffle=True)
    other = run(tmp_path, "other", problem(evaluations=40, seed=1))
    assert log_of(tmp_path / "one") == log_of(tmp_path / "two")
    assert (tmp_path / "one" / "best.yaml").read_bytes() == (tmp_path / "two" / "best.yaml").read_bytes()
    assert log_of(tmp_path / "one") != log_of(tmp_path / "other")
    assert one.best == two.best != other.best


def test_candidate_ids_are_sequential_and_seeds_depend_on_id_and_seed(tmp_path):
    run(tmp_path, "s", problem(evaluations=20, population=6))
    log = log_of(tmp_path / "s")
    assert [r["id"] for r in log] == list(range(20))
    assert [r["generation"] for r in log] == [i // 6 for i in range(20)]
    assert [r["seed"] for r in log] == [candidate_seed(0, i) for i in range(20)]
    assert len({candidate_seed(0, i) for i in range(100)} | {candidate_seed(1, 0)}) == 101


@pytest.mark.parametrize("kill", [9, 14])  # inside the second generation, and at its last candidate
def test_resume_ends_where_the_uninterrupted_search_ends(tmp_path, kill):
    settings = dict(evaluations=30, population=7)
    whole = run(tmp_path, "whole", problem(**settings))
    dying = Worker(near_a, kill=kill)
    with pytest.raises(Killed):
        run(tmp_path, "cut", problem(**settings), worker=dying)
    done = len(read_log(tmp_path / "cut" / "candidates.jsonl"))
    assert done == kill - 1
    with pytest.raises(MergesmithError, match="already holds a search"):
        run(tmp_path, "cut", problem(**settings))
    again = Worker(near_a)
    resumed = run(tmp_path, "cut", problem(**settings), worker=again, resume=True)
    assert again.calls == 30 - done  # what the log held was reused, not run again
    assert log_of(tmp_path / "cut") == log_of(tmp_path / "whole")
    assert (tmp_path / "cut" / "best.yaml").read_bytes() == (tmp_path / "whole" / "best.yaml").read_bytes()
    assert resumed.best == whole.best


def test_killed_twice_and_a_line_cut_by_the_crash_still_resume_exactly(tmp_path):
    settings = dict(evaluations=30, population=7)
    run(tmp_path, "whole", problem(**settings))
    with pytest.raises(Killed):
        run(tmp_path, "cut", problem(**settings), worker=Worker(near_a, kill=10))
    with open(tmp_path / "cut" / "candidates.jsonl", "a") as log:
        log.write('{"id": 9, "generation": 1, "fid')  # the crash cut the last line short
    with pytest.raises(Killed):  # reuses the 9 logged, runs 3 more and dies in generation 2
        run(tmp_path, "cut", problem(**settings), worker=Worker(near_a, kill=4), resume=True)
    assert len(read_log(tmp_path / "cut" / "candidates.jsonl")) == 12
    last = Worker(near_a)
    run(tmp_path, "cut", problem(**settings), worker=last, resume=True)
    assert last.calls == 30 - 12
    assert log_of(tmp_path / "cut") == log_of(tmp_path / "whole")


def test_a_smaller_budget_on_resume_drops_what_the_longer_run_logged(tmp_path):
    with pytest.raises(Killed):  # checkpointed after 21 candidates, 24 logged
        run(tmp_path, "cut", problem(evaluations=30, population=7), worker=Worker(near_a, kill=25))
    with pytest.raises(MergesmithError, match="evaluated 21 candidates, more than 10"):
        run(tmp_path, "cut", problem(evaluations=10, population=7), resume=True)
    run(tmp_path, "cut", problem(evaluations=22, population=7), resume=True)
    run(tmp_path, "short", problem(evaluations=22, population=7))
    assert log_of(tmp_path / "cut") == log_of(tmp_path / "short")
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["candidates"] == 22


def test_a_larger_budget_on_resume_continues_as_if_given_at_the_start(tmp_path):
    run(tmp_path, "short", problem(evaluations=25, population=10))  # cuts generation 3 at 5
    assert len(read_log(tmp_path / "short" / "candidates.jsonl")) == 25
    run(tmp_path, "short", problem(evaluations=42, population=10), resume=True)
    run(tmp_path, "long", problem(evaluations=42, population=10))
    assert log_of(tmp_path / "short") == log_of(tmp_path / "long")


def test_resume_refuses_a_different_search(tmp_path):
    run(tmp_path, "a", problem(evaluations=10))
    with pytest.raises(MergesmithError, match="differs from this one"):
        run(tmp_path, "a", problem(evaluations=10, seed=5), resume=True)


def test_failed_and_nan_candidates_are_logged_and_the_search_goes_on(tmp_path):
    class Flaky:
        calls = 0

        def __call__(self, candidate):
            self.calls += 1
            if candidate.id % 3 == 1:
                return Evaluation(candidate.id, None, "fitness raised ValueError: boom")
            if candidate.id % 3 == 2:
                return Evaluation(candidate.id, [float("nan")])
            return Evaluation(candidate.id, near_a(candidate.x))

    result = run(tmp_path, "f", problem(evaluations=30), worker=Flaky())
    log = log_of(tmp_path / "f")
    assert len(log) == 30 and result.candidates == 30
    assert [r["error"] for r in log[1::3]] == ["fitness raised ValueError: boom"] * 10
    assert all(r["scores"] is None and "nan" in r["error"] for r in log[2::3])
    assert all(r["scores"] is not None for r in log[0::3])
    assert result.best["id"] % 3 == 0
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["failed"] == 20 and summary["candidates"] == 30


def test_every_candidate_failing_leaves_no_best_but_a_summary(tmp_path):
    result = run(tmp_path, "dead", problem(optimizer="nsga2", evaluations=12, population=6),
                 score=lambda x, f: None)
    assert result.best is None and not (tmp_path / "dead" / "best.yaml").exists()
    assert json.loads((tmp_path / "dead" / "summary.json").read_text())["failed"] == 12


def test_multi_fidelity_rescores_the_best_share_at_full_fidelity(tmp_path):
    def noisy(x, fidelity):  # the low fidelity sees a shifted optimum
        return [near_a(x)[0] - (0 if fidelity == 1 else 0.3 * x[2])]

    result = run(tmp_path, "mf", problem(evaluations=24, population=8,
                                         fidelity={"start": 0.25, "keep": 0.5}), score=noisy)
    log = log_of(tmp_path / "mf")
    low = [r for r in log if r["fidelity"] == 0.25]
    full = [r for r in log if r["fidelity"] == 1.0]
    assert [r["id"] for r in low] == list(range(24)) and len(full) == 12
    for g in range(3):
        scored = sorted((r for r in low if r["generation"] == g), key=lambda r: -r["scores"][0])
        assert {r["id"] for r in full if r["generation"] == g} == {r["id"] for r in scored[:4]}
    assert result.best["id"] in {r["id"] for r in full} and result.evaluations == 36


def test_halving_caps_the_cut_candidates_below_the_kept_ones():
    low = [Evaluation(0, [0.9, 0.1]), Evaluation(1, [0.8, 0.9]), Evaluation(2, [0.2, 0.3]),
           Evaluation(3, None, "boom")]
    full = {1: Evaluation(1, [0.5, 0.6], fidelity=1.0), 2: Evaluation(2, [0.4, 0.7], fidelity=1.0)}
    told = _halving(low, full)
    assert told[0].scores == [0.4, 0.1] and told[3].scores is None
    assert told[1] is full[1] and told[2] is full[2]


def test_time_budget_stops_the_search(tmp_path):
    import time

    def slow(x, fidelity):
        time.sleep(0.02)
        return near_a(x)

    result = run(tmp_path, "t", problem(evaluations=None, seconds=0.3, population=4), score=slow)
    assert result.stopped == "seconds" and 4 <= result.candidates <= 24


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(MergesmithError, match="no budget"):
        run(tmp_path, "x", problem(evaluations=None))
    with pytest.raises(MergesmithError, match="optimizes one objective, and the fitness gives 2"):
        run(tmp_path, "y", problem(evaluations=10), score=two_wells)
    with pytest.raises(MergesmithError, match="fidelity"):
        run(tmp_path, "z", problem(fidelity={"start": 1.5}))
    with pytest.raises(MergesmithError, match="unknown optimizer"):
        run(tmp_path, "w", problem(optimizer="cmaes"))
    assert not any((tmp_path / name).exists() for name in "xzw")  # OUT untouched: run again
