"""`mergesmith moe-compress`: an MoE with K experts per layer instead of E, each new expert the
usage-weighted merge of a group of the old ones (methods/moe_compress.py chooses the groups).

Inputs: Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints, per-expert (`experts.{e}.w1`, as
transformers' `save_pretrained` and mergekit-moe write them) or fused (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I], as the transformers 5 modules hold them). Output: the
per-expert layout of moe/layouts.py.

Router: row g of the new router is the usage-weighted mean of its members' rows, so a group of
identical rows keeps its row (no paper gives a rule for a smaller router: MC-SMoE's and HC-SMoE's
code keep all E rows and point every member at its group's merged expert (HC-SMoE:
hcsmoe/merging/grouping_mixtral.py copies the gate and maps experts to groups), which
`keep_router=True` writes: E expert slots, the router unchanged, nothing smaller on disk but
exactly the papers' routing). Experts per token become min(k, K).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mergesmith.calibrate.moe_routing import routing_statistics
from mergesmith.engine.program import Output, Program, write_program
from mergesmith.errors import CalibrationError, PlanError
from mergesmith.io import Checkpoint
from mergesmith.io.checkpoint import TensorInfo
from mergesmith.io.views import Entry, View, computed, reindexed, stored
from mergesmith.methods import moe_compress as mc
from mergesmith.methods.permutation import match_units
from mergesmith.moe.layouts import LAYOUTS, Layout, PROJECTIONS

METHODS = ("mc_smoe", "hc_smoe", "sub_moe")
ALIGNED_BY_DEFAULT = {"mc_smoe"}  # the paper aligns members to their dominant expert
NEEDS_OUTPUTS = {"hc_smoe", "sub_moe"}  # cluster the experts' mean outputs
FUSED = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}


@dataclass
class MoeSource:
    """An MoE checkpoint's experts, under the per-expert names of its layout whatever it stores."""

    ck: Checkpoint
    layout: Layout
    num_experts: int
    top_k: int
    routers: dict[int, str]  # layer -> the router tensor as stored
    experts: View  # layout.expert(l, e, projection) -> that expert's tensor
    stored_names: set[str]  # every expert and router tensor of the input

    def read(self, layer: int, e: int, projection: str) -> torch.Tensor:
        return self.experts.read(self.layout.expert(layer, e, projection))


def read_moe(path: str | Path) -> MoeSource:
    """The MoE at `path`, or a PlanError saying why it is not one mergesmith can compress."""
    ck = Checkpoint(Path(path))
    model_type = ck.config.get("model_type")
    layout = LAYOUTS.get(model_type)
    if layout is None:
        raise PlanError(f"{ck.label} is a {model_type or 'model without model_type'} model, not an MoE "
                        "mergesmith compresses",
                        hint=f"moe-compress takes {', '.join(LAYOUTS)} checkpoints (`mergesmith moe` builds one)")
    counts = [ck.config[k] for k in ("num_local_experts", "num_experts") if isinstance(ck.config.get(k), int)]
    top_k = ck.config.get("num_experts_per_tok")
    if not counts or not isinstance(top_k, int):
        raise PlanError(f"{ck.label}: config.json gives no number of experts or experts per token",
                        hint="expected num_local_experts (or num_experts) and num_experts_per_tok")
    n = counts[0]
    routers, entries, names = {}, {}, set()
    for layer in range(int(ck.config.get("num_hidden_layers", 0))):
        blocks = [f"model.layers.{layer}.{b}" for b in dict.fromkeys((layout.block, "mlp"))]
        router = next((f"{b}.gate.weight" for b in blocks if f"{b}.gate.weight" in ck.tensors), None)
        if router is None:
            continue  # a dense layer (Qwen-MoE's mlp_only_layers)
        routers[layer] = router
        names.add(router)
        fused = next((b for b in blocks if f"{b}.experts.gate_up_proj" in ck.tensors), None)
        for e in range(n):
            for projection in PROJECTIONS:
                name = layout.expert(layer, e, projection)
                if fused is not None:
                    entries[name] = _fused_entry(ck, f"{fused}.experts", e, projection, name)
                    names.add(f"{fused}.experts.{FUSED[projection][0]}")
                elif name in ck.tensors:
                    entries[name] = stored(ck, name)
                    names.add(name)
                else:
                    raise PlanError(f"{ck.label}: layer {layer} has a router but no tensor {name!r}",
                                    hint="experts are read per expert (experts.{e}...) or fused "
                                         "(experts.gate_up_proj, experts.down_proj)")
    if not routers:
        raise PlanError(f"{ck.label}: no router tensors (model.layers.*.{layout.block}.gate.weight): "
                        "not an MoE checkpoint",
                        hint="moe-compress takes an MoE's folder")
    return MoeSource(ck, layout, n, top_k, routers, View(f"{ck.label} (experts)", ck.config, entries, [ck]), names)


def _fused_entry(ck: Checkpoint, prefix: str, e: int, projection: str, name: str) -> Entry:
    """Expert e's projection inside a fused [E, R, C] tensor (gate and up are the halves of
    gate_up's R): rows are read as rows of the [E·R, C] matrix, so a chunk costs its own bytes."""
    fused, half = FUSED[projection]
    stored_name = f"{prefix}.{fused}"
    info = ck.tensors[stored_name]
    height = info.shape[1] if half is None else info.shape[1] // 2
    first = e * info.shape[1] + (half or 0) * height
    flat = _FlatRows(ck, stored_name)

    def read(rows):
        start, stop = rows if rows is not None else (0, height)
        return flat.read(stored_name, (first + start, first + stop))

    return Entry(TensorInfo(name, info.dtype, (height, *info.shape[2:]), info.file, None), read)


class _FlatRows(Checkpoint):
    """One tensor of `ck` read as a matrix: its first two axes merged (for Checkpoint.read's
    byte-range rows)."""

    def __init__(self, ck: Checkpoint, name: str):
        info = ck.tensors[name]
        self.path, self.label = ck.path, ck.label
        self.tensors = {name: replace(info, shape=(info.shape[0] * info.shape[1], *info.shape[2:]))}
        self._pickled = {file: {k: t.flatten(0, 1) for k, t in tensors.items() if k == name}
                         for file, tensors in ck._pickled.items()}


# ---- the program ------------------------------------------------------------------------------

def compress_moe(moe: str | Path, out: str | Path, *, method: str, experts: int, data: str | Path | None = None,
                 statistics=None, linkage: str = "ward", rank: int | None = None, sparse: float = 0.0,
                 align: bool | None = None, keep_router: bool = False, adaptive: bool = False, seed: int = 0,
                 samples: int = 128, max_length: int | None = None, batch_size: int = 8, device: str = "cpu",
                 calibration_dtype: str = "float32", shard_size: str | int = "5GB", resume: bool = False,
                 overwrite: bool = False, progress: bool = False) -> Path:
    """Write the MoE at `moe` with `experts` experts per layer to `out` and return its path.
    `statistics` (calibrate/moe_routing.RoutingStatistics) replaces a run over `data`. `adaptive`
    (MC-SMoE's global budget, with `keep_router`): K × layers groups over all layers, more where
    more experts are used."""
    program, notes = compression_program(moe, method=method, experts=experts, data=data, statistics=statistics,
                                         linkage=linkage, rank=rank, sparse=sparse, align=align,
                                         keep_router=keep_router, adaptive=adaptive, seed=seed,
                                         samples=samples, max_length=max_length, batch_size=batch_size,
                                         device=device, calibration_dtype=calibration_dtype, progress=progress)
    return write_program(program, out, shard_size=shard_size, device=device, resume=resume,
                         overwrite=overwrite, progress=progress, notes=notes)


def compression_program(moe, *, method: str, experts: int, data=None, statistics=None, linkage="ward",
                        rank=None, sparse=0.0, align=None, keep_router=False, adaptive=False, seed=0,
                        samples=128, max_length=None, batch_size=8, device="cpu", calibration_dtype="float32",
                        progress=False) -> tuple[Program, dict[str, str]]:
    source = read_moe(moe)
    _check(source, method, experts, linkage, rank, sparse, data, statistics)
    if adaptive and not (method == "mc_smoe" and keep_router):
        raise PlanError("--adaptive is MC-SMoE's per-layer group count, for mc_smoe with --keep-router",
                        hint="a config holds one expert count for every layer, so only --keep-router "
                             "(all E slots kept) can give layers different numbers of groups")
    dtype = getattr(torch, str(calibration_dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise PlanError(f"--calibration-dtype {calibration_dtype!r}: not a floating dtype",
                        hint="float32, bfloat16 or float16")
    if statistics is None:

        statistics = routing_statistics(source.ck.path, data, samples=samples, max_length=max_length,
                                        batch_size=batch_size, seed=seed, device=device, dtype=dtype,
                                        outputs=method in NEEDS_OUTPUTS, progress=progress)
    missing = sorted(set(source.routers) - set(statistics.layers))
    if missing:
        raise PlanError(f"{source.ck.label}: no routing statistics for MoE layer(s) {missing}")
    align = method in ALIGNED_BY_DEFAULT if align is None else align
    cache = _Cache()
    outputs, record = [], {}
    usage = {layer: mc.usage_frequencies(statistics.layers[layer].counts) for layer in source.routers}
    sizes = dict(zip(usage, mc.layer_group_counts(list(usage.values()), experts * len(usage)) if adaptive
                     else [experts] * len(usage)))
    for layer, frequencies in usage.items():
        stats = statistics.layers[layer]
        labels = _labels(method, stats, frequencies, sizes[layer], linkage, seed)
        groups = mc.groups(labels)
        record[layer] = {"groups": groups, "frequencies": [round(float(f), 6) for f in frequencies]}
        merged = [_group(source, layer, members, frequencies, method, align, rank, sparse, cache)
                  for members in groups]
        slots = labels.tolist() if keep_router else range(len(groups))
        for slot, g in enumerate(slots):
            for projection in PROJECTIONS:
                inputs, weights = merged[g][projection]
                outputs.append(Output(source.layout.expert(layer, slot, projection), inputs, weights, layer))
        outputs.append(_router(source, layer, labels, frequencies, keep_router))
    outputs += [Output(name, [(source.ck, name)]) for name in source.ck.tensors if name not in source.stored_names]
    count = source.num_experts if keep_router else experts
    top_k = source.top_k if keep_router else min(source.top_k, experts)
    config = dict(source.ck.config)
    for key in ("num_local_experts", "num_experts"):
        if isinstance(config.get(key), int):
            config[key] = count
    config["num_experts_per_tok"] = top_k
    summary = (f"{source.ck.label}'s {source.num_experts} experts per layer merged into {experts} by {method} "
               f"(routing statistics over {statistics.examples} calibration examples"
               f"{', members aligned by permutation' if align else ''}"
               f"{f', rank {rank}' if rank else ''}{', group counts per layer by usage' if adaptive else ''}); "
               + (f"all {count} expert slots kept, each pointing to its group's merge, router unchanged."
                  if keep_router else f"router rows merged by usage; {top_k} experts per token."))
    program = Program(outputs, config, source.ck, f"MoE compressed to {experts} experts ({method})", summary,
                      seed=seed, models={"moe": source.ck})
    settings = {"method": method, "experts": experts, "align": align, "keep_router": keep_router, "adaptive": adaptive,
                "linkage": linkage if method == "hc_smoe" else None, "rank": rank, "sparse": sparse, "seed": seed}
    layers = ",\n".join(f'  "{layer}": {json.dumps(r)}' for layer, r in record.items())
    text = json.dumps(settings)[:-1] + ', "layers": {\n' + layers + "\n}}\n"  # one line per layer
    return program, {"compression.json": text}


def _check(source: MoeSource, method, experts, linkage, rank, sparse, data, statistics) -> None:
    label, n = source.ck.label, source.num_experts
    if method not in METHODS:
        raise PlanError(f"unknown MoE compression method {method!r}", hint=f"methods: {', '.join(METHODS)}")
    if not isinstance(experts, int) or experts < 1:
        raise PlanError(f"--experts must be a positive integer, got {experts!r}")
    if experts > n:
        raise PlanError(f"--experts {experts}: {label} has only {n} experts per layer",
                        hint=f"give K <= {n}")
    if linkage not in mc.LINKAGES:
        raise PlanError(f"--linkage {linkage!r}: not a linkage", hint=f"linkages: {', '.join(mc.LINKAGES)}")
    if rank is not None and (rank < 1 or method == "hc_smoe"):
        raise PlanError(f"--rank {rank}: " + ("hc_smoe has no rank" if method == "hc_smoe" else "must be >= 1"),
                        hint="mc_smoe: rank of its low-rank + sparse compression; sub_moe: of the joint basis")
    if not 0.0 <= sparse <= 1.0 or (sparse and (method != "mc_smoe" or rank is None)):
        raise PlanError(f"--sparse {sparse}: a fraction in [0, 1], for mc_smoe with --rank",
                        hint="the residual's share kept beside the rank-r part")
    if statistics is None and (data is None or not Path(data).is_file()):
        raise CalibrationError(f"{data}: no such calibration file" if data else
                               "moe-compress needs calibration data (--data FILE)",
                               hint="a .txt file (one text per line), .jsonl, .csv or .parquet")


def _labels(method, stats, frequencies, k, linkage, seed) -> torch.Tensor:
    if method == "mc_smoe":
        return mc.dominant_groups(frequencies, mc.router_similarity(stats.logit_gram), k)
    if stats.mean_output is None:
        raise PlanError(f"{method} needs the experts' mean outputs in the routing statistics",
                        hint="collect them with routing_statistics(..., outputs=True)")
    if method == "hc_smoe":
        return mc.agglomerative_groups(stats.mean_output, k, linkage)
    return mc.cosine_kmeans_groups(stats.mean_output, k, seed)


def _group(source, layer, members, frequencies, method, align, rank, sparse, cache):
    """projection -> (inputs, weights) of one new expert: a copy (singleton, no rank), a weighted
    average (streamed by the engine), or a tensor computed in memory (a truncated rank)."""
    weights = mc.member_weights(frequencies, members)
    anchor = members[max(range(len(members)), key=lambda i: (weights[i], -i))]  # the most used
    names = {p: [source.layout.expert(layer, e, p) for e in members] for p in PROJECTIONS}
    inputs = {p: [(source.experts, name) for name in names[p]] for p in PROJECTIONS}
    if align and len(members) > 1:
        view = _aligned(source, layer, members, anchor)
        inputs = {p: [(view, name) for name in names[p]] for p in PROJECTIONS}
    if rank is None:
        if len(members) == 1:
            return {p: (inputs[p], None) for p in PROJECTIONS}
        return {p: (inputs[p], weights) for p in PROJECTIONS}
    out = {}
    for p in PROJECTIONS:
        name = f"{names[p][0]} merged"
        out[p] = ([(cache.view(name, inputs[p], lambda ts, p=p: _computed(method, p, ts, weights, rank, sparse)),
                    name)], None)
    return out


def _computed(method, projection, tensors, weights, rank, sparse) -> torch.Tensor:
    if method == "mc_smoe":
        return mc.low_rank_plus_sparse(mc.weighted_merge(tensors, weights), rank, sparse)
    if projection == "down_proj":  # [H, I]: the model's axis first, the basis shared across members
        return mc.subspace_merge(tensors, weights, rank)
    return mc.subspace_merge([t.T for t in tensors], weights, rank).T.contiguous()


def _aligned(source, layer, members, anchor) -> View:
    """Each member's hidden units permuted to best match the anchor's (rows of gate and up,
    columns of down), by linear assignment of their weight vectors."""
    def features(e):
        return mc.unit_features(*(source.read(layer, e, p) for p in PROJECTIONS))

    target = features(anchor)
    entries = {}
    for e in members:
        perm = torch.arange(target.shape[0]) if e == anchor else match_units(target, features(e))
        for p in PROJECTIONS:
            name = source.layout.expert(layer, e, p)
            entries[name] = reindexed(source.experts, name, {1 if p == "down_proj" else 0: perm})
    return View(f"{source.ck.label} (layer {layer} aligned to expert {anchor})", source.ck.config, entries,
                [source.ck])


def _router(source, layer, labels, frequencies, keep_router) -> Output:
    name = source.layout.router(layer)
    if keep_router:
        return Output(name, [(source.ck, source.routers[layer])])
    rows = mc.merged_router(source.ck.read(source.routers[layer]), labels, frequencies)
    return Output(name, [(View(f"{source.ck.label} (merged router)", {}, {name: computed(name, rows)}), name)])


class _Cache:
    """Tensors computed when the engine first reads them (one held at a time: the engine reads
    one output's rows in order), so a model's merged experts are never all in memory."""

    def __init__(self):
        self.lock = threading.Lock()
        self.key, self.value = None, None

    def view(self, name, inputs, compute) -> View:
        first_ck, first_name = inputs[0]
        info = first_ck.tensors[first_name]

        def read(rows):
            with self.lock:
                if self.key != name:
                    tensors = [ck.read(n) for ck, n in inputs]
                    self.key, self.value = name, compute(tensors).to(info.dtype)
                value = self.value
            return (value if rows is None else value[rows[0]:rows[1]]).clone()

        entry = Entry(TensorInfo(name, info.dtype, info.shape, Path("<memory>"), None), read)
        return View(name, {}, {name: entry}, [ck for ck, _ in inputs])
