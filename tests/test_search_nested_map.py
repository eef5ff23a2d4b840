"""Nested MAP (`map`, `variant: nested`; search/algorithms/map_nested.py) through the search
driver on a synthetic fitness: each task's score is an exact quadratic in the flat task-
arithmetic weights, s_k(w) = a_k - b_k ||w - e_k||^2, so each node's fit is exact and the tree
can be computed by hand (the authors' run_MAP_nested: closest pair first, the preference-
weighted choice on the front, the chosen merge joining the pool)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import yaml

from mergesmith.errors import MergesmithError, RecipeError
from mergesmith.search.algorithms import map_nested
from mergesmith.search.driver import read_log
from mergesmith.search.optimizers import get_optimizer
from mergesmith.search.space import load_search

A = np.array([0.9, 0.5, 0.86, 0.42])  # each model alone scores a_k on its own task
B = np.array([1.0, 0.6, 0.5, 0.8])
N, K = 4, 8
PREFERENCES = [2, 1, 1, 1]
FAST = {"generations": 30, "pop_size": 20}  # a coarser surrogate front where its precision is not tested


def recipe(models: int = N, search: dict | None = None, options: dict | None = None, **top) -> dict:
    section = {"optimizer": "map", "evaluations": 200,
               "parameters": {"weight": {"low": 0, "high": 1, "per_model": True}},
               "fitness": {"callable": "unused:score", "objectives": "each"},
               "options": {"variant": "nested", "samples": K, **(options or {})}}
    section.update(search or {})
    return {"merge_method": "task_arithmetic", "base_model": "base",
            "models": [{"model": "base"}] + [{"model": f"m{i}"} for i in range(models)],
            **top, "search": section}


def scores(w: np.ndarray) -> list[float]:
    return [float(A[k] - B[k] * np.sum((w - np.eye(N)[k]) ** 2)) for k in range(N)]


def drive(tmp_path, name, problem, score=None, **kwargs):
    from test_search_driver import Worker, run

    def by_weights(x, fidelity=1.0):
        values = problem.space.decode(x)
        return (score or scores)(np.array([values[f"weight[m{i}]"] for i in range(N)]))

    worker = kwargs.pop("worker", None) or Worker(by_weights)
    worker.score = by_weights
    return run(tmp_path, name, problem, worker=worker, **kwargs)


def optimizer_of(out):
    with open(out / "state.pkl", "rb") as f:
        return pickle.load(f).optimizer


GRID = np.array([(u, v) for u in np.linspace(0, 1, 21) for v in np.linspace(0, 1, 21)])


def hand_choice(objectives, totals) -> np.ndarray:
    """get_scaling_from_pf on the grid: the point maximising sum_g P_g/||P|| M_g(c)."""
    weights = np.array(totals, dtype=float) / np.linalg.norm(totals)
    values = np.array([[m(c) for m in objectives] for c in GRID])
    return GRID[int(np.argmax(values @ weights))]


def test_tree_and_choices_equal_the_hand_computation(tmp_path, monkeypatch):
    # the front is a fixed grid, so the choice on it is exact; the surrogates are exact quadratics
    monkeypatch.setattr(map_nested, "surrogate_front", lambda fits, d, *args: GRID.copy())
    problem = load_search(recipe(options={"preferences": PREFERENCES}))
    result = drive(tmp_path, "nested", problem)
    tree = optimizer_of(tmp_path / "nested").tree
    p = np.array(PREFERENCES, dtype=float)

    def mean(w, tasks):  # a preference-weighted mean of the tasks' scores
        return float(p[tasks] @ np.array(scores(w))[tasks] / p[tasks].sum())

    # experts alone score a = (0.9, 0.5, 0.86, 0.42): closest pair (m0, m2), |0.9 - 0.86|
    # maximise (2 s_0 + s_2) on c0 e0 + c2 e2: by hand c = (0.8, 0.2)
    assert tree[0]["merged"] == [["m0"], ["m2"]]
    assert np.allclose(tree[0]["coefficients"], [0.8, 0.2])
    w02 = np.array([0.8, 0, 0.2, 0])
    assert tree[0]["score"] == pytest.approx(mean(w02, [0, 2]))  # 0.62
    # pool m1 0.5, m3 0.42, m0+m2 0.62: closest (m1, m3); s_1 + s_3 is maximised at
    # (3/7, 4/7), whose nearest grid points are (0.45, 0.55) (each axis separately, by hand)
    assert tree[1]["merged"] == [["m1"], ["m3"]]
    assert np.allclose(tree[1]["coefficients"], [0.45, 0.55])
    w13 = np.array([0, 0.45, 0, 0.55])
    assert tree[1]["score"] == pytest.approx(mean(w13, [1, 3]))
    # last: the two merges, P = (2 + 1, 1 + 1)
    assert tree[2]["merged"] == [["m0", "m2"], ["m1", "m3"]]
    c = hand_choice([lambda c: mean(c[0] * w02 + c[1] * w13, [0, 2]),
                     lambda c: mean(c[0] * w02 + c[1] * w13, [1, 3])], [3, 2])
    assert np.allclose(tree[2]["coefficients"], c)
    flat = c[0] * w02 + c[1] * w13  # the products along the tree
    assert tree[2]["score"] == pytest.approx(mean(flat, [0, 1, 2, 3]))
    assert np.allclose(list(tree[2]["weights"].values()), flat)
    assert list(tree[2]["weights"]) == ["m0", "m1", "m2", "m3"]
    # the result is the last candidate; best.yaml stays the best of every candidate
    last = read_log(tmp_path / "nested" / "candidates.jsonl")[-1]
    assert np.allclose([last["params"][f"weight[m{i}]"] for i in range(N)], flat, atol=1e-11)
    assert result.candidates == N + (N - 1) * (K + 1) and result.stopped == "optimizer"


def test_experts_alone_first_then_k_samples_and_one_choice_per_node(tmp_path):
    problem = load_search(recipe())
    result = drive(tmp_path, "nested", problem)
    log = read_log(tmp_path / "nested" / "candidates.jsonl")
    assert result.candidates == len(log) == N + (N - 1) * (K + 1)
    sizes = np.bincount([r["generation"] for r in log]).tolist()
    assert sizes == [N] + [K, 1] * (N - 1)
    assert [r["x"] for r in log[:N]] == np.eye(N).tolist()
    # the surrogate front of NSGA-III: each choice near the weighted optimum over the box
    tree = optimizer_of(tmp_path / "nested").tree
    # equal preferences: m0 + m2 scores about (0.678 + 0.416) / 2 = 0.547, now closest to m1
    # (0.047 against m3's 0.08): a model joins a merge, then the last model joins the result
    assert [node["merged"] for node in tree] == [[["m0"], ["m2"]], [["m1"], ["m0", "m2"]],
                                                 [["m3"], ["m1", "m0", "m2"]]]
    # s_0 + s_2 on c0 e0 + c2 e2 peaks at (2/3, 1/3); the front holds 13 reference directions
    assert np.abs(np.array(tree[0]["coefficients"]) - [2 / 3, 1 / 3]).max() < 0.08
    assert optimizer_of(tmp_path / "nested").result() == tree[-1]["weights"]


@pytest.mark.parametrize("kill", [11, 13, 17])  # in a node's samples, at its choice, in the next
def test_resume_ends_where_the_uninterrupted_search_ends(tmp_path, kill):
    from test_search_driver import Killed, Worker, log_of

    small = recipe(options=FAST)
    whole = drive(tmp_path, "whole", load_search(small))
    with pytest.raises(Killed):
        drive(tmp_path, "cut", load_search(small), worker=Worker(None, kill=kill))
    resumed = drive(tmp_path, "cut", load_search(small), resume=True)
    assert log_of(tmp_path / "cut") == log_of(tmp_path / "whole")
    assert optimizer_of(tmp_path / "cut").tree == optimizer_of(tmp_path / "whole").tree
    assert resumed.best == whole.best


def test_failed_samples_are_left_out_and_replaced(tmp_path):
    calls = []

    def flaky(w):  # every other sample of the first node fails: 4 of 8 succeed, 2 more drawn
        calls.append(w)
        first_node = 4 < len(calls) <= 4 + K
        return [float("nan")] * N if first_node and len(calls) % 2 else scores(w)

    result = drive(tmp_path, "flaky", load_search(recipe(options=FAST)), score=flaky)
    log = read_log(tmp_path / "flaky" / "candidates.jsonl")
    assert np.bincount([r["generation"] for r in log]).tolist()[:4] == [N, K, 2, 1]
    assert sum(r["scores"] is None for r in log) == K // 2
    assert result.candidates == N + (N - 1) * (K + 1) + 2
    tree = optimizer_of(tmp_path / "flaky").tree
    assert tree[0]["samples"] == 6 and len(tree) == N - 1


def test_a_model_alone_that_fails_is_an_error(tmp_path):
    with pytest.raises(MergesmithError, match="m1 alone failed to score"):
        drive(tmp_path, "x", load_search(recipe()),
              score=lambda w: [float("nan")] * N if w[1] == 1 else scores(w))


def test_closest_pair_is_the_first_in_pool_order():
    assert map_nested.closest_pair([0.9, 0.5, 0.86, 0.42]) == (0, 2)
    assert map_nested.closest_pair([0.5, 0.7, 0.9, 0.3]) == (0, 1)  # three ties of 0.2
    assert map_nested.closest_pair([0.1, 0.5, 0.45, 0.0]) == (1, 2)


def test_preferred_point_maximises_the_normalised_preference_sum():
    fits = [(np.zeros((1, 1)), np.array([1.0]), 0.0), (np.zeros((1, 1)), np.array([-1.0]), 1.0)]
    front = np.array([[0.0], [0.3], [1.0]])  # M1 = c, M2 = 1 - c
    assert map_nested.preferred(fits, front, [1, 3])[0] == 0.0
    assert map_nested.preferred(fits, front, [3, 1])[0] == 1.0


def refused(data: dict, match: str):
    problem = load_search(data)
    with pytest.raises(RecipeError, match=match):
        get_optimizer("map")(problem.space, problem.settings, 0)


@pytest.mark.parametrize("data, match", [
    (recipe(merge_method="linear"), "merge_method: .*task_arithmetic, not linear"),
    (recipe(search={"method": ["task_arithmetic", "linear"]}), "search.method: .*not task_arithmetic, linear"),
    (recipe(parameters={"normalize": True}), "parameters: .*no normalize"),
    (recipe(parameters={"lambda": 0.5}), "parameters: .*lambda 1"),
    (recipe(search={"parameters": {"weight": {"low": 0, "high": 1}}}), "exactly one weight per model"),
    (recipe(search={"parameters": {"weight": {"low": 0, "high": 1, "per_model": True},
                                   "lambda": {"low": 0.5, "high": 1.5}}}), "exactly one weight per model"),
    (recipe(search={"parameters": {"weight": {"low": 0, "high": 0.8, "per_model": True}}}),
     r"search.parameters.weight: .*holding \[0, 1\], not \[0, 0.8\]"),
    (recipe(search={"parameters": {"weight": {"low": 0.01, "high": 1, "per_model": True,
                                              "scale": "log"}}}), "linear weight range"),
    (recipe(models=1), "models: .*at least 2 models"),
    (recipe(search={"fitness": {"callable": "unused:score"}}), "search.fitness.objectives must be each"),
    (recipe(search={"fidelity": {"start": 0.5}}), "search.fidelity: .*full-fidelity"),
    (recipe(options={"samples": 5}), "search.options.samples: .*at least 6"),
    (recipe(search={"evaluations": 30}), r"search.evaluations: 30 .* = 31"),
    (recipe(options={"preferences": [1, 1]}), "search.options.preferences: .*4 positive"),
    (recipe(options={"preferences": [1, 1, 0, 1]}), "search.options.preferences"),
    (recipe(options={"variant": "plain", "preferences": [1, 1, 1, 1]}), "only nested MAP"),
    (recipe(options={"variant": "nest"}), "variant: 'nest' is not plain, bayesian or nested"),
])
def test_refusals_name_the_search_field(data, match):
    refused(data, match)


def test_a_space_that_is_not_per_model_weights_is_refused():
    from test_search_driver import Settings, Space

    with pytest.raises(RecipeError, match="variant: 'nested' varies the per-model weights"):
        get_optimizer("map")(Space(3), Settings(optimizer="map", options={"variant": "nested"}), 0)


def test_a_fitness_without_one_objective_per_model_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"search.fitness: nested MAP needs one objective per "
                                          r"model \(4: m0, m1, m2, m3\), the fitness gives 2"):
        drive(tmp_path, "x", load_search(recipe()), score=lambda w: scores(w)[:2])


def test_toy_models_end_to_end_the_last_candidate_is_the_nested_merge(zoo, tmp_path):
    """Real models, space, in-memory candidates and a callable fitness whose two objectives both
    peak at the task-arithmetic merge at TARGET_WEIGHTS: the one node's choice is that merge."""
    import mergesmith
    from test_search_driver import TARGET_WEIGHTS, toy_search

    path = toy_search(zoo, tmp_path, optimizer="map", evaluations=20, population=None,
                      fitness={"callable": "fitness.py:both", "names": ["e1", "e2"],
                               "objectives": "each"},
                      options={"variant": "nested", "samples": 6, **FAST})
    with open(tmp_path / "fitness.py", "a") as f:  # toy_search wrote score(): -||merged - target||^2
        f.write("\n\ndef both(tensors):\n    return [score(tensors), 2 * score(tensors)]\n")
    result = mergesmith.search(path, tmp_path / "out", progress=False)
    assert result.candidates == 2 + 1 * (6 + 1) and result.stopped == "optimizer"
    last = read_log(tmp_path / "out" / "candidates.jsonl")[-1]
    weights = [last["params"][name] for name in sorted(last["params"])]
    assert np.abs(np.array(weights) - TARGET_WEIGHTS).max() < 0.01, last
    assert list(optimizer_of(tmp_path / "out").tree[0]["weights"].values()) == pytest.approx(weights)
    # the search's answer is the tree's last merge, written as result.yaml, its tree in summary.json
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["result"]["weights"].values()) == pytest.approx(weights)
    assert len(summary["result"]["tree"]) == 1 and result.files["result"].name == "result.yaml"
    models = yaml.safe_load(result.files["result"].read_text())["models"]
    assert [m["parameters"]["weight"] for m in models] == pytest.approx(weights)
