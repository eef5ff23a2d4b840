"""Merge into memory: the plan and per-tensor merge of `merge`, with no folder written.

For small models merged many times (a sweep, a search), where writing and reloading a folder per
candidate costs more than the merge. The whole output is held in memory, so this is not for big
models; each tensor is merged whole, which gives the values `merge` writes (for chunked two-pass
methods such as SLERP, up to the order of a float64 sum).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergesmith.engine.allocator import keep_freed_memory
from mergesmith.engine.api import _device, plan
from mergesmith.engine.plan import Plan
from mergesmith.engine.run import Unit, merge_unit
from mergesmith.errors import MergesmithError
from mergesmith.recipe import Recipe


def merge_tensors(recipe: Plan | Recipe | str | Path | dict, *, seed: int | None = None,
                  device: str = "cpu") -> dict[str, torch.Tensor]:
    """The merged model as a state dict (output tensor name -> tensor on the CPU).

    Given a Plan (from `mergesmith.plan`), merges that plan; `seed` then does not apply.
    """
    the_plan = recipe if isinstance(recipe, Plan) else plan(recipe, seed=seed)
    if the_plan.method.side is not None:
        raise MergesmithError(f"{the_plan.method.name} writes outputs beside the merged weights, "
                              "which an in-memory merge would drop", hint="merge it to a folder")
    keep_freed_memory()
    compute = _device(device)
    merged = {}
    for job in the_plan.jobs:
        tensors = [ck.read(name) for ck, name in job.inputs]
        if job.vocab_axis:
            tensors = the_plan.vocab.gather(tensors, [ck for ck, _ in job.inputs])
        merged[job.out.name] = merge_unit(the_plan, Unit(job, None, "merge"), tensors, compute, None)
    return merged


def load_merged(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy merged tensors into a model of the same architecture, in place.

    Every tensor must find a parameter or buffer; parameters left out may only be tied ones
    (an output head sharing the input embedding), which follow their twin.
    """
    result = module.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise MergesmithError(f"the model has no tensor {result.unexpected_keys[0]!r} "
                              f"({len(result.unexpected_keys)} merged tensors did not fit)",
                              hint="build the model from the same architecture as the merged one")
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    missing = set(result.missing_keys)
    unset = [names[0] for names in groups.values() if all(n in missing for n in names)]
    unset += [n for n in missing if not any(n in names for names in groups.values())]
    if unset:
        raise MergesmithError(f"the merge has no tensor for {unset[0]!r} ({len(unset)} left unset)",
                              hint="build the model from the same architecture as the merged one")
    return module
