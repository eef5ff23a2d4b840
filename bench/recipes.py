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
SPARSE = ("ties", "dare_ties", "breadcrumbs", "della")  # their density is a variant's (`build`)


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


def arcee_fusion(models):
    return {
        "merge_method": "arcee_fusion",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["expert1"])}],
        "dtype": "bfloat16",
    }


def _variant_of(build, name, **fields):
    """`build`'s recipe with top-level `fields` (`compat: mergekit`) or, under `parameters`,
    the rest (`rescale: true`: mergekit's L1 rescale)."""

    top = {key: fields.pop(key) for key in ("compat",) if key in fields}

    def recipe(models):
        out = dict(build(models), **top)
        if fields:
            out.setdefault("parameters", {}).update(fields)
        return out

    recipe.__name__ = name
    return recipe


def _subspace(method):
    def build(models):
        return {
            "merge_method": method,
            "base_model": str(models["base"]),
            "models": _experts(models),
            "dtype": "bfloat16",
        }
    return build


def _weighted(method, base=True, **params):
    """A method of weighted experts (base + 3, or the 3 experts alone) with its parameters."""

    def build(models):
        recipe = {"merge_method": method, "models": _experts(models), "dtype": "bfloat16"}
        if base:
            recipe["base_model"] = str(models["base"])
        if params:
            recipe["parameters"] = dict(params)
        return recipe

    build.__name__ = method
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
    "arcee_fusion": arcee_fusion,
    # mergekit's exact-count cuts (whole tensors) and its L1 rescale (streamed, a third pass)
    "ties_compat": _variant_of(ties, "ties_compat", compat="mergekit"),
    "breadcrumbs_compat": _variant_of(breadcrumbs, "breadcrumbs_compat", compat="mergekit"),
    "ties_l1": _variant_of(ties, "ties_l1", rescale=True),
    "tsv_m": _subspace("tsv_m"),
    "iso_c": _subspace("iso_c"),
    "iso_cts": _subspace("iso_cts"),
    "pcb": _weighted("pcb", density=0.5),
    "widen": _weighted("widen"),
    "stitch": _weighted("stitch", density=0.05),
    "multislerp": _weighted("multislerp"),
    "karcher": _weighted("karcher", base=False),
}


# Variants of a recipe, named "<method>[-<dtype>][-d<density>]" (e.g. ties-fp32-d0.2): the
# recipe's `dtype` (what the merge computes in; published recipes say bfloat16 or float32) and,
# for the methods with one, each model's density. The plain name is the recipe above.
DTYPES = {"bfloat16": "", "float32": "fp32", "float16": "fp16"}
DEFAULT_DTYPE = "bfloat16"


def variant(method: str, dtype: str = DEFAULT_DTYPE, density: float | None = None) -> str:
    name = method + (f"-{DTYPES[dtype]}" if DTYPES[dtype] else "")
    return name + (f"-d{density:g}" if density is not None else "")


def parse_variant(name: str) -> tuple[str, str, float | None]:
    """(method, dtype, density or None) of a variant name."""
    method, *parts = name.split("-")
    dtype, density = DEFAULT_DTYPE, None
    for part in parts:
        if part.startswith("d") and part[1:].replace(".", "", 1).isdigit():
            density = float(part[1:])
        elif part in DTYPES.values():
            dtype = next(d for d, short in DTYPES.items() if short == part)
        else:
            raise ValueError(f"bad recipe variant {name!r}: {part!r} is no dtype or density")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    return method, dtype, density


def has_density(method: str) -> bool:
    return method in SPARSE


def build(name: str, models) -> dict:
    method, dtype, density = parse_variant(name)
    recipe = METHODS[method](models)
    recipe["dtype"] = dtype
    if density is not None:
        for entry in recipe["models"]:
            entry.setdefault("parameters", {})["density"] = density
    return recipe


def recipe_models(recipe: dict) -> list[Path]:
    """Distinct model directories a recipe reads, in first-seen order."""
    seen = []
    for p in [recipe.get("base_model")] + [m["model"] for m in recipe.get("models", [])]:
        if p and Path(p) not in seen:
            seen.append(Path(p))
    return seen


def write_recipe(name: str, models, path: Path) -> dict:
    """The recipe of a method or variant (`variant`), written to `path`."""
    recipe = build(name, models)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return recipe
