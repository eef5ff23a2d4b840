"""Resolve a method's parameters for one tensor, with mergekit's precedence and error locations.

Precedence, most specific first (as mergekit): the model's own entry, the slice, the module, the
recipe.
Per-model parameters are looked up for each expert; global ones once.
"""

from __future__ import annotations

import difflib
from typing import Any

from mergesmith.errors import PlanError
from mergesmith.methods import MethodSpec, all_methods
from mergesmith.recipe import Recipe, resolve_setting



def _numeric(value: Any) -> Any:
    """YAML 1.1 reads `1e-8` as a string; mergekit accepts it as a number, so do we."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class ParamResolver:
    def __init__(self, recipe: Recipe, method: MethodSpec):
        self.recipe = recipe
        self.method = method
        self._checked: set[tuple] = set()

    def _levels(self):
        """Every parameters dict in the recipe, with its location."""
        r = self.recipe
        yield r.parameters, ("parameters",)
        for i, m in enumerate(r.models or []):
            yield m.parameters, ("models", i, "parameters")
        for section, at in [(r, ()), *((m, ("modules", n)) for n, m in (r.modules or {}).items())]:
            if at:
                yield section.parameters, (*at, "parameters")
                for i, m in enumerate(section.models or []):
                    yield m.parameters, (*at, "models", i, "parameters")
            for i, sl in enumerate(section.slices or []):
                yield sl.parameters, (*at, "slices", i, "parameters")
                for j, s in enumerate(sl.sources):
                    yield s.parameters, (*at, "slices", i, "sources", j, "parameters")

    def check_names(self) -> list[str]:
        """Unknown names are errors (typos); another method's parameters are only warnings,
        since mergekit recipes often carry them along."""
        own = {p.name for p in self.method.params}
        other = {p.name for spec in all_methods() for p in spec.params} - own
        warnings = []
        for params, path in self._levels():
            for name in params or {}:
                if name in own:
                    continue
                where = self.recipe.where(*path, name)
                if name in other:
                    warnings.append(f"{where}: {self.method.name!r} does not use {name!r}; ignored")
                    continue
                close = difflib.get_close_matches(name, sorted(own), n=1)
                allowed = ", ".join(sorted(own)) or "none"
                raise PlanError(f"{where}: unknown parameter {name!r} for {self.method.name!r}",
                                hint=f"did you mean {close[0]!r}?" if close
                                else f"its parameters are: {allowed}")
        return warnings

    def resolve(self, out_slice, experts, tensor_name: str, t: float) -> dict[str, Any]:
        params: dict[str, Any] = {}
        shared = [(out_slice.params, (*out_slice.path, "parameters")),
                  (self.recipe.parameters, ("parameters",))]
        if out_slice.module:  # a module's parameters come between its slice's and the recipe's
            module = self.recipe.modules[out_slice.module[1]]
            shared.insert(1, (module.parameters, (*out_slice.module, "parameters")))
        for p in self.method.params:
            if p.per_model:
                params[p.argname] = [
                    self._value(p, [(s.params, (*s.path, "parameters")), *shared], tensor_name, t,
                                missing_at=s.path, model=s.ckpt.label)
                    for s in experts
                ]
            else:
                params[p.argname] = self._value(p, shared, tensor_name, t,
                                                missing_at=("parameters",), model=None)
        if self.method.validate is not None:
            key = ("validate", repr(sorted(params.items())))
            if key not in self._checked:
                try:
                    self.method.validate(params)
                except ValueError as exc:
                    raise PlanError(f"{self.recipe.where('parameters')}: {self.method.name}: {exc}") from None
                self._checked.add(key)
        return params

    def _value(self, param, levels, tensor_name, t, *, missing_at, model):
        for settings, path in levels:
            if settings and param.name in settings:
                value = resolve_setting(settings[param.name], tensor_name, t,
                                        validate=_numeric if param.type in (int, float) else None)
                if value is not None:
                    return self._check(param, value, (*path, param.name))
        if param.required:
            whose = f" for model {model}" if model else ""
            raise PlanError(f"{self.recipe.where(*missing_at)}: {self.method.name!r} needs "
                            f"parameter {param.name!r}{whose} (for {tensor_name!r})",
                            hint=param.doc or None)
        return param.default

    def _check(self, param, value, path):
        try:
            return param.check(value)
        except ValueError as exc:
            raise PlanError(f"{self.recipe.where(*path)}: {param.name} {exc}") from None
