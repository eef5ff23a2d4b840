"""The recipe schema: mergekit 0.1.5's merge configuration, accepted as written.

Model references stay strings ("org/name", "org/name@revision", a local path); the engine
resolves them. Every model forbids unknown fields, so a typo is an error rather than a setting
silently ignored. A loaded Recipe remembers its file and the line of every field for messages.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional, Union

from pathlib import Path

import yaml
from pydantic import (
    model_serializer,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mergesmith.recipe.parameters import ParameterSetting, describe

NO_FILE = "<recipe>"

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}  # fmt: skip

Parameters = Optional[dict[str, ParameterSetting]]


def _dtype(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    # mergekit accepts a "torch." prefix; case is forgiven since the meaning is unambiguous.
    name = value.strip().lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(
            f"unsupported dtype {value!r}; allowed: float32, float16, bfloat16 "
            "(or fp32, fp16, bf16, float, half)"
        )
    return _DTYPES[name]


def _model_ref(value: str) -> str:
    # An empty reference would resolve to the working directory, not to a model.
    if not value.strip():
        raise ValueError("empty model reference; give a model folder or a hub id like org/name")
    return value


def _adapter_form(value: Optional[str]) -> Optional[str]:
    # mergekit reads "model+adapter" as a PEFT adapter applied to the model (the engine opens
    # it); a folder whose name holds a "+" is still a folder.
    if value and "+" in value and not Path(value).expanduser().exists():
        model, _, adapter = value.partition("+")
        if not model.strip() or not adapter.strip():
            raise ValueError(f"{value!r}: mergekit's model+adapter form needs both a model and a "
                             "PEFT adapter folder, e.g. org/base+./my-lora")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibration(_Strict):
    """`calibration:` the data a data-aware method learns from (recipe level), or, on a model
    entry, what differs for that model (its own task's data, its head). Unset fields inherit."""

    data: Optional[StrictStr] = None  # a .txt (one example per line), .jsonl, .csv or .parquet file
    dataset: Optional[StrictStr] = None  # a `datasets` dataset: "name" or "name:config"
    split: StrictStr = "train"
    text_field: StrictStr = "text"
    label_field: Optional[StrictStr] = None  # labels, where the objective uses them (Fisher)
    labels: Optional[list[StrictStr]] = None  # label names in head order, for text labels
    head: Optional[StrictStr] = None  # frozen classification head (safetensors: weight, bias)
    samples: StrictInt = Field(default=128, ge=1)
    max_length: Optional[StrictInt] = Field(default=None, ge=2)
    batch_size: StrictInt = Field(default=8, ge=1)
    seed: StrictInt = 0
    cache: Optional[StrictStr] = None  # statistics folder; default ~/.cache/mergesmith/statistics

    @model_serializer(mode="wrap")
    def _only_what_is_set(self, handler):
        """A section written out (recipe cards, copies of a recipe) holds only the fields it
        set: a model entry's defaults must not become values that override the recipe's."""
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}

    @model_validator(mode="after")
    def _one_source(self) -> "Calibration":
        if self.data and self.dataset:
            raise PydanticCustomError(
                "recipe", "give either 'data' or 'dataset', not both", {"field": "dataset"})
        return self

    def merged(self, override: Optional["Calibration"]) -> "Calibration":
        """This section with a model entry's fields laid over it (only the fields it sets)."""
        if override is None:
            return self
        data = self.model_dump()
        data.update(override.model_dump(exclude_unset=True))
        if "data" in override.model_fields_set:
            data["dataset"] = None
        if "dataset" in override.model_fields_set:
            data["data"] = None
        return Calibration(**data)


class InputModel(_Strict):
    """An entry of `models:`."""

    model: StrictStr
    parameters: Parameters = None
    calibration: Optional[Calibration] = None

    _named = field_validator("model")(_model_ref)
    _plain = field_validator("model")(_adapter_form)


class SliceSource(_Strict):
    """An entry of a slice's `sources:`: layers [start, end) of one model."""

    model: StrictStr
    layer_range: tuple[StrictInt, StrictInt]
    parameters: Parameters = None

    _named = field_validator("model")(_model_ref)
    _plain = field_validator("model")(_adapter_form)

    @field_validator("layer_range", mode="before")
    @classmethod
    def _two_items(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"expected [start, end] (two integers), got {describe(value)}")
        return value

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if not 0 <= start < end:
            raise ValueError(f"expected [start, end) with 0 <= start < end, got [{start}, {end}]")
        return value


class Slice(_Strict):
    """An entry of `slices:`: output layers built from one or more source ranges."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: Optional[StrictStr] = None
    # mergekit 0.1.5 declares this field but never reads it; accepted so its recipes load.
    residual_weight: Optional[float] = None
    parameters: Parameters = None

    _plain = field_validator("base_model")(_adapter_form)


class Module(_Strict):
    """An entry of `modules:` (multimodal models): the models or slices of one part of the
    checkpoint (a text decoder, a vision tower, ...), with its own parameters."""

    models: Optional[list[InputModel]] = None
    slices: Optional[list[Slice]] = None
    parameters: Parameters = None

    @model_validator(mode="after")
    def _one_input_form(self) -> "Module":
        if bool(self.models) == bool(self.slices):
            raise PydanticCustomError(
                "recipe", "give either a non-empty 'models' or 'slices' list for this module", {})
        return self


class ModelToken(_Strict):
    """A token's rows taken from one model's rows for a token (`kind: model_token`)."""

    kind: Literal["model_token"]
    model: StrictStr
    token_id: Optional[StrictInt] = Field(default=None, ge=0)
    token: Optional[StrictStr] = None

    @model_validator(mode="after")
    def _one_of(self) -> "ModelToken":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class ZeroToken(_Strict):
    kind: Literal["zero"]


class TokenSetting(_Strict):
    """An entry of `tokenizer.tokens`: where the token's embedding and head rows come from (a
    model of the recipe, another token's rows, or zeros) for the models that lack the token, or
    for every model with `force: true`."""

    source: Union[ModelToken, ZeroToken, StrictStr, None] = None
    force: StrictBool = False

    @field_validator("source", mode="before")
    @classmethod
    def _by_kind(cls, value: Any) -> Any:
        # one branch per form, so that an error names the form's own fields
        if isinstance(value, dict):
            kind = value.get("kind")
            if kind == "zero":
                return ZeroToken.model_validate(value)
            if kind == "model_token":
                return ModelToken.model_validate(value)
            raise ValueError("expected a model, {kind: zero} or {kind: model_token, model: ..., "
                             f"token: ...}}, got kind {describe(kind)}")
        return value


class TokenizerSection(_Strict):
    """`tokenizer:` mergekit's tokenizer configuration: the output vocabulary (`source`: union,
    base or a model), tokens added or re-sourced, and padding of the vocabulary."""

    source: StrictStr = "union"
    tokens: Optional[dict[str, TokenSetting]] = None
    pad_to_multiple_of: Optional[StrictInt] = Field(default=None, ge=1)


class LayerScaling(_Strict):
    """`lines:` LiNeS, applied after the method: θ = θ0 + (α + β·l/(L − 1))·(θ_merged − θ0) for
    block l of L (tensors outside the blocks get α); needs a base_model."""

    alpha: float = Field(allow_inf_nan=False)
    beta: float = Field(allow_inf_nan=False)


class AlignSection(_Strict):
    """`align:` permute the merged models' units onto one reference model before merging, for
    models trained from different initialisations (engine/weight_matching.py). Weight matching holds
    every model's tensors in memory while it solves, at plan time."""

    method: Literal["weight_matching"] = "weight_matching"
    reference: Optional[StrictStr] = None  # a model of the recipe; default base_model, else the first
    units: list[Literal["mlp", "heads", "residual", "head_dims"]] = Field(
        default=["mlp", "heads", "residual"], min_length=1)  # head_dims: a value head's dims, with heads
    scheme: Literal["mean", "reference"] = "mean"  # 3+ models: against the others' mean, or the reference
    max_sweeps: StrictInt = Field(default=100, ge=1)
    seed: StrictInt = 0


class ContinualSection(_Strict):
    """`continual:` for a continual rule (merge_method: opcm, continual_*; engine/continual.py):
    `onto`, an earlier continual merge's folder to add this recipe's models to (as
    `mergesmith merge --onto`); without it, the models are merged one at a time from the base."""

    onto: Optional[StrictStr] = None


class Recipe(_Strict):
    """A whole merge recipe."""

    merge_method: StrictStr
    base_model: Optional[StrictStr] = None
    models: Optional[list[InputModel]] = None
    slices: Optional[list[Slice]] = None
    parameters: Parameters = None
    dtype: Optional[StrictStr] = None
    out_dtype: Optional[StrictStr] = None
    modules: Optional[dict[str, Module]] = None
    tokenizer_source: Optional[StrictStr] = None
    tokenizer: Optional[TokenizerSection] = None
    chat_template: Optional[StrictStr] = None
    seed: Optional[StrictInt] = None
    name: Optional[StrictStr] = None
    lines: Optional[LayerScaling] = None
    calibration: Optional[Calibration] = None
    # "mergekit": reproduce mergekit 0.1.5's arithmetic (its compute dtype, sign ties, L1
    # rescale, selections) for the methods both have; none (unset): the papers' definitions
    compat: Optional[Literal["none", "mergekit"]] = None
    align: Optional[AlignSection] = None
    continual: Optional[ContinualSection] = None

    _source: str = PrivateAttr(default=NO_FILE)
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)
    _text: Optional[str] = PrivateAttr(default=None)  # the YAML as written, for mergekit_config.yml

    _normalise_dtype = field_validator("dtype", "out_dtype")(_dtype)
    _plain = field_validator("base_model", "tokenizer_source")(_adapter_form)

    @model_validator(mode="after")
    def _one_input_form(self) -> "Recipe":
        # Truthiness, like mergekit: an empty list counts as absent.
        given = [name for name in ("models", "slices", "modules") if getattr(self, name)]
        if len(given) > 1:
            raise PydanticCustomError(
                "recipe", f"give either {given[0]!r} or {given[1]!r}, not both", {"field": given[1]})
        if not given:
            raise PydanticCustomError(
                "recipe", "no inputs: give a non-empty 'models' or 'slices' list (or 'modules')",
                {"field": ""},
            )
        if self.tokenizer_source and self.tokenizer:
            raise PydanticCustomError(
                "recipe", "give either 'tokenizer_source' or 'tokenizer', not both",
                {"field": "tokenizer"},
            )  # fmt: skip
        return self

    def __eq__(self, other: object) -> bool:
        # Equal content is an equal recipe, wherever it was loaded from.
        return type(other) is type(self) and self.model_dump() == other.model_dump()

    @property
    def source(self) -> str:
        """The recipe's file path, or "<recipe>" when it came from a string or a dict."""
        return self._source

    def where(self, *path: str | int) -> str:
        """'recipe.yaml:12: models[1].parameters.weight' for where("models", 1, "parameters",
        "weight"); the line is the nearest ancestor's when the field itself was not written."""
        return locate(self._source, self._lines, path)

    def fingerprint(self) -> str:
        """sha256 of the recipe's content: key order, absent-vs-null and 1-vs-1.0 do not count."""
        data = _canonical(self.model_dump(mode="json", exclude_none=True))
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_yaml(self) -> str:
        """The recipe as YAML, in field order with unset fields left out (for the model card)."""
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)

    def model_refs(self) -> list[str]:
        """Every distinct model this recipe names, in first-seen order."""
        refs = [self.base_model]
        for section in [self, *(self.modules or {}).values()]:
            refs += [m.model for m in section.models or ()]
            for piece in section.slices or ():
                refs += [src.model for src in piece.sources] + [piece.base_model]
        keywords = {"base", "union"}  # tokenizer sources that are not models (a model may be named so)
        tokenizers = [self.tokenizer_source, self.tokenizer.source if self.tokenizer else None]
        refs += [r for r in tokenizers if r not in keywords]
        return list(dict.fromkeys(r for r in refs if r))


def format_path(path: tuple) -> str:
    """("models", 1, "parameters", "weight") -> "models[1].parameters.weight"."""
    out = ""
    for item in path:
        out += f"[{item}]" if isinstance(item, int) else (f".{item}" if out else str(item))
    return out


def locate(source: str, lines: dict[tuple, int], path: tuple) -> str:
    """'FILE:LINE: dotted.path' using the nearest ancestor with a known line; just the dotted
    path (or "recipe" for the root) when there is no file."""
    dotted = format_path(path)
    if source == NO_FILE:
        return dotted or "recipe"
    line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), None)
    head = f"{source}:{line}" if line is not None else source
    return f"{head}: {dotted}" if dotted else head


def _canonical(value: Any) -> Any:
    # 1.0 and 1 mean the same to every method (parameters are coerced to their declared type).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


class _Dumper(yaml.SafeDumper):
    """Writes lists of scalars inline (`t: [0, 0.5, 1]`), as mergekit does."""

    def represent_list(self, data: list) -> yaml.SequenceNode:
        flow = all(isinstance(e, (bool, int, float, str)) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _Dumper.represent_list)
