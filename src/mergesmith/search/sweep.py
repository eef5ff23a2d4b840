"""Grid sweeps: merge at every grid point, pick the best on validation, report it on test.

A grid value replaces the recipe's global `parameters` entry of that name (per-model settings
still win over it, as in any recipe). Every point is cached by its recipe's fingerprint, so a
rerun, or a finer grid that shares points, merges and scores only what is new.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mergesmith.errors import MergesmithError
from mergesmith.evaluate import Report, Task, load_task, plot_sweep
from mergesmith.methods import get_method
from mergesmith.recipe import Recipe, load_recipe
from mergesmith.search.scoring import Scorer

GRID_HINT = "write NAME=START:STOP:STEP (STOP included) or NAME=V1,V2,..."


def parse_grid(text: str) -> tuple[str, list]:
    """'lambda=0.3:1.5:0.2' -> ('lambda', [0.3, 0.5, ..., 1.5]); 'density=0.2,0.5' -> a list."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise MergesmithError(f"--grid {text!r}: expected NAME=VALUES", hint=GRID_HINT)
    if ":" in values:
        parts = [_value(v, text) for v in values.split(":")]
        if len(parts) != 3 or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts):
            raise MergesmithError(f"--grid {text!r}: a range is START:STOP:STEP, three numbers",
                                  hint=GRID_HINT)
        start, stop, step = parts
        if step <= 0 or stop < start:
            raise MergesmithError(f"--grid {text!r}: needs STEP > 0 and STOP >= START", hint=GRID_HINT)
        count = math.floor((stop - start) / step + 1e-9) + 1
        return name, [round(start + i * step, 10) for i in range(count)]
    return name, [_value(v, text) for v in values.split(",")]


def _value(text: str, whole: str) -> Any:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        number = float(text)
    except ValueError:
        raise MergesmithError(f"--grid {whole!r}: {text!r} is not a number", hint=GRID_HINT) from None
    return int(number) if number.is_integer() and "." not in text else number


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower()


def with_parameters(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """The recipe with its global `parameters` entries set to `values`."""
    data = recipe.model_dump(mode="json", exclude_none=True)
    data.setdefault("parameters", {}).update(values)
    return load_recipe(data)


@dataclass
class SweepPoint:
    values: dict[str, Any]
    key: str
    score: float  # average normalized score on validation (or the one task's score, without experts)
    lo: float | None = None
    hi: float | None = None

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_text(v)}" for k, v in self.values.items())


@dataclass
class SweepResult:
    grid: dict[str, list]
    points: list[SweepPoint]
    best: SweepPoint
    best_recipe: Recipe
    validation: Report
    test: Report
    out: Path
    merged: int  # merges run (the rest were reused from the cache)
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        folder = self.out / "merges" / self.best.key
        return {"grid": self.grid,
                "best": {"values": self.best.values, "key": self.best.key,
                         "recipe": str(self.files.get("recipe")),
                         "folder": str(folder) if folder.is_dir() else None},
                "points": [{"values": p.values, "key": p.key, "score": p.score, "lo": p.lo, "hi": p.hi}
                           for p in self.points],
                "merged": self.merged, "validation": self.validation.to_dict(),
                "test": self.test.to_dict()}

    def to_markdown(self) -> str:
        criterion = "avg normalized [95% CI]" if self.validation.experts else "score"
        header = [*self.grid, criterion]
        lines = ["## Sweep (validation split)", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        for p in self.points:
            interval = f" [{p.lo:.3f}, {p.hi:.3f}]" if p.lo is not None else ""
            cells = [_text(v) for v in p.values.values()] + [f"{p.score:.3f}{interval}"]
            if p is self.best:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Best: {self.best.label}. On the test split:", "", self.test.to_markdown()]
        return "\n".join(lines)


def sweep(recipe: Recipe | str | Path, grid: dict[str, list], tasks: list[Task | str | Path],
          out: str | Path, *, experts: dict[str, str] | None = None, base: str | None = None,
          in_memory: bool = False, device: str = "cpu", batch_size: int = 32,
          max_examples: int | None = None, seed: int | None = None, n_bootstrap: int = 1000,
          progress: Callable[[str], None] | None = None) -> SweepResult:
    """Merge and score every grid point on validation; the best is scored on test.

    Writes `best.yaml` (the best point's recipe), `sweep.json`, `sweep.md` and `sweep.png` into
    `out`, beside the cached merges (`out/merges/<key>`, the best one's named in sweep.json).
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    tasks = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    _check_grid(recipe, grid)
    for task in tasks:
        for split in ("validation", "test"):
            task.examples(split)  # both splits must exist before anything is merged
    out = Path(out)
    scorer = Scorer(tasks, out, experts=experts, base=base, in_memory=in_memory, device=device,
                    batch_size=batch_size, max_examples=max_examples, seed=seed, n_bootstrap=n_bootstrap)
    names = list(grid)
    combos = list(dict.fromkeys(tuple(c) for c in itertools.product(*grid.values())))
    points, recipes, scores = [], {}, {}
    for i, combo in enumerate(combos, start=1):
        values = dict(zip(names, combo))
        point = SweepPoint(values, "", math.nan)
        recipes[point.label] = with_parameters(recipe, values)
        point.key = scorer.key(recipes[point.label])
        if progress:
            progress(f"[{i}/{len(combos)}] {point.label}")
        scores[point.label] = scorer.score_recipe(recipes[point.label], "validation")
        points.append(point)
    validation = scorer.report(scores, "validation")
    for point in points:
        average = validation.averages[point.label]
        if scorer.experts:
            point.score = average.normalized
        else:
            point.score = validation.cell(point.label, tasks[0].name).score
        point.lo, point.hi = average.lo, average.hi
    best = max(points, key=lambda p: scorer.objective(validation, p.label))
    if progress:
        progress(f"best on validation: {best.label}; scoring it on test")
    test = scorer.report({best.label: scorer.score_recipe(recipes[best.label], "test")}, "test")
    result = SweepResult(grid, points, best, recipes[best.label], validation, test, out, scorer.merged)
    _write(result, scorer, tasks)
    return result


def _check_grid(recipe: Recipe, grid: dict[str, list]) -> None:
    method = get_method(recipe.merge_method)
    if not grid:
        raise MergesmithError("nothing to sweep", hint="give at least one --grid NAME=VALUES")
    for name, values in grid.items():
        param = method.param(name)
        if param is None:
            known = ", ".join(p.name for p in method.params) or "none"
            raise MergesmithError(f"--grid {name}: method {method.name!r} has no parameter {name!r}",
                                  hint=f"its parameters: {known}")
        for value in values:
            try:
                param.check(value)
            except ValueError as exc:
                raise MergesmithError(f"--grid {name}: value {value!r} {exc}") from None


def _write(result: SweepResult, scorer: Scorer, tasks: list[Task]) -> None:
    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    result.files["recipe"] = out / "best.yaml"
    result.files["recipe"].write_text(result.best_recipe.to_yaml())
    result.files["json"] = out / "sweep.json"
    result.files["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    result.files["markdown"] = out / "sweep.md"
    result.files["markdown"].write_text(result.to_markdown())
    x, rest = next(iter(result.grid)), list(result.grid)[1:]
    lines: dict[str, list] = {}
    for p in result.points:
        label = ", ".join(f"{k}={_text(p.values[k])}" for k in rest)
        lines.setdefault(label, []).append((p.values[x], p.score, p.lo, p.hi))
    ylabel = ("average normalized score" if scorer.experts
              else f"{tasks[0].name} {tasks[0].metric}") + " (validation)"
    result.files["plot"] = plot_sweep(lines, out / "sweep.png", xlabel=x, ylabel=ylabel,
                                      title=f"sweep of {', '.join(result.grid)}")
