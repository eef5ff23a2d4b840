"""Continual merging on the demo: the experts arrive one at a time, in two orders (the demo's
and its reverse), merged with OPCM and with sequential task arithmetic (`mergesmith merge
--onto`); after each step, each task's normalized score on test, the average over the tasks
merged so far and over all tasks, against the all-at-once merges of every expert (task
arithmetic at the same λ, which sequential task arithmetic must equal at the last step, and
the plain average).

    .venv/bin/python bench/continual_demo.py [--fast] [--alpha 0.5] [--lambda 0.3]
        [--work bench/work] [--json bench/results/continual-demo.json]

--fast uses the demo's tiny random BERT and two tasks (seconds); without it, the demo's
MiniLM base and its four experts (trained on first use and cached, as `mergesmith demo`).
Defaults α = 0.5 and λ = 0.3 are FusionBench's (config/method/opcm/{opcm,task_arithmetic}.yaml).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--lambda", dest="lam", type=float, default=0.3)
    parser.add_argument("--work", type=Path, default=ROOT / "work")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from mergesmith.embedded.world import prepare_demo
    from mergesmith.engine.continual import continual_merge
    from mergesmith.evaluate import load_task
    from mergesmith.recipe import load_recipe
    from mergesmith.search.scoring import Scorer

    setup = prepare_demo(fast=args.fast, progress=True)
    names = list(setup.experts)
    work = args.work / ("continual-demo-fast" if args.fast else "continual-demo")
    tasks = [load_task(setup.tasks[n]) for n in names]
    scorer = Scorer(tasks, work / "scores", experts={n: str(p) for n, p in setup.experts.items()},
                    base=str(setup.base), n_bootstrap=200)
    rules = {"opcm": {"alpha": args.alpha}, "continual_task_arithmetic": {"lambda": args.lam}}
    orders = [names, names[::-1]]
    steps, candidates, seconds = [], {}, {}
    for rule, params in rules.items():
        for order in orders:
            onto = None
            for i, task in enumerate(order):
                label = f"{rule} {'>'.join(order[:i + 1])}"
                folder = work / "merges" / label.replace(" ", "_").replace(">", "-")
                recipe = {"merge_method": rule, "base_model": str(setup.base),
                          "models": [{"model": str(setup.experts[task])}], "parameters": params}
                started = time.perf_counter()
                continual_merge(recipe, folder, onto=onto, overwrite=True)
                seconds[label] = time.perf_counter() - started
                candidates[label] = scorer.score_folder(folder, "test")
                steps.append((rule, order, i, label))
                onto = folder
    experts = [{"model": str(setup.experts[n]), "parameters": {"weight": 1.0}} for n in names]
    at_once = {f"all at once: task_arithmetic λ={args.lam:g}": {
                   "merge_method": "task_arithmetic", "base_model": str(setup.base),
                   "models": experts, "parameters": {"lambda": args.lam}},
               "all at once: average": {"merge_method": "linear", "models": experts}}
    for label, recipe in at_once.items():
        candidates[label] = scorer.score_recipe(load_recipe(recipe), "test")
    report = scorer.report(candidates, "test")

    def normalized(label, task):
        return report.cell(label, task).normalized

    rows = []
    for rule, order, i, label in steps:
        seen = order[:i + 1]
        per_task = {t: normalized(label, t) for t in names}
        rows.append({"rule": rule, "order": ">".join(order), "step": i + 1, "added": order[i],
                     "normalized": per_task,
                     "avg_seen": sum(per_task[t] for t in seen) / len(seen),
                     "avg_all": report.averages[label].normalized, "merge_seconds": seconds[label]})
    for label in at_once:
        per_task = {t: normalized(label, t) for t in names}
        rows.append({"rule": label, "order": "-", "step": len(names), "added": "-",
                     "normalized": per_task, "avg_seen": report.averages[label].normalized,
                     "avg_all": report.averages[label].normalized, "merge_seconds": None})
    header = ["rule", "order", "step", "added", *names, "avg seen", "avg all"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["rule"], r["order"], str(r["step"]), r["added"],
                 *(f"{r['normalized'][t]:.3f}" for t in names), f"{r['avg_seen']:.3f}",
                 f"{r['avg_all']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    out = args.json or ROOT / "results" / ("continual-demo-fast.json" if args.fast else "continual-demo.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"alpha": args.alpha, "lambda": args.lam, "tasks": names,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
