"""A search end to end on toy models: the space, in-memory candidates, a callable fitness, the
CLI, two Ray workers and the demo's search row (the driver's own tests: test_search_driver.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mergesmith.recipe import load_recipe
from mergesmith.search.driver import read_log, search


def log_of(out: Path) -> list[dict]:
    """The log without timings, in id order (completion order depends on the workers)."""
    records = read_log(out / "candidates.jsonl")
    for r in records:
        r.pop("seconds")
    return sorted(records, key=lambda r: (r["id"], r["fidelity"]))


TARGET_WEIGHTS = (0.3, 0.8)

FITNESS = '''
from pathlib import Path

from safetensors.torch import load_file

TARGET = {}
for file in sorted(Path({target!r}).glob("*.safetensors")):
    TARGET.update(load_file(file))
CALLS = [0]


def score(tensors):
    """- ||merged - target||^2: the target is task arithmetic with known weights."""
    return -sum(float(((tensors[k].double() - TARGET[k].double()) ** 2).sum()) for k in TARGET)


def flaky(tensors):
    CALLS[0] += 1
    if CALLS[0] % 3 == 1:
        raise ValueError("boom")
    return float("nan") if CALLS[0] % 3 == 2 else score(tensors)
'''


def toy_search(zoo, tmp_path, **search) -> Path:
    """A task-arithmetic recipe over the toy experts whose weights are searched, and a fitness
    file whose optimum is the merge at TARGET_WEIGHTS."""
    from mergesmith.pipeline import merge

    from conftest import write_recipe

    models = zoo("llama")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
              "models": [{"model": str(models[e]), "parameters": {"weight": 0.5}}
                         for e in ("e1", "e2")]}
    target = dict(recipe, models=[dict(m, parameters={"weight": w})
                                  for m, w in zip(recipe["models"], TARGET_WEIGHTS)])
    if not (tmp_path / "target").exists():
        merge(target, tmp_path / "target")
    (tmp_path / "fitness.py").write_text(FITNESS.replace("{target!r}", repr(str(tmp_path / "target"))))
    settings = {"parameters": {"weight": {"low": 0.0, "high": 1.0, "per_model": True}},
                "optimizer": "cma", "evaluations": 48, "population": 8,
                "fitness": {"callable": "fitness.py:score"}, **search}
    return write_recipe(tmp_path / "search.yaml", dict(recipe, search=settings))


def test_toy_search_recovers_the_weights_and_merge_reproduces_its_best(zoo, tmp_path, monkeypatch,
                                                                      capsys):
    from conftest import read_tensors, run_cli
    from mergesmith.search.candidates import CandidateMerger
    from mergesmith.search.space import load_search

    import mergesmith

    path = toy_search(zoo, tmp_path)
    result = mergesmith.search(path, tmp_path / "out", progress=False)
    weights = [result.best["params"][name] for name in sorted(result.best["params"])]
    assert np.abs(np.array(weights) - TARGET_WEIGHTS).max() < 0.03, result.best
    code, _, err = run_cli(monkeypatch, capsys, "merge", tmp_path / "out" / "best.yaml",
                           tmp_path / "best")
    assert code == 0, err
    merged = read_tensors(tmp_path / "best")
    problem = load_search(path)
    searched = CandidateMerger(problem.recipe).tensors(problem.space.recipe(result.best["x"]))
    assert merged.keys() == searched.keys()
    for name in merged:
        assert merged[name].dtype == searched[name].dtype
        assert torch.equal(merged[name], searched[name]), name
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_fitness", tmp_path / "fitness.py")
    fitness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fitness)
    assert fitness.score(merged) == result.best["scores"][0]  # the model the search scored


def test_cli_search_runs_overrides_and_resumes(zoo, tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    path = toy_search(zoo, tmp_path)
    out = tmp_path / "cli"
    code, _, err = run_cli(monkeypatch, capsys, "search", path, out, "--evaluations", "10",
                           "--seed", "3", "-q", "-v")
    assert code == 0, err
    assert "weight[" in err and "best: candidate" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["candidates"] == 10 and summary["seed"] == 3
    assert summary["candidates_per_minute"] > 0
    code, _, err = run_cli(monkeypatch, capsys, "search", path, out, "--evaluations", "10", "-q")
    assert code == 1 and "already holds a search" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, "search", path, out, "--evaluations", "20",
                           "--seed", "3", "--resume", "-q")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["candidates"] == 20
    assert [r["id"] for r in read_log(out / "candidates.jsonl")] == list(range(20))


def test_toy_fitness_that_raises_or_gives_nan_is_logged_and_the_search_goes_on(zoo, tmp_path):
    path = toy_search(zoo, tmp_path, evaluations=9, population=3,
                      fitness={"callable": "fitness.py:flaky"})
    result = search(path, tmp_path / "out", progress=False)
    log = log_of(tmp_path / "out")
    assert len(log) == 9 and result.candidates == 9
    assert all("ValueError: boom" in r["error"] for r in log[0::3])
    assert all(r["scores"] is None and "nan" in r["error"] for r in log[1::3])
    assert all(r["scores"] is not None and r["error"] is None for r in log[2::3])
    assert result.best["id"] % 3 == 2


def test_two_ray_workers_give_the_serial_search(zoo, tmp_path):
    """Candidates' seeds and the order the optimizer is told do not depend on the workers."""
    ray = pytest.importorskip("ray")
    path = toy_search(zoo, tmp_path, evaluations=12, population=6)
    serial = search(path, tmp_path / "serial", progress=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        parallel = search(path, tmp_path / "ray", workers=2, progress=False)
    finally:
        ray.shutdown()
    assert log_of(tmp_path / "ray") == log_of(tmp_path / "serial")
    assert parallel.best == serial.best
    assert (tmp_path / "ray" / "best.yaml").read_bytes() == (tmp_path / "serial" / "best.yaml").read_bytes()


def test_interrupted_cli_search_says_how_to_resume(zoo, tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    import mergesmith.search.driver as driver

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "search", interrupted)
    code, _, err = run_cli(monkeypatch, capsys, "search", toy_search(zoo, tmp_path), tmp_path / "o")
    assert code == 130 and "rerun the same command with --resume" in err


def test_demo_search_row(tmp_path, one_thread):
    """`mergesmith demo --method search`: a time-bounded CMA-ES row, its best recipe scored on
    test beside the references, searched once and then taken from the cache."""
    from mergesmith.demo.leaderboard import run_leaderboard
    from mergesmith.embedded.world import prepare_demo

    setup = prepare_demo(fast=True, seed=0, cache=tmp_path / "cache", progress=False)

    def board():
        return run_leaderboard(setup.base, setup.experts, setup.tasks, tmp_path / "out",
                               cache=tmp_path / "board", methods=["search"], say=lambda m: None,
                               n_bootstrap=50, search_seconds=4)

    first = board()
    [entry] = first.entries
    assert entry.method == "search" and entry.recipe.merge_method == "task_arithmetic"
    assert sorted(entry.values) == sorted(f"weight({t})" for t in setup.tasks)
    found = tmp_path / "board" / "search" / "cma-seed0-4s"
    summary = json.loads((found / "summary.json").read_text())
    assert summary["stopped"] == "seconds" and summary["candidates"] >= 6
    assert load_recipe(found / "best.yaml") == entry.recipe
    assert first.test.averages["search"].normalized is not None
    log = (found / "candidates.jsonl").read_text()
    again = board()  # cached: nothing is searched again
    assert (found / "candidates.jsonl").read_text() == log
    assert again.test.averages["search"].normalized == first.test.averages["search"].normalized
