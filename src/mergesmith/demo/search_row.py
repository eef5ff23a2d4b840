"""The demo's search row (`mergesmith demo --method search`): CMA-ES over the experts'
task-arithmetic weights, scored on the validation split and bounded in wall time; its best
recipe is then scored on test like every other row.

Each candidate is merged in memory and scored on a quarter of each task's validation examples;
the best third of each generation is scored again on all of them (successive halving), and only
those full scores compete for the best recipe.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from mergesmith.recipe import load_recipe

NAME = "search"
SECONDS = 60  # the search's budget in the demo (its first run stays within ten minutes)
FAST_SECONDS = 5  # with --fast (tiny model, two tasks)
FIDELITY = {"start": 0.25, "keep": 0.34}


def search_problem(base: Path, experts: list[Path], tasks: list, seed: int, seconds: float) -> dict:
    """Task arithmetic over the experts, one weight per expert in [0, 1.5] starting from 1."""
    return {
        "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts],
        "search": {"parameters": {"weight": {"low": 0.0, "high": 1.5, "per_model": True}},
                   "optimizer": "cma", "seed": seed, "seconds": seconds, "population": 6,
                   "fidelity": FIDELITY,
                   "fitness": {"tasks": [str(t.path) for t in tasks], "objectives": "mean"}},
    }


def search_entry(base: Path, experts: list[Path], tasks: list, cache: Path, seed: int,
                 seconds: float, tuner):
    """The leaderboard's Entry for the search's best recipe (searched once, then cached)."""
    from mergesmith.demo.leaderboard import Entry
    from mergesmith.search.driver import search

    out = cache / "search" / f"cma-seed{seed}-{seconds:g}s"
    if not (out / "best.yaml").is_file():
        if out.exists():  # stopped before it finished: its time budget is spent, start over
            shutil.rmtree(out)
        search(search_problem(base, experts, tasks, seed, seconds), out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    recipe = load_recipe(out / "best.yaml")
    report = tuner.report({NAME: tuner.score_recipe(recipe, "validation")}, "validation")
    # weight(task), not weight[/path/to/expert] (and no brackets, which rich reads as markup)
    task_of = {f"[{e}]": f"({t.name})" for e, t in zip(experts, tasks)}
    values = {}
    for name, value in summary["best"]["params"].items():
        head, bracket, rest = name.partition("[")
        values[head + task_of.get(bracket + rest, bracket + rest)] = round(value, 2)
    validation = report.averages[NAME].normalized
    return Entry(NAME, values, recipe, math.nan if validation is None else validation,
                 data_seconds=summary["seconds"])
