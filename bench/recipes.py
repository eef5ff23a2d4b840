"""Merge recipes (mergekit YAML; mergesmith reads the same files as-is).

To add a method, write a builder ``f(models) -> dict`` and register it in
METHODS.  ``models`` maps "base", "expert1", ... to checkpoint directories.
The set of models a recipe reads is derived from the recipe itself
(``recipe_models``), so the I/O floor follows automatically.
"""

from __future__ import annotations

from pathlib import Path

import yaml

WEIGHTS = (0.5, 0.3, 0.2)


def _experts(models, weights=WEIGHTS, **extra):
    return [
        {"model": str(models[f"expert{i}"]), "parameters": {"weight": w, **extra}}
        for i, w in enumerate(weights, 1)
    ]


def linear(models):
    return {
        "merge_method": "linear",
        "models": _experts(models),
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }


def task_arithmetic(models):
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": _experts(models),
        "dtype": "bfloat16",
    }


def slerp(models):
    return {
        "merge_method": "slerp",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["base"])}, {"model": str(models["expert1"])}],
        "parameters": {"t": 0.4},
        "dtype": "bfloat16",
    }


def _sparse(method, **per_model):
    """A task-vector method in a typical mergekit recipe: base + 3 experts, density 0.5."""

    def recipe(models):
        return {
            "merge_method": method,
            "base_model": str(models["base"]),
            "models": _experts(models, density=0.5, **per_model),
            "dtype": "bfloat16",
        }

    recipe.__name__ = method
    return recipe


ties = _sparse("ties")
dare_ties = _sparse("dare_ties")
breadcrumbs = _sparse("breadcrumbs", gamma=0.01)
della = _sparse("della", epsilon=0.1)


def model_stock(models):
    return {
        "merge_method": "model_stock",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[f"expert{i}"])} for i in (1, 2, 3)],
        "dtype": "bfloat16",
    }


def nuslerp(models):
    return {
        "merge_method": "nuslerp",
        "base_model": str(models["base"]),
        "models": _experts(models, weights=(0.6, 0.4)),
        "dtype": "bfloat16",
    }


def sce(models):
    return {
        "merge_method": "sce",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[f"expert{i}"])} for i in (1, 2, 3)],
        "parameters": {"select_topk": 0.5},
        "dtype": "bfloat16",
    }


def _subspace(method):
    def build(models):
        return {
            "merge_method": method,
            "base_model": str(models["base"]),
            "models": _experts(models),
            "dtype": "bfloat16",
        }
    return build


METHODS = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "slerp": slerp,
    "ties": ties,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
    "della": della,
    "model_stock": model_stock,
    "nuslerp": nuslerp,
    "sce": sce,
    "tsv_m": _subspace("tsv_m"),
    "iso_c": _subspace("iso_c"),
    "iso_cts": _subspace("iso_cts"),
}


def recipe_models(recipe: dict) -> list[Path]:
    """Distinct model directories a recipe reads, in first-seen order."""
    seen = []
    for p in [recipe.get("base_model")] + [m["model"] for m in recipe.get("models", [])]:
        if p and Path(p) not in seen:
            seen.append(Path(p))
    return seen


def write_recipe(method: str, models, path: Path) -> dict:
    recipe = METHODS[method](models)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return recipe
