"""PEFT LoRA adapter folders in and out, with PEFT 0.21's semantics.

A folder holds adapter_config.json and adapter_model.safetensors (or a pickled adapter_model.bin,
loaded only with weights_only=True). Tensor names carry PEFT's `base_model.model.` prefix, which
is stripped, so a module is named as in the model's own state dict (`model.layers.0.mlp.up_proj`);
`Adapter.modules` is keyed by that module's weight name (`….up_proj.weight`). Matching those names
to a checkpoint whose names lack or add a prefix is the caller's job (see `match_names`).

ΔW = s·B·A with s = α/r (α/√r with use_rslora), r and α per module from rank_pattern and
alpha_pattern, matched as PEFT's get_pattern_key does (first key that is a dotted suffix of the
module name, as a regex). fan_in_fan_out (GPT-2's Conv1D) and embeddings store ΔWᵀ. DoRA scales
each output row of W + ΔW to the stored magnitude m, over the whole row as PEFT's merge does.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mergesmith.errors import CheckpointError
from mergesmith.io.checkpoint import Checkpoint, read_json_object

SUPPORTED = {"LORA"}
PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILES = "adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin")
# LoRA variants whose merged weight is not W + s·B·A (or DoRA's rescaling of it): refused by name.
VARIANTS = ("use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config", "kasa_config",
            "monteclora_config", "velora_config", "layer_replication", "target_parameters",
            "trainable_token_indices")
FACTOR_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A",
                   ".lora_embedding_B": "B", ".lora_magnitude_vector": "m",
                   ".lora_magnitude_vector.weight": "m", ".lora_B.bias": "bias"}


@dataclass
class LoraModule:
    weight: str             # base tensor name this adapts
    rank: int
    scaling: float          # α/r or α/√r, patterns applied
    fan_in_fan_out: bool    # the base stores ΔWᵀ: GPT-2 Conv1D, and every embedding
    magnitude: str | None   # DoRA magnitude tensor name in the adapter file
    embedding: bool = False  # saved as lora_embedding_A/B (A: (r, vocab), B: (dim, r))
    bias: str | None = None  # lora_bias: lora_B's bias, added (times s) to the base bias


class Adapter:
    """One PEFT LoRA adapter folder, read lazily: the header now, tensors on demand."""

    def __init__(self, path: Path, label: str, config: dict, store: Checkpoint):
        self.path, self.label, self.config, self._store = path, label, config, store
        self.base_model: str | None = config.get("base_model_name_or_path") or None
        self.modules: dict[str, LoraModule] = {}
        self.saved: dict[str, str] = {}
        self.biases: dict[str, str] = {}  # lora_bias: base bias name -> the weight it belongs to
        self._index()

    def _index(self) -> None:
        parts: dict[str, dict[str, str]] = {}
        for key in self._store.tensors:
            name = key.removeprefix(PREFIX)
            suffix = next((s for s in FACTOR_SUFFIXES if name.endswith(s)), None)
            if suffix is not None:
                found = parts.setdefault(name[: -len(suffix)], {})
                found[FACTOR_SUFFIXES[suffix]] = key
                if "embedding" in suffix:
                    found["embedding"] = key
            elif ".lora_" in name:
                raise CheckpointError(f"{self.label}: tensor {key!r} is not a LoRA A, B or DoRA "
                                      f"magnitude tensor", hint="only plain LoRA and DoRA are read")
            else:  # modules_to_save, and a targeted embedding's own weight (`….base_layer.weight`)
                self.saved[name.replace(".base_layer.", ".")] = key
        for module, found in sorted(parts.items()):
            self.modules[f"{module}.weight"] = self._module(module, found)
            if "bias" in found:
                self.biases[f"{module}.bias"] = f"{module}.weight"

    def _module(self, module: str, found: dict[str, str]) -> LoraModule:
        missing = [p for p in ("A", "B") if p not in found]
        if missing:
            raise CheckpointError(f"{self.label}: module {module!r} has no lora_{missing[0]} tensor",
                                  hint="the adapter file is incomplete")
        a, b = (self._store.tensors[found[p]].shape for p in ("A", "B"))
        if len(a) != 2 or len(b) != 2:
            raise CheckpointError(f"{self.label}: module {module!r} is a convolution LoRA "
                                  f"(A {list(a)}), which mergesmith does not apply yet")
        rank, alpha = _pattern(self.config, "rank_pattern", "r", module), \
            _pattern(self.config, "alpha_pattern", "lora_alpha", module)
        if a[0] != rank or b[1] != rank:
            raise CheckpointError(f"{self.label}: module {module!r} has rank {a[0]} tensors (A "
                                  f"{list(a)}, B {list(b)}) but the config says r={rank}",
                                  hint="adapter_config.json does not belong to these weights")
        embedding = "embedding" in found
        if embedding and "m" in found:
            raise CheckpointError(f"{self.label}: DoRA on embedding {module!r} is not supported")
        scaling = alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank)
        return LoraModule(f"{module}.weight", rank, float(scaling),
                          embedding or bool(self.config.get("fan_in_fan_out")), found.get("m"),
                          embedding, found.get("bias"))

    def factors(self, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in fp32, PEFT's layout: B (d_out, r), A (r, d_in); scaling not folded in."""
        return tuple(self._tensor(n).float() for n in self._factor_names(weight))  # type: ignore[return-value]

    def _factor_names(self, weight: str) -> tuple[str, str]:
        stem = weight.removesuffix(".weight")
        if self.modules[weight].embedding:
            return f"{stem}.lora_embedding_B", f"{stem}.lora_embedding_A"
        return f"{stem}.lora_B.weight", f"{stem}.lora_A.weight"

    def delta(self, weight: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """s·B·A in fp32 in the base checkpoint's stored layout (ΔWᵀ for fan_in_fan_out and
        embeddings); rows [start, stop) of its first dimension only when rows is given."""
        module = self.modules[weight]
        b, a = self.factors(weight)
        start, stop = rows if rows is not None else (None, None)
        if module.fan_in_fan_out:  # rows of ΔWᵀ are columns of B·A, taken from A as PEFT rounds
            return (b @ a[:, start:stop]).T.contiguous().mul_(module.scaling)
        return (b[start:stop] @ a).mul_(module.scaling)

    def apply(self, weight: str, base: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """W + ΔW in fp32 for the base tensor (or its rows), DoRA-rescaled where the adapter has
        a magnitude. DoRA with fan_in_fan_out needs the whole tensor: its rows are columns here."""
        module = self.modules[weight]
        if rows is not None and self.needs_whole(weight):
            raise ValueError(f"{weight}: DoRA with fan_in_fan_out is applied to the whole tensor")
        merged = self.delta(weight, rows).add_(base)  # in place: one fp32 block, not two
        if module.magnitude is None:
            return merged
        magnitude = self._tensor(module.magnitude).float()
        if module.fan_in_fan_out:
            return merged * (magnitude / torch.linalg.norm(merged, dim=0))
        if rows is not None:
            magnitude = magnitude[rows[0]:rows[1]]
        return merged * (magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1)

    def bias_delta(self, bias: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """s·b of lora_B's bias (lora_bias) for the base bias `bias`, in fp32."""
        module = self.modules[self.biases[bias]]
        start, stop = rows if rows is not None else (None, None)
        return self._tensor(module.bias).float()[start:stop].mul_(module.scaling)

    def read_saved(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self._store.read(self.saved[name], rows)

    def shape(self, weight: str) -> tuple[int, ...]:
        """The stored shape of the base tensor `weight` that this adapter's ΔW fits."""
        b, a = self._factor_names(weight)
        shape = (self._info(b).shape[0], self._info(a).shape[1])
        return shape[::-1] if self.modules[weight].fan_in_fan_out else shape

    def saved_shape(self, name: str) -> tuple[int, ...]:
        return self._info(self.saved[name]).shape

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def needs_whole(self, weight: str) -> bool:
        """DoRA normalises per output row, which is a column of a fan_in_fan_out tensor."""
        module = self.modules[weight]
        return module.magnitude is not None and module.fan_in_fan_out

    def _info(self, name: str):
        return self._store.tensors[name if name in self._store.tensors else PREFIX + name]

    def _tensor(self, name: str) -> torch.Tensor:
        return self._store.read(self._info(name).name)


def _pattern(config: dict, pattern: str, default: str, module: str):
    """PEFT's get_pattern_key: the first pattern key that matches a dotted suffix as a regex."""
    patterns = config.get(pattern) or {}
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return config[default]


def read_adapter(path: Path, label: str | None = None) -> Adapter:
    path = Path(path)
    label = label or str(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{label}: no {CONFIG_FILE} in {path}",
                              hint="an adapter folder is what PeftModel.save_pretrained writes")
    config = read_json_object(config_file, "adapter config")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED:
        raise CheckpointError(f"{label}: adapter type {config.get('peft_type')!r} is not supported "
                              f"(only LoRA and DoRA adapters are read)",
                              hint="merge_and_unload it with PEFT into a full checkpoint first")
    variant = next((k for k in VARIANTS if config.get(k)), None)
    if variant is not None:
        raise CheckpointError(f"{label}: LoRA variant {variant}={config[variant]!r} is not supported",
                              hint="merge_and_unload it with PEFT into a full checkpoint first")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise CheckpointError(f"{config_file}: {key} must be a positive number, got "
                                  f"{config.get(key)!r}")
    weights = next((path / f for f in WEIGHTS_FILES if (path / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{label}: no adapter weights in {path}",
                              hint=f"expected {' or '.join(WEIGHTS_FILES)}")
    return Adapter(path, label, config, Checkpoint.of_file(weights, label, config))


def is_adapter_folder(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def match_names(names: list[str], base: set[str]) -> dict[str, str]:
    """Each adapter tensor name -> the base checkpoint's name for it: the same name, or the one
    that differs only by a leading prefix (a base saved from GPT2Model lacks `transformer.`; one
    saved from a task model adds `bert.`). Names with no unique match are left out."""
    found = {}
    for name in names:
        if name in base:
            found[name] = name
            continue
        near = [b for b in base if name.endswith("." + b) or b.endswith("." + name)]
        if len(near) == 1:
            found[name] = near[0]
    return found


def write_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                  base_model: str | None, ranks: dict[str, int] | None = None,
                  alphas: dict[str, float] | None = None, saved: dict[str, torch.Tensor] | None = None,
                  fan_in_fan_out: bool = False, extra_config: dict | None = None,
                  embeddings: set[str] | None = None) -> None:
    """An adapter folder that PeftModel.from_pretrained loads. factors: base weight name ->
    (B, A), PEFT's layout; α defaults to each module's rank, so its scaling is 1. r is the
    largest rank; modules whose rank or α differs go to rank_pattern / alpha_pattern under
    their full module names. `embeddings` names weights saved as lora_embedding_A/B."""
    from safetensors.torch import save_file

    folder = Path(folder)
    ranks, alphas, embeddings = dict(ranks or {}), dict(alphas or {}), set(embeddings or ())
    modules, tensors = {}, {}
    for weight, (b, a) in factors.items():
        if not weight.endswith(".weight") or b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise CheckpointError(f"{folder}: cannot write LoRA factors for {weight!r} (B "
                                  f"{list(b.shape)}, A {list(a.shape)})",
                                  hint="B is (d_out, r), A is (r, d_in), keyed by a '.weight' name")
        module = weight.removesuffix(".weight")
        rank = ranks.get(weight, b.shape[1])
        modules[module] = (rank, float(alphas.get(weight, rank)))
        kind = ("lora_embedding_B", "lora_embedding_A") if weight in embeddings else \
            ("lora_B.weight", "lora_A.weight")
        tensors[f"{PREFIX}{module}.{kind[0]}"] = b.contiguous()
        tensors[f"{PREFIX}{module}.{kind[1]}"] = a.contiguous()
    to_save = set()
    for name, tensor in (saved or {}).items():
        module, leaf = name.replace(".base_layer.", ".").rsplit(".", 1)
        if module in modules:  # a targeted module's own weight, as PEFT's save_embedding_layers
            tensors[f"{PREFIX}{module}.base_layer.{leaf}"] = tensor.contiguous()
        else:
            tensors[PREFIX + name] = tensor.contiguous()
            to_save.add(module)
    r = max((rank for rank, _ in modules.values()), default=1)
    alpha = float(r)
    config = {
        "peft_type": "LORA", "base_model_name_or_path": base_model, "task_type": None,
        "r": r, "lora_alpha": _number(alpha), "target_modules": sorted(modules),
        "rank_pattern": {m: k for m, (k, _) in modules.items() if k != r},
        "alpha_pattern": {m: _number(al) for m, (_, al) in modules.items() if al != alpha},
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "lora_dropout": 0.0,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": sorted(to_save) or None,
        **(extra_config or {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILES[0]), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _number(value: float) -> int | float:
    """Whole α values as ints, as PEFT writes them."""
    return int(value) if float(value).is_integer() else value
