"""A merge given as its output tensors rather than as a recipe: MoE assembly and compression,
aligned models. Each output tensor is one input copied (under any name, cast to the output
dtype) or a weighted average of inputs; inputs are checkpoints or io/views.py views (renamed,
re-indexed, computed in memory). Streaming, shards, atomic output, `--resume` and the progress
bar are the engine's, exactly as for a recipe.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergesmith.engine.plan import Plan, TensorJob
from mergesmith.errors import PlanError
from mergesmith.io import OutTensor, layout_shards
from mergesmith.methods import TensorContext, get_method
from mergesmith.recipe import Recipe


@dataclass
class Output:
    """One output tensor: `inputs` averaged with `weights` (normalised by their sum), or, when
    `weights` is None, the single input as stored (cast to the program's dtype)."""

    name: str
    inputs: list[tuple[object, str]]  # (checkpoint or view, tensor name)
    weights: list[float] | None = None
    layer: int | None = None


@dataclass
class Program:
    outputs: list[Output]
    config: dict  # the output's config.json
    config_source: object  # tokenizer and generation config are copied from its folder
    title: str  # the model card's heading, e.g. "MoE of 4 experts (mixtral)"
    summary: str  # the model card's paragraph: what was built, and how
    record: tuple[str, str] | None = None  # (file name, text): the config as the user gave it
    dtype: torch.dtype | None = None  # floating outputs are cast to it (None: the first input's)
    seed: int = 0
    models: dict[str, object] = field(default_factory=dict)  # reference -> checkpoint, for the card

    def key(self) -> str:
        """What a resumed run must share with the first: every output's name, inputs and weights,
        the config and the record."""
        outs = [[o.name, [[getattr(ck, "label", ""), n] for ck, n in o.inputs], o.weights]
                for o in self.outputs]
        blob = json.dumps([outs, self.config, self.record, str(self.dtype), self.seed], sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def program_plan(program: Program, shard_bytes: int = 5 * 1000**3) -> Plan:
    """The engine's plan for the program: one job per output, shards laid out as for a merge."""
    method = get_method("linear")
    jobs = [_job(program, out) for out in program.outputs]
    models = program.models or {ck.label: ck for out in program.outputs for ck, _ in out.inputs
                                if hasattr(ck, "label")}
    recipe = Recipe.model_validate({"merge_method": "linear", "name": program.title,
                                    "models": [{"model": ref} for ref in models]})
    recipe._text = program.record[1] if program.record else None
    return Plan(recipe=recipe, method=method, jobs=jobs,
                shards=layout_shards([job.out for job in jobs], shard_bytes), config=program.config,
                config_source=program.config_source, load_dtype=None, vocab=None, seed=program.seed,
                models=models, program=program)


def _job(program: Program, out: Output) -> TensorJob:
    if not out.inputs:
        raise PlanError(f"output tensor {out.name!r} has no inputs")
    infos = [ck.tensors[name] for ck, name in out.inputs]
    shape = infos[0].shape
    for (ck, name), info in zip(out.inputs, infos):
        if info.shape != shape:
            raise PlanError(f"shapes differ for {out.name!r}: {out.inputs[0][0].label} has "
                            f"{list(shape)} ({out.inputs[0][1]!r}), {ck.label} has "
                            f"{list(info.shape)} ({name!r})")
    floating = infos[0].dtype.is_floating_point
    dtype = (program.dtype or infos[0].dtype) if floating else infos[0].dtype
    copy = out.weights is None and (not floating or dtype == infos[0].dtype)
    if out.weights is None and len(out.inputs) != 1:
        raise PlanError(f"output tensor {out.name!r}: a copy takes one input, got {len(out.inputs)}")
    if out.weights is not None and len(out.weights) != len(out.inputs):
        raise PlanError(f"output tensor {out.name!r}: {len(out.weights)} weights for "
                        f"{len(out.inputs)} inputs")
    weights = out.weights if out.weights is not None else [1.0]
    params = {} if copy else {"weights": list(weights), "normalize": True}
    return TensorJob(OutTensor(out.name, dtype, tuple(shape)), list(out.inputs), False, params,
                     TensorContext(out.name, out.layer, None, program.seed), copy=copy)


def write_program(program: Program, out: str | Path, *, shard_size: str | int = "5GB",
                  device: str = "cpu", resume: bool = False, overwrite: bool = False,
                  progress: bool = False, notes: dict[str, str] | None = None) -> Path:
    """Write the program's model folder at `out` (atomically; `resume` finishes an interrupted
    run with the same bytes) and return its path."""
    from mergesmith.engine.api import write_plan, parse_size

    the_plan = program_plan(program, parse_size(shard_size))
    return write_plan(the_plan, out, device=device, resume=resume, overwrite=overwrite,
                      progress=progress, notes=notes)
