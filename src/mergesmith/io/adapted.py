"""A base checkpoint with a LoRA adapter applied, read tensor by tensor as the engine streams.

`AdaptedCheckpoint` has Checkpoint's interface (config, tensors, read(name, rows)), so the engine
merges `model: BASE+ADAPTER` like any folder and never holds the whole adapted model. A read adds
s·B·A to the base rows in fp32 (DoRA: rescales each output row) and rounds once to the base's
stored dtype. PEFT's merge_and_unload rounds ΔW to the model's dtype before adding it, so in fp32
the two agree bitwise and in bf16/fp16 they may differ by one rounding step. modules_to_save
tensors replace the base's, cast to its dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergesmith.errors import PlanError
from mergesmith.io.adapter import Adapter, is_adapter_folder, match_names, read_adapter
from mergesmith.io.checkpoint import Checkpoint
from mergesmith.io.pack import open_pack, pack_parts
from mergesmith.io.resolve import resolve_model


class AdaptedCheckpoint:
    """`base` with `adapter` applied; every name and shape checked when opened."""

    def __init__(self, base: Checkpoint, adapter: Adapter, label: str, base_from: str = ""):
        self.base, self.adapter, self.label = base, adapter, label
        self.path, self.config, self.tensors = base.path, base.config, base.tensors
        self.sources = [*base.sources, adapter.path]
        self.note = (f"LoRA adapter {adapter.path} (rank {_ranks(adapter)}, "
                     f"{len(adapter.modules)} modules{_dora(adapter)}"
                     f"{f', {len(adapter.saved)} saved tensors' if adapter.saved else ''}) "
                     f"on {base.label}{f' ({base_from})' if base_from else ''}")
        self._modules = self._bind(adapter.modules, "target module")
        self._saved = self._bind(adapter.saved, "saved tensor")
        self._biases = self._bind(adapter.biases, "lora_bias of a module whose bias")
        self._check_shapes()

    def _bind(self, names, what: str) -> dict[str, str]:
        """Base tensor name -> the adapter's name for it, refusing names the base lacks."""
        found = match_names(list(names), set(self.tensors))
        missing = next((n for n in names if n not in found), None)
        if missing is not None:
            raise PlanError(f"{self.adapter.label}: {what} {missing!r} is absent from the base "
                            f"{self.base.label}",
                            hint="the adapter was trained on another model; check its base")
        return {base: name for name, base in found.items()}

    def _check_shapes(self) -> None:
        for base_name, name in self._modules.items():
            self._same_shape(base_name, self.adapter.shape(name), f"module {name!r}")
        for base_name, name in self._saved.items():
            self._same_shape(base_name, self.adapter.saved_shape(name), f"saved tensor {name!r}")
        for base_name, name in self._biases.items():
            bias = self.adapter.modules[self.adapter.biases[name]].bias
            self._same_shape(base_name, self.adapter.tensor_shape(bias), f"lora_bias {bias!r}")

    def _same_shape(self, base_name: str, shape: tuple[int, ...], what: str) -> None:
        have = self.tensors[base_name].shape
        if tuple(shape) != tuple(have):
            raise PlanError(f"{self.adapter.label}: {what} has shape {list(shape)}, but "
                            f"{base_name!r} of the base {self.base.label} has {list(have)}",
                            hint="the adapter was trained on another model; check its base")

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The adapted tensor (or rows of it) in the base's stored dtype."""
        dtype = self.tensors[name].dtype
        module = self._modules.get(name)
        whole = module is not None and self.adapter.needs_whole(module)
        span = None if whole else rows
        if name in self._saved:
            base = self.adapter.read_saved(self._saved[name], span)
        else:
            base = self.base.read(name, span)
        if name in self._biases:
            return self.adapter.bias_delta(self._biases[name], rows).add_(base).to(dtype)
        if module is None:
            return base.to(dtype)
        merged = self.adapter.apply(module, base, span)
        if whole and rows is not None:
            merged = merged[rows[0]:rows[1]]
        return merged.to(dtype)


def _ranks(adapter: Adapter) -> str:
    ranks = sorted({m.rank for m in adapter.modules.values()})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def _dora(adapter: Adapter) -> str:
    return ", DoRA" if any(m.magnitude for m in adapter.modules.values()) else ""


def open_input(ref: str, opened: dict, base_model: str | None, check=lambda ck: None):
    """A recipe's model reference opened: a model folder as a Checkpoint; `BASE+ADAPTER`, or a
    bare adapter folder (its base: the recipe's base_model, else the adapter's
    base_model_name_or_path), as an AdaptedCheckpoint. `opened` caches by folder so a model named
    twice is read once; `check` runs once on each model folder opened. A delta pack (a folder
    with pack.json, or BASE+PACK) opens as a PackedCheckpoint on its base."""
    pack = pack_parts(ref, base_model)
    if pack is not None:
        base = open_input(pack[0], opened, None, check)
        key = (pack[0], pack[1].resolve())
        if key not in opened:
            opened[key] = open_pack(base, pack[1], ref, pack[2])
        return opened[key]
    base_ref, adapter_ref, base_from = _split(ref, base_model)
    if adapter_ref is None:
        folder = resolve_model(ref).resolve()
        if folder not in opened:
            opened[folder] = Checkpoint(folder, label=ref)
            check(opened[folder])
        return opened[folder]
    base = open_input(base_ref, opened, None if base_ref == base_model else base_model, check)
    key = (base_ref, resolve_model(adapter_ref).resolve())
    if key not in opened:
        opened[key] = AdaptedCheckpoint(base, read_adapter(key[1], ref), ref, base_from)
    return opened[key]


def is_adapter_ref(ref: str) -> bool:
    """`BASE+ADAPTER`, or a local adapter folder (no hub lookup)."""
    local = Path(ref).expanduser()
    if "+" in ref and not local.exists():
        return True
    return is_adapter_folder(local) and not (local / "config.json").is_file()


def _split(ref: str, base_model: str | None) -> tuple[str, str | None, str]:
    """(base reference, adapter reference or None, where the base came from)."""
    if "+" in ref and not Path(ref).expanduser().exists():
        base, _, adapter = ref.partition("+")
        return base, adapter, ""
    folder = resolve_model(ref)
    if not is_adapter_folder(folder) or (folder / "config.json").is_file():
        return ref, None, ""
    if base_model and base_model != ref:
        return base_model, ref, "the recipe's base_model"
    named = read_adapter(folder, ref).base_model
    if not named:
        raise PlanError(f"{ref}: an adapter folder with no base: its adapter_config.json has no "
                        f"base_model_name_or_path and the recipe has no base_model",
                        hint="give base_model, or write the model as BASE+ADAPTER")
    return named, ref, "base_model_name_or_path of its adapter_config.json"
