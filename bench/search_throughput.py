"""Candidates per minute of one search worker: in memory against merge-to-folder-then-evaluate.

    .venv/bin/python bench/search_throughput.py                  # the demo's experts (cached)
    .venv/bin/python bench/search_throughput.py --fidelity 0.1 --candidates 12

Both paths score the same candidates (random points of a per-model weight and λ space over the
demo's base and four experts, task arithmetic by default) with the same fitness: mean accuracy
on the demo's four tasks, validation split (800 examples, or a fixed share with --fidelity).
- in memory: `SearchWorker` (search/candidates.py): the inputs were read once at start; each
  candidate is merged into the one model's parameters and scored.
- on disk: as mergekit-evolve's on-disk strategy: each candidate is merged to a folder
  (`mergesmith merge`), loaded from it and scored, then the folder is deleted.
- on disk, mergekit (`--mergekit`): that strategy as mergekit-evolve runs it, the candidate's
  recipe merged by mergekit's own `run_merge` (what its OnDiskMergeEvaluator calls), then
  loaded and scored the same way (our scoring, not lm-eval's, which would only add to its time).
The scores of the two paths must agree exactly (the merges are bit-identical); the script
checks that. `--toy` replaces the experts by seeded perturbations of the demo's base (the
same shape) when training them would take too long.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mergesmith.embedded.world import TASKS


def experts(toy: bool, cache: Path | None) -> tuple[Path, list[Path]]:
    from mergesmith.demo import prepare_demo
    from mergesmith.embedded.assets import base_model_folder, cache_dir

    if not toy:
        setup = prepare_demo(cache=cache)
        return setup.base, [setup.experts[name] for name in TASKS]
    from transformers import AutoModel, AutoTokenizer

    base = base_model_folder(cache)
    folders = []
    for i, name in enumerate(TASKS):
        folder = cache_dir(cache) / "bench" / f"toy-expert-{name}"
        if not (folder / "config.json").is_file():
            model = AutoModel.from_pretrained(base, dtype=torch.float32)
            generator = torch.Generator().manual_seed(i + 1)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(1e-3 * torch.randn(param.shape, generator=generator))
            model.save_pretrained(folder)
            AutoTokenizer.from_pretrained(base).save_pretrained(folder)
        folders.append(folder)
    return base, folders


def problem(base: Path, folders: list[Path], method: str, fidelity_seed: int, cache) -> dict:
    recipe = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(f), "parameters": {"weight": 0.25}} for f in folders],
              "parameters": {"lambda": 1.0} if method == "task_arithmetic" else {"density": 0.5}}
    demo = {"cache": str(cache)} if cache else {}
    search = {"parameters": {"weight": {"low": 0.0, "high": 1.0, "per_model": True}},
              "fitness": {"tasks": list(TASKS), "seed": fidelity_seed, "demo": demo}}
    if method == "task_arithmetic":
        search["parameters"]["lambda"] = {"low": 0.2, "high": 1.5}
    return {**recipe, "search": search}


def in_memory(worker, points, fidelity: float) -> tuple[float, list[float]]:
    from mergesmith.search.candidates import Candidate

    started = time.perf_counter()
    scores = []
    for i, x in enumerate(points):
        evaluation = worker(Candidate(i, list(x), fidelity))
        if evaluation.scores is None:
            sys.exit(f"candidate {i} failed: {evaluation.error}")
        scores.append(evaluation.scores[0])
    return time.perf_counter() - started, scores


def on_disk(worker, points, fidelity: float, scratch: Path) -> tuple[float, list[float]]:
    from mergesmith.evaluate.run import load_model
    from mergesmith.pipeline import merge

    task = worker.fitness.parts[0].task  # every demo task loads the same encoder
    started = time.perf_counter()
    scores = []
    for i, x in enumerate(points):
        folder = merge(worker.space.recipe(x), scratch / f"candidate-{i}")
        module, tokenizer = load_model(folder, task)
        scores.append(worker.fitness(module.eval(), tokenizer, fidelity=fidelity).scores[0])
        shutil.rmtree(folder)
    return time.perf_counter() - started, scores


def _patch_mergekit_aliases() -> None:
    """mergekit 0.1.5 crashes on BERT's optional weights (plan.py adds a list and the tuple of a
    weight's aliases: TypeError); hand plan_tensor the aliases as a list, nothing else changed."""
    from mergekit.plan import MergePlanner

    if getattr(MergePlanner.plan_tensor, "patched", False):
        return
    original = MergePlanner.plan_tensor

    def plan_tensor(self, weight, weights_in, *args, **kwargs):
        weights_in = [w.model_copy(update={"aliases": list(w.aliases)}) if w.aliases else w
                      for w in weights_in]
        return original(self, weight, weights_in, *args, **kwargs)

    plan_tensor.patched = True
    MergePlanner.plan_tensor = plan_tensor


def mergekit_on_disk(worker, points, fidelity: float, scratch: Path) -> tuple[float, list[float]]:
    """mergekit-evolve's on-disk strategy: mergekit's run_merge into a folder, load, score."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from mergesmith.evaluate.run import load_model

    _patch_mergekit_aliases()
    task = worker.fitness.parts[0].task
    options = MergeOptions(copy_tokenizer=True, lazy_unpickle=False, low_cpu_memory=False)
    started = time.perf_counter()
    scores = []
    for i, x in enumerate(points):
        config = MergeConfiguration.model_validate(yaml.safe_load(worker.space.recipe(x).to_yaml()))
        folder = scratch / f"mergekit-{i}"
        run_merge(config, out_path=str(folder), options=options)
        module, tokenizer = load_model(folder, task)
        scores.append(worker.fitness(module.eval(), tokenizer, fidelity=fidelity).scores[0])
        shutil.rmtree(folder)
    return time.perf_counter() - started, scores


def build_only(worker, points, scratch: Path) -> tuple[float, float]:
    """Seconds to build the candidates' models without scoring them: merged in place, against
    merged to a folder and loaded from it."""
    from mergesmith.evaluate.run import load_model
    from mergesmith.pipeline import merge

    recipes = [worker.space.recipe(x) for x in points]
    started = time.perf_counter()
    for recipe in recipes:
        worker.merger.merge(recipe)
    memory_s = time.perf_counter() - started
    started = time.perf_counter()
    for i, recipe in enumerate(recipes):
        folder = merge(recipe, scratch / f"build-{i}")
        load_model(folder, worker.fitness.parts[0].task)
        shutil.rmtree(folder)
    return memory_s, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--fidelity", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--toy", action="store_true", help="experts of the demo's shape, untrained")
    parser.add_argument("--cache", type=Path, default=None, help="the demo's cache folder")
    parser.add_argument("--scratch", type=Path, default=None, help="where candidate folders go")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: one worker per core is how a search runs (and on a "
                             "busy machine a second thread's hand-offs cost more than its work)")
    parser.add_argument("--mergekit", action="store_true",
                        help="also time mergekit-evolve's on-disk strategy with mergekit's merge")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mergesmith.search.candidates import Candidate, SearchWorker

    base, folders = experts(args.toy, args.cache)
    spec = problem(base, folders, args.method, 0, args.cache)
    started = time.perf_counter()
    worker = SearchWorker(spec)
    setup = time.perf_counter() - started
    rng = np.random.default_rng(0)
    points = rng.random((args.candidates + 1, len(worker.space)))
    worker(Candidate(-1, list(points[0])))
    points = points[1:]  # the first candidate built the model and loaded the tokenizer: not timed
    print(f"{'toy' if args.toy else 'demo'} experts, {args.method}, {len(worker.space)} dimensions, "
          f"torch threads {torch.get_num_threads()}; worker setup {setup:.1f} s (inputs read once: "
          f"{worker.merger.inputs.nbytes / 2**20:.0f} MiB kept)")
    print("| fidelity | examples | in memory (cand/min) | on disk (cand/min) | ratio |"
          + (" on disk, mergekit (cand/min) | ratio |" if args.mergekit else ""))
    print("| --- | --- | --- | --- | --- |" + (" --- | --- |" if args.mergekit else ""))
    scratch = Path(tempfile.mkdtemp(prefix="search-throughput-", dir=args.scratch))
    try:
        memory_s, disk_s = build_only(worker, points, scratch)
        print(f"| merge only | 0 | {60 * len(points) / memory_s:.1f} | {60 * len(points) / disk_s:.1f} "
              f"| {disk_s / memory_s:.2f}x |", flush=True)
        for fidelity in args.fidelity:
            memory_s, memory_scores = in_memory(worker, points, fidelity)
            disk_s, disk_scores = on_disk(worker, points, fidelity, scratch)
            if memory_scores != disk_scores:
                sys.exit(f"the paths disagree: {memory_scores} against {disk_scores}")
            examples = sum(len(p.subset(fidelity).examples("validation")) for p in worker.fitness.parts)
            per_min = [60 * len(points) / s for s in (memory_s, disk_s)]
            row = (f"| {fidelity:g} | {examples} | {per_min[0]:.1f} | {per_min[1]:.1f} | "
                   f"{per_min[0] / per_min[1]:.2f}x |")
            if args.mergekit:
                mk_s, mk_scores = mergekit_on_disk(worker, points, fidelity, scratch)
                # mergekit computes in its own order: scores may differ where a merged weight's
                # last bit flips a prediction; report how many candidates differ
                differ = sum(a != b for a, b in zip(memory_scores, mk_scores))
                row += (f" {60 * len(points) / mk_s:.1f} | {mk_s / memory_s:.2f}x |"
                        + (f" ({differ} scores differ)" if differ else ""))
            print(row, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
