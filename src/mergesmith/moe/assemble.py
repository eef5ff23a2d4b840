"""Dense experts into one sparse MoE, as a Program the engine streams (engine/program.py).

Outputs: every tensor of the base but its MLPs (`non_expert: average`: the experts' mean, as in
Branch-Train-MiX), expert e's MLP of layer l in slot e of layer l (a copy, unless noise_scale or
residual_scale change it), the shared expert (Qwen-MoE), and the router rows of gates.py as
computed tensors. Everything is checked before anything is written; the copies stream one
tensor (or row block) at a time whatever the number of experts.
"""

from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from mergesmith.io import tensor_names as L
from mergesmith.engine.compatibility import check_config_matches_weights, config_difference, tensor_difference
from mergesmith.engine.program import Output, Program, write_program
from mergesmith.errors import PlanError
from mergesmith.io.adapted import open_input
from mergesmith.io.checkpoint import Checkpoint, TensorInfo
from mergesmith.io.views import Entry, View, computed, stored
from mergesmith.methods.moe_assemble import noise_and_scale
from mergesmith.moe.gates import gate_rows
from mergesmith.moe.layouts import PROJECTIONS, Layout, moe_config, non_expert_shapes, pick_layout
from mergesmith.recipe.moe import ExpertConfig, MoeConfig, load_moe_config, upcycle_config

RECORD = "mergekit_moe_config.yml"  # the config as given, under mergekit-moe's name for it
IGNORED = ("rotary_emb.inv_freq",)  # buffers older checkpoints saved; no model loads them


def build_moe(config: MoeConfig | str | Path | dict, out: str | Path, *, device: str = "cpu",
              shard_size: str | int = "5GB", resume: bool = False, overwrite: bool = False,
              progress: bool = False, allow_identical_experts: bool = False) -> Path:
    """Write the MoE that `config` (a MoeConfig, or mergekit-moe's YAML as a file, string or dict)
    describes at `out`; every error before any work."""
    if not isinstance(config, MoeConfig):
        config = load_moe_config(config)
    with _collector_paused():
        program = moe_program(config, device=device, progress=progress,
                              allow_identical_experts=allow_identical_experts)
    return write_program(program, out, shard_size=shard_size, device=device, resume=resume,
                         overwrite=overwrite, progress=progress)


@contextmanager
def _collector_paused():
    """No cyclic garbage collection while the program is planned: planning imports transformers'
    config classes (and, for prompt gates, its modeling code), some 170k objects that live
    until exit, which the collector would walk again and again as they arrive (~0.4 s of a 1B
    build: bench/README.md). Back on before the writing, whose first collection frees
    planning's cycles (the prompt model's)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def upcycle(model: str, experts: int, out: str | Path, *, noise_scale: float | None = None,
            experts_per_token: int = 2, architecture: str | None = None, dtype: str | None = None,
            seed: int = 0, **options) -> Path:
    """AquilaMoE's scale-out of one dense model into `experts` experts (recipe/moe.py's
    upcycle_config); a Qwen-MoE's shared expert starts with a zero down projection."""
    ck = open_model(model, {})
    layout = pick_layout(architecture, ck.config.get("model_type"), None, ck.label,
                         where="--architecture")
    config = upcycle_config(model, experts, noise_scale=noise_scale, experts_per_token=experts_per_token,
                            architecture=layout.name, dtype=dtype, seed=seed, shared_expert=layout.shared)
    return build_moe(config, out, **options)


def moe_program(config: MoeConfig, *, device: str = "cpu", progress: bool = False,
                allow_identical_experts: bool = False) -> Program:
    opened: dict[str, Checkpoint] = {}
    by_folder: dict = {}

    def opener(ref: str) -> Checkpoint:
        if ref not in opened:
            opened[ref] = open_model(ref, by_folder, config.base_model)
        return opened[ref]

    base = opener(config.base_model)
    experts = [opener(e.source_model) for e in config.experts]
    shared = [opener(e.source_model) for e in config.shared_experts or ()]
    layout = pick_layout(config.architecture, base.config.get("model_type"), len(shared), base.label,
                         where=config.where("architecture"))
    _check_inputs(config, layout, base, experts + shared, allow_identical_experts)
    dtype = _dtype(config, base)
    moe = moe_config(layout, base.config, len(experts), config.experts_per_token,
                     str(dtype).removeprefix("torch."), config.norm_topk_prob)
    rows = _router_rows(config, base, device, progress)

    outputs = _non_expert_outputs(config, layout, base, experts, moe)
    entries, layer_of = _expert_entries(config, layout, experts, shared, rows)
    view = View("experts and routers", moe, entries, [base, *experts, *shared])
    outputs += [Output(name, [(view, name)], layer=layer_of[name]) for name in entries]

    source = opener(config.tokenizer_source) if config.tokenizer_source else base
    what = "the experts' mean" if config.non_expert == "average" else f"{config.base_model}"
    summary = (f"a {layout.name} mixture of {len(experts)} experts ({config.experts_per_token} per "
               f"token{', one shared expert' if shared else ''}) assembled from dense models: each "
               f"expert is one model's MLP; attention, norms and embeddings are {what}; router rows "
               f"by gate_mode {config.gate_mode}.")
    return Program(outputs, moe, source, f"MoE of {len(experts)} experts ({layout.name})", summary,
                   record=(RECORD, config._text or config.to_yaml()), dtype=dtype, seed=config.seed,
                   models={ref: ck for ref, ck in opened.items()})


def open_model(ref: str, by_folder: dict, base_model: str | None = None) -> Checkpoint:
    """A model reference opened as the merge engine opens a recipe's: a folder or hub id, or
    mergekit's `BASE+ADAPTER` (a bare adapter folder: on `base_model`), as a view that applies
    the adapter tensor by tensor as the experts stream."""
    return open_input(ref, by_folder, base_model, check_config_matches_weights)


def _check_inputs(config: MoeConfig, layout: Layout, base: Checkpoint, models: list[Checkpoint],
                  allow_identical: bool) -> None:
    """Every expert of the base's architecture, sizes and tensors; distinct unless allowed."""
    for ck in models:
        found = config_difference(base, ck, layers=True)
        if found is not None:
            raise PlanError(f"expert {ck.label} does not match the base {base.label}: {found}",
                            hint="an MoE's experts are dense models of the base's architecture and size")
        only = tensor_difference(base, ck)
        if only is not None:
            name, has, lacks = only
            raise PlanError(f"expert {ck.label} and the base {base.label} have different tensors: "
                            f"{has.label} has {name!r}, {lacks.label} has no such tensor",
                            hint="an MoE's experts are dense models of the base's architecture")
        for name, info in ck.tensors.items():
            if ".mlp." in name and info.shape != base.tensors[name].shape:
                raise PlanError(f"expert {ck.label}'s {name} is {list(info.shape)}, the base "
                                f"{base.label}'s {list(base.tensors[name].shape)}")
    for name in base.tensors:
        if ".mlp." in name and not any(name.endswith(f".mlp.{p}.weight") for p in PROJECTIONS):
            raise PlanError(f"{base.label}: MLP tensor {name!r} has no place in an MoE expert",
                            hint="experts are gate/up/down projections without biases")
    refs = {tuple(Path(p).resolve() for p in ck.sources) for ck in models[:len(config.experts)]}
    if len(refs) == 1 and not (allow_identical or config.allow_identical_experts):
        raise PlanError(f"{config.where('experts')}: every expert is {config.experts[0].source_model}: "
                        "the MoE would compute what that model does, at more cost",
                        hint="to train it afterwards (upcycling), set allow_identical_experts: true "
                             "or pass --allow-identical-experts")
    if layout.name == "mixtral" and config.norm_topk_prob is False:
        raise PlanError(f"{config.where('norm_topk_prob')}: Mixtral always renormalises its top-k "
                        "weights", hint="drop norm_topk_prob, or use a Qwen-MoE layout")


def _dtype(config: MoeConfig, base: Checkpoint) -> torch.dtype:
    """mergekit-moe's select_dtype: the config's, else the base config's, else as stored."""
    name = config.dtype or base.config.get("dtype") or base.config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return next(i.dtype for i in base.tensors.values() if i.dtype.is_floating_point)


def _router_rows(config: MoeConfig, base: Checkpoint, device: str, progress: bool) -> torch.Tensor:

    shared = config.shared_experts or []
    if shared and config.gate_mode not in ("random", "uniform_random") and not shared[0].positive_prompts:
        raise PlanError(f"{config.where('shared_experts', 0)}: the shared expert's gate is made "
                        f"from its prompts under gate_mode {config.gate_mode}, and it has none",
                        hint="give it positive_prompts (as mergekit-moe requires), or use gate_mode: random")
    rows = gate_rows(config, base, device=device, seed=config.seed, progress=progress)
    want = (base.config["num_hidden_layers"], len(config.experts) + len(shared), base.config["hidden_size"])
    if tuple(rows.shape) != want:
        raise PlanError(f"router rows of shape {list(rows.shape)}, expected {list(want)}")
    return rows.float()


def _non_expert_outputs(config: MoeConfig, layout: Layout, base: Checkpoint,
                        experts: list[Checkpoint], moe: dict) -> list[Output]:
    """The base's tensors but its MLPs (or the experts' mean), checked against the tensors a
    transformers model of the MoE config holds; attention biases that the layout has and the
    dense model lacks (Qwen-MoE from Llama) are zeros, as mergekit-moe writes them."""
    want = non_expert_shapes(layout, moe)
    have = [n for n in base.tensors if ".mlp." not in n and not n.endswith(IGNORED)]
    outputs = []
    for name in have:
        if name == "lm_head.weight" and name not in want:
            continue  # a tied head stored anyway: the model reads its embedding
        if name not in want:
            raise PlanError(f"{base.label}'s tensor {name!r} has no place in a {layout.name} model",
                            hint="its config has options (biases, ...) the MoE class lacks")
        if tuple(base.tensors[name].shape) != want[name]:
            raise PlanError(f"{base.label}'s {name} is {list(base.tensors[name].shape)}; a "
                            f"{layout.name} model of its config holds {list(want[name])}")
        layer = L.layer_of(name)
        if config.non_expert == "average":
            outputs.append(Output(name, [(ck, name) for ck in experts], [1.0] * len(experts), layer))
        else:
            outputs.append(Output(name, [(base, name)], layer=layer))
    zeros = View("zero biases", moe, {})
    for name in sorted(set(want) - set(have)):
        if name.endswith("_proj.bias"):
            zeros.entries[name] = computed(name, torch.zeros(want[name]))
            outputs.append(Output(name, [(zeros, name)], layer=L.layer_of(name)))
        else:
            raise PlanError(f"{base.label} has no tensor {name!r}, which a {layout.name} model holds")
    zeros.tensors = {name: entry.info for name, entry in zeros.entries.items()}
    return outputs


def _expert_entries(config: MoeConfig, layout: Layout, experts: list[Checkpoint],
                    shared: list[Checkpoint], rows: torch.Tensor) -> tuple[dict[str, Entry], dict[str, int]]:
    """Each layer's expert tensors (slot e = expert e's MLP), shared expert and router rows, in
    that order, as view entries; and each one's layer."""
    entries, layer_of = {}, {}
    specs = [(ck, spec, layout.expert, e) for e, (ck, spec) in enumerate(zip(experts, config.experts))]
    specs += [(ck, spec, None, 0) for ck, spec in zip(shared, config.shared_experts or ())]
    for layer in range(rows.shape[0]):
        for ck, spec, slot, e in specs:
            for p in PROJECTIONS:
                name = slot(layer, e, p) if slot else layout.shared_expert(layer, p)
                entries[name] = _expert_entry(ck, f"model.layers.{layer}.mlp.{p}.weight", name, spec,
                                              p == "down_proj", config.seed)
        name = layout.router(layer)
        entries[name] = computed(name, rows[layer, :len(experts)].contiguous())
        if shared:
            name = layout.shared_gate(layer)
            entries[name] = computed(name, rows[layer, len(experts):len(experts) + 1].contiguous())
        layer_of.update((name, layer) for name in entries if name not in layer_of)
    return entries, layer_of


def _expert_entry(ck: Checkpoint, name: str, out_name: str, spec: ExpertConfig, down: bool,
                  seed: int) -> Entry:
    """Source `name` as expert tensor `out_name`: stored as is, or noised and scaled in fp32
    (noise seeded by the output's name: each slot of an upcycled model gets its own)."""
    scale = spec.residual_scale if down else None
    if spec.noise_scale is None and scale is None:
        return stored(ck, name)
    info = ck.tensors[name]
    row = math.prod(info.shape[1:])

    def read(rows):
        offset = rows[0] * row if rows is not None else 0
        return noise_and_scale(ck.read(name, rows), noise_scale=spec.noise_scale, residual_scale=scale,
                               key=f"{seed}\0{out_name}", offset=offset)

    return Entry(TensorInfo(out_name, torch.float32, info.shape, info.file, None), read)
