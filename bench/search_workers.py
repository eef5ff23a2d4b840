"""Search throughput with 1 worker (in-process) and with N Ray workers of a local runtime.

    .venv/bin/python bench/search_workers.py                      # 1 and 2 workers, 48 candidates

The same search each time (CMA-ES over the demo experts' task-arithmetic weights, fitness the
mean accuracy over the demo's four tasks on a seeded tenth of their validation examples,
`--fidelity`, the best tenth of each generation again on all), so the logs must agree; the script checks that, and prints candidates per minute
from each search's own summary (its wall time includes starting the workers, which load the
models once each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from mergesmith.demo import prepare_demo
from mergesmith.embedded.assets import cache_dir
from mergesmith.embedded.world import TASKS
from mergesmith.search.driver import search


def problem(base: Path, experts: list[Path], evaluations: int, fidelity: float, cache: Path) -> dict:
    return {
        "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(e), "parameters": {"weight": 0.7}} for e in experts],
        "search": {"parameters": {"weight": {"low": 0.0, "high": 1.5, "per_model": True}},
                   "optimizer": "cma", "seed": 0, "evaluations": evaluations, "population": 12,
                   "fitness": {"tasks": list(TASKS), "demo": {"cache": str(cache)}},
                   "fidelity": {"start": fidelity, "keep": 0.1}},
    }


def scores(out: Path) -> list:
    lines = (out / "candidates.jsonl").read_text().splitlines()
    return sorted((r["id"], r["fidelity"], r["scores"]) for r in map(json.loads, lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--evaluations", type=int, default=48)
    parser.add_argument("--fidelity", type=float, default=0.1)
    parser.add_argument("--cache", type=Path, default=None, help="the demo's cache folder")
    args = parser.parse_args()
    setup = prepare_demo(cache=args.cache)
    spec = problem(setup.base, [setup.experts[t] for t in TASKS], args.evaluations,
                   args.fidelity, cache_dir(args.cache))
    scratch = Path(tempfile.mkdtemp(prefix="search-workers-"))
    logs = {}
    try:
        print("| workers | candidates | seconds | candidates/min |")
        print("| --- | --- | --- | --- |")
        for workers in map(int, args.workers.split(",")):
            out = scratch / f"w{workers}"
            result = search(spec, out, workers=workers, progress=False)
            logs[workers] = scores(out)
            print(f"| {workers}{' (Ray)' if workers > 1 else ' (in-process)'} | "
                  f"{result.candidates} | {result.seconds:.1f} | "
                  f"{60 * result.candidates / result.seconds:.1f} |", flush=True)
        first = next(iter(logs.values()))
        if any(log != first for log in logs.values()):
            raise SystemExit("the searches disagree: results depend on the number of workers")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
