"""Scoring merge candidates for sweeps and soups: merge (or reuse), evaluate (or reuse), rank.

A candidate is a recipe. Its merged folder is kept under `<dir>/merges/<key>` and its scores under
`<dir>/scores/<key>/`, where the key is the recipe's fingerprint and the seed, so a rerun reuses
both; scores are also keyed by each task's own fingerprint (definition and data), so editing a
task re-scores only that task. With `in_memory`, candidates are merged into a model built once,
from inputs read once, and never written (search/candidates.py): for small models merged many
times.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mergesmith.errors import MergesmithError
from mergesmith.evaluate import Report, Task, TaskResult, evaluate_models, summarize
from mergesmith.io.checkpoint import weight_files
from mergesmith.methods import get_method
from mergesmith.recipe import Recipe, load_recipe


def recipe_key(recipe: Recipe, seed: int | None = None) -> str:
    """Names a merge result: the recipe's content fingerprint and the seed."""
    seed = seed if seed is not None else (recipe.seed or 0)
    return hashlib.sha256(f"{recipe.fingerprint()}\0{seed}".encode()).hexdigest()[:16]


def folder_key(folder: str | Path) -> str:
    """Names a model folder's weights: its path and its weight files' sizes and times."""
    folder = Path(folder).resolve()
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(folder)]
    return hashlib.sha256(json.dumps([str(folder), stamp]).encode()).hexdigest()[:16]


class Scorer:
    """Evaluates candidates and reference models on a fixed list of tasks, with a disk cache.

    experts: task name -> expert folder, for normalized scores; base: a folder, for forgetting.
    References are named by their path as given.
    """

    def __init__(self, tasks: list[Task], cache_dir: str | Path, *, experts: dict[str, str] | None = None,
                 base: str | None = None, in_memory: bool = False, device: str = "cpu",
                 batch_size: int = 32, max_examples: int | None = None, seed: int | None = None,
                 n_bootstrap: int = 1000):
        self.tasks = tasks
        self.dir = Path(cache_dir)
        self.experts = {task: str(path) for task, path in (experts or {}).items()}
        self.base = str(base) if base is not None else None
        self.in_memory, self.device, self.seed = in_memory, device, seed
        self.batch_size, self.max_examples, self.n_bootstrap = batch_size, max_examples, n_bootstrap
        self.merged = 0  # merges actually run (not reused)
        self._merger = None  # in memory: search/candidates.py's CandidateMerger, made on first use
        names = {t.name for t in tasks}
        for task in self.experts:
            if task not in names:
                raise MergesmithError(f"--expert {task}=...: no task named {task!r}",
                                      hint=f"tasks: {', '.join(sorted(names))}")
        if len(tasks) > 1 and set(self.experts) != names:
            missing = sorted(names - set(self.experts))
            raise MergesmithError(f"tasks {', '.join(missing)} have no expert; averaging several tasks "
                                  "needs each task's expert to normalize its score",
                                  hint="add --expert TASK=MODEL for each task")

    # -- evaluation ------------------------------------------------------------------------
    def score_folder(self, folder: str | Path, split: str) -> dict[str, TaskResult]:
        return self._cached(folder_key(folder), split, lambda: Path(folder))

    def score_recipe(self, recipe: Recipe, split: str) -> dict[str, TaskResult]:
        key = self.key(recipe)
        return self._cached(key, split, lambda: self._materialize(recipe, key))

    def key(self, recipe: Recipe) -> str:
        return recipe_key(recipe, self.seed)

    def merge_folder(self, recipe: Recipe) -> Path:
        """The candidate's merged folder, merged now unless a previous run left it."""
        from mergesmith.pipeline import merge

        folder = self.dir / "merges" / self.key(recipe)
        if not (folder / "config.json").is_file():
            if get_method(recipe.merge_method).output == "adapter":
                # scored as its base plus the merged adapter (the base its config names)
                recipe = load_recipe({"merge_method": "linear", "dtype": recipe.dtype or "float32",
                                      "models": [{"model": str(self.adapter_folder(recipe)),
                                                  "parameters": {"weight": 1.0}}]})
            merge(recipe, folder, device=self.device, seed=self.seed, overwrite=folder.exists())
            self.merged += 1
        return folder

    def adapter_folder(self, recipe: Recipe) -> Path:
        """The adapter a merge into an adapter wrote, merged now unless a previous run left it."""
        from mergesmith.pipeline import merge

        folder = self.dir / "merges" / f"{self.key(recipe)}-adapter"
        if not (folder / "adapter_config.json").is_file():
            merge(recipe, folder, device=self.device, seed=self.seed, overwrite=folder.exists())
        return folder

    def references(self, split: str) -> dict[str, dict[str, TaskResult]]:
        """The experts' and the base's scores (each folder scored once)."""
        paths = list(dict.fromkeys([*self.experts.values(), *([self.base] if self.base else [])]))
        return {path: self.score_folder(path, split) for path in paths}

    def report(self, candidates: dict[str, dict[str, TaskResult]], split: str) -> Report:
        """Candidates and references together, normalized by the experts."""
        results = {**candidates, **self.references(split)}
        return summarize(results, self.experts, self.base, n_bootstrap=self.n_bootstrap)

    def objective(self, report: Report, name: str) -> float:
        """What a search maximises: the average normalized score, or with one task and no
        expert, the score itself (negated when lower is better)."""
        if self.experts:
            return report.averages[name].normalized
        cell = report.cell(name, self.tasks[0].name)
        return cell.score if cell.higher_is_better else -cell.score

    def _cached(self, key: str, split: str, model) -> dict[str, TaskResult]:
        files = {t.name: self.dir / "scores" / key /
                 f"{t.name}.{split}.{t.fingerprint[:12]}.{self.max_examples or 'all'}.json"
                 for t in self.tasks}
        results = {name: TaskResult.from_dict(json.loads(f.read_text()))
                   for name, f in files.items() if f.is_file()}
        missing = [t for t in self.tasks if t.name not in results]
        if missing:
            fresh = evaluate_models({key: model()}, missing, split, batch_size=self.batch_size,
                                    device=self.device, max_examples=self.max_examples)[key]
            for name, result in fresh.items():
                files[name].parent.mkdir(parents=True, exist_ok=True)
                files[name].write_text(json.dumps(result.to_dict()))
            results.update(fresh)
        return {t.name: results[t.name] for t in self.tasks}

    def _materialize(self, recipe: Recipe, key: str):
        spec = get_method(recipe.merge_method)
        if not self.in_memory or spec.router or spec.output == "adapter":
            # a router is trained on the written model; an adapter is written, then applied
            return self.merge_folder(recipe)
        from mergesmith.search.candidates import CandidateMerger

        if self._merger is None:  # the inputs are read once, for every candidate
            self._merger = CandidateMerger(recipe, self.device, seed=self.seed)
        self.merged += 1
        return self._merger.merge(recipe)
