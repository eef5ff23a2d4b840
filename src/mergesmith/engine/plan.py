"""Plan a merge from headers alone: which inputs feed each output tensor, how, and with what.

Everything a recipe can get wrong is found here, before any tensor data is read: unknown
method or parameter, missing or out-of-range values, layer ranges, tensor names, shapes and
vocabulary sizes. Each error names the recipe line, the model and the tensor.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mergesmith.io import tensor_names as L
from mergesmith.engine.compatibility import check_compatible, check_config_matches_weights, ties
from mergesmith.engine.modules import module_prefix, set_config_value
from mergesmith.engine.params import ParamResolver
from mergesmith.engine.vocab import VocabPlan, chat_template_for, plan_vocab
from mergesmith.errors import MergesmithError, PlanError, RecipeError
from mergesmith.io import Checkpoint, OutTensor, Shard, layout_shards
from mergesmith.io.adapted import open_input
from mergesmith.methods import MethodSpec, TensorContext, get_method
from mergesmith.methods.lines import layer_scale
from mergesmith.recipe import Recipe, load_recipe, lookup
from mergesmith.recipe.parameters import scalars
from mergesmith.recipe.schema import LayerScaling

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPAT = ("none", "mergekit")  # the recipe's `compat:` values, also `--compat`
NO_MATCH = "the statistics do not match the checkpoint's tensor names"


@dataclass
class Source:
    """One model feeding one output slice, over layers [start, stop)."""

    ckpt: Checkpoint
    start: int
    stop: int
    params: dict | None
    path: tuple  # where the source sits in the recipe, for error messages


@dataclass
class OutSlice:
    sources: list[Source]
    base: Source | None
    params: dict | None
    path: tuple
    lines_base: Source | None = None  # θ0 of LiNeS, also when the method takes no base
    module: tuple = ()  # ("modules", name) for a slice of a module (its parameters apply)


@dataclass
class TensorJob:
    """One output tensor: its inputs (base first when the method takes one) and how to merge them."""

    out: OutTensor
    inputs: list[tuple[Checkpoint, str]]
    has_base: bool
    params: dict[str, Any]
    ctx: TensorContext
    copy: bool = False  # integer buffers are copied from the first input, never merged
    vocab_axis: bool = False
    # LiNeS: θ0 + s·(merged − θ0). inputs[0] is then θ0, given to the method only if has_base.
    lines_scale: float | None = None
    # Statistic kinds read for this tensor (the method's, when every expert's store has them):
    # the last len(statistics) × experts inputs, kind by kind, each in expert order.
    statistics: tuple[str, ...] = ()


@dataclass
class Plan:
    recipe: Recipe
    method: MethodSpec
    jobs: list[TensorJob]
    shards: list[Shard]
    config: dict
    config_source: Checkpoint
    load_dtype: torch.dtype | None
    vocab: VocabPlan | None
    seed: int
    models: dict[str, Checkpoint]  # recipe reference -> opened folder
    warnings: list[str] = field(default_factory=list)
    statistics: dict[str, Checkpoint] = field(default_factory=dict)  # reference -> its store
    chat_template: str | None = None  # the recipe's chat_template as Jinja text
    program: Any = None  # engine/program.py's Program, when the plan was not built from a recipe

    @property
    def total_bytes(self) -> int:
        return sum(job.out.nbytes for job in self.jobs)

    def streams(self, job: TensorJob) -> bool:
        """Whether the job's tensor may be merged in blocks of rows: never a vocabulary-aligned
        one, nor a vector for a row-local method (it is one row)."""
        return (self.method.streams(job.params) and not job.vocab_axis
                and not (self.method.row_local and len(job.out.shape) < 2))

    def peak_memory(self, chunk_bytes: int) -> int:
        """Bytes the run holds at its peak: one unit being merged plus one being prefetched."""
        worst = 0
        for job in self.jobs:
            elements = math.prod(job.out.shape)
            if self.streams(job):
                elements = min(elements, max(chunk_bytes // 4, math.prod(job.out.shape[1:]) or 1))
            inputs = [ck.tensors[name] for ck, name in job.inputs]
            # statistics shaped like the tensor are chunked with it; others (Gram matrices) are
            # read whole and solved in float64
            shaped = [i for i in inputs if i.shape == job.out.shape or not job.statistics]
            whole = sum(i.nbytes + 3 * 8 * math.prod(i.shape) for i in inputs if i not in shaped)
            stored = sum(i.dtype.itemsize for i in shaped) * elements
            compute = (len(shaped) + 2) * 4 * elements  # fp32 inputs, result, scratch
            worst = max(worst, 2 * stored + compute + whole + job.out.dtype.itemsize * elements)
        return worst


def build_plan(recipe: Recipe | str | Path | dict, *, seed: int | None = None,
               shard_bytes: int = 5 * 1000**3,
               statistics: dict[str, str | Path] | None = None,
               allow_crimes: bool = False, compat: str | None = None,
               log: Callable[[str], None] | None = None) -> Plan:
    """`statistics` maps a model reference of the recipe to its statistics store (calibrate/),
    for methods that read statistics. `allow_crimes` (mergekit's name) merges models whose
    architectures or configs differ, with a warning; their tensor sets must still agree."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if compat is not None:
        if compat not in COMPAT:
            raise MergesmithError(f"unknown compat {compat!r}", hint="use none or mergekit")
        recipe = recipe.model_copy(update={"compat": compat})  # so the card and resume see it
    try:
        method = get_method(recipe.merge_method)
    except MergesmithError as exc:
        raise RecipeError(f"{recipe.where('merge_method')}: {exc.message}", hint=exc.hint) from None
    if method.output != "tensor":
        raise PlanError(f"{recipe.where('merge_method')}: {method.name} merges LoRA adapters into "
                        "an adapter, not tensors of checkpoints",
                        hint="run it with `mergesmith merge` or mergesmith.merge (engine/adapters.py)")
    if method.learn is not None:
        raise PlanError(f"{recipe.where('merge_method')}: {method.name} learns its merge from data "
                        "before anything is merged; the engine alone cannot run it",
                        hint="run it with `mergesmith merge` or mergesmith.merge, with a calibration: section")
    opened = _open_models(recipe)
    if recipe.align is not None:
        from mergesmith.engine.weight_matching import align_recipe_models  # lazily: it builds on this module

        opened = align_recipe_models(recipe, opened, method, log=log)
    stores = _open_statistics(recipe, method, opened, statistics or {})
    groups = _groups(recipe, opened, method)
    slices = [out_slice for _, _, group in groups for out_slice in group]
    resolver = ParamResolver(recipe, method)
    warnings = check_settings(recipe, method)
    ref = slices[0].base or slices[0].sources[0]
    check_compatible(recipe, slices, ref.ckpt, allow_crimes, warnings)
    vocab = plan_vocab(recipe, opened, ref.ckpt)
    chat_template = chat_template_for(recipe, opened)
    if method.side is not None:
        _check_side_outputs(recipe, method, slices, vocab)
    seed = seed if seed is not None else (recipe.seed or 0)
    load_dtype = DTYPES[recipe.dtype] if recipe.dtype else None
    out_dtype = DTYPES.get(recipe.out_dtype or recipe.dtype or "")
    jobs: list[TensorJob] = []
    layer_swap_lists = any(p.argname == "layers" and p.type is str for p in method.params)

    def add(out_slice: OutSlice, names: list[tuple[str, str | None]], t: float, layer: int | None):
        """names: (output name, name in the slice's reference model, per source offset)."""
        for out_name, src_layer_offset in names:
            job = _job(out_slice, out_name, src_layer_offset, t, layer, total_layers,
                       resolver, method, seed, out_dtype, vocab, recipe.lines)
            jobs.append(_with_statistics(job, method, stores) if stores else job)
            if "layers" in job.params and layer_swap_lists:
                _check_layer_lists(recipe, out_slice, job, total_layers)

    layer_counts = {}  # config key -> layers, for each module that has a key
    for prefix, count_key, group in groups:  # the whole model, or each module with its own layers
        total_layers = sum(s.sources[0].stop - s.sources[0].start for s in group)
        if count_key:
            layer_counts[count_key] = total_layers
        head = group[0].base or group[0].sources[0]
        ref_names = sorted(n for n in head.ckpt.tensors if n.startswith(prefix))
        outside = [n for n in ref_names if L.layer_of(n) is None]
        add(group[0], [(n, None) for n in outside if L.is_before_layers(n)], 0.0, None)
        out_layer = 0
        for out_slice in group:
            lead = out_slice.base or out_slice.sources[0]
            count = out_slice.sources[0].stop - out_slice.sources[0].start
            for offset in range(count):
                t = offset / (count - 1) if count > 1 else 1.0
                template = [n for n in sorted(lead.ckpt.tensors)
                            if n.startswith(prefix) and L.layer_of(n) == lead.start + offset]
                names = [(L.with_layer(n, out_layer), offset) for n in template]
                add(out_slice, names, t, out_layer)
                out_layer += 1
        add(group[-1], [(n, None) for n in outside if not L.is_before_layers(n)], 0.0, None)
    if recipe.modules:  # the top-level layer count is not any one module's
        total_layers = 0

    if not jobs:
        raise PlanError(f"{ref.ckpt.label}: no tensors to merge")
    if recipe.compat == "mergekit" and method.compat is not None:
        for job in jobs:
            if not job.copy:
                job.params = method.compat(job.params, _compute_dtype(job, load_dtype))
    # RegMean++ plans its blocks with placeholder stores and hands each block its Grams itself
    if stores and not any(store.config.get("placeholder") for store in stores.values()):
        check_statistics_coverage(recipe, method, jobs,
                                  [slices[0].params, recipe.parameters] if len(slices) == 1 else None)
    config = _output_config(ref.ckpt, slices, total_layers, out_dtype or jobs[0].out.dtype, vocab)
    for key, count in layer_counts.items():
        set_config_value(config, key, count)
    _warn_unused(slices, jobs, warnings)
    return Plan(recipe=recipe, method=method, jobs=jobs,
                shards=layout_shards([job.out for job in jobs], shard_bytes),
                config=config, config_source=ref.ckpt, load_dtype=load_dtype, vocab=vocab,
                seed=seed, models=opened, warnings=warnings,
                statistics={ref: stores[id(ck)] for ref, ck in opened.items() if id(ck) in stores},
                chat_template=chat_template)


def _compute_dtype(job: TensorJob, load_dtype: torch.dtype | None) -> torch.dtype:
    """mergekit's compute dtype for a tensor: the recipe's `dtype`, else its inputs' stored
    dtypes promoted (bf16 inputs are merged in bf16 arithmetic)."""
    if load_dtype is not None:
        return load_dtype
    dtype = None
    for ck, name in job.inputs:
        stored = ck.tensors[name].dtype
        dtype = stored if dtype is None else torch.promote_types(dtype, stored)
    return dtype


def check_settings(recipe: Recipe, method: MethodSpec) -> list[str]:
    """Every parameter value the recipe writes for the method, checked where it is written
    (also values a filter never selects, and before a data-aware method collects anything):
    names as ParamResolver.check_names, values as the method's Param.check. Returns the
    warnings for other methods' parameters."""
    resolver = ParamResolver(recipe, method)
    warnings = resolver.check_names()
    params = {p.name: p for p in method.params}
    for settings, path in resolver._levels():
        for name, setting in (settings or {}).items():
            param = params.get(name)
            for inner, value in scalars(setting) if param is not None else ():
                if param.type in (int, float) and isinstance(value, str):
                    try:
                        value = float(value)  # YAML 1.1 reads 1e-3 as a string; so does resolve
                    except ValueError:
                        pass
                try:
                    param.check(value)
                except ValueError as exc:
                    raise PlanError(f"{recipe.where(*path, name, *inner)}: {name} {exc}") from None
    return warnings


def _open_models(recipe: Recipe) -> dict[str, Checkpoint]:
    """Each reference opened once; `BASE+ADAPTER` and adapter folders as adapted views."""
    by_folder: dict = {}
    return {ref: open_input(ref, by_folder, recipe.base_model, check_config_matches_weights)
            for ref in recipe.model_refs()}


def _open_statistics(recipe: Recipe, method: MethodSpec, opened: dict[str, Checkpoint],
                     statistics: dict[str, str | Path]) -> dict[int, Checkpoint]:
    """Each model's statistics store, by id of the model's Checkpoint."""
    if not method.statistics or (method.optional_statistics and not statistics):
        if statistics and not method.statistics:
            raise PlanError(f"{recipe.where('merge_method')}: {method.name} reads no statistics, "
                            "but statistics were given")
        return {}
    stores: dict[int, Checkpoint] = {}
    for ref, path in statistics.items():
        if ref not in opened:
            raise PlanError(f"statistics given for {ref!r}, which the recipe does not name")
        stores[id(opened[ref])] = Checkpoint(Path(path), label=f"statistics of {ref}")
    not_merged = (recipe.base_model, recipe.tokenizer_source, recipe.tokenizer and recipe.tokenizer.source)
    experts = [ref for ref in opened if ref not in not_merged]
    missing = [ref for ref in experts if id(opened[ref]) not in stores]
    if missing:
        raise PlanError(f"{recipe.where('merge_method')}: {method.name} needs "
                        f"{' and '.join(method.statistics)} statistics of every model; "
                        f"{missing[0]} has none",
                        hint="run it with `mergesmith merge` or mergesmith.merge, with a calibration: section")
    return stores


def _with_statistics(job: TensorJob, method: MethodSpec, stores: dict[int, Checkpoint]) -> TensorJob:
    """The job with its experts' statistics appended to its inputs, or unchanged (the method then
    gets None and falls back) when some expert has none for this tensor."""
    if job.copy or job.vocab_axis:
        return job
    experts = job.inputs[1:] if (job.has_base or job.lines_scale is not None) else job.inputs
    extra = []
    for kind in method.statistics:
        for ck, name in experts:
            store = stores.get(id(ck))
            if store is None:
                raise PlanError(f"{ck.label}: {method.name} merges it with {kind} statistics, "
                                "and it has none",
                                hint="give it calibration data too (a base model the method does "
                                     "not use as its base is merged as one more model)")
            key = f"{name}::{kind}"
            if key not in store.tensors:
                return job
            shape = store.tensors[key].shape
            # Gram matrices and per-input-channel vectors (act_abs) are not shaped like it
            if kind not in ("gram", "act_abs") and tuple(shape) != tuple(ck.tensors[name].shape):
                raise PlanError(f"{store.label}: {key!r} has shape {list(shape)}, the tensor "
                                f"{list(ck.tensors[name].shape)}",
                                hint="the statistics were gathered from another model; collect them again")
            extra.append((store, key))
    return dataclasses.replace(job, inputs=job.inputs + extra, statistics=method.statistics)


def _groups(recipe: Recipe, opened: dict[str, Checkpoint],
            method: MethodSpec) -> list[tuple[str, str | None, list[OutSlice]]]:
    """(tensor prefix, config key of its layer count, output slices) per part of the output: the
    whole model, or each of the recipe's `modules:` (mergekit's multimodal form)."""
    if not recipe.modules:
        return [("", None, _normalize(recipe, opened, method))]
    groups = []
    for name, module in recipe.modules.items():
        at = ("modules", name)
        first = (module.models or [None])[0] or module.slices[0].sources[0]
        prefix, key = module_prefix(opened[first.model], name, recipe.where(*at))
        groups.append((prefix, key, _normalize(recipe, opened, method, module, prefix, at)))
    covered = tuple(prefix for prefix, _, _ in groups)
    ref = groups[0][2][0].base or groups[0][2][0].sources[0]
    left = [n for n in sorted(ref.ckpt.tensors) if not n.startswith(covered)]
    if left:  # mergekit leaves them out of the output without a word
        raise PlanError(f"{recipe.where('modules')}: {len(left)} tensor(s) of {ref.ckpt.label} "
                        f"belong to no module listed, e.g. {left[0]!r}",
                        hint="list every module of the model under modules:")
    return groups


def _normalize(recipe: Recipe, opened: dict[str, Checkpoint], method: MethodSpec,
               section: Any = None, prefix: str = "", at: tuple = ()) -> list[OutSlice]:
    """Both recipe forms as output slices; `models:` is one slice over all layers (as mergekit).
    For a module, `section` is its entry, `prefix` its tensors' and `at` its recipe path."""
    section = section or recipe
    counts = {id(ck): L.num_layers([n for n in ck.tensors if n.startswith(prefix)])
              for ck in opened.values()}
    base_ck = opened[recipe.base_model] if recipe.base_model else None
    if section.models is not None:
        sources = [Source(opened[m.model], 0, counts[id(opened[m.model])], m.parameters,
                          (*at, "models", i)) for i, m in enumerate(section.models)]
        for j, later in enumerate(sources):
            first = next(s for s in sources if s.ckpt is later.ckpt)
            if first is not later:
                raise PlanError(f"{recipe.where(*at, 'models', j)}: {later.ckpt.label} is listed twice "
                                f"in models (models[{first.path[1]}] and models[{j}])",
                                hint="list each model once; give it a larger weight instead")
        if base_ck is not None and all(s.ckpt is not base_ck for s in sources):
            sources.append(Source(base_ck, 0, counts[id(base_ck)], None, ("base_model",)))
        raw = [(sources, base_ck, None, at)]
    else:
        raw = []
        for i, sl in enumerate(section.slices):
            sources = [Source(opened[s.model], *s.layer_range, s.parameters,
                              (*at, "slices", i, "sources", j)) for j, s in enumerate(sl.sources)]
            slice_base = opened[sl.base_model] if sl.base_model else base_ck
            raw.append((sources, slice_base, sl.parameters, (*at, "slices", i)))

    slices = []
    for sources, base_ck, params, path in raw:
        for s in sources:
            have = counts[id(s.ckpt)]
            if s.stop > have and section.slices is not None:
                raise PlanError(f"{recipe.where(*s.path, 'layer_range')}: layer_range "
                                f"[{s.start}, {s.stop}] goes past {s.ckpt.label}, which has {have} layers")
        lengths = {s.stop - s.start for s in sources}
        if len(lengths) > 1:
            detail = ", ".join(f"{s.ckpt.label}: {s.stop - s.start}" for s in sources)
            raise PlanError(f"{recipe.where(*path) if path else 'models'}: the models of one slice "
                            f"must have the same number of layers ({detail})")
        base = next((s for s in sources if s.ckpt is base_ck), None)
        if method.needs_base and base_ck is None:
            raise PlanError(f"{recipe.where('merge_method')}: method {method.name!r} needs a "
                            "base model", hint="add base_model: <the model the experts were tuned from>")
        if method.uses_base and base_ck is not None and base is None:
            raise PlanError(f"{recipe.where(*path)}: the base model {base_ck.label} is not among "
                            "this slice's sources")
        experts = len(sources) - (1 if base is not None and method.uses_base else 0)
        if experts < method.min_models or (method.max_models and experts > method.max_models):
            want = (f"exactly {method.min_models}" if method.min_models == method.max_models else
                    f"at least {method.min_models}" if not method.max_models else
                    f"{method.min_models} to {method.max_models}")
            raise PlanError(f"{recipe.where(*path) if path else recipe.where('models')}: method "
                            f"{method.name!r} merges {want} model(s) besides the base; got {experts}")
        if recipe.lines is not None and base is None:
            missing = (f"the base model {base_ck.label} is not among this slice's sources"
                       if base_ck is not None else "the recipe has no base_model")
            raise PlanError(f"{recipe.where('lines')}: LiNeS scales each layer's change from the "
                            f"base model, but {missing}",
                            hint="add base_model: <the model the experts were tuned from>")
        slices.append(OutSlice(sources, base if method.uses_base else None, params, path,
                               lines_base=base if recipe.lines is not None else None, module=at))
    return slices


def _check_side_outputs(recipe: Recipe, method: MethodSpec, slices: list[OutSlice],
                        vocab: VocabPlan | None) -> None:
    """Side outputs (EMR's masks, Twin-Merging's parts) are applied later to the merge's own
    tensors, so the output rows must be the base's rows, from one base model."""
    if vocab is not None:
        raise PlanError(f"{recipe.where('tokenizer_source')}: {method.name} does not support a "
                        "merged vocabulary yet", hint="leave tokenizer_source out")
    if len({id(s.base.ckpt) for s in slices}) > 1:
        raise PlanError(f"{recipe.where('slices')}: {method.name} needs one base model for all "
                        "slices", hint="give base_model once, at the top of the recipe")
    if recipe.lines is not None and method.router:
        raise PlanError(f"{recipe.where('lines')}: {method.name}'s exclusive parts are taken from "
                        "the shared model before LiNeS would scale it", hint="leave lines out")


def _input_name(source: Source, template: str, offset: int | None) -> str:
    name = template if offset is None else L.with_layer(template, source.start + offset)
    if name in source.ckpt.tensors:
        return name
    tied = L.tied_embedding(set(source.ckpt.tensors), name)
    if tied is not None and ties(source.ckpt):
        return tied
    if tied is not None:
        raise PlanError(f"{source.ckpt.label}: has no tensor {name!r}, and its config says "
                        "tie_word_embeddings: false, so its embedding is not its output head",
                        hint="the checkpoint is incomplete; download its missing weight files")
    close = difflib.get_close_matches(name, list(source.ckpt.tensors), n=1)
    raise PlanError(f"{source.ckpt.label}: has no tensor {name!r}",
                    hint=f"closest is {close[0]!r}" if close else "the models differ in architecture")


def _job(out_slice: OutSlice, out_name: str, offset: int | None, t: float, layer: int | None,
         total_layers: int, resolver: ParamResolver, method: MethodSpec, seed: int,
         out_dtype: torch.dtype | None, vocab: VocabPlan | None,
         lines: LayerScaling | None) -> TensorJob:
    lead = out_slice.base or out_slice.sources[0]
    template = out_name if offset is None else L.with_layer(out_name, lead.start + offset)
    experts = [s for s in out_slice.sources if s is not out_slice.base]
    origin = out_slice.base or out_slice.lines_base  # θ0, first when the method or LiNeS uses it
    ordered = ([origin] if origin else []) + experts
    inputs = [(s.ckpt, _input_name(s, template, offset)) for s in ordered]
    infos = [ck.tensors[name] for ck, name in inputs]
    ref_info = lead.ckpt.tensors[_input_name(lead, template, offset)]
    vocab_axis = vocab is not None and bool(L.VOCAB_NAMES.search(out_name))
    shape = ref_info.shape
    if vocab_axis:
        shape = (vocab.rows, *ref_info.shape[1:])
    for (ck, name), info in zip(inputs, infos):
        if info.shape == ref_info.shape or (vocab_axis and info.shape[1:] == ref_info.shape[1:]):
            continue
        if L.VOCAB_NAMES.search(out_name) and info.shape[1:] == ref_info.shape[1:]:
            raise PlanError(
                f"vocabulary sizes differ: {lead.ckpt.label} has {ref_info.shape[0]} rows in "
                f"{template!r}, {ck.label} has {info.shape[0]} in {name!r}",
                hint="mergesmith never truncates; set tokenizer_source: base, union or a model "
                     "to match rows by token")
        raise PlanError(f"shapes differ for {out_name!r}: {lead.ckpt.label} has "
                        f"{list(ref_info.shape)}, {ck.label} has {list(info.shape)} ({name!r})")
    family = _dtype_family(ref_info.dtype)
    for (ck, name), info in zip(inputs, infos):
        if _dtype_family(info.dtype) != family:
            raise PlanError(f"dtypes differ for {out_name!r}: {lead.ckpt.label} stores it as "
                            f"{_dtype_name(ref_info.dtype)}, {ck.label} as "
                            f"{_dtype_name(info.dtype)} ({name!r})",
                            hint="merge checkpoints of the same precision family; dequantize "
                                 "or convert the odd one first")
    copy = not ref_info.dtype.is_floating_point
    dtype = ref_info.dtype if copy else (out_dtype or ref_info.dtype)
    params = {} if copy else resolver.resolve(out_slice, experts, out_name, t)
    scale = (None if copy or lines is None
             else layer_scale(layer, total_layers, lines.alpha, lines.beta))
    return TensorJob(OutTensor(out_name, dtype, tuple(shape)), inputs, out_slice.base is not None,
                     params, TensorContext(out_name, layer, total_layers or None, seed),
                     copy=copy, vocab_axis=vocab_axis, lines_scale=scale)


def _dtype_family(dtype: torch.dtype) -> str:
    """Tensors of one family convert into each other exactly enough to merge: 16/32/64-bit
    floats; an fp8 tensor is scaled by factors stored elsewhere, and integers are not weights."""
    if dtype.is_floating_point:
        return "fp8" if dtype.itemsize == 1 else "float"
    return _dtype_name(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_layer_lists(recipe: Recipe, out_slice: OutSlice, job: TensorJob, total: int) -> None:
    """layer_swap's per-model layer lists must name layers the output has."""
    from mergesmith.methods.passthrough import parse_layers

    experts = [s for s in out_slice.sources if s is not out_slice.base]
    for source, spec in zip(experts, job.params["layers"]):
        try:
            beyond = [n for n in parse_layers(spec or "") if n >= total]
        except ValueError:
            continue  # the method's own validation names a malformed list
        if beyond:
            raise PlanError(f"{recipe.where(*source.path, 'parameters', 'layers')}: layers "
                            f"{spec!r} go past the output, which has {total} layers (0-{total - 1})")


def check_statistics_coverage(recipe: Recipe, method: MethodSpec, jobs: list[TensorJob],
                              levels: list[dict | None] | None = None, *,
                              reason: Callable[[list[str]], str] | None = None) -> None:
    """A tensor the statistics should cover but do not (their names do not match the
    checkpoint's) would be merged by the data-free fallback: refused unless the recipe sets
    `fallback` for it (`levels`: where the parameter is looked up, most specific first). Gram
    matrices cover linear weights (2-D, not embeddings); Fisher statistics every floating
    tensor. A job covered has `statistics` set; `reason(missing)` says why the others are not."""
    kinds = set(method.statistics) & {"gram", "fisher"}
    if not kinds or method.optional_statistics:
        return
    has_fallback = any(p.name == "fallback" for p in method.params)
    levels = levels or [recipe.parameters]
    missing = []
    for job in jobs:
        if job.statistics or job.copy or job.vocab_axis:
            continue
        name = job.out.name
        if kinds == {"gram"} and (len(job.out.shape) != 2 or not name.endswith(".weight")
                                  or L.VOCAB_NAMES.search(name) or L.is_before_layers(name)):
            continue
        if has_fallback and lookup("fallback", levels, name) is not None:
            continue
        missing.append(name)
    if missing:
        kind = " or ".join(sorted(kinds))
        hint = (f"set parameters: {{fallback: linear}} (or task_arithmetic) to merge them without "
                f"statistics" if has_fallback else
                "collect the statistics again from this checkpoint")
        raise PlanError(f"{recipe.where('merge_method')}: {method.name}: {len(missing)} tensor(s) "
                        f"have no {kind} statistics, e.g. {', '.join(map(repr, missing[:3]))}; "
                        f"{reason(missing) if reason else NO_MATCH}", hint=hint)


def _output_config(ref: Checkpoint, slices: list[OutSlice], total_layers: int,
                   dtype: torch.dtype, vocab: VocabPlan | None) -> dict:
    config = dict(ref.config)
    key = L.layer_count_key(config)
    if key is not None and total_layers:
        config[key] = total_layers
        types = config.get("layer_types")
        if isinstance(types, list):
            # per-layer attention kinds follow the layers they came from
            config["layer_types"] = [
                (s.ckpt.config.get("layer_types") or types)[s.start + i]
                for sl in slices for s in sl.sources[:1] for i in range(s.stop - s.start)
            ]
    if vocab is not None:
        config["vocab_size"] = vocab.rows
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    return config


def _warn_unused(slices: list[OutSlice], jobs: list[TensorJob], warnings: list[str]) -> None:
    """Name tensors no output is made from (an expert's extra head, say): dropped, but not silently."""
    used = {name for job in jobs for _, name in job.inputs}
    for ck in {id(s.ckpt): s.ckpt for sl in slices for s in sl.sources}.values():
        unused = [n for n in ck.tensors if n not in used and L.layer_of(n) is None]
        if unused:
            warnings.append(f"{ck.label}: {len(unused)} tensor(s) not in the output, e.g. {unused[0]!r}")
