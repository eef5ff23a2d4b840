"""Does search beat hand tuning? Layer-wise searches on the demo against its grid-tuned methods.

    .venv/bin/python bench/search_quality.py                       # cma and m2n2, 200 evaluations
    .venv/bin/python bench/search_quality.py --optimizers cma --evaluations 60

The demo's base, four experts and four tasks (`mergesmith demo` builds and caches them). Each
search varies task arithmetic's weight per expert and per layer (6 layer groups of MiniLM-L6,
plus own values for the embeddings and for the head side: 4 x 8 = 32 dimensions in [0, 1.5]),
starting from the grid-tuned task-arithmetic point (every weight = its λ), and scores candidates
by the mean accuracy over the four tasks on their validation split (successive halving: a
quarter of the examples first, the best third of each generation again on all), with at most
`--evaluations` candidates. The data-free methods of the demo's default set are tuned on their grids as the
leaderboard tunes them (validation, first 100 examples per task). Every chosen recipe is then
scored on test, with 95% paired-bootstrap intervals of the difference in average normalized
score against the best grid-tuned method (chosen on validation, as the leaderboard does).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mergesmith.demo import prepare_demo
from mergesmith.embedded.assets import cache_dir
from mergesmith.demo.leaderboard import TUNING_EXAMPLES, _tune, method_recipe
from mergesmith.embedded.world import TASKS
from mergesmith.evaluate import load_task, summarize
from mergesmith.methods import get_method
from mergesmith.recipe import load_recipe
from mergesmith.search.driver import search
from mergesmith.search.scoring import Scorer

DATA_FREE = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "tsv_m", "iso_c")
LAYER_GROUPS = 6  # MiniLM-L6: one group per layer


def search_problem(base: Path, experts: list[Path], optimizer: str, evaluations: int,
                   seed: int, cache: Path, start: float) -> dict:
    return {
        "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(e), "parameters": {"weight": start}} for e in experts],
        "search": {
            "parameters": {"weight": {"low": 0.0, "high": 1.5, "per_model": True,
                                      "layer_groups": LAYER_GROUPS, "ends": True}},
            "optimizer": optimizer, "seed": seed, "evaluations": evaluations,
            "population": 12, "fidelity": {"start": 0.25, "keep": 0.34},
            "fitness": {"tasks": list(TASKS), "objectives": "mean",
                        "demo": {"cache": str(cache)}},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", default="cma,m2n2")
    parser.add_argument("--evaluations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None, help="the demo's cache folder")
    parser.add_argument("--out", type=Path, default=Path("bench/work/search-quality"))
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    cache = cache_dir(args.cache)
    setup = prepare_demo(cache=args.cache)
    tasks = [load_task(setup.tasks[name]) for name in TASKS]
    experts = [setup.experts[name] for name in TASKS]
    references = dict(experts={t: str(setup.experts[t]) for t in TASKS}, base=str(setup.base),
                      in_memory=True, seed=args.seed, n_bootstrap=args.bootstrap)
    scorer = Scorer(tasks, cache, **references)
    tuner = Scorer(tasks, cache, max_examples=TUNING_EXAMPLES, **references)

    chosen, validation, seconds, values = {}, {}, {}, {}
    for name in DATA_FREE:
        started = time.perf_counter()
        entry = _tune(get_method(name), method_recipe(get_method(name), setup.base, experts), tuner)
        chosen[name], validation[name], values[name] = entry.recipe, entry.validation, entry.values
        seconds[name] = time.perf_counter() - started
        print(f"{name}: {entry.values} validation {entry.validation:.4f} "
              f"({seconds[name]:.0f} s)", flush=True)
    best_grid = max(validation, key=validation.get)

    searched = {}
    for optimizer in args.optimizers.split(","):
        out = args.out / f"{optimizer}-seed{args.seed}-{args.evaluations}"
        started = time.perf_counter()
        problem = search_problem(setup.base, experts, optimizer, args.evaluations, args.seed,
                                 cache, start=values["task_arithmetic"]["lambda"])
        result = search(problem, out, resume=(out / "state.pkl").is_file())
        label = f"search:{optimizer}"
        seconds[label] = time.perf_counter() - started
        chosen[label] = load_recipe(out / "best.yaml")
        searched[label] = dict(candidates=result.candidates, evaluations=result.evaluations,
                               validation_mean_accuracy=result.best["scores"][0],
                               per_minute=60 * result.candidates / max(result.seconds, 1e-9))
        validation[label] = tuner.report({label: tuner.score_recipe(chosen[label], "validation")},
                                         "validation").averages[label].normalized
        print(f"{label}: {result.candidates} candidates in {result.seconds:.0f} s, best "
              f"validation mean accuracy {result.best['scores'][0]:.4f}", flush=True)

    results = {}
    for name, recipe in chosen.items():
        started = time.perf_counter()
        results[name] = scorer.score_recipe(recipe, "test")
        print(f"{name}: scored on test ({time.perf_counter() - started:.0f} s)", flush=True)
    results.update({"base": scorer.references("test")[str(setup.base)]})
    for task in TASKS:
        results[f"expert:{task}"] = scorer.references("test")[str(setup.experts[task])]
    report = summarize(results, {t: f"expert:{t}" for t in TASKS}, "base", seed=args.seed,
                       n_bootstrap=args.bootstrap)
    rows = []
    print(f"\nbest grid-tuned data-free method (on validation): {best_grid}\n")
    print(f"{'model':<22} {'val (first 100)':>15} {'test norm.':>10} {'vs ' + best_grid:>28}")
    for name in chosen:
        test = report.averages[name]
        diff = report.compare(name, best_grid)
        rows.append(dict(model=name, validation=validation[name], test=test.normalized,
                         test_lo=test.lo, test_hi=test.hi, difference=diff.difference,
                         lo=diff.lo, hi=diff.hi, beyond_noise=diff.beyond_noise,
                         seconds=seconds[name], **searched.get(name, {})))
        print(f"{name:<22} {validation[name]:>15.4f} {test.normalized:>10.4f} "
              f"{diff.difference:>+10.4f} [{diff.lo:+.4f}, {diff.hi:+.4f}]"
              f"{' *' if diff.beyond_noise else ''}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        dict(best_grid=best_grid, evaluations=args.evaluations, rows=rows), indent=2))


if __name__ == "__main__":
    main()
