"""The merge pipeline (plan → statistics → stream), for every method: gather what the method
needs, then stream the merge with the engine. A method that needs no data goes straight to it.

Three routes, by what the method declares (methods/registry.py):
- statistics (fisher, regmean, ota): each expert's statistics are collected from its calibration
  data (or read from its optimizer state) into cached stores, which the engine reads per tensor;
- regmean_plusplus: the same, but block l's Grams come from the partly merged model;
- learn (adamerging, ...): the method learns coefficients or masks on the models in memory; the
  result is written as an ordinary recipe (task arithmetic with per-tensor weights, or stitch with
  mask stores) that the engine merges, and that the output folder keeps beside the card;
- router (twin): the engine merges without data; then, before the folder is put in place, a
  router is trained on the merged model with the experts' calibration data (calibrate/router.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergesmith.engine import api as engine
from mergesmith.io import tensor_names as L
from mergesmith.errors import MergesmithError, PlanError, RecipeError
from mergesmith.io import Checkpoint, resolve_model
from mergesmith.methods import MethodSpec, get_method
from mergesmith.recipe import Calibration, Recipe, load_recipe

LEARNED_FILE = "learned.json"  # beside a learned merge's weights: what it learned, and how


@dataclass
class Prepared:
    """What the engine runs for a recipe: the recipe itself, or what a learned method wrote."""

    recipe: Recipe
    statistics: dict[str, Path] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # spent on data: collecting statistics (0 when cached) or learning


def prepare(recipe: Recipe | str | Path | dict, *, device: str = "cpu",
            progress: bool = False, allow_crimes: bool = False) -> Prepared:
    """Gather what the recipe's method needs from data (cached), as input for the engine.
    `allow_crimes` as for the engine's plan (RegMean++ plans its blocks with it)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    method = _method(recipe)
    started = time.perf_counter()
    if not method.needs_data:
        return Prepared(recipe)
    if method.learn is not None:
        return learn(recipe, method, device=device, progress=progress)
    if method.router:
        for ref in _experts(recipe):
            calibration_for(recipe, ref, method)  # checked before the merge, used after it
        return Prepared(recipe)
    if collects_statistics(method):
        plan(recipe, allow_crimes=allow_crimes)  # what no statistics can reach, before collecting
    stores = gather_statistics(recipe, method, device=device, progress=progress,
                               allow_crimes=allow_crimes)
    # a cached store's seconds are those of its collection, which this merge did not repeat
    recorded = [json.loads((p / "config.json").read_text()).get("seconds") for p in stores.values()]
    seconds = (sum(recorded) if recorded and None not in recorded
               else time.perf_counter() - started)
    return Prepared(recipe, stores, seconds=seconds)


def merge(recipe: Recipe | str | Path | dict, out: str | Path, *, device: str = "cpu",
          progress: bool = False, **options: Any) -> Path:
    """`mergesmith.merge`: any recipe, with or without data; options as the engine's `merge`.
    A multi-stage recipe (several YAML documents) runs stage by stage (engine/stages.py; option
    `intermediate_dir`)."""
    from mergesmith.engine.stages import is_multi_stage, run_stages

    if is_multi_stage(recipe):
        return run_stages(recipe, out, device=device, progress=progress, **options)
    from mergesmith.engine.continual import continual_merge, is_continual

    if options.get("onto") is not None or is_continual(recipe):  # models added one at a time
        return continual_merge(recipe, out, device=device, progress=progress, **options)
    prepared = prepare(recipe, device=device, progress=progress,
                       allow_crimes=options.get("allow_crimes", False))
    finish = None
    if get_method(prepared.recipe.merge_method).router:
        def finish(folder: Path) -> None:
            train_router_for(prepared.recipe, folder, device=device, seed=options.get("seed"))
    return engine.merge(prepared.recipe, out, device=device, progress=progress,
                        statistics=prepared.statistics or None, notes=prepared.notes,
                        finish=finish, **options)


def train_router_for(recipe: Recipe, folder: Path, *, device: str = "cpu",
                     seed: int | None = None) -> dict:
    """Twin-Merging: the router of the merge in `folder`, from each expert's calibration data."""
    from mergesmith.calibrate.router import train_router

    method = _method(recipe)
    cals = [calibration_for(recipe, ref, method) for ref in _experts(recipe)]
    params = _learn_params(recipe, method)
    return train_router(folder, cals, root_of(recipe), steps=params["router_steps"],
                        lr=params["router_lr"], seed=seed if seed is not None else (recipe.seed or 0),
                        device=device)


def merge_plan(recipe: Recipe | str | Path | dict, *, device: str = "cpu", **options: Any):
    """The engine's plan with the data-aware parts in place (for in-memory merges)."""
    prepared = prepare(recipe, device=device, allow_crimes=options.get("allow_crimes", False))
    return engine.plan(prepared.recipe, statistics=prepared.statistics or None, **options)


def plan(recipe: Recipe | str | Path | dict, **options: Any):
    """The engine's plan. For a data-aware method it checks the calibration settings and plans
    the same tensors and shards as an average, reading no data."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    from mergesmith.engine.continual import continual_chain, is_continual

    if is_continual(recipe):  # checked as the task arithmetic of its models (and --onto's merge)
        return continual_chain(recipe, shard_size=options.get("shard_size", "5GB")).checked
    method = _method(recipe)
    if not method.needs_data:
        return engine.plan(recipe, **options)
    experts = _experts(recipe)  # (data-aware methods take a models: list)
    for ref in experts if needs_calibration(method) else ():
        calibration_for(recipe, ref, method)
    refs = list(dict.fromkeys([*([recipe.base_model] if recipe.base_model else []),
                               *(m.model for m in recipe.models)]))
    data = recipe.model_dump(exclude_none=True)
    data.update(merge_method="linear", models=[{"model": ref, "parameters": {"weight": 1.0}}
                                               for ref in refs])
    for key in ("calibration", "parameters", "base_model", "lines"):
        data.pop(key, None)
    from mergesmith.engine.plan import check_settings

    warnings = check_settings(recipe, method)  # the stand-in average takes none of them
    stand_in = engine.plan(data, **options)
    stand_in.warnings[:0] = warnings
    if collects_statistics(method):
        check_statistics_reach(recipe, method, stand_in)
    return stand_in


def collects_statistics(method: MethodSpec) -> bool:
    """Whether the method's statistics are collected from calibration data by its layers."""
    return method.learn is None and not method.router and bool(method.statistics) \
        and needs_calibration(method)


def check_statistics_reach(recipe: Recipe, method: MethodSpec, stand_in) -> None:
    """Refuse now what the merge would refuse once the statistics are collected: a tensor that
    no layer of the module transformers builds from the config reads (the checkpoint names its
    layers otherwise) gets no statistics. Reads the configs and headers, no weights or data."""
    from mergesmith.calibrate.collect import reachable_statistics
    from mergesmith.engine.plan import check_statistics_coverage

    experts = _experts(recipe)
    # RegMean++ runs the first expert's module with every expert's tensors
    module = resolve_model(experts[0]) if method.name == "regmean_plusplus" else None
    reach = {id(stand_in.models[ref]): reachable_statistics(
        resolve_model(ref), calibration_for(recipe, ref, method), method.statistics,
        module_folder=module) for ref in experts}
    jobs, unreached = [], {}
    for job in stand_in.jobs:
        unreached[job.out.name] = [ck.label for ck, name in job.inputs if id(ck) in reach and not all(
            f"{name}::{kind}" in reach[id(ck)] for kind in method.statistics)]
        jobs.append(job if unreached[job.out.name] else
                    dataclasses.replace(job, statistics=method.statistics))

    def reason(missing: list[str]) -> str:
        models = dict.fromkeys(label for name in missing for label in unreached[name])
        return (f"no layer of the module transformers builds for {' and '.join(models)} reads "
                "them (the checkpoint names its layers otherwise), so calibration cannot give "
                "them any")

    check_statistics_coverage(recipe, method, jobs, reason=reason)


def _method(recipe: Recipe) -> MethodSpec:
    try:
        return get_method(recipe.merge_method)
    except MergesmithError as exc:
        raise RecipeError(f"{recipe.where('merge_method')}: {exc.message}", hint=exc.hint) from None


def root_of(recipe: Recipe) -> Path:
    """Where relative paths of the calibration section start: the recipe file's folder."""
    source = Path(recipe.source)
    return source.parent if source.is_file() else Path.cwd()


def _experts(recipe: Recipe) -> list[str]:
    if not recipe.models:
        form = "modules" if recipe.modules else "slices"
        raise RecipeError(f"{recipe.where(form)}: data-aware methods take a models: list, "
                          f"not {form}")
    _no_adapters(recipe)
    return [m.model for m in recipe.models if m.model != recipe.base_model]


def _no_adapters(recipe: Recipe) -> None:
    """Calibration runs each model in transformers from its folder, which an adapter is not."""
    from mergesmith.io.adapted import is_adapter_ref

    refs = [(("base_model",), recipe.base_model)] + [
        (("models", i, "model"), m.model) for i, m in enumerate(recipe.models)]
    at, ref = next(((at, ref) for at, ref in refs if ref and is_adapter_ref(ref)), (None, None))
    if ref is not None:
        raise PlanError(f"{recipe.where(*at)}: {ref} is a LoRA adapter, and {recipe.merge_method} "
                        "runs full checkpoints on calibration data",
                        hint="merge it into its base first: a linear recipe with the one model "
                             "BASE+ADAPTER writes that checkpoint")


def calibration_for(recipe: Recipe, ref: str, method: MethodSpec) -> Calibration:
    """The recipe's calibration section with the model entry's own laid over it."""
    entry = next(m for m in recipe.models if m.model == ref)
    index = recipe.models.index(entry)
    if recipe.calibration is None and entry.calibration is None:
        raise RecipeError(f"{recipe.where('models', index)}: {method.name} learns from data, and "
                          f"{ref} has none", hint="add a calibration: section (data: <file>) to the "
                          "recipe or to this model")
    base = recipe.calibration or Calibration()
    cal = base.merged(entry.calibration)
    if cal.data is None and cal.dataset is None:
        raise RecipeError(f"{recipe.where('models', index, 'calibration')}: no data for {ref}",
                          hint="set calibration.data (a file) or calibration.dataset")
    return cal


def needs_calibration(method: MethodSpec) -> bool:
    """Whether the method reads calibration data (not only files beside the models)."""
    if method.learn is not None or method.router:
        return True
    return bool(method.statistics) and not method.optional_statistics and \
        method.statistics != ("second_moment",)


def gather_statistics(recipe: Recipe, method: MethodSpec, *, device: str = "cpu",
                      progress: bool = False, allow_crimes: bool = False) -> dict[str, Path]:
    """Model reference -> statistics store, collected (or found in the cache) for each expert."""
    from mergesmith.calibrate.store import ensure_statistics

    if method.name == "regmean_plusplus":
        return _sequential_statistics(recipe, method, device=device, progress=progress,
                                      allow_crimes=allow_crimes)
    if method.optional_statistics:  # stitch without learned masks: its data-free rule
        return {}
    root = root_of(recipe)
    stores: dict[str, Path] = {}
    if method.statistics_from == "base" and recipe.base_model is None:
        raise RecipeError(f"{recipe.where('merge_method')}: {method.name} reads the base "
                          "model's activations", hint="add base_model")
    for ref in _experts(recipe):
        folder = resolve_model(recipe.base_model if method.statistics_from == "base" else ref)
        if method.statistics == ("second_moment",):
            stores[ref] = second_moment_store(folder, _cache(recipe, root))
            continue
        cal = calibration_for(recipe, ref, method)
        stores[ref] = ensure_statistics(folder, cal, root, method.statistics, device=device,
                                        progress=progress)
    return stores


def second_moment_store(folder: Path, cache: Path) -> Path:
    """The optimizer's second moments saved with the model, as a store ("<tensor>::second_moment")."""
    from mergesmith.calibrate.moments import read_second_moments
    from mergesmith.calibrate.store import is_store, model_fingerprint, write_store

    path = cache / f"{Path(folder).resolve().name}-moments-{model_fingerprint(folder)[:20]}"
    if not is_store(path):
        moments = read_second_moments(folder)
        write_store(path, {f"{name}::second_moment": m.float().contiguous() for name, m in moments.items()},
                    {"model": str(folder), "kinds": ["second_moment"], "source": "optimizer state"})
    return path


def _cache(recipe: Recipe, root: Path) -> Path:
    from mergesmith.calibrate.store import default_cache

    return default_cache(recipe.calibration or Calibration(), root)


def _sequential_statistics(recipe: Recipe, method: MethodSpec, *, device: str,
                           progress: bool, allow_crimes: bool = False) -> dict[str, Path]:
    """RegMean++: block by block, each expert's Grams from the inputs the merged blocks give."""
    from mergesmith.calibrate.sequential import sequential_statistics

    root = root_of(recipe)
    refs = _experts(recipe)
    if recipe.base_model is None:
        raise RecipeError(f"{recipe.where('merge_method')}: {method.name} runs the partly merged "
                          "model, built on the base", hint="add base_model")
    cals = [calibration_for(recipe, ref, method) for ref in refs]
    return sequential_statistics(recipe, resolve_model(recipe.base_model),
                                 {ref: resolve_model(ref) for ref in refs}, cals, root,
                                 device=device, progress=progress, allow_crimes=allow_crimes)


# --- learned merges ------------------------------------------------------------------------


def learn(recipe: Recipe, method: MethodSpec, *, device: str = "cpu",
          progress: bool = False) -> Prepared:
    """Learn on the models in memory; the result is a recipe (plus mask stores) kept in the
    cache under everything it depends on, so scoring it again does not learn again."""
    from mergesmith.calibrate.problem import build_problem

    if recipe.base_model is None:
        raise RecipeError(f"{recipe.where('merge_method')}: {method.name} learns task-vector "
                          "coefficients, which need a base", hint="add base_model")
    refs = _experts(recipe)
    cals = [calibration_for(recipe, ref, method) for ref in refs]
    params = _learn_params(recipe, method)
    root = root_of(recipe)
    folders = [resolve_model(r) for r in [recipe.base_model, *refs]]
    folder = _cache(recipe, root) / "learned" / _learned_key(recipe, folders, cals, root)
    if (folder / "recipe.yaml").is_file():
        stores = {ref: folder / f"expert-{i}" for i, ref in enumerate(refs)
                  if (folder / f"expert-{i}" / "config.json").is_file()}
        record = json.loads((folder / LEARNED_FILE).read_text())
        return Prepared(load_recipe(folder / "recipe.yaml"), stores,
                        {LEARNED_FILE: (folder / LEARNED_FILE).read_text()}, record["seconds"])
    started = time.perf_counter()
    problem = build_problem(folders[0], folders[1:], cals, root, device=device)
    learned = method.learn(problem, **params)
    seconds = time.perf_counter() - started
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    partial.mkdir(parents=True)
    stores = (_mask_stores(partial, refs, learned.masks) if learned.masks is not None else
              _mask_stores(partial, refs, learned.coefficients, "coefficient")
              if learned.coefficients is not None else {})
    resolved = _resolved_recipe(recipe, refs, learned)
    note = json.dumps({"method": method.name, "parameters": params, "seconds": seconds,
                       "losses": learned.losses, "weights": learned.weights,
                       "recipe": recipe.to_yaml()}, indent=1, default=float)
    (partial / "recipe.yaml").write_text(resolved.to_yaml())
    (partial / LEARNED_FILE).write_text(note)
    partial.rename(folder)
    stores = {ref: folder / path.name for ref, path in stores.items()}
    return Prepared(load_recipe(folder / "recipe.yaml"), stores, {LEARNED_FILE: note}, seconds)


def _learned_key(recipe: Recipe, folders: list[Path], cals: list[Calibration], root: Path) -> str:
    from mergesmith.calibrate.data import fingerprint as data_fingerprint
    from mergesmith.io.checkpoint import weight_files

    stamp = [[(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(folder)]
             for folder in folders]
    blob = json.dumps([recipe.fingerprint(), stamp, [data_fingerprint(c, root) for c in cals]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _learn_params(recipe: Recipe, method: MethodSpec) -> dict[str, Any]:
    """The method's global parameters as the recipe sets them (defaults otherwise)."""
    given = dict(recipe.parameters or {})
    values = {}
    for param in method.params:
        if param.per_model:
            continue
        if param.name in given:
            try:
                values[param.argname] = param.check(given.pop(param.name))
            except ValueError as exc:
                raise RecipeError(f"{recipe.where('parameters', param.name)}: {exc}") from None
        elif not param.required:
            values[param.argname] = param.default
        else:
            raise RecipeError(f"{recipe.where('parameters')}: {method.name} needs {param.name!r}")
    if given:
        name = next(iter(given))
        raise RecipeError(f"{recipe.where('parameters', name)}: {method.name} has no parameter "
                          f"{name!r}", hint=f"its parameters: {', '.join(p.name for p in method.params)}")
    return values


def _resolved_recipe(recipe: Recipe, refs: list[str], learned) -> Recipe:
    """What was learned, as a recipe any engine runs: per-tensor weights become filter lists
    (longest name first, since a filter matches every name containing it)."""
    data = recipe.model_dump(exclude_none=True)
    data.pop("calibration", None)
    models: list[dict[str, Any]] = [{"model": recipe.base_model}]
    for i, ref in enumerate(refs):
        weight: Any = 1.0
        if learned.weights is not None:
            names = sorted(learned.weights, key=lambda n: (-len(n), n))
            weight = [{"filter": n, "value": float(learned.weights[n][i])} for n in names]
            weight.append({"value": 0.0})  # tensors the method did not learn keep the base
        models.append({"model": ref, "parameters": {"weight": weight}} if learned.method is None
                      else {"model": ref})
    data["models"] = models
    if learned.method is not None:  # a merge of its own applies what was learned (dam_fold)
        data["merge_method"] = learned.method
        data.pop("parameters", None)
    elif learned.masks is not None:
        data["merge_method"] = "stitch"
        data["parameters"] = {"overlap": "sum" if learned.weights is not None else "average"}
    else:
        data["merge_method"] = "task_arithmetic"
        data.pop("parameters", None)
    return Recipe(**data)


def _mask_stores(folder: Path, refs: list[str], masks: dict[str, list[torch.Tensor]],
                 kind: str = "mask") -> dict[str, Path]:
    """Each expert's learned masks (or float coefficients) as a statistics store
    ("<tensor>::<kind>") inside `folder`."""
    from mergesmith.calibrate.store import write_store

    stores = {}
    for i, ref in enumerate(refs):
        stores[ref] = folder / f"expert-{i}"
        write_store(stores[ref], {f"{n}::{kind}": (m[i].to(torch.uint8) if kind == "mask" else
                                                   m[i].float()).contiguous()
                                  for n, m in masks.items()}, {"model": ref, "kinds": [kind]})
    return stores
