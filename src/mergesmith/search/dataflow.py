"""The data-flow space (Akiba et al. 2024, evo_merge_dfs): a path of layers drawn from the
experts, with scaling, decoded to a passthrough/slices recipe.

The slots are every layer of every model of the pool in order (model 1's layers, then model
2's, ...), M of them, repeated r times: T = M·r slots. Gene I_t in [-1, 1] keeps slot t on the
path iff I_t > 0; the path is the kept slots in order. The paper's W_ij multiplies the whole
hidden state that enters layer j from layer i. A weight scale cannot express that: in a pre-norm
block the norm undoes a scale of its input and the residual carries it past every weight. What
a recipe can express exactly is the part the layer's first linear maps see, so W_ij here scales
the weight matrices of layer j's attention input projections (q, k, v; their biases are not
scaled): their inputs are multiplied by W_ij. W is indexed by the absolute layers (i, j), not by
path positions (`scaling: pair`, M² genes, the paper's); `scaling: layer` gives one gene per
layer j (M genes), `none` no scaling. Under `pair` the path's first layer, which has no
predecessor, is not scaled.
Embeddings come with the path's first layer's model, the final norm and head with its last's
(passthrough slices take them from the first and last slice).
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import Field, StrictInt, StrictStr, model_validator

from mergesmith.errors import RecipeError
from mergesmith.recipe import Recipe
from mergesmith.search.space import Dimension, SearchSpace, _Strict, validate_section

# The linear maps a block applies first to its (normalized) input: attention's q, k, v, fused or not.
FIRST_LINEARS = re.compile(r"(?:^|\.)(?:q_proj|k_proj|v_proj|qkv_proj|c_attn|query_key_value|"
                           r"Wqkv|W_pack|query|key|value)\.weight$")


class ScaleRange(_Strict):
    low: float = Field(default=0.0, allow_inf_nan=False)
    high: float = Field(default=2.0, allow_inf_nan=False)
    scale: Literal["linear", "log"] = "linear"

    @model_validator(mode="after")
    def _bounds(self) -> "ScaleRange":
        if not self.low < self.high:
            raise ValueError(f"bounds reversed or empty: low {self.low:g} must be below high {self.high:g}")
        if self.scale == "log" and self.low <= 0:
            raise ValueError(f"a log scale needs low > 0, got {self.low:g}")
        return self


class DataFlowSpec(_Strict):
    """`search.dataflow`: the pool of models, how often their layers repeat, how to scale."""

    models: Optional[list[StrictStr]] = Field(default=None, min_length=1)
    repeats: StrictInt = Field(default=3, ge=1)
    scaling: Literal["pair", "layer", "none"] = "pair"
    scale: ScaleRange = Field(default_factory=ScaleRange)


class DataFlowSpace(SearchSpace):
    def __init__(self, recipe: Recipe, raw: dict):
        from mergesmith.io import tensor_names as L
        from mergesmith.io.adapted import open_input

        at = ("search", "dataflow")
        self.base = recipe
        self.spec = spec = validate_section(DataFlowSpec, raw, recipe, at, {(*at, "scale"): ScaleRange})
        pool = spec.models or _recipe_models(recipe)
        if len(set(pool)) < len(pool):
            raise RecipeError(f"{recipe.where(*at, 'models')}: a model is listed twice")
        self.slots: list[tuple[str, int]] = []  # (model, layer), the M layers in order
        self.projections: dict[str, list[str]] = {}  # model -> its first linears, as filters
        for ref in pool:
            names = list(open_input(ref, {}, recipe.base_model).tensors)
            count = L.num_layers(names)
            if not count:
                raise RecipeError(f"{recipe.where(*at)}: {ref} has no numbered layers")
            self.slots += [(ref, layer) for layer in range(count)]
            first = sorted(n for n in names if L.layer_of(n) == 0 and FIRST_LINEARS.search(n))
            self.projections[ref] = [n[L.LAYER.search(n).end():] for n in first]
            if spec.scaling != "none" and not first:
                raise RecipeError(f"{recipe.where(*at, 'scaling')}: cannot tell the attention input "
                                  f"projections of {ref}, which the scaling scales",
                                  hint="use scaling: none")
        m = len(self.slots)
        self.dimensions = [Dimension(f"path[{t}]:{ref}:{layer}", -1.0, 1.0)
                           for t, (ref, layer) in enumerate(self.slots * spec.repeats)]
        s = spec.scale
        if spec.scaling == "pair":
            self.dimensions += [Dimension(f"scale[{self._label(i)}->{self._label(j)}]", s.low, s.high, s.scale)
                                for i in range(m) for j in range(m)]
        elif spec.scaling == "layer":
            self.dimensions += [Dimension(f"scale[{self._label(j)}]", s.low, s.high, s.scale)
                                for j in range(m)]

    def _label(self, i: int) -> str:
        ref, layer = self.slots[i]
        return f"{ref}:{layer}"

    def path(self, values: dict[str, Any]) -> list[tuple[int, float]]:
        """(layer index into slots, scale) along the path."""
        m = len(self.slots)
        kept = [t % m for t, d in enumerate(self.dimensions[:m * self.spec.repeats]) if values[d.name] > 0]
        out = []
        for p, j in enumerate(kept):
            if self.spec.scaling == "pair":
                scale = values[f"scale[{self._label(kept[p - 1])}->{self._label(j)}]"] if p else 1.0
            elif self.spec.scaling == "layer":
                scale = values[f"scale[{self._label(j)}]"]
            else:
                scale = 1.0
            out.append((j, float(scale)))
        return out

    def build(self, values: dict[str, Any]) -> dict:
        path = self.path(values)
        if not path:
            raise RecipeError("data-flow candidate: the path is empty (every I_t <= 0)",
                              hint="such a candidate has no model; the search scores it as failed")
        runs: list[list] = []  # [model, first layer, stop, scale]
        for j, scale in path:
            ref, layer = self.slots[j]
            last = runs[-1] if runs else None
            if last and last[0] == ref and last[2] == layer and last[3] == scale:
                last[2] = layer + 1
            else:
                runs.append([ref, layer, layer + 1, scale])
        data = self.base.model_dump(mode="json", exclude_none=True)
        for key in ("models", "slices", "base_model", "parameters", "modules"):
            data.pop(key, None)
        data["merge_method"] = "passthrough"
        data["slices"] = [{"sources": [self._source(*run)]} for run in runs]
        return data

    def _source(self, ref: str, start: int, stop: int, scale: float) -> dict:
        source = {"model": ref, "layer_range": [start, stop]}
        if scale != 1.0:
            source["parameters"] = {"scale": [{"filter": f, "value": scale}
                                              for f in self.projections[ref]]}
        return source

    def given(self) -> dict[str, Any]:
        """The recipe's own path where the slots hold it (its slices, in order, each slot after
        the last), else the first model's layers; every scale 1."""
        m, order = len(self.slots), self.slots * self.spec.repeats
        wanted = [(s.model, layer) for piece in self.base.slices or [] for s in piece.sources[:1]
                  for layer in range(*s.layer_range)] or [s for s in self.slots if s[0] == self.slots[0][0]]
        chosen, at = set(), 0
        for slot in wanted:
            at = next((t for t in range(at, len(order)) if order[t] == slot), None)
            if at is None:
                chosen = {t for t, s in enumerate(self.slots) if s[0] == self.slots[0][0]}
                break
            chosen.add(at)
            at += 1
        out = {d.name: (0.5 if t in chosen else -0.5) for t, d in enumerate(self.dimensions[:m * self.spec.repeats])}
        out.update({d.name: 1.0 for d in self.dimensions[m * self.spec.repeats:]})
        return out


def _recipe_models(recipe: Recipe) -> list[str]:
    refs = [m.model for m in recipe.models or []]
    refs += [s.model for piece in recipe.slices or [] for s in piece.sources]
    return list(dict.fromkeys(refs))
