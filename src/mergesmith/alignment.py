"""Alignment of models that do not share a basin, before they are merged: Git Re-Basin weight
matching (engine/weight_matching.py: data-free, any number of models, each written permuted) or
PLeaS for two transformers (methods/pleas.py has the maths): one merged model whose MLP width
lies between d (every unit merged) and 2d (both models' units kept).

Transformer form:
1. B is weight-matched to A (engine/weight_matching.py: residual stream, attention heads, MLP units), so
   that everything outside the MLPs can be averaged.
2. Bottom up, per layer, on calibration data (calibrate/pleas_activations.py): A's and aligned
   B's MLP hidden units (the input of down_proj) are correlated; a linear assignment pairs them
   and the `2d − width` most correlated pairs are merged. A merged unit's gate and up rows are
   the average of the pair's; kept units keep their rows. down_proj, the only linear map that
   reads the units, is solved by least squares so that the merged layer's MLP output on the
   merged model's own inputs (layers below already merged) approximates both A's and B's MLP
   outputs on the same tokens (targets of A and aligned B stacked).
3. Attention, norms, embeddings and the LM head are the average of A and aligned B.
The output is written by engine/program.py: averages and gate/up rows as views of A and
aligned B, down_proj as computed tensors; config.json's `intermediate_size` is the new width
(one for every layer: transformers has one).

Supported: decoders whose MLP is `gate_proj`/`up_proj`/`down_proj` without biases and that
weight matching knows (Llama, Mistral, Qwen2). The forward passes hold A, aligned B and the
merged model in memory.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from mergesmith.calibrate.pleas_activations import merge_layers, token_batches
from mergesmith.engine import weight_matching
from mergesmith.engine.program import Output, Program, write_program
from mergesmith.engine.weight_matching import FAMILIES, align_models, open_models, reference_index
from mergesmith.errors import CalibrationError, OutputError, PlanError
from mergesmith.io import TensorInfo
from mergesmith.io.views import Entry, View, computed, reindexed
from mergesmith.methods.pleas import RIDGE, Blocks, merged_width

METHODS = ("weight_matching", "pleas")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
SAMPLES = 128


def align(models: list, out: str | Path, *, method: str = "weight_matching", units=FAMILIES,
          scheme: str = "mean", max_sweeps: int = 100, log=None, **options) -> list[Path]:
    """Align `models` by `method` and return the folders written: weight matching writes each
    model but the reference, permuted, to OUT/<its folder name>; PLeaS merges A and B into OUT
    (its own options: budget, data, ...), weight-matching B to A first on every unit family."""
    if method == "weight_matching":
        return weight_matching.align(models, out, units=units, scheme=scheme, max_sweeps=max_sweeps,
                                     log=log, **options)
    if method != "pleas":
        raise PlanError(f"unknown alignment method {method!r}", hint=f"use {' or '.join(METHODS)}")
    given = [name for name, value, default in (("units", tuple(units), FAMILIES), ("scheme", scheme, "mean"),
                                               ("max_sweeps", max_sweeps, 100)) if value != default]
    if given:
        raise PlanError(f"PLeaS takes no {given[0]!r}: it weight-matches B to A on "
                        f"{', '.join(FAMILIES)} itself", hint=f"leave {given[0]} out with --method pleas")
    return [pleas_align(models, out, **options)]


def pleas_align(models, out: str | Path, *, budget: float = 1.5, data: str | Path | None = None,
                samples: int = SAMPLES, max_length: int | None = None, batch_size: int = 8,
                ridge: float = RIDGE, reference: str | int | None = None, device: str = "cpu",
                seed: int = 0, progress: bool = False, shard_size: str | int = "5GB",
                overwrite: bool = False, resume: bool = False) -> Path:
    """Merge `models` = [A, B] (folders, hub ids or checkpoints) by PLeaS into `out`; `budget`
    in [1, 2] sets the MLP width to d + round((budget − 1)·d). `data`: a calibration file
    (.txt, .jsonl, .csv, .parquet with a `text` field), or None for data-free PLeaS on random
    token sequences from A's vocabulary. `reference` (default the first) names A, the model
    whose tokenizer, config and basis the output keeps."""
    a, b = _inputs(models, reference)
    units = a.config["intermediate_size"]
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 1.0 <= budget <= 2.0:
        raise PlanError(f"pleas: budget {budget!r} is out of range",
                        hint="give 1 (width d: every MLP unit merged) to 2 (width 2d: none merged)")
    width = merged_width(units, float(budget))
    _check_data(data, samples, max_length, batch_size)
    target = Path(out)
    if target.exists() and not (overwrite or resume) and (not target.is_dir() or any(target.iterdir())):
        # the engine says so too, but only after the forward passes
        raise OutputError(f"output {target.absolute()} already exists",
                          hint="choose a new folder or pass --overwrite")
    aligned = _weight_matched(a, b, seed)


    batches = partial(token_batches, data=data, samples=samples, max_length=max_length,
                      batch_size=batch_size, seed=seed)
    blocks, downs = merge_layers(a, aligned, width, batches, device=device, ridge=ridge,
                                 progress=progress)
    settings = {"method": "pleas", "models": [a.label, b.label], "budget": budget, "width": width,
                "data": str(data) if data is not None else None, "samples": samples,
                "max_length": max_length, "seed": seed, "ridge": ridge}
    return write_program(pleas_program(a, aligned, blocks, downs, settings), out,
                         shard_size=shard_size, device=device, resume=resume, overwrite=overwrite,
                         progress=progress)


def pleas_program(a, aligned, blocks: list[Blocks], downs: list[torch.Tensor], settings: dict) -> Program:
    """The merged model as a program: each tensor the average of A and aligned B, except the
    MLPs (gate/up rows laid out by `blocks`, down_proj the solved `downs`)."""
    width = blocks[0].width
    solved = {_name(layer, "down_proj"): down for layer, down in enumerate(downs)}
    downs_view = View("pleas least squares", {}, {n: computed(n, t) for n, t in solved.items()})
    outputs = []
    for name in a.tensors:
        layer, kind = _mlp(name)
        if kind == "down_proj":
            outputs.append(Output(name, [(downs_view, name)], layer=layer))
        elif kind is not None:
            first, second = _unit_rows(a, aligned, name, blocks[layer])
            outputs.append(Output(name, [(first, name), (second, name)], [1.0, 1.0], layer=layer))
        else:
            outputs.append(Output(name, [(a, name), (aligned, name)], [1.0, 1.0], layer=layer))
    config = dict(a.config, intermediate_size=width)
    units = a.config["intermediate_size"]
    data = settings["data"] or "random token sequences (data-free)"
    summary = (f"PLeaS merge of {a.label} and {aligned.label} (weight-matched to it): MLP width "
               f"{width} (budget {settings['budget']}; {2 * units - width} of {units} units merged per "
               f"layer), down_proj by least squares on {data}, everything else averaged.")
    return Program(outputs, config, a, f"PLeaS merge (width {width})", summary,
                   record=("pleas.json", json.dumps(settings, indent=2) + "\n"),
                   dtype=next(i.dtype for i in a.tensors.values() if i.dtype.is_floating_point),
                   seed=settings["seed"],
                   models={a.label: a, aligned.label: aligned})


def _unit_rows(a, aligned, name: str, blocks: Blocks) -> tuple[View, View]:
    """Two views of gate/up rows whose average is the merged layer's: [A's merged rows, A's kept,
    B's kept] and [B's merged rows, A's kept, B's kept]."""
    kept = [(a, blocks.only_a), (aligned, blocks.only_b)]
    return tuple(View(f"{ck.label} (PLeaS rows)", {}, {name: _stacked(name, [(ck, index), *kept])},
                      [a, aligned])
                 for ck, index in ((a, blocks.merged_a), (aligned, blocks.merged_b)))


def _stacked(name: str, parts: list[tuple[object, torch.Tensor]]) -> Entry:
    """Rows `index` of each part's tensor `name`, one part after another."""
    entries = [reindexed(ck, name, {0: index}) for ck, index in parts]
    sizes = [len(index) for _, index in parts]
    first = entries[0].info
    shape = (sum(sizes), *first.shape[1:])

    def read(rows):
        start, stop = rows if rows is not None else (0, shape[0])
        pieces, offset = [], 0
        for entry, size in zip(entries, sizes):
            low, high = max(start, offset), min(stop, offset + size)
            if low < high:
                pieces.append(entry.read((low - offset, high - offset)))
            offset += size
        return torch.cat(pieces) if pieces else torch.empty((0, *shape[1:]), dtype=first.dtype)

    return Entry(TensorInfo(name, first.dtype, shape, first.file, None), read)


def _name(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.mlp.{kind}.weight"


def _mlp(name: str) -> tuple[int | None, str | None]:
    """(layer, gate_proj | up_proj | down_proj) of an MLP weight, else (layer or None, None)."""
    parts = name.split(".")
    layer = int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else None
    kind = parts[4] if layer is not None and len(parts) == 6 and parts[3] == "mlp" else None
    return layer, kind if kind in MLP_NAMES else None


def _inputs(models, reference) -> tuple[object, object]:
    """A (the reference) and B, opened, each with gated bias-free MLPs, else a PlanError.
    engine/weight_matching.py checks that they are one architecture and size."""

    if len(models) != 2:
        raise PlanError(f"pleas merges two models, got {len(models)}",
                        hint="give A and B; for more, merge the result with the next")
    refs = [m if hasattr(m, "tensors") else str(m) for m in models]
    first = reference_index([str(r) for r in refs], reference)
    opened = [r if hasattr(r, "tensors") else None for r in refs]
    if None in opened:
        opened = [o or ck for o, ck in zip(opened, open_models([str(r) for r in refs]))]
    a, b = opened[first], opened[1 - first]
    for ck in (a, b):
        layers, units = ck.config.get("num_hidden_layers"), ck.config.get("intermediate_size")
        missing = [n for layer in range(layers or 0) for n in map(partial(_name, layer), MLP_NAMES)
                   if n not in ck.tensors]
        if not layers or not units or missing or ck.config.get("mlp_bias"):
            raise PlanError(f"pleas: {ck.label} ({ck.config.get('model_type')}) has no gated MLP PLeaS "
                            f"can resize{f' (no tensor {missing[0]})' if missing else ''}",
                            hint="supported: Llama, Mistral, Qwen2 (gate/up/down_proj, no MLP bias)")
    return a, b


def _check_data(data, samples, max_length, batch_size) -> None:
    """The calibration settings, checked before anything is computed."""
    if data is not None and not Path(data).is_file():
        raise CalibrationError(f"pleas: calibration file {data}: no such file",
                               hint="a .txt (one text per line), .jsonl, .csv or .parquet file; "
                                    "or none, for random tokens")
    for name, value, least in (("samples", samples, 1), ("batch_size", batch_size, 1),
                               ("max_length", max_length, 2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise PlanError(f"pleas: {name} must be an integer >= {least}, got {value!r}")


def _weight_matched(a, b, seed: int):
    """B with its residual stream, heads and MLP units permuted onto A by weight matching
    (engine/weight_matching.py), so that everything outside the MLPs can be averaged."""

    return align_models([a, b], reference=0, seed=seed)[1].model
