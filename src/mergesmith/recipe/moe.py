"""mergekit-moe's config, as `mergesmith moe CONFIG OUT` reads it.

Every field of mergekit-moe's YAML is accepted with its meaning (base_model, experts with
positive/negative prompts, noise_scale, residual_scale, gate_mode, dtype, experts_per_token,
shared_experts, architecture); ours are tokenizer_source, allow_identical_experts (mergekit's
--i-understand-this-is-not-useful-without-training), non_expert (BTX), norm_topk_prob and seed.
A model reference may be mergekit's `BASE+ADAPTER` (a PEFT LoRA merged in as the experts stream,
moe/assemble.py), which mergekit-moe 0.1.5 itself refuses ("LoRA not merged").
Errors read 'moe.yml:7: experts[1].source_model: <what is wrong>', as for a recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, field_validator

from mergesmith.errors import RecipeError
from mergesmith.recipe.loader import (
    MAX_NODES, MAX_RECIPE_BYTES, _BoundedLoader, _collect_lines, _expanded_size, _is_file, _recipe_error,
    _too_big, _TooLarge,
)
from mergesmith.recipe.schema import NO_FILE, _adapter_form, _dtype, _model_ref, locate

GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")


class ExpertConfig(BaseModel):
    """One dense model whose MLPs become an expert (or the shared expert) in every layer."""

    model_config = ConfigDict(extra="forbid")

    source_model: StrictStr
    positive_prompts: Optional[list[StrictStr]] = None
    negative_prompts: Optional[list[StrictStr]] = None
    noise_scale: Optional[float] = None  # adds N(0, noise_scale²) to each MLP weight
    residual_scale: Optional[float] = None  # multiplies the down projection

    _check_ref = field_validator("source_model")(_model_ref)
    _plain = field_validator("source_model")(_adapter_form)


class MoeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: StrictStr
    experts: list[ExpertConfig] = Field(min_length=1)
    gate_mode: Literal[GATE_MODES] = "hidden"
    dtype: Optional[StrictStr] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[ExpertConfig]] = None
    architecture: Optional[StrictStr] = None  # mixtral | qwen2_moe | qwen3_moe (or mergekit's names)
    tokenizer_source: Optional[StrictStr] = None
    allow_identical_experts: StrictBool = False
    non_expert: Literal["base", "average"] = "base"  # average: BTX's mean of the experts
    norm_topk_prob: Optional[StrictBool] = None  # Qwen-MoE: renormalise the top-k weights
    seed: int = 0

    _check_ref = field_validator("base_model")(_model_ref)
    _plain = field_validator("base_model", "tokenizer_source")(_adapter_form)
    _normalise_dtype = field_validator("dtype")(_dtype)

    _source: str = NO_FILE
    _lines: dict = {}
    _text: Optional[str] = None

    def where(self, *path: str | int) -> str:
        """'FILE:LINE: dotted.path' of a field, for errors found after loading."""
        return locate(self._source, self._lines, path)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_defaults=True), sort_keys=False)


def load_moe_config(source: str | Path | dict) -> MoeConfig:
    """A MoeConfig from a YAML file path, a YAML string or a dict; every problem a RecipeError
    naming the file, line and field."""
    if isinstance(source, dict):
        return _validate(source, NO_FILE, {}, None)
    if isinstance(source, str) and not source.strip():
        raise RecipeError("the MoE config is empty", hint="it needs base_model and experts")
    if isinstance(source, str) and not _is_file(source) and ("\n" in source or ":" in source):
        return _parse(source, NO_FILE)
    path = Path(source)
    if not path.is_file():
        what = "is a directory, not a config file" if path.is_dir() else "MoE config file not found"
        raise RecipeError(f"{path}: {what}", hint="give the path of a mergekit-moe .yaml config")
    try:
        raw = path.read_bytes()[:MAX_RECIPE_BYTES + 1]
        if len(raw) > MAX_RECIPE_BYTES:
            _too_big(str(path))
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the MoE config: {exc}") from None
    return _parse(text, str(path))


def _parse(text: str, source: str) -> MoeConfig:
    where = source if source != NO_FILE else "MoE config"
    if len(text) > MAX_RECIPE_BYTES:
        _too_big(where)
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}, set()) > MAX_NODES:
            raise _TooLarge(f"aliases that expand to more than {MAX_NODES} YAML nodes")
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        head = where + (f":{mark.line + 1}" if mark is not None else "")
        raise RecipeError(f"{head}: invalid YAML: {' '.join(str(problem).split())}") from None
    except _TooLarge as exc:
        raise RecipeError(f"{where}: the config has {exc}",
                          hint="an MoE config is a few dozen lines; write repeated parts out") from None
    finally:
        loader.dispose()
    if data is None:
        raise RecipeError(f"{where}: the MoE config is empty",
                          hint="it needs base_model and experts (each with source_model)")
    lines: dict[tuple, int] = {}
    _collect_lines(node, (), lines, set())
    return _validate(data, source, lines, text)


def _fields_at(owner: tuple) -> list[str] | None:
    if not owner:
        return list(MoeConfig.model_fields)
    if len(owner) == 2 and owner[0] in ("experts", "shared_experts"):
        return list(ExpertConfig.model_fields)
    return None


def _validate(data: Any, source: str, lines: dict, text: str | None) -> MoeConfig:
    if not isinstance(data, dict):
        where = locate(source, lines, ()) if source != NO_FILE else "MoE config"
        raise RecipeError(f"{where}: an MoE config must be a mapping of fields",
                          hint="start with 'base_model: ...' and 'experts:'")
    try:
        config = MoeConfig.model_validate(data)
    except ValidationError as exc:
        raise _recipe_error(exc, data, source, lines, fields_at=_fields_at) from None
    config._source, config._lines, config._text = source, lines, text
    _check(config)
    return config


def _check(config: MoeConfig) -> None:
    """What one field alone cannot say (the prompts each gate_mode needs are checked where the
    rows are made, moe/gates.py)."""
    count = len(config.experts)
    if not 1 <= config.experts_per_token <= count:
        raise RecipeError(f"{config.where('experts_per_token')}: {config.experts_per_token} experts "
                          f"per token, with {count} expert(s)",
                          hint=f"route each token to between 1 and {count} experts")
    shared = config.shared_experts or []
    if len({bool(e.positive_prompts) for e in shared}) > 1:
        raise RecipeError(f"{config.where('shared_experts')}: give prompts for every shared expert "
                          "or for none", hint="as mergekit-moe")


def upcycle_config(model: str, experts: int, *, noise_scale: float | None = None,
                   experts_per_token: int = 2, architecture: str | None = None,
                   dtype: str | None = None, seed: int = 0, shared_expert: bool = False) -> MoeConfig:
    """AquilaMoE's scale-out: one dense model repeated `experts` times, random router rows
    (`noise_scale` breaks the experts' symmetry). A shared expert (Qwen-MoE) is the model's MLP
    with its down projection zeroed, so that the MoE starts as the dense model."""
    expert = {"source_model": model, **({"noise_scale": noise_scale} if noise_scale else {})}
    data = {"base_model": model, "experts": [expert] * experts, "gate_mode": "random",
            "experts_per_token": experts_per_token, "allow_identical_experts": True, "seed": seed}
    if architecture:
        data["architecture"] = architecture
    if dtype:
        data["dtype"] = dtype
    if shared_expert:
        data["shared_experts"] = [{"source_model": model, "residual_scale": 0.0}]
    config = load_moe_config(data)
    config._text = config.to_yaml()
    return config
