"""Search spaces: a recipe's `search:` section as points of the unit cube, and back to recipes.

Every point handed between the parts of a search lies in [0, 1]^d; a Dimension maps its unit
coordinate to a value (linear or log scale, integers, choices) and back. A SearchSpace turns a
point into a plain, complete recipe that `mergesmith merge` runs as it is. Three spaces share
this interface: the parameter space (search/parameter_space.py: method parameters, per model
and per layer group, the method itself among a list), the data-flow space (search/dataflow.py: layer paths through the
experts) and mergekit-evolve's genome (search/mergekit_evolve.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic import model_validator

from mergesmith.errors import RecipeError
from mergesmith.recipe import Recipe, load_recipe
from mergesmith.recipe.loader import _recipe_error, load_stages
from mergesmith.recipe.parameters import Scalar
from mergesmith.recipe.schema import NO_FILE

SPACE_HINT = "see the README's Search section for the search: fields"


# -- dimensions -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dimension:
    """One coordinate of the search: its unit value u in [0, 1] maps onto [low, high] (linearly
    or on a log scale), onto the integers low..high (equal shares of [0, 1] each), or onto
    `choices` (equal shares, in order). Floats are rounded to `digits` significant digits, so
    that a recipe reads 0.3 rather than 0.30000000000000004 (None keeps every bit)."""

    name: str
    low: float
    high: float
    scale: str = "linear"
    kind: str = "float"
    choices: tuple = ()
    digits: int | None = 12

    def value(self, u: float) -> Any:
        u = min(max(float(u), 0.0), 1.0)
        if self.kind == "choice":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        if self.kind == "int":
            return int(min(math.floor(self.low + u * (self.high - self.low + 1)), self.high))
        if u == 1.0:  # exactly the bound, whatever the rounding below
            return self.high
        if self.scale == "log":
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        value = min(max(value, self.low), self.high)
        return float(f"{value:.{self.digits}g}") if self.digits else value

    def unit(self, value: Any) -> float:
        """The unit coordinate of `value` (the middle of its share for ints and choices),
        clipped into [0, 1]."""
        if self.kind == "choice":
            index = self.choices.index(value) if value in self.choices else 0
            return (index + 0.5) / len(self.choices)
        value = float(value)
        if self.kind == "int":
            u = (round(value) - self.low + 0.5) / (self.high - self.low + 1)
        elif self.scale == "log":
            value = max(value, self.low)
            u = (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        else:
            u = (value - self.low) / (self.high - self.low)
        return min(max(u, 0.0), 1.0)


class SearchSpace:
    """Points of [0, 1]^d and the recipes they stand for. Subclasses set `dimensions` and
    implement `build(values)` (values by dimension name -> a recipe dict) and `given()` (the
    recipe's own values by dimension name, where it has them)."""

    dimensions: list[Dimension]
    section: dict = {}  # the search: entries that define this space, as to_dict writes them

    def __len__(self) -> int:
        return len(self.dimensions)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def decode(self, x) -> dict[str, Any]:
        x = np.asarray(x, dtype=float).reshape(-1)
        if x.size != len(self.dimensions):
            raise ValueError(f"a point of this space has {len(self.dimensions)} coordinates, got {x.size}")
        return {d.name: d.value(u) for d, u in zip(self.dimensions, x)}

    def encode(self, values: dict[str, Any]) -> np.ndarray:
        """The point whose decoded values are `values` (ints and choices: the middle of their share)."""
        return np.array([d.unit(values[d.name]) for d in self.dimensions], dtype=float)

    def recipe(self, x) -> Recipe:
        return load_recipe(self.build(self.decode(x)))

    def start(self) -> np.ndarray:
        given = self.given()
        return np.array([d.unit(given[d.name]) if given.get(d.name) is not None else 0.5
                         for d in self.dimensions], dtype=float)

    def build(self, values: dict[str, Any]) -> dict:
        raise NotImplementedError

    def given(self) -> dict[str, Any]:
        return {}


# -- the search: section ----------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Range(_Strict):
    """How one method parameter varies (`search.parameters.NAME`)."""

    low: Optional[float] = Field(default=None, allow_inf_nan=False)
    high: Optional[float] = Field(default=None, allow_inf_nan=False)
    scale: Literal["linear", "log"] = "linear"
    integer: StrictBool = Field(default=False, alias="int")
    choices: Optional[list[Scalar]] = Field(default=None, min_length=1)
    per_model: StrictBool = False
    layer_groups: StrictInt = Field(default=1, ge=1)
    smooth: StrictBool = False  # one value per group at evenly spaced anchors, interpolated between
    filters: Optional[list[StrictStr]] = Field(default=None, min_length=1)
    # own values for the tensors before the layers (embeddings) and after them (final norm, head)
    ends: StrictBool = False

    @model_validator(mode="after")
    def _bounds(self) -> "Range":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low and high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (or choices)")
        if not self.low < self.high:
            raise ValueError(f"bounds reversed or empty: low {self.low:g} must be below high {self.high:g}")
        if self.scale == "log" and self.low <= 0:
            raise ValueError(f"a log scale needs low > 0, got {self.low:g}")
        if self.integer and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("int: true needs whole-number bounds")
        return self


class SearchSection(_Strict):
    """`search:` beside a recipe: the space (parameters and method, or dataflow, or genome) and
    the optimizer's settings."""

    parameters: dict[str, Range] = Field(default_factory=dict)
    method: Optional[list[StrictStr]] = Field(default=None, min_length=1)
    dataflow: Optional[dict] = None  # checked by search/dataflow.py
    genome: Optional[dict] = None  # checked by search/mergekit_evolve.py
    optimizer: StrictStr = "cma"
    seed: StrictInt = 0
    evaluations: Optional[StrictInt] = Field(default=None, ge=1)
    seconds: Optional[float] = Field(default=None, gt=0)
    population: Optional[StrictInt] = Field(default=None, ge=1)
    fitness: dict = Field(default_factory=dict)
    fidelity: Optional[dict] = None
    options: dict = Field(default_factory=dict)
    source: Optional[StrictStr] = None  # the YAML file the search came from (set by to_dict)


@dataclass
class SearchSettings:
    optimizer: str = "cma"
    seed: int = 0
    evaluations: int | None = None  # budget in candidate evaluations
    seconds: float | None = None  # budget in wall time
    population: int | None = None  # per generation (the optimizer's default if None)
    fitness: dict = field(default_factory=dict)  # as written; search/fitness.py reads it
    fidelity: dict | None = None  # multi-fidelity settings (the driver reads them)
    options: dict = field(default_factory=dict)  # optimizer-specific (sigma0, ...)


SETTINGS = tuple(f.name for f in fields(SearchSettings))
SPACE_KEYS = ("parameters", "method", "dataflow", "genome")


@dataclass
class SearchProblem:
    recipe: Recipe  # the recipe without its search: section (its models are the pool)
    space: SearchSpace
    settings: SearchSettings
    source: Path | None = None  # the YAML file (relative data paths resolve against its folder)

    def to_dict(self) -> dict:
        """The recipe with its search: section, JSON/YAML-able; load_search rebuilds the problem."""
        data = self.recipe.model_dump(mode="json", exclude_none=True)
        search = dict(self.space.section)
        search.update({name: getattr(self.settings, name) for name in SETTINGS})
        if self.source is not None:
            search["source"] = str(self.source)
        data["search"] = {k: v for k, v in search.items() if v is not None}
        return data


def load_search(source: str | Path | dict) -> SearchProblem:
    """A SearchProblem from a recipe (file, YAML string or dict) with a `search:` section."""
    searches: list = []
    stages = load_stages(source, searches)
    recipe = stages[0]
    if len(stages) > 1:
        raise RecipeError(f"{recipe.where()}: a search takes one recipe, this file holds {len(stages)}",
                          hint="search one stage at a time")
    raw = searches[0]
    if raw is None:
        raise RecipeError(f"{recipe.where()}: no search: section",
                          hint="add search: with the parameters to vary; " + SPACE_HINT)
    if not isinstance(raw, dict):
        raise RecipeError(f"{recipe.where('search')}: expected a mapping, got {type(raw).__name__}",
                          hint=SPACE_HINT)
    section = validate_section(SearchSection, raw, recipe, ("search",),
                               {("search", "parameters", "*"): Range})
    path = (Path(section.source) if section.source else
            Path(recipe.source).absolute() if recipe.source != NO_FILE else None)
    settings = SearchSettings(**{name: getattr(section, name) for name in SETTINGS})
    space = _space(recipe, section)
    space.section = section.model_dump(mode="json", include=set(SPACE_KEYS), exclude_none=True,
                                       by_alias=True)
    if not space.section.get("parameters"):
        space.section.pop("parameters", None)
    return SearchProblem(recipe, space, settings, path)


def validate_section(model: type[BaseModel], raw: Any, recipe: Recipe, at: tuple,
                     nested: dict[tuple, type[BaseModel]] | None = None) -> BaseModel:
    """`raw` (the data at path `at` of the recipe) as `model`, or a RecipeError naming the file,
    line and field. `nested` names the models of sections below `at` ("*" for any key), so that
    a typo there is answered with that section's fields."""
    def fields_at(owner: tuple) -> list[str] | None:
        for path, cls in {at: model, **(nested or {})}.items():
            if len(owner) == len(path) and all(p in ("*", o) for p, o in zip(path, owner)):
                return [f.alias or name for name, f in cls.model_fields.items()]
        return None

    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _recipe_error(exc, raw, recipe.source, recipe._lines, prefix=at,
                            fields_at=fields_at) from None


def _space(recipe: Recipe, section: SearchSection) -> SearchSpace:
    kinds = [k for k in ("dataflow", "genome") if getattr(section, k) is not None]
    if section.parameters or section.method:
        kinds.insert(0, "parameters")
    if not kinds:
        raise RecipeError(f"{recipe.where('search')}: the search space is empty: nothing varies",
                          hint="name parameters to vary under search.parameters, methods under "
                               "search.method, or a search.dataflow space")
    if len(kinds) > 1:
        raise RecipeError(f"{recipe.where('search', kinds[1])}: give one space: {kinds[0]} or "
                          f"{kinds[1]}, not both", hint="search them one after the other (a "
                          "parameter search first, then a data-flow search over its result)")
    if kinds[0] == "dataflow":
        from mergesmith.search.dataflow import DataFlowSpace

        return DataFlowSpace(recipe, section.dataflow)
    if kinds[0] == "genome":
        from mergesmith.search.mergekit_evolve import GenomeSpace

        return GenomeSpace(recipe, section.genome, section.seed)
    from mergesmith.search.parameter_space import ParameterSpace

    return ParameterSpace(recipe, section)


def model_layers(recipe: Recipe, refs: list[str] | None = None) -> dict[str, int]:
    """Layers of each model of the recipe (or of `refs`), read from the checkpoint headers."""
    from mergesmith.io import tensor_names as L
    from mergesmith.io import Checkpoint, resolve_model

    refs = refs or [m.model for m in recipe.models or []]
    counts = {}
    for ref in refs:
        counts[ref] = L.num_layers(list(Checkpoint(resolve_model(ref), label=ref).tensors))
        if not counts[ref]:
            raise RecipeError(f"{recipe.where('models')}: {ref} has no numbered layers to group")
    return counts
