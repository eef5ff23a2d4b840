"""Summaries of many models on many tasks: normalized scores with paired bootstrap intervals.

For each task one matrix of resampled example indices is drawn (seeded by the seed and the task
name) and applied to every model and to the task's expert, so a model's normalized score and the
difference between two models are measured on the same resamples.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mergesmith.errors import MergesmithError
from mergesmith.evaluate.metrics import (
    TaskResult,
    bootstrap_indices,
    forgetting,
    normalized_score,
    percentile_interval,
)


@dataclass
class Cell:
    """One model on one task."""

    model: str
    task: str
    metric: str
    score: float
    higher_is_better: bool
    normalized: float | None = None
    lo: float | None = None
    hi: float | None = None
    forgetting: float | None = None


@dataclass
class Average:
    """A model's mean normalized score over the tasks that have an expert."""

    model: str
    normalized: float | None
    lo: float | None
    hi: float | None
    tasks: int


@dataclass
class Comparison:
    model_a: str
    model_b: str
    difference: float  # average normalized score of a minus b
    lo: float
    hi: float

    @property
    def beyond_noise(self) -> bool:
        """The 95% interval of the difference excludes 0."""
        return self.lo > 0 or self.hi < 0


class Report:
    def __init__(self, cells: list[Cell], averages: dict[str, Average],
                 samples: dict[str, np.ndarray], experts: dict[str, str], base: str | None):
        self.cells = cells
        self.averages = averages
        self._samples = samples  # model -> [B] average normalized score on each resample
        self.experts = experts
        self.base = base

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(c.model for c in self.cells))

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(c.task for c in self.cells))

    def cell(self, model: str, task: str) -> Cell:
        for c in self.cells:
            if c.model == model and c.task == task:
                return c
        raise KeyError((model, task))

    def best(self) -> str:
        """The model with the highest average normalized score."""
        ranked = [a for a in self.averages.values() if a.normalized is not None]
        if not ranked:
            raise MergesmithError("no normalized scores to rank by", hint="name each task's expert")
        return max(ranked, key=lambda a: a.normalized).model

    def compare(self, model_a: str, model_b: str, level: float = 0.95) -> Comparison:
        """Paired-bootstrap interval of avg_normalized(a) − avg_normalized(b)."""
        for name in (model_a, model_b):
            if name not in self._samples:
                raise MergesmithError(f"no average normalized score for model {name!r}",
                                      hint="compare models evaluated on tasks with experts")
        diff = self._samples[model_a] - self._samples[model_b]
        lo, hi = percentile_interval(diff, level)
        point = self.averages[model_a].normalized - self.averages[model_b].normalized
        return Comparison(model_a, model_b, point, lo, hi)

    def to_dict(self) -> dict:
        return {"experts": self.experts, "base": self.base,
                "cells": [asdict(c) for c in self.cells],
                "averages": [asdict(a) for a in self.averages.values()]}

    def to_json(self, path: str | Path | None = None) -> dict:
        data = self.to_dict()
        if path is not None:
            Path(path).write_text(json.dumps(data, indent=2) + "\n")
        return data

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and one row per model: each task's score (normalized [interval]), the average."""
        header = ["model"] + [f"{t} ({self._metric(t)})" for t in self.tasks] + ["avg normalized [95% CI]"]
        if self.base is not None:
            header.append("avg forgetting")
        body = []
        for model in self.models:
            row = [model]
            for task in self.tasks:
                c = self.cell(model, task)
                text = _number(c.score)
                if c.normalized is not None:
                    text += f" ({_number(c.normalized)} [{_number(c.lo)}, {_number(c.hi)}])"
                row.append(text)
            avg = self.averages[model]
            row.append("-" if avg.normalized is None else
                       f"{_number(avg.normalized)} [{_number(avg.lo)}, {_number(avg.hi)}]")
            if self.base is not None:
                lost = [c.forgetting for c in self.cells if c.model == model and c.forgetting is not None]
                row.append(_number(sum(lost) / len(lost)) if lost else "-")
            body.append(row)
        return header, body

    def table(self, title: str = "evaluation"):
        from rich.table import Table

        header, body = self.rows()
        table = Table(title=title)
        for name in header:
            table.add_column(name, justify="left" if name == "model" else "right")
        for row in body:
            table.add_row(*row)
        return table

    def to_markdown(self) -> str:
        header, body = self.rows()
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        notes = ["", "Scores per task, with the normalized score (model / task expert; expert / model "
                 "for perplexity) and its 95% paired-bootstrap interval in brackets."]
        if self.experts:
            notes.append("Experts: " + ", ".join(f"{t} → {m}" for t, m in self.experts.items()) + ".")
        if self.base is not None:
            notes.append(f"Forgetting: base ({self.base}) score − model score, in the metric's units, "
                         "averaged over tasks (lower-is-better metrics: model − base).")
        return "\n".join(lines + notes) + "\n"

    def _metric(self, task: str) -> str:
        return next(c.metric for c in self.cells if c.task == task)


def summarize(results: dict[str, dict[str, TaskResult]], experts: dict[str, str] | None = None,
              base: str | None = None, seed: int = 0, n_bootstrap: int = 1000,
              level: float = 0.95) -> Report:
    """Normalized scores, forgetting and paired-bootstrap intervals for every model and task.

    results: model name -> task name -> result; experts: task name -> the name (a key of
    `results`) of that task's expert; base: the name of the base model, for forgetting.
    """
    experts = dict(experts or {})
    for task, expert in experts.items():
        if expert not in results:
            raise MergesmithError(f"the expert of task {task!r}, {expert!r}, has no results")
    if base is not None and base not in results:
        raise MergesmithError(f"the base model {base!r} has no results")
    tasks = list(dict.fromkeys(t for by_task in results.values() for t in by_task))
    indices = {}
    for task in tasks:
        sizes = {r[task].n for r in results.values() if task in r}
        if len(sizes) > 1:
            raise MergesmithError(f"task {task!r} was scored on different numbers of examples "
                                  f"({sorted(sizes)}); paired intervals need the same examples")
        indices[task] = bootstrap_indices(sizes.pop(), n_bootstrap, seed, task)

    expert_samples = {t: results[e][t].resampled(indices[t]) for t, e in experts.items()
                      if t in results[e]}
    cells, averages, samples = [], {}, {}
    for model, by_task in results.items():
        per_task = []
        for task, result in by_task.items():
            cell = Cell(model, task, result.metric, result.score, result.higher_is_better)
            if task in expert_samples:
                expert = results[experts[task]][task]
                resampled = normalized_score(result.resampled(indices[task]), expert_samples[task],
                                             result.higher_is_better)
                point = normalized_score(result.score, expert.score, result.higher_is_better)
                cell.normalized = _finite(point)
                if cell.normalized is not None:
                    cell.lo, cell.hi = percentile_interval(resampled, level)
                    per_task.append((cell.normalized, resampled))
            if base is not None and task in results[base]:
                cell.forgetting = forgetting(result.score, results[base][task].score, result.higher_is_better)
            cells.append(cell)
        if per_task:
            mean = float(np.mean([value for value, _ in per_task]))
            samples[model] = np.mean([resampled for _, resampled in per_task], axis=0)
            averages[model] = Average(model, mean, *percentile_interval(samples[model], level), len(per_task))
        else:
            averages[model] = Average(model, None, None, None, 0)
    return Report(cells, averages, samples, experts, base)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
