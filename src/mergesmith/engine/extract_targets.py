"""Which tensors of a full fine-tune become LoRA factors and which are saved whole
(mergekit-extract-lora 0.1.5's walk over the model's modules, engine/extract_lora.py's plan).

A module's type decides, as in mergekit: Linear, Embedding and (beyond mergekit) GPT-2's Conv1D
weights are factored; the input and output embeddings are saved whole unless `embed_lora` (and
always when the vocabulary changed); every other module with a weight (norms) is saved whole, or
dropped with `skip_undecomposable`. The types come from the model built on the meta device from
config.json (no weight read), as mergekit builds it, except for the plain decoders of DECODERS,
whose types show in their tensors' names and shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mergesmith.errors import PlanError
from mergesmith.io import Checkpoint

if TYPE_CHECKING:
    from mergesmith.engine.extract_lora import Options


@dataclass(frozen=True)
class Target:
    """One module of the fine-tune: `kind` "lora" (τ factored), "embedding" or "conv1d" (τᵀ
    factored: PEFT's layout for those), or "save" (its tensors copied whole). `weight`/`bias`
    name the checkpoint tensors (a tied weight's source)."""

    module: str
    kind: str
    weight: str
    bias: str | None
    shape: tuple[int, ...]

    @property
    def transposed(self) -> bool:
        return self.kind in ("embedding", "conv1d")


@dataclass(frozen=True)
class Module:
    """What the walk needs of one module with a weight: its checkpoint tensors, whether it is an
    embedding (`role` "input" / "output": the model's own; or any other nn.Embedding), and how
    PEFT would adapt it (`kind` as Target's), None where it cannot."""

    name: str
    weight: str
    bias: str | None
    embedding: bool
    kind: str | None
    role: str | None = None


def plan_targets(base: Checkpoint, ft: Checkpoint, options: Options) -> list[Target]:
    """mergekit's walk over the model's modules, in order."""
    modules = _decoder_modules(ft) or list(_meta_modules(ft))
    embed_lora = options.embed_lora and not _vocab_changed(base, ft, modules)
    save = list(options.save_modules)
    targets = []
    for m in modules:
        key = m.name.rsplit(".", 1)[-1]
        if m.embedding and not embed_lora and not _matches(options.exclude, m.name) and key not in save:
            save.append(key)
        if m.name in save or key in save:
            kind = "save"
        elif not _wanted(options, m.name):
            continue
        elif m.kind is not None:
            kind = m.kind
        elif options.skip_undecomposable:
            continue
        else:  # a norm, or another module PEFT cannot adapt: whole, as mergekit does
            kind = "save"
            if key not in save:
                save.append(key)
        targets.append(Target(m.name, kind, m.weight, m.bias, tuple(ft.tensors[m.weight].shape)))
    _check_shapes(base, ft, targets)
    return targets


# Decoders whose module types show in their tensors: the token embedding `model.embed_tokens`
# (an Embedding), the head `lm_head` (absent when tied to it), every other 2-D weight a Linear,
# every 1-D weight a norm. These are not built: transformers' modeling code alone costs 130 MB
# of memory, more than the extraction's own at 1B. tests/test_extract_lora.py checks that the
# walk over their tensors and the walk over the built model agree.
DECODERS = {"llama", "mistral", "qwen2", "gemma"}


def _decoder_modules(ck: Checkpoint) -> list[Module] | None:
    if ck.config.get("model_type") not in DECODERS or "model.embed_tokens.weight" not in ck.tensors:
        return None
    params: dict[str, dict[str, str]] = {}
    for tensor in ck.tensors:
        module, _, param = tensor.rpartition(".")
        if param in ("weight", "bias"):
            params.setdefault(module, {})[param] = tensor
    params.setdefault("lm_head", {"weight": "model.embed_tokens.weight"})  # tied
    modules = []
    for name, found in params.items():
        if "weight" not in found:
            continue
        role = {"model.embed_tokens": "input", "lm_head": "output"}.get(name)
        flat = len(ck.tensors[found["weight"]].shape) == 2
        kind = ("embedding" if role == "input" else "lora") if flat else None
        modules.append(Module(name, found["weight"], found.get("bias"), role is not None, kind, role))
    return sorted(modules, key=_model_order)


def _model_order(m: Module) -> tuple:
    """The built model's order, near enough: embeddings, layers by number, the head last."""
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in m.name.split("."))
    return {"input": 0, "output": 2}.get(m.role, 1), parts


def _meta_modules(ck: Checkpoint):
    """The modules of the model built on the meta device from config.json (no weight read)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    model = _meta_model(ck)
    source = _sources(model, ck)
    roles = {id(model.get_input_embeddings()): "input", id(model.get_output_embeddings()): "output"}
    for name, module in model.named_modules():
        weight = source.get(f"{name}.weight") if "weight" in module._parameters else None
        if weight is None:
            continue
        bias = source.get(f"{name}.bias") if "bias" in module._parameters else None
        role = roles.get(id(module))
        kind = None
        if len(ck.tensors[weight].shape) == 2 and isinstance(module, (nn.Linear, nn.Embedding, Conv1D)):
            kind = ("embedding" if isinstance(module, nn.Embedding) else
                    "conv1d" if isinstance(module, Conv1D) else "lora")
        yield Module(name, weight, bias, role is not None or isinstance(module, nn.Embedding), kind, role)


def _wanted(options: Options, name: str) -> bool:
    """mergekit's --include-regex / --exclude-regex (re.search on the module name)."""
    if options.include and not _matches(options.include, name):
        return False
    return not _matches(options.exclude, name)


def _meta_model(ck: Checkpoint) -> torch.nn.Module:
    """The model's modules from config.json alone (no weight read): their types decide."""
    import transformers as tf

    names = list(ck.config.get("architectures") or [])
    cls = next((getattr(tf, n) for n in names if hasattr(tf, n)), None)
    if cls is None:
        raise PlanError(f"{ck.label}: config.json names no transformers architecture ({names}), "
                        "so which tensors are Linear, Embedding or norms is unknown",
                        hint="set `architectures` in config.json (e.g. LlamaForCausalLM)")
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return cls(tf.AutoConfig.from_pretrained(ck.path))
    finally:
        tf.logging.set_verbosity(verbosity)


def _sources(model: torch.nn.Module, ck: Checkpoint) -> dict[str, str]:
    """Parameter name -> the checkpoint tensor holding it; a tied parameter (an LM head tied to
    the embeddings) is read from the tensor of the name the checkpoint has."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    found = {}
    for names in groups.values():
        stored = next((n for n in names if n in ck.tensors), None)
        if stored is not None:
            found.update(dict.fromkeys(names, stored))
    return found


def _vocab_changed(base: Checkpoint, ft: Checkpoint, modules: list[Module]) -> bool:
    """A resized vocabulary: mergekit then saves the embeddings whole, whatever embed_lora says."""
    stored = next((m.weight for m in modules if m.role == "input"), None)
    return bool(stored and stored in base.tensors
                and base.tensors[stored].shape[0] != ft.tensors[stored].shape[0])


def _matches(patterns: tuple[str, ...], name: str) -> bool:
    return any(re.search(p, name) for p in patterns)


def _check_shapes(base: Checkpoint, ft: Checkpoint, targets: list[Target]) -> None:
    """Every factored tensor must be in the base with the fine-tune's shape (before any compute)."""
    for t in targets:
        for name in (t.weight, t.bias) if t.kind != "save" else ():
            if name is None:
                continue
            if name not in base.tensors:
                raise PlanError(f"tensor {name!r} of {ft.label} is missing from {base.label}",
                                hint="extract against the base model this fine-tune started from")
            if base.tensors[name].shape != ft.tensors[name].shape:
                raise PlanError(f"tensor {name!r}: {ft.label} has shape "
                                f"{list(ft.tensors[name].shape)}, {base.label} "
                                f"{list(base.tensors[name].shape)}",
                                hint="extract against the base model this fine-tune started from")
