"""Forgetting by task-vector negation (Ilharco et al., "Editing Models with Task Arithmetic",
arXiv 2212.04089, the negation part): θ = θ_target − λ·τ_f with τ_f = θ_forget − θ0, where
θ_forget is θ0 fine-tuned on the behaviour to remove and θ_target is θ0 or any model on the same
base. The merge is the task_arithmetic recipe base θ0, models [θ_target: 1, θ_forget: −λ].

λ is chosen as in the paper: the largest λ of the grid whose model keeps every control task at
or above `floor` times θ_target's own score (the paper: 95% of the original's control accuracy;
its λ grid is unconfirmed, ours is the user's). Scores are compared as evaluate's normalized
scores (model / original, or original / model for perplexity), so a floor means the same for
every metric. The forgetting report puts, for every λ, what the forgotten tasks lose beside what
the control tasks keep; the chosen λ is scored again on the report split.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mergesmith.errors import MergesmithError
from mergesmith.io.output import refuse_overlap
from mergesmith.evaluate import Task, evaluate_models, load_task, normalized_score
from mergesmith.recipe import Recipe, load_recipe


def negation_recipe(base: str, forget: str, lam: float, target: str | None = None,
                    dtype: str = "float32") -> Recipe:
    """θ_target − λ(θ_forget − θ0) as a task_arithmetic recipe (θ_target = θ0 when not given)."""
    models = [{"model": str(forget), "parameters": {"weight": -float(lam)}}]
    if target is not None and str(target) != str(base):
        models.insert(0, {"model": str(target), "parameters": {"weight": 1.0}})
    return load_recipe({"merge_method": "task_arithmetic", "base_model": str(base), "dtype": dtype,
                        "models": models})


@dataclass
class NegationPoint:
    lam: float
    scores: dict[str, float]  # task -> score on the selection split
    shares: dict[str, float]  # task -> normalized by the original's (λ = 0) score

    def keeps(self, controls: list[str], floor: float) -> bool:
        return all(self.shares[t] >= floor for t in controls)


def choose_lambda(points: list[NegationPoint], controls: list[str], floor: float) -> NegationPoint:
    """The point of largest λ whose every control task keeps `floor` of the original's score
    (λ = 0 keeps everything, so there always is one)."""
    return max((p for p in points if p.keeps(controls, floor) or p.lam == 0), key=lambda p: p.lam)


@dataclass
class NegationResult:
    forget: list[str]
    controls: list[str]
    floor: float
    points: list[NegationPoint]
    chosen: NegationPoint
    report: dict[str, dict[str, float]]  # "original" / "negated" -> task -> score (report split)
    splits: tuple[str, str]
    recipe: Recipe
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"forget_tasks": self.forget, "control_tasks": self.controls, "floor": self.floor,
                "select_split": self.splits[0], "report_split": self.splits[1],
                "lambda": self.chosen.lam,
                "points": [{"lambda": p.lam, "scores": p.scores, "normalized": p.shares,
                            "keeps_controls": p.keeps(self.controls, self.floor)} for p in self.points],
                "report": self.report}

    def to_markdown(self) -> str:
        tasks = self.forget + self.controls
        head = ["λ", *(f"{t} ({self._role(t)})" for t in tasks), "controls kept"]
        lines = [f"## Negation sweep ({self.splits[0]} split; share of λ = 0's score, floor {self.floor:g})",
                 "",
                 "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for p in self.points:
            cells = [f"{p.lam:g}"] + [f"{p.scores[t]:.4g} ({p.shares[t]:.0%})" for t in tasks] + \
                    ["yes" if p.keeps(self.controls, self.floor) else "no"]
            if p is self.chosen:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Chosen λ = {self.chosen.lam:g}: the largest that keeps every control task at "
                      f"{self.floor:.0%} of the original's score or more. On the {self.splits[1]} split:", "",
                  "| task | role | original | negated | share of the original |", "|---|---|---|---|---|"]
        for t in tasks:
            before, after = self.report["original"][t], self.report["negated"][t]
            lines.append(f"| {t} | {self._role(t)} | {before:.4g} | {after:.4g} | "
                         f"{self.report['normalized'][t]:.0%} |")
        return "\n".join(lines) + "\n"

    def _role(self, task: str) -> str:
        return "forget" if task in self.forget else "control"


def negate(forget: str, *, base: str, target: str | None = None, forget_tasks: list, control_tasks: list,
           lambdas: list[float], out: str | Path, floor: float = 0.95, select_split: str = "validation",
           report_split: str = "test", in_memory: bool = True, device: str = "cpu", batch_size: int = 32,
           max_examples: int | None = None, write_model: bool = True,
           progress: Callable[[str], None] | None = None) -> NegationResult:
    """Sweep λ, choose it by the control floor, write the report (negation.json, negation.md),
    the chosen recipe (negated.yaml) and, with `write_model`, the negated model (OUT/model)."""
    forget_list = [t if isinstance(t, Task) else load_task(t) for t in forget_tasks]
    control_list = [t if isinstance(t, Task) else load_task(t) for t in control_tasks]
    _check(forget_list, control_list, lambdas, floor, select_split, report_split)
    # the report and the model go into OUT: never into, over or around a model read (BASE+ADAPTER: both)
    refuse_overlap(Path(out), [part for ref in (base, forget, target) if ref for part in str(ref).split("+")
                               if Path(part).expanduser().exists()], what="the negation")
    tasks = forget_list + control_list
    grid = sorted({0.0, *map(float, lambdas)})
    score = _scorer(tasks, base, forget, target, Path(out), device, batch_size, max_examples, in_memory)
    points = []
    for i, lam in enumerate(grid, start=1):
        if progress:
            progress(f"[{i}/{len(grid)}] λ = {lam:g}")
        scores = score(lam, select_split)
        original = points[0].scores if points else scores
        points.append(NegationPoint(lam, scores, {t.name: _share(t, scores, original) for t in tasks}))
    chosen = choose_lambda(points, [t.name for t in control_list], floor)
    recipe = negation_recipe(base, forget, chosen.lam, target)
    before, after = score(0.0, report_split), score(chosen.lam, report_split)
    report = {"original": before, "negated": after,
              "normalized": {t.name: _share(t, after, before) for t in tasks}}
    result = NegationResult([t.name for t in forget_list], [t.name for t in control_list], floor, points,
                            chosen, report, (select_split, report_split), recipe)
    _write(result, Path(out), write_model, device)
    return result


def _share(task: Task, scores: dict[str, float], original: dict[str, float]) -> float:
    return float(normalized_score(scores[task.name], original[task.name], task.higher_is_better))


def _scorer(tasks, base, forget, target, out: Path, device, batch_size, max_examples, in_memory):
    """(λ, split) -> task -> score. In memory the inputs are read once and each λ is merged into
    one model; otherwise each λ is merged once into OUT/merges/lambda-λ."""
    from mergesmith.pipeline import merge
    from mergesmith.search.candidates import CandidateMerger

    merger = CandidateMerger(negation_recipe(base, forget, 1.0, target), device) if in_memory else None

    def score(lam: float, split: str) -> dict[str, float]:
        recipe = negation_recipe(base, forget, lam, target)
        if merger is not None:
            model = merger.merge(recipe)
        else:
            model = out / "merges" / f"lambda-{lam:g}"
            if not (model / "config.json").is_file():
                merge(recipe, model, device=device, overwrite=model.exists())
        results = evaluate_models({"m": model}, tasks, split, batch_size=batch_size, device=device,
                                  max_examples=max_examples)["m"]
        return {name: float(r.score) for name, r in results.items()}

    return score


def _check(forget, controls, lambdas, floor, select_split, report_split) -> None:
    if not forget:
        raise MergesmithError("negate: no task to forget", hint="give --forget-task TASK")
    if not controls:
        raise MergesmithError("negate: no control task", hint="give --control-task TASK: what the "
                              "negated model must keep (λ is chosen by it)")
    names = [t.name for t in forget + controls]
    if len(set(names)) != len(names):
        raise MergesmithError(f"negate: task {sorted(n for n in names if names.count(n) > 1)[0]!r} "
                              "is given twice", hint="each task is either forgotten or a control")
    if not lambdas or any(not math.isfinite(x) or x < 0 for x in lambdas):
        raise MergesmithError(f"negate: λ values must be finite and >= 0, got {lambdas}",
                              hint="e.g. --lambdas 0:1:0.1")
    if not 0 < floor <= 1:
        raise MergesmithError(f"negate: floor {floor} is out of range",
                              hint="a share of the original's control score in (0, 1]; the paper uses 0.95")
    for task in forget + controls:
        task.examples(select_split), task.examples(report_split)  # both splits, before any merge


def _write(result: NegationResult, out: Path, write_model: bool, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.files["recipe"] = out / "negated.yaml"
    result.files["recipe"].write_text(result.recipe.to_yaml())
    result.files["json"] = out / "negation.json"
    result.files["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    result.files["markdown"] = out / "negation.md"
    result.files["markdown"].write_text(result.to_markdown())
    if write_model:
        from mergesmith.pipeline import merge

        result.files["model"] = merge(result.recipe, out / "model", device=device,
                                      overwrite=(out / "model").exists())
