"""Permutation alignment of whole models: a transformer's permutation spec, weight matching over
it, and the aligned models as views re-indexed by the permutations, which merge like any model
or are written as ordinary checkpoints through engine/program.py.

Unlike a merge, weight matching cannot stream tensor by tensor: a permutation couples every
tensor it touches (the residual stream's touches all of them), so it holds every model's
tensors in memory in float32 while it solves. Only the writing streams.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from mergesmith.engine.compatibility import check_config_matches_weights, config_difference
from mergesmith.engine.program import Output, Program, write_program
from mergesmith.errors import OutputError, PlanError
from mergesmith.io.adapted import open_input
from mergesmith.io.views import View, reindexed, stored
from mergesmith.methods.permutation import Axis, Matching, Spec, indices, weight_matching_many

FAMILIES = ("mlp", "heads", "residual")  # the default units
OPTIONAL = ("head_dims",)  # dims within each value head (V rows, O columns), with heads
SCHEMES = ("mean", "reference")
SUPPORTED = "llama, mistral, qwen2, qwen3, gemma and gpt2"

# tensor name -> {axis: unit kind}; kinds become Axis objects per layer in _axis. A bias follows
# its weight's output rows; sequence-classification heads (`score`) read the residual stream.
_LAYER = r"model\.layers\.(\d+)\."
_LLAMA = [
    (r"model\.embed_tokens\.weight", {1: "residual"}),
    (r"model\.norm\.weight", {0: "residual"}),
    (r"(lm_head|score)\.weight", {1: "residual"}),
    (_LAYER + r"(input_layernorm|post_attention_layernorm)\.weight", {0: "residual"}),
    (_LAYER + r"self_attn\.q_proj\.weight", {0: "q", 1: "residual"}),
    (_LAYER + r"self_attn\.q_proj\.bias", {0: "q"}),
    (_LAYER + r"self_attn\.k_proj\.weight", {0: "kv", 1: "residual"}),
    (_LAYER + r"self_attn\.k_proj\.bias", {0: "kv"}),
    (_LAYER + r"self_attn\.v_proj\.weight", {0: "v", 1: "residual"}),
    (_LAYER + r"self_attn\.v_proj\.bias", {0: "v"}),
    (_LAYER + r"self_attn\.o_proj\.weight", {0: "residual", 1: "o"}),
    (_LAYER + r"self_attn\.o_proj\.bias", {0: "residual"}),
    (_LAYER + r"self_attn\.(q_norm|k_norm)\.weight", {}),  # Qwen3: over a head's dims, shared by heads
    (_LAYER + r"mlp\.(gate_proj|up_proj)\.weight", {0: "mlp", 1: "residual"}),
    (_LAYER + r"mlp\.(gate_proj|up_proj)\.bias", {0: "mlp"}),
    (_LAYER + r"mlp\.down_proj\.weight", {0: "residual", 1: "mlp"}),
    (_LAYER + r"mlp\.down_proj\.bias", {0: "residual"}),
]
_BLOCK = r"transformer\.h\.(\d+)\."
_GPT2 = [  # Conv1D weights are stored [in, out]
    (r"transformer\.(wte|wpe)\.weight", {1: "residual"}),
    (r"transformer\.ln_f\.(weight|bias)", {0: "residual"}),
    (r"(lm_head|score)\.weight", {1: "residual"}),
    (_BLOCK + r"(ln_1|ln_2)\.(weight|bias)", {0: "residual"}),
    (_BLOCK + r"attn\.c_attn\.weight", {0: "residual", 1: "qkv"}),
    (_BLOCK + r"attn\.c_attn\.bias", {0: "qkv"}),
    (_BLOCK + r"attn\.c_proj\.weight", {0: "head", 1: "residual"}),
    (_BLOCK + r"(attn\.c_proj|mlp\.c_proj)\.bias", {0: "residual"}),
    (_BLOCK + r"mlp\.c_fc\.weight", {0: "residual", 1: "mlp"}),
    (_BLOCK + r"mlp\.c_fc\.bias", {0: "mlp"}),
    (_BLOCK + r"mlp\.c_proj\.weight", {0: "mlp", 1: "residual"}),
    (_BLOCK + r"attn\.(bias|masked_bias)", {}),  # causal-mask buffers of old checkpoints
]
_RULES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
          "gpt2": _GPT2}


def _heads(config: dict) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim)."""
    heads = config.get("num_attention_heads") or config.get("n_head")
    kv = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size") or config.get("n_embd")
    return heads, kv, config.get("head_dim") or hidden // heads


def _axis(kind: str, layer: str | None, config: dict) -> Axis:
    heads, kv, dim = _heads(config)
    if kind == "residual":
        return Axis("residual")
    if kind == "mlp":
        return Axis(f"mlp.{layer}")
    # with GQA a key/value head moves together with its group of query heads; dims within a
    # query/key head stay fixed (RoPE rotates them in pairs); those of a value head may move
    # (its V rows with the O columns of each query head that reads it)
    block = {"q": heads // kv * dim, "o": heads // kv * dim, "kv": dim, "v": dim, "qkv": dim,
             "head": dim}[kind]
    inner = f"head_dims.{layer}" if kind in ("v", "o") else None
    return Axis(f"heads.{layer}", block=block, parts=3 if kind == "qkv" else 1, inner=inner,
                inner_block=dim if inner else 1)


def permutation_spec(ck) -> Spec:
    """Which axes of `ck`'s tensors share which permutation: "residual" (global), "mlp.L" (MLP
    hidden units of layer L) and "heads.L" (key/value heads with their query heads)."""
    model_type = ck.config.get("model_type")
    rules = _RULES.get(model_type)
    if rules is None:
        raise PlanError(f"{ck.label}: weight matching has no permutation spec for architecture "
                        f"{model_type!r}", hint=f"it supports {SUPPORTED}")
    heads, kv, _ = _heads(ck.config)
    if not heads or heads % kv:
        raise PlanError(f"{ck.label}: config.json gives {heads} attention heads and {kv} key/value "
                        "heads; weight matching needs whole groups of query heads per key/value head")
    spec = Spec({})
    for name, info in ck.tensors.items():
        found = next(((m, kinds) for p, kinds in rules if (m := re.fullmatch(p, name))), None)
        if found is None:
            raise PlanError(f"{ck.label}: weight matching has no permutation rule for tensor {name!r} "
                            f"({model_type})", hint=f"it knows the standard tensors of {SUPPORTED} "
                            "checkpoints; a tensor it does not know could break the model's function")
        match, kinds = found
        layer = match.group(1) if match.groups() and match.group(1).isdigit() else None
        moved = {axis: _axis(kind, layer, ck.config) for axis, kind in kinds.items()}
        for axis, ax in moved.items():
            if ax.inner:
                spec.sizes[ax.inner], spec.inner[ax.inner] = ax.inner_block, ax.perm
            units, left = divmod(info.shape[axis], ax.block * ax.parts)
            if left or spec.sizes.setdefault(ax.perm, units) != units:
                why = (f"not a whole number of {ax.perm!r} units of {ax.block * ax.parts}" if left
                       else f"{units} {ax.perm!r} units where other tensors have {spec.sizes[ax.perm]}")
                raise PlanError(f"{ck.label}: tensor {name!r} has {info.shape[axis]} entries on axis "
                                f"{axis}: {why}", hint="config.json does not describe these weights")
        if moved:
            spec.axes[name] = moved
    return spec


@dataclass
class Aligned:
    """One model after alignment: the view that presents it permuted (the reference itself for
    the reference) and the permutations found."""

    model: object  # Checkpoint or View
    matching: Matching
    source: object  # the checkpoint as opened


def aligned_view(ck, spec: Spec, perms: dict[str, torch.Tensor], label: str | None = None) -> View:
    """`ck` with every tensor re-indexed by `perms` along the axes the spec gives."""
    entries = {name: reindexed(ck, name, indices(spec, perms, name)) if name in spec.axes
               else stored(ck, name) for name in ck.tensors}
    return View(label or ck.label, ck.config, entries, [ck])


def _check_same_model(ref, ck) -> None:
    found = config_difference(ref, ck, layers=True)
    if found is not None:
        raise PlanError(f"cannot align {ck.label} to {ref.label}: different models ({found})",
                        hint="weight matching aligns models of one architecture and size")
    mine = {n: tuple(i.shape) for n, i in ref.tensors.items()}
    theirs = {n: tuple(i.shape) for n, i in ck.tensors.items()}
    for name in sorted(mine.keys() | theirs.keys()):
        if mine.get(name) != theirs.get(name):
            raise PlanError(f"cannot align {ck.label} to {ref.label}: tensor {name!r} is "
                            f"{list(mine[name]) if name in mine else 'absent'} in {ref.label} and "
                            f"{list(theirs[name]) if name in theirs else 'absent'} in {ck.label}",
                            hint="weight matching aligns models of one architecture and size")


def align_models(models: list, *, reference: int = 0, units=FAMILIES, max_sweeps: int = 100,
                 seed: int = 0, scheme: str = "mean", device: str = "cpu",
                 log: Callable[[str], None] | None = None) -> list[Aligned]:
    """Weight matching of opened models (checkpoints or views) onto `models[reference]`; the
    products run on `device`, which holds every model's tensors in float32."""
    if len(models) < 2:
        raise PlanError(f"alignment needs two models or more, got {len(models)}")
    bad = [u for u in units if u not in FAMILIES + OPTIONAL] or ([] if units else ["(none)"])
    if bad:
        raise PlanError(f"unknown unit family {bad[0]!r} to align",
                        hint=f"use some of {', '.join(FAMILIES + OPTIONAL)}")
    if "head_dims" in units and "heads" not in units:
        raise PlanError("head_dims moves dims within the heads, so it aligns with heads only",
                        hint="give units heads,head_dims (and mlp, residual as you like)")
    if scheme not in SCHEMES:
        raise PlanError(f"unknown alignment scheme {scheme!r}", hint=f"use {' or '.join(SCHEMES)}")
    ref = models[reference]
    spec = permutation_spec(ref).only(units)
    for ck in models:
        if ck is not ref:
            _check_same_model(ref, ck)
    if log:
        log(f"weight matching {len(models) - 1} model(s) onto {ref.label}: "
            f"{len(spec.sizes)} permutations ({', '.join(units)}), tensors held in memory")
    tensors = [{name: ck.read(name).to(device, torch.float32) for name in spec.axes} for ck in models]
    found = weight_matching_many(spec, tensors, reference=reference, scheme=scheme,
                                 max_sweeps=max_sweeps, seed=seed, on_sweep=log and (
                                     lambda k, sweeps, value: log(f"  {models[k].label}: sweep "
                                                                  f"{sweeps}, objective {value:.6g}")))
    result = []
    for k, (ck, matching) in enumerate(zip(models, found)):
        if log and k != reference:
            rounds = f" in {matching.rounds} round(s) against the others' mean" if matching.rounds else ""
            log(f"  {ck.label}: {matching.sweeps} sweep(s){rounds}, objective against the reference "
                f"{matching.objective[0]:.6g} -> {matching.objective[-1]:.6g}")
        view = ck if k == reference else aligned_view(ck, spec, matching.perms)
        if k != reference:
            view.note = f"aligned to {ref.label} by weight matching ({matching.sweeps} sweeps)"
        result.append(Aligned(view, matching, ck))
    return result


def open_models(refs: list) -> list:
    cache: dict = {}
    return [open_input(str(ref), cache, None, check_config_matches_weights) for ref in refs]


def align(models: list, out: str | Path, *, reference: str | int | None = None, units=FAMILIES,
          max_sweeps: int = 100, seed: int = 0, scheme: str = "mean", shard_size: str | int = "5GB",
          device: str = "cpu", overwrite: bool = False, resume: bool = False, progress: bool = False,
          log: Callable[[str], None] | None = None) -> list[Path]:
    """Align `models` (folders or hub ids) onto the reference (default: the first) by weight
    matching and write each other model, permuted, to OUT/<its folder name>; returns the folders
    written. (mergesmith.align also offers PLeaS, which needs data.)"""
    method = "weight_matching"
    refs = [str(m) for m in models]
    index = reference_index(refs, reference)
    names = _folder_names(refs)
    for k, name in enumerate(names):  # before the matching, which may take long
        target = Path(out) / name
        taken = target.exists() and (not target.is_dir() or any(target.iterdir()))
        if k != index and taken and not overwrite:
            raise OutputError(f"output {target} already exists",
                              hint="choose a new folder or pass --overwrite")
    aligned = align_models(open_models(refs), reference=index, units=units, max_sweeps=max_sweeps,
                           seed=seed, scheme=scheme, device=device, log=log)
    ref = aligned[index].source
    written = []
    for k, item in enumerate(aligned):
        if k == index:
            continue
        settings = {"method": method, "reference": refs[index], "model": refs[k], "units": list(units),
                    "scheme": scheme, "max_sweeps": max_sweeps, "seed": seed}
        written.append(write_program(_program(item, ref, settings), Path(out) / names[k],
                                     shard_size=shard_size, device=device, overwrite=overwrite,
                                     resume=resume, progress=progress,
                                     notes={"alignment.json": _record(item)}))
    return written


def reference_index(refs: list[str], reference: str | int | None) -> int:
    if reference is None:
        return 0
    if isinstance(reference, int) and 0 <= reference < len(refs):
        return reference
    if str(reference) in refs:
        return refs.index(str(reference))
    raise PlanError(f"reference {reference!r} is not one of the models to align",
                    hint="give one of the models named, or leave it out to use the first")


def _folder_names(refs: list[str]) -> list[str]:
    """A distinct output folder name per model: its folder's (or hub id's) last part."""
    names: list[str] = []
    for ref in refs:
        stem = Path(ref.rstrip("/")).name or "model"
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


def _program(item: Aligned, ref, settings: dict) -> Program:
    view = item.model
    outputs = [Output(name, [(view, name)]) for name in sorted(view.tensors)]
    matching = item.matching
    summary = (f"{item.source.label} with its units permuted onto {ref.label} by Git Re-Basin "
               f"weight matching ({', '.join(settings['units'])}; {matching.sweeps} sweep(s), "
               f"objective {matching.objective[0]:.6g} -> {matching.objective[-1]:.6g}). It computes "
               "the same function as the original; merge it with the reference like any model.")
    title = f"{item.source.label} aligned to {ref.label}"
    return Program(outputs, dict(item.source.config), item.source, title, summary,
                   record=("alignment.yml", yaml.safe_dump(settings, sort_keys=False)),
                   seed=settings["seed"], models={settings["model"]: item.source})


def _record(item: Aligned) -> str:
    """The permutations found (b aligned = b re-indexed by them), for inspection and reuse."""
    matching = item.matching
    return json.dumps({"objective": matching.objective, "sweeps": matching.sweeps,
                       "rounds": matching.rounds,
                       "permutations": {p: t.tolist() for p, t in sorted(matching.perms.items())}}) + "\n"


def align_recipe_models(recipe, opened: dict, method, log: Callable[[str], None] | None = None
                        ) -> dict:
    """A recipe's `align:` section applied at plan time: each model the recipe merges replaced
    by its view permuted onto the reference (the section's, else base_model, else the first);
    `log` gets the matching's progress lines, as `mergesmith align` prints them."""
    section = recipe.align
    if method.needs_data:  # its statistics or learned values would belong to the unaligned models
        raise PlanError(f"{recipe.where('align')}: only methods that need no data merge models "
                        f"aligned at plan time; {method.name} needs data",
                        hint="align the models first with `mergesmith align`, then merge the aligned folders")
    if recipe.modules:
        raise PlanError(f"{recipe.where('align')}: align: does not support recipes with modules:",
                        hint="align the models first with `mergesmith align`, then merge the folders")
    slices = recipe.slices or ()
    refs = [recipe.base_model, *(m.model for m in recipe.models or ()),
            *(s.model for piece in slices for s in piece.sources), *(piece.base_model for piece in slices)]
    refs = list(dict.fromkeys(r for r in refs if r))
    reference = section.reference or recipe.base_model or refs[0]
    if reference not in refs:
        raise PlanError(f"{recipe.where('align', 'reference')}: {reference!r} is not a model the "
                        "recipe merges", hint=f"use one of {', '.join(refs)}")
    models = list({id(opened[r]): opened[r] for r in refs}.values())  # a folder named twice is one model
    try:
        aligned = align_models(models, reference=models.index(opened[reference]), units=section.units,
                               max_sweeps=section.max_sweeps, seed=section.seed, scheme=section.scheme,
                               log=log)
    except PlanError as exc:
        raise PlanError(f"{recipe.where('align')}: {exc.message}", hint=exc.hint) from None
    views = {id(item.source): item.model for item in aligned}
    return {ref: views.get(id(ck), ck) for ref, ck in opened.items()}
