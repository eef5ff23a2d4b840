"""The parameter space: method parameters (per model, per layer group, per filter) and the method
itself among a list, written into the recipe as mergekit writes settings.

Per-layer-group values become gradient lists: with `smooth`, one value per group at evenly spaced
anchors, interpolated between them; without, one entry per layer (each group's value repeated
over its layers), so that layer l, at t = l/(L − 1), takes its group's value. Tensors outside the
layers (embeddings, final norm, head) sit at t = 0: they take the first group's value, as every
gradient gives them. `filters` write conditionals, first match wins, with a catch-all last.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mergesmith.errors import MethodError, RecipeError
from mergesmith.methods import get_method
from mergesmith.methods.registry import MethodSpec, Param
from mergesmith.recipe import Recipe, lookup
from mergesmith.search.space import Dimension, Range, SearchSection, SearchSpace, model_layers


@dataclass(frozen=True)
class _Target:
    """Where one parameter's values go: the recipe's `parameters`, or one model's entry."""

    param: str
    model: int | None  # index into recipe.models, None for the global parameters
    spec: Range
    dims: tuple  # ((filter or None, group names...), ...) per filter set
    ends: tuple = ()  # (the embeddings' dimension, the head's) with `ends`


class ParameterSpace(SearchSpace):
    """Method parameters (per model and per layer group where asked) and the method itself."""

    def __init__(self, recipe: Recipe, section: SearchSection):
        self.base = recipe
        self.methods = self._methods(recipe, section)
        self.dimensions: list[Dimension] = []
        if section.method:
            self.dimensions.append(Dimension("merge_method", 0, len(self.methods) - 1,
                                             kind="choice", choices=tuple(self.methods)))
        self.layers = 0
        self.outside: tuple[list[str], list[str]] | None = None  # tensors before, after the layers
        self.targets: list[_Target] = []
        # by name, not as written: a copy of the section dumped with sorted keys is the same space
        for name, spec in sorted(section.parameters.items()):
            self._add(name, spec)
        if all(d.kind == "choice" and len(d.choices) == 1 for d in self.dimensions):
            raise RecipeError(f"{recipe.where('search')}: the search space is empty: nothing varies "
                              "(one method, one choice)", hint="give ranges or several choices")

    def _methods(self, recipe: Recipe, section: SearchSection) -> list[str]:
        names = section.method or [recipe.merge_method]
        for i, name in enumerate(names):
            try:
                get_method(name)
            except MethodError as exc:
                at = ("search", "method", i) if section.method else ("merge_method",)
                raise RecipeError(f"{recipe.where(*at)}: {exc.message}", hint=exc.hint) from None
        if len(set(names)) < len(names):
            raise RecipeError(f"{recipe.where('search', 'method')}: a method is listed twice")
        return list(names)

    def _specs(self) -> list[MethodSpec]:
        return [get_method(m) for m in self.methods]

    def _param(self, name: str) -> Param:
        found = [p for spec in self._specs() if (p := spec.param(name)) is not None]
        if not found:
            allowed = sorted({p.name for spec in self._specs() for p in spec.params})
            whom = (f"{self.methods[0]} takes" if len(self.methods) == 1
                    else f"none of {', '.join(self.methods)} takes")
            raise RecipeError(f"{self.base.where('search', 'parameters', name)}: unknown parameter "
                              f"{name!r}: {whom} it",
                              hint=f"its parameters are: {', '.join(allowed) or 'none'}")
        return found[0]

    def _experts(self) -> list[int]:
        """Indices of recipe.models whose per-model parameters a method reads."""
        uses_base = any(spec.uses_base for spec in self._specs())
        return [i for i, m in enumerate(self.base.models or [])
                if not (uses_base and m.model == self.base.base_model)]

    def _add(self, name: str, spec: Range) -> None:
        at = ("search", "parameters", name)
        where = self.base.where(*at)
        param = self._param(name)
        if spec.choices is None and param.type not in (int, float):
            raise RecipeError(f"{where}: {name} is {param.type.__name__}, not a number; give "
                              "its values as choices: [...]")
        for bound in (spec.low, spec.high):
            if bound is None:
                continue
            try:
                param.check(bound)
            except ValueError as exc:
                raise RecipeError(f"{where}: the bound {bound:g} is out of range: {name} {exc}") from None
        if spec.per_model and not param.per_model:
            raise RecipeError(f"{where}: {name} is one value for the whole merge, not per model",
                              hint="leave per_model out")
        if (spec.per_model or spec.layer_groups > 1 or spec.ends) and not self.base.models:
            raise RecipeError(f"{where}: per_model, layer_groups and ends need a recipe with models:",
                              hint="write the recipe with models: rather than slices:")
        if spec.layer_groups > 1:
            self.layers = self.layers or count_layers(self.base)
            if spec.layer_groups > self.layers:
                raise RecipeError(f"{self.base.where(*at, 'layer_groups')}: {spec.layer_groups} "
                                  f"groups, but the models have {self.layers} layers")
        if spec.ends:
            self.outside = self.outside or outside_tensors(self.base)
        sets = [*(spec.filters or []), None] if spec.filters else [None]
        groups = self._group_names(spec)
        owners = [(i, f"[{self.base.models[i].model}]") for i in self._experts()] if spec.per_model else [(None, "")]
        if spec.per_model and not owners:
            raise RecipeError(f"{where}: per_model, but the recipe has no models besides the base")
        kind = "choice" if spec.choices is not None else "int" if spec.integer or param.type is int else "float"
        if kind == "int" and not (float(spec.low).is_integer() and float(spec.high).is_integer()):
            raise RecipeError(f"{where}: {name} is an integer; give whole-number bounds")
        for model, label in owners:
            dims = []
            for filt in sets:
                tag = "" if not spec.filters else "{" + (filt or "*") + "}"
                names = tuple(f"{name}{label}{tag}{group}" for group in groups)
                for dim_name in names:
                    if kind == "choice":
                        self.dimensions.append(Dimension(dim_name, 0, len(spec.choices) - 1,
                                                         kind="choice", choices=tuple(spec.choices)))
                    else:
                        self.dimensions.append(Dimension(dim_name, spec.low, spec.high, spec.scale, kind))
                dims.append((filt, names))
            ends = (f"{name}{label}@embeddings", f"{name}{label}@head") if spec.ends else ()
            self.dimensions += [replace(self.dimensions[-1], name=dim_name) for dim_name in ends]
            self.targets.append(_Target(name, model, spec, tuple(dims), ends))

    def _group_names(self, spec: Range) -> list[str]:
        n = spec.layer_groups
        if n == 1:
            return [""]
        if spec.smooth:
            return [f"@t={k / (n - 1):.3g}" for k in range(n)]
        return [f"@layers.{a}-{b - 1}" for a, b in layer_groups(self.layers, n)]

    # recipes from values

    def build(self, values: dict[str, Any]) -> dict:
        data = self.base.model_dump(mode="json", exclude_none=True)
        method = values.get("merge_method", self.base.merge_method)
        data["merge_method"] = method
        spec = get_method(method)
        for target in self.targets:
            if spec.param(target.param) is None:
                continue
            setting = self._setting(target, values)
            if target.model is None:
                data.setdefault("parameters", {})[target.param] = setting
                if spec.param(target.param).per_model:  # one shared value: the models' own go
                    for entry in data.get("models") or []:
                        (entry.get("parameters") or {}).pop(target.param, None)
            else:
                data["models"][target.model].setdefault("parameters", {})[target.param] = setting
        if "merge_method" in values:  # parameters the chosen method does not take are dropped
            own = {p.name for p in spec.params}
            for holder in [data, *(data.get("models") or [])]:
                if holder.get("parameters"):
                    holder["parameters"] = {k: v for k, v in holder["parameters"].items() if k in own}
        return _without_empty_parameters(data)

    def _setting(self, target: _Target, values: dict[str, Any]) -> Any:
        def per_layer(names: tuple) -> Any:
            group = [_plain(values[n]) for n in names]
            if len(group) == 1:
                return group[0]
            if target.spec.smooth:
                return group
            # one value per layer: a gradient at t = l/(L-1) lands on layer l's own entry
            bounds = layer_groups(self.layers, len(group))
            return [v for v, (a, b) in zip(group, bounds) for _ in range(a, b)]

        if not target.spec.filters:
            setting = per_layer(target.dims[0][1])
        else:
            setting = [({"filter": filt, "value": per_layer(names)} if filt is not None
                        else {"value": per_layer(names)}) for filt, names in target.dims]
        if not target.ends:
            return setting
        # the ends by their full names first (first match wins), then the layers' setting
        ends = [{"filter": tensor, "value": _plain(values[dim])}
                for tensors, dim in zip(self.outside, target.ends) for tensor in tensors]
        return ends + (setting if isinstance(setting, list) and target.spec.filters else [{"value": setting}])

    def given(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.dimensions and self.dimensions[0].name == "merge_method":
            out["merge_method"] = self.base.merge_method
        for target in self.targets:
            param = self._param(target.param)
            levels = [self.base.parameters]
            if target.model is not None:
                levels.insert(0, self.base.models[target.model].parameters)
            n = target.spec.layer_groups
            if target.spec.smooth:
                positions = [k / (n - 1) for k in range(n)] if n > 1 else [0.0]
            else:
                bounds = layer_groups(self.layers, n) if n > 1 else [(0, 1)]
                positions = [a / (self.layers - 1) if self.layers > 1 else 0.0 for a, _ in bounds]
            for filt, names in target.dims:
                for dim_name, t in zip(names, positions):
                    value = lookup(target.param, levels, filt or "", t)
                    if value is None and not param.required and param.default is not None:
                        value = param.default
                    if isinstance(value, str) and target.spec.choices is None:
                        try:
                            value = float(value)
                        except ValueError:
                            value = None
                    out[dim_name] = value
            for tensors, dim_name in zip(self.outside or (), target.ends):
                value = lookup(target.param, levels, tensors[0], 0.0) if tensors else None
                out[dim_name] = value if value is not None else param.default if not param.required else None
        return out


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones, so recipes dump and fingerprint as written."""
    return value.item() if isinstance(value, np.generic) else value


def _without_empty_parameters(data: dict) -> dict:
    for holder in [data, *(data.get("models") or [])]:
        if "parameters" in holder and not holder["parameters"]:
            del holder["parameters"]
    return data


def layer_groups(layers: int, groups: int) -> list[tuple[int, int]]:
    """[start, stop) of `groups` contiguous groups of `layers` layers, the first ones one layer
    longer where they do not divide evenly."""
    size, extra = divmod(layers, groups)
    bounds, start = [], 0
    for g in range(groups):
        stop = start + size + (1 if g < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def outside_tensors(recipe: Recipe) -> tuple[list[str], list[str]]:
    """The tensors of the recipe's first model before its layers (embeddings) and after them
    (final norm, head), by full name."""
    from mergesmith.io import tensor_names as L
    from mergesmith.io.adapted import open_input

    ref = recipe.models[0].model  # a model folder or an adapter on one: the same tensor names
    names = sorted(n for n in open_input(ref, {}, recipe.base_model).tensors if L.layer_of(n) is None)
    before = [n for n in names if L.is_before_layers(n)]
    after = [n for n in names if not L.is_before_layers(n)]
    if not before or not after:
        raise RecipeError(f"{recipe.where('models', 0)}: {ref} has no tensors before or after its "
                          "layers to give their own values", hint="leave ends out")
    return before, after


def count_layers(recipe: Recipe, refs: list[str] | None = None) -> int:
    """The layer count the models of `recipe` share, read from their headers."""
    counts = model_layers(recipe, refs)
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{ref}: {n}" for ref, n in counts.items())
        raise RecipeError(f"{recipe.where('models')}: layer groups need models with one layer "
                          f"count ({detail})")
    return next(iter(counts.values()))
