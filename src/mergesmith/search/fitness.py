"""What a search maximizes: scores of a merged model on validation data, or a user's function.

    fitness:
      tasks: [topic, sentiment]        # evaluate/ task files or folders, or the demo's task names
      lm_eval: [arc_easy]              # lm-eval-harness tasks (their validation split)
      perplexity: notes.txt            # a text file, one example per line: − mean token loss
      callable: "my_module:score"      # or "fitness.py:score"; gets the merged state dict
      names: [accuracy, size]          # the callable's scores, when it gives several
      objectives: mean                 # or each: one objective per task (Pareto searches)
      seed: 0                          # which examples a fidelity below 1 scores

Every score is higher-is-better: accuracy and F1 as they are, a loss negated (a perplexity task
scores − its mean token loss). Tasks are scored on their validation split, never on test.
`fidelity` f < 1 scores the first ⌈f·n⌉ examples of one seeded permutation of each split: the
same examples every call, and those of a lower fidelity among those of a higher one.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from mergesmith.errors import MergesmithError, RecipeError

KEYS = {"tasks", "lm_eval", "perplexity", "callable", "names", "objectives", "seed", "split",
        "batch_size", "max_length", "lm_eval_options", "demo"}
SCORED = ("tasks", "lm_eval", "perplexity", "callable")


@dataclass
class FitnessResult:
    scores: list[float]  # one per objective
    per_example: list[float] | None = None  # every scored example's outcome, tasks in order


class Fitness(Protocol):
    objectives: list[str]  # names, higher is better

    def __call__(self, model, tokenizer, *, fidelity: float = 1.0, seed: int = 0,
                 tensors=None) -> FitnessResult: ...


def load_fitness(spec: dict | Callable, base: Path | None = None) -> "Fitness":
    """The fitness a `fitness:` section describes. Relative paths start at `base` (the search
    file's folder). A Python callable stands for `{callable: it}`."""
    if callable(spec) and not isinstance(spec, dict):
        spec = {"callable": spec}
    if not isinstance(spec, dict) or not any(spec.get(key) for key in SCORED):
        raise RecipeError("search.fitness: says nothing to score",
                          hint="give tasks:, lm_eval:, perplexity: or callable:")
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise RecipeError(f"search.fitness.{unknown[0]}: unknown key",
                          hint=f"keys: {', '.join(sorted(KEYS))}")
    split = spec.get("split", "validation")
    if split == "test":
        raise RecipeError("search.fitness.split: test: a search never scores on the test split "
                          "(what it tunes on would no longer measure it)",
                          hint="score on validation; keep test for the final comparison")
    objectives = spec.get("objectives", "mean")
    if objectives not in ("mean", "each"):
        raise RecipeError(f"search.fitness.objectives: {objectives!r}", hint="mean or each")
    base = Path(base) if base is not None else Path.cwd()
    seed = int(spec.get("seed", 0))
    parts: list[Part] = []
    if spec.get("tasks"):
        parts += [TaskPart(task, split, seed, spec) for task in _tasks(spec, base)]
    if spec.get("perplexity"):
        parts.append(TaskPart(_text_task(spec["perplexity"], base, split, spec), split, seed, spec))
    if spec.get("lm_eval"):
        parts.append(LmEvalPart(spec["lm_eval"], spec, base))
    if spec.get("callable"):
        parts.append(CallablePart(spec["callable"], base, spec.get("names")))
    return SearchFitness(parts, objectives)


class Part(Protocol):
    names: list[str]
    wants_model: bool
    wants_tensors: bool

    def __call__(self, model, tokenizer, tensors, fidelity: float, seed: int
                 ) -> tuple[list[float], list[float] | None]: ...


class SearchFitness:
    """The parts' scores as the objectives: each one, or their mean."""

    def __init__(self, parts: list[Part], objectives: str = "mean"):
        self.parts, self.mode = parts, objectives
        names = [name for part in parts for name in part.names]
        self.objectives = names if objectives == "each" else ["mean(" + ", ".join(names) + ")"]
        self.wants_model = any(part.wants_model for part in parts)
        self.wants_tensors = any(part.wants_tensors for part in parts)

    def __call__(self, model, tokenizer, *, fidelity: float = 1.0, seed: int = 0,
                 tensors=None) -> FitnessResult:
        if not 0 < fidelity <= 1:
            raise MergesmithError(f"fidelity {fidelity} is not in (0, 1]")
        scores: list[float] = []
        per_example: list[float] | None = []
        for part in self.parts:
            got, examples = part(model, tokenizer, tensors, fidelity, seed)
            if len(got) != len(part.names):
                raise MergesmithError(f"fitness {', '.join(part.names)}: gave {len(got)} scores, "
                                      f"expected {len(part.names)}",
                                      hint="name a callable's scores with fitness.names")
            scores += [float(s) for s in got]
            # per example only when every part has them (M2N2's score matrix needs them all)
            per_example = per_example + examples if per_example is not None and examples else None
        if self.mode == "mean":
            scores = [float(np.mean(scores))]
        return FitnessResult(scores, per_example)


# --- evaluate/ tasks --------------------------------------------------------------------------


def _tasks(spec: dict, base: Path) -> list:
    from mergesmith.evaluate import load_task

    names = spec["tasks"] if isinstance(spec["tasks"], list) else [spec["tasks"]]
    tasks = []
    for name in names:
        path = base / str(name)
        if path.exists():
            tasks.append(load_task(path))
        else:
            tasks.append(load_task(_demo_task(str(name), spec.get("demo") or {})))
    return tasks


def _demo_task(name: str, options: dict) -> Path:
    """The demo's task with its frozen head, as the demo prepares it (fitted on first use)."""
    from mergesmith.embedded.assets import base_model_folder, cache_dir, tiny_base_folder
    from mergesmith.embedded.finetune import FAST, prepare_task
    from mergesmith.embedded.world import SETTINGS, TASKS, TASKS_DIR

    if name not in TASKS:
        raise RecipeError(f"search.fitness.tasks: {name!r} is neither a task file or folder nor "
                          "a demo task", hint=f"demo tasks: {', '.join(TASKS)}")
    fast, seed = bool(options.get("fast", False)), int(options.get("seed", 0))
    root = cache_dir(Path(options["cache"]) if options.get("cache") else None)
    settings = (FAST if fast else SETTINGS).with_seed(seed)
    base = tiny_base_folder(root, seed) if fast else base_model_folder(root)
    return prepare_task(TASKS_DIR / name / "task.yaml", base, root, settings)


def _text_task(spec: Any, base: Path, split: str, options: dict):
    """A text file (one example a line) as a perplexity task of one split."""
    from mergesmith.evaluate import Task

    file = base / str(spec)
    if not file.is_file():
        raise RecipeError(f"search.fitness.perplexity: no file {file}")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise RecipeError(f"search.fitness.perplexity: {file} has no text")
    task = Task(name=f"perplexity:{file.stem}", kind="perplexity", path=file, data={split: file},
                metric="perplexity", max_length=int(options.get("max_length", 128)))
    task._rows[split], task._label_ids[split] = [{"text": line} for line in lines], []
    return task


class TaskPart:
    """One evaluate/ task on one split: its score (− mean token loss for perplexity)."""

    wants_model, wants_tensors = True, False

    def __init__(self, task, split: str, seed: int, spec: dict):
        from mergesmith.evaluate.tasks import TaskError

        if split not in task.data:
            raise TaskError(f"{task.path}: task {task.name!r} has no {split} split, which a search "
                            "scores on", hint=f"add {split}: <file> to its data (it has "
                            f"{', '.join(task.data)})")
        self.task, self.split, self.seed = task, split, seed
        self.batch_size = int(spec.get("batch_size", 32))
        self.names = [task.name]
        self._subsets: dict[int, Any] = {}

    def subset(self, fidelity: float):
        """The task cut to the examples a fidelity scores (the whole task at 1)."""
        n = len(self.task.examples(self.split))
        k = n if fidelity >= 1 else max(1, math.ceil(fidelity * n))
        if k not in self._subsets:
            keep = sorted(subsample(n, k, self.seed, self.task.name))
            rows = self.task.examples(self.split)
            ids = self.task.label_ids(self.split)
            self._subsets[k] = dataclasses.replace(
                self.task, _rows={self.split: [rows[i] for i in keep]},
                _label_ids={self.split: [ids[i] for i in keep] if ids else []})
        return self._subsets[k]

    def __call__(self, model, tokenizer, tensors, fidelity: float, seed: int):
        from mergesmith.evaluate import evaluate_model

        task = self.subset(fidelity)
        module = model if isinstance(model, tuple) else (model, tokenizer)
        result = evaluate_model(module, task, self.split, batch_size=self.batch_size)
        if result.metric == "perplexity":  # − mean token loss, over tokens; per example as well
            tokens = result.tokens.double()
            loss = float((result.per_example.double() * tokens).sum() / tokens.sum())
            return [-loss], (-result.per_example).tolist()
        return [result.score], result.per_example.tolist()


def subsample(n: int, k: int, seed: int, name: str) -> list[int]:
    """The first k of a permutation of range(n) seeded by (seed, name): fixed for a task, and
    nested (a smaller k takes a prefix of a larger one's examples)."""
    generator = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return generator.permutation(n)[:k].tolist()


# --- lm-eval ----------------------------------------------------------------------------------


class LmEvalPart:
    """lm-eval-harness tasks (evaluate/lm_eval.py) on their validation split. A fidelity f < 1
    scores the first ⌈f·n⌉ documents (lm-eval's `limit`): fixed, not a random subsample."""

    wants_model, wants_tensors = True, False

    def __init__(self, tasks: Any, spec: dict, base: Path):
        self.tasks = tasks if isinstance(tasks, list) else [tasks]
        self.options = dict(spec.get("lm_eval_options") or {})
        if self.options.get("include_path"):
            self.options["include_path"] = base / str(self.options["include_path"])
        index = None
        for task in self.tasks:
            name = task.get("task") if isinstance(task, dict) else str(task)
            if not isinstance(task, dict) or "dataset_path" not in task:  # a registered task
                index = index or _lm_eval_index(self.options)
                task = {**_registered(index, name), **(task if isinstance(task, dict) else {})}
            _validation_only(name, task)
        self.names = [t["task"] if isinstance(t, dict) else str(t) for t in self.tasks]

    def __call__(self, model, tokenizer, tensors, fidelity: float, seed: int):
        from mergesmith.evaluate.lm_eval import run_lm_eval

        limit = None if fidelity >= 1 else fidelity
        results = run_lm_eval((model, tokenizer), self.tasks, limit=limit, seed=seed,
                              **self.options)
        missing = [name for name in self.names if name not in results]
        if missing:
            raise MergesmithError(f"lm-eval gave no result for {missing[0]!r}")
        scores, per_example = [], []
        for name in self.names:
            result = results[name]
            sign = 1.0 if result.higher_is_better else -1.0
            scores.append(sign * result.score)
            per_example += (sign * result.per_example.double()).tolist()
        return scores, per_example


def _lm_eval_index(options: dict) -> dict:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MergesmithError("lm-eval is not installed",
                              hint="pip install 'mergesmith[eval]' (or lm-eval)") from None
    include = options.get("include_path")
    return TaskManager(include_path=str(include) if include else None,
                       include_defaults=options.get("include_defaults", True)).task_index


def _registered(index: dict, name: str) -> dict:
    """A registered lm-eval task's own config (its includes resolved), to check its splits."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = index.get(name)
    if entry is None:
        raise RecipeError(f"search.fitness.lm_eval: no lm-eval task {name!r}",
                          hint="check the name, or set lm_eval_options.include_path")
    if entry.yaml_path is None or str(entry.kind).lower().endswith(("group", "tag")):
        raise RecipeError(f"search.fitness.lm_eval: {name!r} is an lm-eval group or tag, whose "
                          "splits a search cannot check", hint="list its tasks one by one")
    return load_yaml(entry.yaml_path, resolve_func=False)


def _validation_only(name: str, config: dict) -> None:
    """An lm-eval task scores its test split when its config names one: refused."""
    if config.get("test_split"):
        raise RecipeError(f"search.fitness.lm_eval: task {name!r} scores its test split "
                          f"{config['test_split']!r}", hint=f"give {{task: {name}, test_split: "
                          "null}: lm-eval then scores its validation_split")
    if not config.get("validation_split"):
        raise RecipeError(f"search.fitness.lm_eval: task {name!r} names no validation_split",
                          hint="give validation_split")


# --- a Python function ------------------------------------------------------------------------


class CallablePart:
    """A user's function of the merged state dict: fn(tensors, **what it asks for), where it may
    ask for model, tokenizer, fidelity and seed. Returns a float, a list of floats, or a
    FitnessResult."""

    OPTIONAL = ("model", "tokenizer", "fidelity", "seed")

    def __init__(self, target: Any, base: Path, names: list[str] | None = None):
        self.fn = target if callable(target) else _import(str(target), base)
        label = target if isinstance(target, str) else getattr(target, "__name__", "callable")
        try:
            accepts = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            accepts = {}
        keywords = any(p.kind is p.VAR_KEYWORD for p in accepts.values())
        self.asks = [k for k in self.OPTIONAL if k in accepts or keywords]
        self.wants_model = "model" in self.asks or "tokenizer" in self.asks
        self.wants_tensors = True
        self.names = [str(n) for n in names] if names else [str(label)]

    def __call__(self, model, tokenizer, tensors, fidelity: float, seed: int):
        given = {"model": model, "tokenizer": tokenizer, "fidelity": fidelity, "seed": seed}
        value = self.fn(tensors, **{k: given[k] for k in self.asks})
        if isinstance(value, FitnessResult):
            scores, examples = list(value.scores), value.per_example
        elif isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
            scores, examples = [float(v) for v in value], None
        else:
            scores, examples = [float(value)], None
        return scores, examples


def _import(target: str, base: Path) -> Callable:
    """'package.module:function' or 'file.py:function' (the file relative to `base`)."""
    where, _, name = target.rpartition(":")
    if not where or not name:
        raise RecipeError(f"search.fitness.callable: {target!r}",
                          hint="write module:function or file.py:function")
    try:
        if where.endswith(".py"):
            file = base / where
            spec = importlib.util.spec_from_file_location(f"mergesmith_fitness_{file.stem}", file)
            if spec is None or not file.is_file():
                raise RecipeError(f"search.fitness.callable: no file {file}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as exc:
        raise RecipeError(f"search.fitness.callable: cannot import {where!r}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RecipeError(f"search.fitness.callable: {where} has no function {name!r}")
    return fn
