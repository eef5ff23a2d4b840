"""Merge into memory: the plan and per-tensor merge of `merge`, with no folder written.

For small models merged many times (a sweep, a search), where writing and reloading a folder per
candidate costs more than the merge. Each tensor is cut into the same units as the streamed
merge (engine/run.py: `units`, the same chunk size) and merged by the same code, so the values
are those `merge` writes, bit for bit. The inputs come from the files or from a `source`, a
cache of them that a search keeps (search/candidates.py); the result goes to fresh tensors or
`into` a model's own.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import torch

from mergesmith.engine.allocator import keep_freed_memory
from mergesmith.engine.api import _device, plan
from mergesmith.engine.plan import Plan
from mergesmith.engine.run import DEFAULT_CHUNK_BYTES, merge_job, merge_threads, read_unit
from mergesmith.errors import MergesmithError
from mergesmith.io import Checkpoint
from mergesmith.recipe import Recipe

# (checkpoint, tensor name, rows [start, stop) or None for all) -> the tensor in its stored dtype
TensorSource = Callable[[Checkpoint, str, "tuple[int, int] | None"], torch.Tensor]


def merge_tensors(recipe: Plan | Recipe | str | Path | dict, *, seed: int | None = None,
                  device: str = "cpu", source: TensorSource | None = None,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The merged model as a state dict (output tensor name -> tensor on the CPU, in the output
    dtype), equal to what `merge` with the same `chunk_size` writes.

    Given a Plan (from `mergesmith.plan`), merges that plan; `seed` then does not apply.
    `into` maps output names to tensors to overwrite in place (a model's parameters, of any
    float dtype the output dtype widens to exactly); the result then holds those tensors.
    """
    the_plan = recipe if isinstance(recipe, Plan) else plan(recipe, seed=seed)
    if the_plan.method.side is not None:
        raise MergesmithError(f"{the_plan.method.name} writes outputs beside the merged weights, "
                              "which an in-memory merge would drop", hint="merge it to a folder")
    keep_freed_memory()
    compute = _device(device)
    read = partial(read_unit, the_plan, source=source)
    merged = {}
    with merge_threads(the_plan, compute), torch.no_grad():
        for job in the_plan.jobs:
            out = (into or {}).get(job.out.name)
            if out is None:
                out = torch.empty(job.out.shape, dtype=job.out.dtype)
            elif tuple(out.shape) != tuple(job.out.shape):
                raise MergesmithError(f"tensor {job.out.name!r}: the merge gives shape "
                                      f"{list(job.out.shape)}, the model's is {list(out.shape)}",
                                      hint="build the model from the merged config")
            for unit, _, result in merge_job(the_plan, job, chunk_bytes, read, compute):
                # a copy, also of a whole tensor: a passed-through input must not alias a cache
                (out if unit.rows is None else out[unit.rows[0]:unit.rows[1]]).copy_(result)
            merged[job.out.name] = out
    return merged


def load_merged(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy merged tensors into a model of the same architecture, in place."""
    targets = model_targets(module, list(tensors))
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(targets[name].shape):
                raise MergesmithError(f"tensor {name!r}: the merge gives shape {list(tensor.shape)}, "
                                      f"the model's is {list(targets[name].shape)}",
                                      hint="build the model from the merged config")
            targets[name].copy_(tensor)
    return module


def model_targets(module: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The module's own tensors that merged tensors `names` overwrite, by name.

    Every name must find a parameter or buffer; parameters left out may only be tied ones
    (an output head sharing the input embedding), which follow their twin.
    """
    state = module.state_dict(keep_vars=True)
    unknown = [name for name in names if name not in state]
    if unknown:
        raise MergesmithError(f"the model has no tensor {unknown[0]!r} ({len(unknown)} merged "
                              "tensors did not fit)",
                              hint="build the model from the same architecture as the merged one")
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    given = set(names)
    unset = [group[0] for group in groups.values() if not given.intersection(group)]
    if unset:
        raise MergesmithError(f"the merge has no tensor for {unset[0]!r} ({len(unset)} left unset)",
                              hint="build the model from the same architecture as the merged one")
    return {name: state[name].detach() for name in names}
