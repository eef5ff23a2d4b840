"""Model soups (Wortsman et al. 2022, Model soups, arXiv:2203.05482): uniform and greedy.

A soup is the plain average of fine-tuned models' weights (the `linear` method with equal
weights). The greedy soup ranks the ingredients by their own validation score and adds each, best
first, only when the soup's validation score does not drop (the paper's Recipe 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mergesmith.errors import MergesmithError
from mergesmith.evaluate import Report, Task, load_task
from mergesmith.recipe import Recipe, load_recipe
from mergesmith.search.scoring import Scorer


def soup_recipe(models: list[str], dtype: str | None = None) -> Recipe:
    """The uniform soup of `models`: θ = (1/n) Σ θi."""
    recipe = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                                                  for m in models]}
    if dtype:
        recipe["dtype"] = dtype
    return load_recipe(recipe)


@dataclass
class SoupResult:
    ingredients: list[tuple[str, float]]  # (model, its own validation score), best first
    kept: list[str]
    score: float  # the soup's validation score, as ranked (average normalized, or the task's score)
    recipe: Recipe
    folder: Path
    validation: Report
    test: Report
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"ingredients": [{"model": m, "score": s, "kept": m in self.kept}
                                for m, s in self.ingredients],
                "kept": self.kept, "score": self.score, "folder": str(self.folder),
                "recipe": json.loads(self.recipe.model_dump_json(exclude_none=True)),
                "validation": self.validation.to_dict(), "test": self.test.to_dict()}

    def to_markdown(self) -> str:
        lines = ["## Soup ingredients (validation split)", "", "| model | score | in the soup |",
                 "|---|---|---|"]
        lines += [f"| {m} | {s:.3f} | {'yes' if m in self.kept else 'no'} |" for m, s in self.ingredients]
        lines += ["", f"Soup of {len(self.kept)} model(s), validation score {self.score:.3f}; "
                  f"written to `{self.folder}`. On the test split:", "", self.test.to_markdown()]
        return "\n".join(lines)


def soup(models: list[str], tasks: list[Task | str | Path], out: str | Path, *, greedy: bool = True,
         experts: dict[str, str] | None = None, base: str | None = None, in_memory: bool = False,
         device: str = "cpu", batch_size: int = 32, max_examples: int | None = None,
         n_bootstrap: int = 1000, progress: Callable[[str], None] | None = None) -> SoupResult:
    """A greedy (default) or uniform soup of `models`, scored on validation and reported on test.

    The soup's folder is written under `out/merges/`; `soup.json` and `soup.md` beside it.
    """
    if len(models) < 2:
        raise MergesmithError("a soup needs at least two models")
    tasks = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    scorer = Scorer(tasks, out, experts=experts, base=base, in_memory=in_memory, device=device,
                    batch_size=batch_size, max_examples=max_examples, n_bootstrap=n_bootstrap)
    models = [str(m) for m in models]
    alone = scorer.report({m: scorer.score_folder(m, "validation") for m in models}, "validation")
    ranked = sorted(models, key=lambda m: scorer.objective(alone, m), reverse=True)
    ingredients = [(m, scorer.objective(alone, m)) for m in ranked]
    if greedy:
        kept, best = greedy_selection(ranked, lambda candidate: _soup_value(scorer, candidate), progress)
    else:
        kept = ranked
        best = _soup_value(scorer, kept)
    recipe = soup_recipe(kept)
    scored = {"soup": scorer.score_recipe(recipe, "validation"),
              **{m: scorer.score_folder(m, "validation") for m in models}}
    validation = scorer.report(scored, "validation")
    test = scorer.report({"soup": scorer.score_recipe(recipe, "test"),
                          **{m: scorer.score_folder(m, "test") for m in models}}, "test")
    result = SoupResult(ingredients, kept, best, recipe, scorer.merge_folder(recipe), validation, test)
    _write(result, Path(out))
    return result


def greedy_selection(ranked: list[str], value: Callable[[list[str]], float],
                     progress: Callable[[str], None] | None = None) -> tuple[list[str], float]:
    """Wortsman et al.'s greedy soup: start from the best ingredient; add each next one when the
    soup's value with it is at least the value without it. Returns (kept, value of the soup)."""
    kept, best = ranked[:1], value(ranked[:1])
    for model in ranked[1:]:
        candidate = value(kept + [model])
        if progress:
            progress(f"{'keep' if candidate >= best else 'skip'} {model}: {candidate:.4f} vs {best:.4f}")
        if candidate >= best:
            kept, best = kept + [model], candidate
    return kept, best


def _soup_value(scorer: Scorer, models: list[str]) -> float:
    if len(models) == 1:  # a soup of one is the model itself
        results = scorer.score_folder(models[0], "validation")
    else:
        results = scorer.score_recipe(soup_recipe(models), "validation")
    return scorer.objective(scorer.report({"soup": results}, "validation"), "soup")


def _write(result: SoupResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.files["json"] = out / "soup.json"
    result.files["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    result.files["markdown"] = out / "soup.md"
    result.files["markdown"].write_text(result.to_markdown())
    result.files["recipe"] = out / "soup.yaml"
    result.files["recipe"].write_text(result.recipe.to_yaml())
