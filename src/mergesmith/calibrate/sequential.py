"""RegMean++'s Gram matrices: each block's inputs come from the blocks already merged.

RegMean (Jin et al. 2023) takes expert i's Gram matrices from expert i's own forward. RegMean++
(Nguyen et al. 2025, arXiv:2508.03121) merges block by block and computes the Gram matrices of
block l of expert i from the hidden states that the MERGED blocks < l produce on task i's data,
fed through expert i's block l: the merge then sees the inputs it will really get. FusionBench
(tanganke/fusion_bench, method/regmean_plusplus) does the same for CLIP's vision encoder, with the
embeddings averaged first; here the layers before the blocks are each expert's own unless
`embeddings` supplies merged ones, so block 0's Grams are RegMean's.

Generic over Hugging Face models: the blocks are the model's longest nn.ModuleList of identical
layers. One module is held in memory; for block l and expert i it carries the merged blocks < l,
expert i's block l and expert i's layers before the blocks, and each pass stops at block l's last
linear layer. Linear layers outside the blocks (output head, pooler, classifier) get their Grams
from the expert's own forward, as in RegMean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from mergesmith import __version__
from mergesmith.calibrate.collect import (Linear, StopForward, execution_order, forward_statistics,
                                          forward_until_stopped, linear_layers, progress_bar)
from mergesmith.calibrate.data import Example
from mergesmith.calibrate.forward import Batch, CalibrationModel
from mergesmith.errors import CalibrationError
from mergesmith.io.checkpoint import Checkpoint
from mergesmith.recipe import Calibration, Recipe

MergeBlock = Callable[[int, list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]
GramSink = Callable[[int, dict[str, torch.Tensor]], None]


def collect_sequential_grams(expert_folders: list[str | Path], examples_per_expert: list[list[Example]],
                             cals: list[Calibration], root: Path, *, merge_block: MergeBlock,
                             embeddings: dict[str, torch.Tensor] | None = None,
                             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                             progress: bool = False, on_grams: GramSink | None = None
                             ) -> list[dict[str, torch.Tensor]]:
    """Per expert, {"<weight>::gram": G} for every linear layer, RegMean++'s way.

    `merge_block(l, grams)` receives block l's Grams of every expert (one dict per expert) and
    returns block l's merged tensors, every one of them, by checkpoint name; they carry the
    inputs of the blocks after it. `embeddings` (checkpoint names) replaces the experts' own
    layers before the blocks in those passes. With `on_grams(i, grams)`, each finished piece of
    expert i's Grams (its layers outside the blocks, then one block at a time) goes there
    instead of being kept, and the lists come back empty.
    """
    if not (len(expert_folders) == len(examples_per_expert) == len(cals)) or not expert_folders:
        raise ValueError("give one examples list and one calibration per expert")
    skeleton = CalibrationModel.load(expert_folders[0], cals[0], root, device, dtype)
    experts = [skeleton.view(folder, cal, root) for folder, cal in zip(expert_folders, cals)]
    checkpoints = [Checkpoint(Path(folder)) for folder in expert_folders]
    batches = [expert.batches(examples) for expert, examples in zip(experts, examples_per_expert)]
    blocks_name, count = repeated_blocks(skeleton.module)
    in_block = [_block_params(skeleton, blocks_name, l) for l in range(count)]
    grams: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    keep = on_grams or (lambda i, found: grams[i].update(found))

    with progress_bar(progress) as bar:
        for i, (expert, checkpoint) in enumerate(zip(experts, checkpoints)):
            expert.load_weights(_read(checkpoint, expert.parameters()))
            outside = [layer for layer in linear_layers(expert) if _block_of(layer.name, blocks_name) is None]
            if outside:
                bar.start(f"regmean++ outside the blocks, expert {i + 1}/{len(experts)}",
                          len(examples_per_expert[i]))
                keep(i, _grams(expert, batches[i], outside, bar))
        before = _before_blocks(skeleton, batches[0][0], blocks_name)
        for l in range(count):
            block_grams = []
            for i, (expert, checkpoint) in enumerate(zip(experts, checkpoints)):
                own = [name for name in before if embeddings is None or name not in embeddings]
                expert.load_weights(_read(checkpoint, own + in_block[l]))
                if embeddings is not None:
                    expert.load_weights({name: embeddings[name] for name in before if name in embeddings})
                layers = [layer for layer in linear_layers(expert) if _block_of(layer.name, blocks_name) == l]
                bar.start(f"regmean++ block {l + 1}/{count}, expert {i + 1}/{len(experts)}",
                          len(examples_per_expert[i]))
                block_grams.append(_grams(expert, batches[i], layers, bar))
            for i, found in enumerate(block_grams):
                keep(i, found)
            merged = merge_block(l, block_grams)
            missing = sorted(set(in_block[l]) - set(merged))
            if missing:
                raise ValueError(f"merge_block({l}) returned no tensor {missing[0]!r} "
                                 f"({len(missing)} of block {l}'s {len(in_block[l])} missing)")
            skeleton.load_weights({name: merged[name] for name in in_block[l]})
    return grams


def repeated_blocks(module: torch.nn.Module) -> tuple[str, int]:
    """The name and length of the model's stack of blocks: the nn.ModuleList of identical
    layers holding the most parameters."""
    best: tuple[int, str, int] | None = None
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1 and len({type(c) for c in child}) == 1:
            size = sum(p.numel() for p in child.parameters())
            if best is None or size > best[0]:
                best = (size, name, len(child))
    if best is None:
        raise CalibrationError(f"{type(module).__name__}: no stack of repeated blocks found",
                               hint="RegMean++ merges block by block; use regmean for this model")
    return best[1], best[2]


def _block_of(module_name: str, blocks_name: str) -> int | None:
    head = f"{blocks_name}."
    if not module_name.startswith(head):
        return None
    index = module_name[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _block_params(model: CalibrationModel, blocks_name: str, layer: int) -> list[str]:
    """Checkpoint names of block `layer`'s tensors."""
    return [ck for name, _ in model.module.named_parameters()
            if _block_of(name, blocks_name) == layer and (ck := model.checkpoint_name(name)) is not None]


def _before_blocks(model: CalibrationModel, batch: Batch, blocks_name: str) -> list[str]:
    """Checkpoint names of the tensors a forward uses before it reaches the first block."""
    used: list[str] = []
    first_block = model.module.get_submodule(f"{blocks_name}.0")

    def record(module_name):
        def hook(module, args):
            own = (name for name, _ in module.named_parameters(recurse=False))
            used.extend(f"{module_name}.{name}" if module_name else name for name in own)
        return hook

    def stop(module, args):
        raise StopForward

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.module.named_modules()
               if _block_of(n, blocks_name) is None and n != blocks_name]
    handles.append(first_block.register_forward_pre_hook(stop))
    try:
        forward_until_stopped(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(ck for name in used if (ck := model.checkpoint_name(name)) is not None))


def _grams(model: CalibrationModel, batches: list[Batch], layers: list[Linear],
           bar) -> dict[str, torch.Tensor]:
    if not layers:
        return {}
    order, stop_early = execution_order(model, batches[0], layers)
    return forward_statistics(model, batches, order, ["gram"], stop_early=stop_early,
                              on_batch=bar.advance)


def _read(checkpoint: Checkpoint, names) -> dict[str, torch.Tensor]:
    return {name: checkpoint.read(name) for name in names}


def sequential_statistics(recipe: Recipe, base_folder: Path, folders: dict[str, Path],
                          cals: list[Calibration], root: Path, *, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, progress: bool = False,
                          allow_crimes: bool = False) -> dict[str, Path]:
    """Each expert's RegMean++ Gram store (model reference -> store), cached under the recipe,
    the models and the data. Block l is merged by the engine exactly as the final merge will
    merge it (the recipe's method and parameters, its dtype and LiNeS), so the Grams of the
    blocks after it see the merged model that will be written (`allow_crimes` as for that
    merge's plan)."""
    from mergesmith.calibrate.data import fingerprint, load_examples
    from mergesmith.calibrate.store import StoreWriter, default_cache, is_store, model_fingerprint

    refs = list(folders)
    key = json.dumps([__version__, recipe.fingerprint(), str(dtype), model_fingerprint(base_folder),
                      [model_fingerprint(folders[ref]) for ref in refs],
                      [fingerprint(c, root) for c in cals]])
    home = default_cache(recipe.calibration or Calibration(), root) / "regmean_plusplus"
    folder = home / hashlib.sha256(key.encode()).hexdigest()[:20]
    stores = {ref: folder / f"expert-{i}" for i, ref in enumerate(refs)}
    if all(is_store(path) for path in stores.values()):
        return stores
    examples = [load_examples(cal, root) for cal in cals]
    partial = home / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        merger = BlockMerger(recipe, refs, partial / "placeholders", device, allow_crimes=allow_crimes)
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(StoreWriter(partial / f"expert-{i}")) for i in range(len(refs))]
            collect_sequential_grams([folders[ref] for ref in refs], examples, cals, root,
                                     merge_block=merger, device=device, dtype=dtype, progress=progress,
                                     on_grams=lambda i, grams: writers[i].add(grams))
            for i, (ref, writer) in enumerate(zip(refs, writers)):
                writer.finish({"model": str(Path(folders[ref]).resolve()), "kinds": ["gram"],
                               "method": "regmean_plusplus",
                               "settings": cals[i].model_dump(exclude={"cache"}),
                               "data_fingerprint": fingerprint(cals[i], root), "examples": len(examples[i]),
                               "recipe": recipe.fingerprint(), "mergesmith_version": __version__})
        shutil.rmtree(partial / "placeholders")
        os.rename(partial, folder)
    except OSError:
        if not all(is_store(path) for path in stores.values()):  # else another process won
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return stores


class BlockMerger:
    """`merge_block` through the engine: the recipe's plan, each job of block l merged by
    `engine.run.merge_unit` with the experts' Grams of that block as its statistics."""

    def __init__(self, recipe: Recipe, refs: list[str], scratch: Path, device: str | torch.device, *,
                 allow_crimes: bool = False):
        from mergesmith.calibrate.store import write_store
        from mergesmith.engine.plan import build_plan

        # the plan wants every expert's store; these hold no Gram, so each job reads none
        placeholders = {ref: write_store(scratch / f"expert-{i}", {"(none)::gram": torch.zeros(1)},
                                         {"placeholder": True}) for i, ref in enumerate(refs)}
        self.plan = build_plan(recipe, statistics=placeholders, allow_crimes=allow_crimes)
        self.device = torch.device(device)

    def __call__(self, layer: int, grams: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from mergesmith.engine.run import Unit, merge_unit

        merged = {}
        for job in self.plan.jobs:
            if job.ctx.layer != layer:
                continue
            tensors = [ck.read(name) for ck, name in job.inputs]
            experts = job.inputs[1:] if (job.has_base or job.lines_scale is not None) else job.inputs
            keys = [f"{name}::gram" for _, name in experts]
            if len(keys) != len(grams):
                raise ValueError(f"{job.out.name}: the plan merges {len(keys)} experts, "
                                 f"Grams came for {len(grams)}")
            if not job.copy and all(k in g for k, g in zip(keys, grams)):
                tensors += [g[k] for k, g in zip(keys, grams)]
                job = dataclasses.replace(job, statistics=("gram",))
            whole = Unit(job, None, "merge")
            merged[job.out.name] = merge_unit(self.plan, whole, tensors, self.device, None)
        return merged
