"""mergekit-evolve's genome configs, decoded as mergekit 0.1.5 decodes them (mergekit/evo/genome.py).

The genotype is a (G, N, F+1, P) array, flattened in that order: G layer groups (layers /
layer_granularity, one group for 0), N models, F filters plus a catch-all, P parameters per
method (linear, task_arithmetic: weight; ties, dare_ties: weight, density; slerp: t). Decode:
density = clamp(|x|, 0, 1); weight and t = |x| unless allow_negative_weights, so x and −x give
the same recipe (the search space is mirrored). mergekit's genes are unbounded; here they live in
[−2, 2], which holds its start (weight 1/N, density 1) and its step (σ0 = 1/6) well inside.
SLERP takes, per layer group, the two largest raw weight genes a ≥ b: the base is a's model and
t = e^b / (e^a + e^b) ≤ 0.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from mergesmith.errors import RecipeError
from mergesmith.methods import get_method
from mergesmith.recipe import Recipe
from mergesmith.recipe.loader import _collect_lines
from mergesmith.search.space import (Dimension, SearchProblem, SearchSpace, _Strict, load_search,
                                     model_layers, validate_section)

METHOD_PARAMS = {"linear": ["weight"], "task_arithmetic": ["weight"], "ties": ["weight", "density"],
                 "dare_ties": ["weight", "density"], "slerp": ["t"]}
GENE_BOUND = 2.0
SIGMA0 = 1 / 6  # mergekit-evolve's step, in gene units


class GenomeSpec(_Strict):
    """`search.genome`: mergekit-evolve's genome settings (its models, method and base are the
    recipe's)."""

    layer_granularity: StrictInt = Field(default=0, ge=0)
    normalize: Optional[StrictBool] = None
    allow_negative_weights: StrictBool = False
    filters: Optional[list[StrictStr]] = None
    smooth: StrictBool = False
    random_init: StrictBool = False


class GenomeSpace(SearchSpace):
    def __init__(self, recipe: Recipe, raw: dict, seed: int = 0):
        at = ("search", "genome")
        self.base, self.seed = recipe, seed
        self.spec = spec = validate_section(GenomeSpec, raw, recipe, at)
        method = recipe.merge_method
        if method not in METHOD_PARAMS:
            raise RecipeError(f"{recipe.where('merge_method')}: a genome search takes "
                              f"{', '.join(METHOD_PARAMS)}, not {method!r}")
        if not recipe.models:
            raise RecipeError(f"{recipe.where()}: a genome search needs the models: form")
        if get_method(method).needs_base and not recipe.base_model:
            raise RecipeError(f"{recipe.where('merge_method')}: {method} needs a base_model")
        if method == "slerp" and (spec.smooth or spec.filters):
            raise RecipeError(f"{recipe.where(*at)}: slerp takes neither smooth nor filters "
                              "(as in mergekit-evolve)")
        self.models = [m.model for m in recipe.models]
        first = self.models[0]
        self.layers = model_layers(recipe, [first])[first]
        g = spec.layer_granularity
        if g and self.layers % g:
            raise RecipeError(f"{recipe.where(*at, 'layer_granularity')}: layer_granularity {g} "
                              f"does not divide the {self.layers} layers of {first}",
                              hint=f"use a divisor of {self.layers}, or 0 for one group")
        self.step = g or self.layers
        self.params = METHOD_PARAMS[method]
        self.sets = [*(spec.filters or []), None]
        self.shape = (self.layers // self.step, len(self.models), len(self.sets), len(self.params))
        # every bit of the genes, as mergekit decodes them
        self.dimensions = [Dimension(self._name(*index), -GENE_BOUND, GENE_BOUND, digits=None)
                           for index in np.ndindex(self.shape)]

    def _name(self, group: int, model: int, filt: int, param: int) -> str:
        tag = "" if len(self.sets) == 1 else "{" + (self.sets[filt] or "*") + "}"
        start = group * self.step
        return f"{self.params[param]}[{self.models[model]}]{tag}@layers.{start}-{start + self.step - 1}"

    def genotype(self, values: dict[str, Any]) -> np.ndarray:
        return np.array([values[d.name] for d in self.dimensions], dtype=float).reshape(self.shape)

    def given(self) -> dict[str, Any]:
        """mergekit's x0: weight 1/N, the other genes 1; with random_init U[0, 1) (seeded)."""
        if self.spec.random_init:
            genes = np.random.default_rng(self.seed).random(self.shape)
        else:
            genes = np.ones(self.shape)
            genes[..., 0] = 1 / len(self.models)
        return {d.name: v for d, v in zip(self.dimensions, genes.reshape(-1))}

    def build(self, values: dict[str, Any]) -> dict:
        genes = self.genotype(values)
        recipe = self.base
        data = {"merge_method": recipe.merge_method}
        if recipe.merge_method == "slerp":
            data["slices"] = self._slerp_slices(genes)
        else:
            arrays = {}
            for p, name in enumerate(self.params):
                v = genes[..., p]
                if name == "density":
                    v = np.clip(np.abs(v), 0, 1)
                elif not self.spec.allow_negative_weights:
                    v = np.abs(v)
                arrays[name] = v
            if self.spec.smooth:
                data["models"] = self._smooth_models(arrays)
            else:
                data["slices"] = self._slices(arrays)
        normalize = self.spec.normalize
        if normalize is None:
            normalize = recipe.merge_method in ("ties", "dare_ties", "linear")
        own = {p.name for p in get_method(recipe.merge_method).params}
        # what mergekit writes, less what the method does not take (mergekit ignores it too)
        data["parameters"] = {k: v for k, v in {"normalize": normalize, "int8_mask": True}.items() if k in own}
        if not data["parameters"]:
            del data["parameters"]
        data["dtype"] = "bfloat16"
        for key in ("base_model", "tokenizer_source"):
            if getattr(recipe, key):
                data[key] = getattr(recipe, key)
        return data

    def _extra_base(self) -> str | None:
        base = self.base.base_model
        return base if base and base not in self.models else None

    def _params(self, arrays: dict, index) -> dict:
        if len(self.sets) == 1:
            return {name: _plain(v[index][0]) for name, v in arrays.items()}
        return {name: [{"filter": f, "value": _plain(x)} for f, x in zip(self.sets, v[index])]
                for name, v in arrays.items()}

    def _slices(self, arrays: dict) -> list[dict]:
        slices = []
        for g in range(self.shape[0]):
            layers = [g * self.step, (g + 1) * self.step]
            sources = [{"model": m, "layer_range": layers, "parameters": self._params(arrays, (g, i))}
                       for i, m in enumerate(self.models)]
            if self._extra_base():
                sources.append({"model": self._extra_base(), "layer_range": layers})
            slices.append({"sources": sources})
        return slices

    def _smooth_models(self, arrays: dict) -> list[dict]:
        models = []
        for i, m in enumerate(self.models):
            if len(self.sets) == 1:
                params = {name: _unpack(v[:, i, 0]) for name, v in arrays.items()}
            else:
                params = {name: [{"filter": f, "value": _unpack(v[:, i, s])}
                                 for s, f in enumerate(self.sets)] for name, v in arrays.items()}
            models.append({"model": m, "parameters": params})
        if self._extra_base():
            models.append({"model": self._extra_base()})
        return models

    def _slerp_slices(self, genes: np.ndarray) -> list[dict]:
        slices = []
        for g in range(self.shape[0]):
            layers = [g * self.step, (g + 1) * self.step]
            raw = genes[g, :, 0, 0]
            a, b = np.argsort(-raw, kind="stable")[:2]  # torch.topk's two largest, largest first
            # e^b / (e^a + e^b), by torch's softmax as mergekit (its rounding, to the last bit)
            t = torch.softmax(torch.tensor([raw[a], raw[b]], dtype=torch.float64), -1)[1].item()
            sources = [{"model": self.models[i], "layer_range": layers} for i in (a, b)]
            if self.base.tokenizer_source:
                sources[0]["parameters"], sources[1]["parameters"] = {"weight": 1 - t}, {"weight": t}
            if self._extra_base():
                sources.append({"model": self._extra_base(), "layer_range": layers})
            slices.append({"sources": sources, "base_model": self.models[a], "parameters": {"t": t}})
        return slices


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _unpack(values: np.ndarray) -> Any:
    return _plain(values[0]) if len(values) == 1 else [_plain(v) for v in values]


# -- mergekit-evolve's config file --------------------------------------------------------------

class _Loose(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvolveGenome(_Loose):
    models: list[StrictStr] = Field(min_length=2)
    merge_method: StrictStr
    base_model: Optional[StrictStr] = None
    tokenizer_source: Optional[StrictStr] = None
    layer_granularity: StrictInt = Field(default=0, ge=0)
    normalize: Optional[StrictBool] = None
    allow_negative_weights: StrictBool = False
    filters: Optional[list[StrictStr]] = None
    smooth: StrictBool = False


class EvolveTask(_Loose):
    name: StrictStr
    weight: float = 1.0
    metric: StrictStr = "acc,none"

    @classmethod
    def of(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class EvolveConfig(_Loose):
    genome: EvolveGenome
    tasks: list[EvolveTask] = Field(min_length=1)
    limit: Optional[StrictInt] = None
    num_fewshot: Optional[StrictInt] = None
    shuffle: StrictBool = False
    random_init: StrictBool = False
    apply_chat_template: StrictBool = True
    fewshot_as_multiturn: StrictBool = True

    @field_validator("tasks", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return [EvolveTask.of(v) for v in value] if isinstance(value, list) else value


def load_evolve_config(path: str | Path) -> SearchProblem:
    """A mergekit-evolve config (genome:, tasks:, ...) as a search: CMA-ES over its genome, with
    its start, step (σ0 = 1/6 in gene units) and budget (100 evaluations), and its lm-eval tasks
    as the fitness (Σ weight·metric)."""
    from mergesmith.recipe.loader import _recipe_error

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: cannot read the mergekit-evolve config: {exc}") from None
    lines: dict = {}
    if node is not None:
        _collect_lines(node, (), lines, set())
    try:
        config = EvolveConfig.model_validate(data if data is not None else {})
    except Exception as exc:  # pydantic's ValidationError, with the file's lines
        if not hasattr(exc, "errors"):
            raise
        raise _recipe_error(exc, data or {}, str(path), lines) from None
    genome = config.genome
    recipe = {"merge_method": genome.merge_method, "models": [{"model": m} for m in genome.models],
              "dtype": "bfloat16"}
    for key in ("base_model", "tokenizer_source"):
        if getattr(genome, key):
            recipe[key] = getattr(genome, key)
    spec = genome.model_dump(include={"layer_granularity", "normalize", "allow_negative_weights",
                                      "filters", "smooth"}, exclude_none=True)
    spec["random_init"] = config.random_init
    tasks = [t.model_dump() for t in config.tasks]
    fitness: dict[str, Any] = {"lm_eval": [t["name"] for t in tasks]}
    if any(t["weight"] != 1.0 or t["metric"] != "acc,none" for t in tasks):
        fitness["lm_eval"] = tasks  # mergekit's own entries: {name, weight, metric}
    fitness.update(config.model_dump(include={"limit", "num_fewshot", "shuffle", "apply_chat_template",
                                              "fewshot_as_multiturn"}, exclude_none=True))
    recipe["search"] = {"genome": spec, "optimizer": "cma", "evaluations": 100,
                        "options": {"sigma0": SIGMA0 / (2 * GENE_BOUND)},
                        "fitness": fitness, "source": str(path)}
    return load_search(recipe)
