"""Merge N PEFT LoRA adapter folders into one adapter folder, module by module.

A recipe whose merge method writes an adapter (`spec.output == "adapter"`, e.g. lora_combine)
names adapter folders as its models:

    merge_method: lora_combine
    models:
      - model: adapters/math
        parameters: {weight: 0.6}
      - model: adapters/code
        parameters: {weight: 0.4}
    parameters: {combination_type: svd, svd_rank: 8}

`plan_adapters` checks everything before any factor is read: every model is a LoRA adapter
(DoRA's magnitudes cannot be combined: refused), they adapt the same modules with the same
shapes (else the module and both adapters are named), equal ranks where the method needs them,
parameters as any recipe's (file:line). `merge_adapters` then reads each module's (B, A) from
every adapter, calls the method, and writes one adapter folder (io/adapter.write_adapter)
through io/output.OutputFolder: built in a hidden folder and renamed into place when complete,
so a failed merge leaves nothing that looks finished.

modules_to_save (full tensors, not deltas): copied when every adapter saves the same tensor,
else averaged with the adapters' weights, Σ w_i M_i / Σ w_i (refused when the weights sum to
0); refused when only some adapters save it, since the others' value (the base's) is not here.
A targeted embedding's own weight, which PEFT saves beside its LoRA, is a base weight: written
back under `base_layer` when the adapters agree on it, refused when they do not.
The output names the recipe's base_model, else the first adapter's base model; adapters whose
base_model_name_or_path differ (a local path and a hub id of one model, often) are merged with
a warning when their shapes agree. Factors are written in fp32 unless the recipe says `dtype`
or `out_dtype`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from mergesmith import __version__
from mergesmith.engine.params import ParamResolver
from mergesmith.engine.plan import DTYPES, check_settings
from mergesmith.errors import MergesmithError, PlanError, RecipeError
from mergesmith.io import OutputFolder, resolve_model
from mergesmith.io.adapter import Adapter, read_adapter, write_adapter
from mergesmith.methods import MethodSpec, TensorContext, get_method
from mergesmith.recipe import Recipe, load_recipe

# Methods whose side outputs (info["side"] per module) are stored beside the merged adapter:
# method -> (module, class) of a store built with (plan, partial folder), given each module's
# side value by add(weight, side) and finish()ed into the partial folder before it is put in
# place. Imported only when such a merge runs.
ADAPTER_SIDE_STORES = {"rmm": ("mergesmith.engine.side_outputs.rmm", "RmmStore"),
                       "orthogonal_lora_sum": ("mergesmith.engine.side_outputs.orthogonality",
                                               "CrossOrthogonalityReport")}


@dataclass
class AdapterPlan:
    recipe: Recipe
    method: MethodSpec
    adapters: list[Adapter]
    params: dict[str, dict[str, Any]]  # module weight name -> the method's resolved parameters
    saved: dict[str, list[float] | None]  # modules_to_save tensor -> weights (None: all equal)
    base_model: str | None
    seed: int
    dtype: torch.dtype
    extra_config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class AdapterMerge:
    path: Path
    energy: dict[str, float]  # module weight name -> Σ kept S² / Σ S² (SVD-based merges)
    warnings: list[str]


def adapter_method(recipe: Recipe | str | Path | dict) -> bool:
    """Whether the recipe's method writes an adapter (False for anything this cannot tell:
    the usual path then reports what is wrong)."""
    try:
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        return get_method(recipe.merge_method).output == "adapter"
    except MergesmithError:
        return False


def plan_adapters(recipe: Recipe | str | Path | dict, *, seed: int | None = None) -> AdapterPlan:
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    try:
        method = get_method(recipe.merge_method)
    except MergesmithError as exc:
        raise RecipeError(f"{recipe.where('merge_method')}: {exc.message}", hint=exc.hint) from None
    if method.output != "adapter" or not recipe.models:
        raise PlanError(f"{recipe.where('merge_method')}: {method.name} merges adapters: give "
                        "them as a models: list of adapter folders", hint="no slices or modules")
    warnings = check_settings(recipe, method)
    adapters = [_read(recipe, i) for i in range(len(recipe.models))]
    if len(adapters) < method.min_models:
        raise PlanError(f"{recipe.where('models')}: {method.name} needs at least "
                        f"{method.min_models} adapters")
    modules = _check_modules(adapters)
    if recipe.base_model:
        _check_base(recipe, adapters[0], modules)
    resolver = ParamResolver(recipe, method)
    sources = [SimpleNamespace(params=m.parameters, path=("models", i), ckpt=a)
               for i, (m, a) in enumerate(zip(recipe.models, adapters))]
    group = SimpleNamespace(params=None, path=(), module=())
    params = {w: resolver.resolve(group, sources, w, 0.0) for w in modules}
    for weight, p in params.items():
        ranks = [a.modules[weight].rank for a in adapters]
        why = method.equal_ranks_when(p) if method.equal_ranks_when else None
        if why and len(set(ranks)) > 1:
            which = ", ".join(f"{a.label}: r={r}" for a, r in zip(adapters, ranks))
            raise PlanError(f"{weight}: {method.name} needs adapters of one rank ({why}), got "
                            f"{which}", hint="give adapters of one rank, or a method that "
                            "takes mixed ranks")
    saved = _check_saved(recipe, adapters, resolver, group, sources)
    names = {a.base_model for a in adapters}
    if len(names) > 1 and not recipe.base_model:
        warnings.append(f"the adapters name different base models ({', '.join(map(str, names))});"
                        " their shapes agree, so they are merged")
    # modules_to_save: the saved tensors' modules, not those of adapted layers' own weights
    kept = sorted({n.rsplit(".", 1)[0] for n in saved if n not in params})
    extra = {"task_type": adapters[0].config.get("task_type"), "modules_to_save": kept or None}
    if any(p.get("mode") == "peft_compat" for p in params.values()):
        # PEFT's merged adapter keeps the first adapter's use_rslora: scaling √r, not 1
        extra["use_rslora"] = bool(adapters[0].config.get("use_rslora"))
    dtype = DTYPES[recipe.out_dtype or recipe.dtype] if (recipe.out_dtype or recipe.dtype) \
        else torch.float32
    return AdapterPlan(recipe, method, adapters, params, saved,
                       recipe.base_model or adapters[0].base_model,
                       seed if seed is not None else (recipe.seed or 0), dtype, extra, warnings)


def _read(recipe: Recipe, i: int) -> Adapter:
    ref = recipe.models[i].model
    adapter = read_adapter(resolve_model(ref), label=ref)
    dora = next((w for w, m in adapter.modules.items() if m.magnitude is not None), None)
    if dora is not None:
        raise PlanError(f"{recipe.where('models', i, 'model')}: {ref} is a DoRA adapter ({dora}): "
                        "its magnitudes cannot be combined into one adapter",
                        hint="merge it as base+adapter with a full-weight method instead")
    return adapter


def _check_modules(adapters: list[Adapter]) -> list[str]:
    """The modules every adapter adapts, in the first one's order; the same shape and layout
    in each."""
    first = adapters[0]
    for other in adapters[1:]:
        for a, b in ((first, other), (other, first)):
            missing = next((w for w in a.modules if w not in b.modules), None)
            if missing is not None:
                raise PlanError(f"{missing}: adapted by {a.label} but not by {b.label}",
                                hint="adapters merged into one must adapt the same modules")
    for weight in first.modules:
        for other in adapters[1:]:
            if other.shape(weight) != first.shape(weight):
                raise PlanError(f"{weight}: {first.label} adapts a {list(first.shape(weight))} "
                                f"weight, {other.label} a {list(other.shape(weight))} one",
                                hint="the adapters were trained on different base models")
            mine, theirs = first.modules[weight], other.modules[weight]
            if (mine.fan_in_fan_out, mine.embedding) != (theirs.fan_in_fan_out, theirs.embedding):
                raise PlanError(f"{weight}: {first.label} and {other.label} store its factors "
                                "in different layouts (fan_in_fan_out or embedding)")
    return list(first.modules)


def _check_base(recipe: Recipe, adapter: Adapter, modules: list[str]) -> None:
    """With a base_model in the recipe: every adapted weight exists there, with its shape."""
    from mergesmith.io import Checkpoint
    from mergesmith.io.adapter import match_names

    base = Checkpoint(resolve_model(recipe.base_model), label=recipe.base_model)
    found = match_names(modules, set(base.tensors))
    for weight in modules:
        if weight not in found:
            raise PlanError(f"{weight}: {adapter.label} adapts a module that {recipe.base_model} "
                            "does not have", hint="the adapter belongs to another base model")
        shape = tuple(base.tensors[found[weight]].shape)
        if shape != tuple(adapter.shape(weight)):
            raise PlanError(f"{weight}: {adapter.label} fits a {list(adapter.shape(weight))} "
                            f"weight, {recipe.base_model} has {list(shape)}",
                            hint="the adapter belongs to another base model")


def _check_saved(recipe, adapters, resolver, group, sources) -> dict[str, list[float] | None]:
    saved: dict[str, list[float] | None] = {}
    for name in dict.fromkeys(n for a in adapters for n in a.saved):
        holders = [a for a in adapters if name in a.saved]
        if len(holders) < len(adapters):
            lacking = next(a for a in adapters if name not in a.saved)
            raise PlanError(f"{name}: {holders[0].label} saves it in full (modules_to_save), "
                            f"{lacking.label} does not", hint="the other adapter's value is the "
                            "base's, which an adapter merge does not read; merge as base+adapter")
        shapes = {tuple(a.saved_shape(name)) for a in adapters}
        if len(shapes) > 1:
            raise PlanError(f"{name}: the adapters save it with different shapes {sorted(shapes)}")
        weights = resolver.resolve(group, sources, name, 0.0).get("weights")
        if weights is not None and abs(sum(weights)) < 1e-8:
            raise PlanError(f"{recipe.where('models')}: {name} (modules_to_save) is averaged "
                            "with the adapters' weights, which sum to 0")
        saved[name] = weights
    return saved


def merge_adapters(recipe: Recipe | str | Path | dict, out: str | Path, *, seed: int | None = None,
                   device: str = "cpu", resume: bool = False, overwrite: bool = False,
                   log: Callable[[str], None] | None = None) -> AdapterMerge:
    """Plan, then merge every module and write one PEFT adapter folder at `out`."""
    plan = plan_adapters(recipe, seed=seed)
    for warning in plan.warnings if log else ():
        log(f"warning: {warning}")
    output = OutputFolder(Path(out), _fingerprint(plan), resume=resume, overwrite=overwrite,
                          inputs=[a.path for a in plan.adapters] + _recipe_file(plan.recipe))
    try:
        factors, energy = {}, {}
        store = _side_store(plan, output.partial)
        for weight, params in plan.params.items():
            factors[weight], info = merge_module(plan, weight, params, torch.device(device))
            if store is not None:
                store.add(weight, info["side"])
            if "energy" in info:
                energy[weight] = info["energy"]
                if log:
                    log(f"  {weight}: energy kept {info['energy']:.4f}")
        saved = {_saved_key(plan, name): merge_saved(plan, name) for name in plan.saved}
        first = plan.adapters[0]
        write_adapter(output.partial, factors, base_model=plan.base_model, saved=saved or None,
                      fan_in_fan_out=bool(first.config.get("fan_in_fan_out")),
                      embeddings={w for w, m in first.modules.items() if m.embedding},
                      extra_config=plan.extra_config)
        if store is not None:
            store.finish()
        path = output.finalize()
    finally:
        output.release()
    if log and energy:
        worst = min(energy, key=energy.get)
        log(f"energy kept: mean {sum(energy.values()) / len(energy):.4f}, lowest "
            f"{energy[worst]:.4f} ({worst})")
    return AdapterMerge(path, energy, plan.warnings)


def merge_module(plan: AdapterPlan, weight: str, params: dict[str, Any],
                 device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """One module's merged (B, A) in the output dtype, and the method's side values."""
    pairs = [a.factors(weight) for a in plan.adapters]
    scalings = [a.modules[weight].scaling for a in plan.adapters]
    call = dict(params)
    weights = call.pop("weights", [1.0] * len(pairs))
    if "transposed" in inspect.signature(plan.method.fn).parameters:  # where PEFT draws masks
        call["transposed"] = plan.adapters[0].modules[weight].fan_in_fan_out
    try:
        B, A, *rest = plan.method.fn([b.to(device) for b, _ in pairs],
                                     [a.to(device) for _, a in pairs], scalings,
                                     weights=weights, ctx=TensorContext(weight, seed=plan.seed),
                                     **call)
    except ValueError as exc:
        raise MergesmithError(f"{weight}: {plan.method.name}: {exc}") from None
    return (B.to("cpu", plan.dtype), A.to("cpu", plan.dtype)), (rest[0] if rest else {})


def merge_saved(plan: AdapterPlan, name: str) -> torch.Tensor:
    tensors = [a.read_saved(name) for a in plan.adapters]
    dtype = tensors[0].dtype
    if all(torch.equal(t, tensors[0]) for t in tensors[1:]):
        return tensors[0]
    if name in plan.params:
        raise PlanError(f"{name}: the adapters carry different base weights for this adapted "
                        "layer (a resized vocabulary?)", hint="adapters merged into one must "
                        "share their base; merge them as base+adapter instead")
    weights = plan.saved[name] or [1.0] * len(tensors)
    total = sum(w * t.float() for w, t in zip(weights, tensors))
    return (total / sum(weights)).to(dtype)


def _side_store(plan: AdapterPlan, folder: Path):
    if plan.method.name not in ADAPTER_SIDE_STORES:
        return None
    import importlib

    module, name = ADAPTER_SIDE_STORES[plan.method.name]
    return getattr(importlib.import_module(module), name)(plan, folder)


def _saved_key(plan: AdapterPlan, name: str) -> str:
    """A saved tensor's name in the output: an adapted layer's own weight (PEFT saves a targeted
    embedding's) goes back under `base_layer`, where PEFT loads it."""
    return f"{name.removesuffix('.weight')}.base_layer.weight" if name in plan.params else name


def _recipe_file(recipe: Recipe) -> list[Path]:
    source = Path(recipe.source)
    return [source] if source.is_file() else []


def _fingerprint(plan: AdapterPlan) -> str:
    """What a resumed merge must share with the interrupted one: recipe, seed, inputs."""
    files = sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns)
                   for a in plan.adapters for f in Path(a.path).iterdir() if f.is_file())
    blob = json.dumps([__version__, plan.recipe.fingerprint(), plan.seed, files])
    return hashlib.sha256(blob.encode()).hexdigest()
