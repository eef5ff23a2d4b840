"""Average the checkpoints of one training run (`mergesmith average`): uniformly, by step, or by
training loss with MWA's penalty (methods/mwa.py).

A run folder is what transformers' Trainer writes: `checkpoint-<step>/` subfolders, each with
the model (config.json + model.safetensors) or, for a PEFT run, the adapter (adapter_config.json
+ adapter_model.safetensors), and `trainer_state.json` whose `log_history` holds the training
loss logged every `logging_steps` up to that checkpoint.

- Full checkpoints: a `linear` recipe with the computed weights, merged by the engine like any
  other recipe (the weights are in the model card's recipe).
- Adapter checkpoints, two ways, which differ:
  `factors` (the paper's): every adapter tensor averaged on its own, A = Σ w_k A_k and
  B = Σ w_k B_k, same rank and config as the checkpoints. Its ΔW is (Σ w_k B_k)(Σ w_k A_k),
  which is not the average of the checkpoints' ΔW (cross terms B_j A_k).
  `delta`: ΔW = Σ w_k s B_k A_k exactly, as one adapter of rank Σ r_k (lora_combine's `cat`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import CheckpointError, MergesmithError, MethodError
from mergesmith.io.checkpoint import read_json_object, read_safetensors_header
from mergesmith.io.output import OutputFolder, write_json
from mergesmith.methods.mwa import BY, checkpoint_weights

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
STATE = "trainer_state.json"
RECORD = "average.json"  # written beside the averaged weights: what was averaged, and how
ADAPTER_MODES = ("factors", "delta")
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
# adapter_config.json fields that may differ between checkpoints of one run without changing
# what the adapter tensors mean
VOLATILE = {"base_model_name_or_path", "revision", "inference_mode"}


@dataclass(frozen=True)
class RunCheckpoint:
    path: Path
    step: int
    loss: float | None  # the last training loss logged at or before `step`
    kind: str  # "full" or "adapter"


@dataclass
class Averaged:
    path: Path
    checkpoints: list[RunCheckpoint]
    weights: list[float]
    kind: str


def read_run(run: Path) -> list[RunCheckpoint]:
    """The run's `checkpoint-*` folders, by step."""
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"run folder {run} does not exist",
                              hint="give the Trainer's output_dir, which holds checkpoint-* folders")
    found = sorted((int(m.group(1)), p) for p in run.iterdir()
                   if p.is_dir() and (m := CHECKPOINT.match(p.name)))
    if not found:
        raise CheckpointError(f"{run}: no checkpoint-* folders",
                              hint="the Trainer writes them every save_steps; is this its output_dir?")
    checkpoints = [_checkpoint(path, step) for step, path in found]
    kinds = {c.kind for c in checkpoints}
    if len(kinds) > 1:
        adapter = next(c for c in checkpoints if c.kind == "adapter")
        full = next(c for c in checkpoints if c.kind == "full")
        raise CheckpointError(f"{run}: {adapter.path.name} holds an adapter but {full.path.name} "
                              "a full model", hint="average one kind at a time")
    return checkpoints


def _checkpoint(path: Path, step: int) -> RunCheckpoint:
    if (path / ADAPTER_CONFIG).is_file():
        kind = "adapter"
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise CheckpointError(f"{path}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}",
                                  hint="only safetensors adapters are read")
    elif (path / "config.json").is_file():
        kind = "full"
    else:
        raise CheckpointError(f"{path}: neither a model (config.json) nor an adapter "
                              f"({ADAPTER_CONFIG})")
    loss = None
    if (path / STATE).is_file():
        state = read_json_object(path / STATE, "trainer state")
        step = int(state.get("global_step") or step)
        loss = logged_loss(state.get("log_history") or [], step)
    return RunCheckpoint(path, step, loss, kind)


def logged_loss(history: list[dict], step: int) -> float | None:
    """The last training `loss` logged at or before `step` (evaluation entries carry
    `eval_loss` instead, and the end-of-training summary `train_loss`: neither counts)."""
    losses = [e["loss"] for e in history if isinstance(e, dict) and isinstance(e.get("loss"), (int, float))
              and e.get("step", 0) <= step]
    return float(losses[-1]) if losses else None


def weights_for(checkpoints: list[RunCheckpoint], by: str, penalty: float) -> list[float]:
    if by == "loss":
        missing = [c.path.name for c in checkpoints if c.loss is None]
        if missing:
            raise CheckpointError(f"--by loss: no training loss logged for {', '.join(missing)} "
                                  f"(in {STATE}'s log_history)",
                                  hint="log more often (logging_steps), or use --by step / uniform")
    try:
        return checkpoint_weights(by, penalty, steps=[c.step for c in checkpoints],
                                  losses=[c.loss for c in checkpoints], count=len(checkpoints))
    except MethodError as exc:
        raise MergesmithError(f"--by {by}: {exc.message}", hint=exc.hint) from None


def average_run(run: Path, out: Path, *, by: str = "uniform", penalty: float = 1.0,
                adapter_mode: str = "factors", overwrite: bool = False,
                progress: bool = False) -> Averaged:
    """Average the run's checkpoints into `out`: a model folder, or an adapter folder."""
    if by not in BY:
        raise MergesmithError(f"--by {by!r}: not a weighting", hint=f"one of {', '.join(BY)}")
    if adapter_mode not in ADAPTER_MODES:
        raise MergesmithError(f"--adapter-mode {adapter_mode!r}: not a mode",
                              hint=f"one of {', '.join(ADAPTER_MODES)}")
    checkpoints = read_run(run)
    weights = weights_for(checkpoints, by, penalty)
    # JSON has no infinity: p = inf is written as the string "inf"
    record = {"by": by, "penalty": penalty if math.isfinite(penalty) else str(penalty), "checkpoints": [
        {"path": str(c.path), "step": c.step, "loss": c.loss, "weight": w}
        for c, w in zip(checkpoints, weights)]}
    # a zero weight (p = inf) reads nothing
    kept = [(c, w) for c, w in zip(checkpoints, weights) if w > 0]
    kind = checkpoints[0].kind
    if kind == "full":
        path = _average_full(kept, out, record, overwrite, progress)
    elif adapter_mode == "factors":
        record["adapter_mode"] = "factors"
        path = average_adapter_factors([c.path for c, _ in kept], [w for _, w in kept], out,
                                       record=record, overwrite=overwrite)
    else:
        record["adapter_mode"] = "delta"
        path = _average_adapter_deltas(kept, out, record, overwrite)
    return Averaged(path, checkpoints, weights, kind)


def average_recipe(kept: list[tuple[RunCheckpoint, float]]) -> dict[str, Any]:
    """The `linear` recipe of full checkpoints, the last one first (config and tokenizer from it)."""
    return {"merge_method": "linear", "parameters": {"normalize": True},
            "models": [{"model": str(c.path), "parameters": {"weight": w}} for c, w in reversed(kept)]}


def _average_full(kept, out: Path, record: dict, overwrite: bool, progress: bool) -> Path:
    from mergesmith.engine.api import merge

    return merge(average_recipe(kept), out, overwrite=overwrite, progress=progress,
                 notes={RECORD: json.dumps(record, indent=2) + "\n"})


def average_adapter_factors(folders: list[Path], weights: list[float], out: Path, *,
                            record: dict | None = None, overwrite: bool = False) -> Path:
    """Σ w_k X_k for every tensor X of the adapters (A, B, modules_to_save, DoRA magnitudes),
    in fp32, stored in the inputs' dtype; the config of the last adapter."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    configs = [read_json_object(f / ADAPTER_CONFIG, "adapter config") for f in folders]
    headers = [read_safetensors_header(f / ADAPTER_WEIGHTS) for f in folders]
    _same_adapters(folders, configs, headers)
    fingerprint = hashlib.sha256(json.dumps([[str(f) for f in folders], weights]).encode()).hexdigest()
    output = OutputFolder(Path(out), fingerprint, overwrite=overwrite, inputs=folders)
    try:
        handles = [safe_open(str(f / ADAPTER_WEIGHTS), framework="pt") for f in folders]
        averaged = {}
        for name, info in headers[0].items():
            total = torch.zeros(info.shape, dtype=torch.float32)
            for handle, w in zip(handles, weights):
                total.add_(handle.get_tensor(name).float(), alpha=w)
            averaged[name] = total.to(info.dtype)
        save_file(averaged, output.path(ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(output.path(ADAPTER_CONFIG), configs[-1])
        if record is not None:
            write_json(output.path(RECORD), record)
        return output.finalize()
    finally:
        output.release()


def _same_adapters(folders: list[Path], configs: list[dict], headers: list[dict]) -> None:
    """Factor averaging needs one adapter layout: the same config and tensors everywhere."""
    first = folders[-1]
    for folder, config, header in zip(folders, configs, headers):
        for key in sorted((set(config) | set(configs[-1])) - VOLATILE):
            if config.get(key) != configs[-1].get(key):
                raise CheckpointError(f"{folder.name}: adapter config {key!r} is "
                                      f"{config.get(key)!r}, in {first.name} {configs[-1].get(key)!r}",
                                      hint="average checkpoints of one run (one adapter config)")
        for name in set(header) ^ set(headers[-1]):
            where = folder.name if name in header else first.name
            raise CheckpointError(f"adapter tensor {name!r} is only in {where} "
                                  f"(comparing {folder.name} with {first.name})")
        for name, info in header.items():
            if info.shape != headers[-1][name].shape:
                raise CheckpointError(f"{folder.name}: adapter tensor {name!r} has shape "
                                      f"{list(info.shape)}, in {first.name} "
                                      f"{list(headers[-1][name].shape)}")


def _average_adapter_deltas(kept, out: Path, record: dict, overwrite: bool) -> Path:
    """ΔW = Σ w_k ΔW_k exactly: lora_combine's `cat` over the checkpoints' adapters (its
    modules_to_save averaged with the same weights)."""
    from mergesmith.engine.adapters import merge_adapters

    recipe = {"merge_method": "lora_combine",
              "parameters": {"combination_type": "cat", "mode": "exact"},
              "models": [{"model": str(c.path), "parameters": {"weight": w}} for c, w in kept]}
    path = merge_adapters(recipe, out, overwrite=overwrite).path
    write_json(path / RECORD, record)  # after the folder is in place: a record, not a weight
    return path
