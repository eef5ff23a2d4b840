"""Adam's second moments (exp_avg_sq) of a fine-tuned model, by checkpoint tensor name: the
curvature that OTA and FFG merge with (methods/curvature.py).

Read from the model folder, in this order:
- `optimizer_second_moments.safetensors`: mergesmith's format, one tensor per checkpoint tensor
  name (`write_second_moments` writes it from a live model and optimizer);
- `optimizer.pt`, as a Hugging Face Trainer saves it in a `checkpoint-N` folder: a torch
  optimizer state keyed by parameter index. Trainer numbers the trainable parameters group by
  group, those with weight decay first, then those without (biases, norms), each group in the
  model's `named_parameters()` order. The checkpoint does not keep that order (safetensors
  headers are sorted by name), so it is rebuilt from the folder's config.json on the meta device:
  no weights are loaded and no code from the folder runs. The file itself is read with
  torch.load(weights_only=True) only.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mergesmith.errors import CalibrationError, CheckpointError

SECOND_MOMENTS_FILE = "optimizer_second_moments.safetensors"
TRAINER_OPTIMIZER_FILE = "optimizer.pt"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
EXPORT_HINT = (f"save them by name with mergesmith.calibrate.moments.write_second_moments(model, "
               f"optimizer, folder), which writes {SECOND_MOMENTS_FILE}")

Order = list[list[tuple[str, tuple[int, ...]]]]  # parameter groups of (name, shape)


def read_second_moments(folder: str | Path) -> dict[str, torch.Tensor]:
    """Adam's exp_avg_sq of every trained tensor of the model in `folder`, by tensor name."""
    folder = Path(folder)
    if (folder / SECOND_MOMENTS_FILE).is_file():
        moments = _read_safetensors(folder / SECOND_MOMENTS_FILE)
    elif (folder / TRAINER_OPTIMIZER_FILE).is_file():
        moments = _read_trainer_optimizer(folder)
    else:
        raise CalibrationError(f"{folder}: no optimizer second moments ({SECOND_MOMENTS_FILE} or "
                               f"a Trainer's {TRAINER_OPTIMIZER_FILE})",
                               hint="OTA and FFG need Adam's exp_avg_sq of each expert; "
                               + EXPORT_HINT)
    _check_against_checkpoint(folder, moments)
    return moments


def write_second_moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         folder: str | Path) -> Path:
    """Save the optimizer's exp_avg_sq of each of `model`'s parameters under the parameter's
    name (a transformers model's names are its checkpoint's tensor names)."""
    from safetensors.torch import save_file

    moments = {name: optimizer.state[param]["exp_avg_sq"].detach().float().cpu().contiguous()
               for name, param in model.named_parameters()
               if "exp_avg_sq" in optimizer.state.get(param, {})}
    if not moments:
        raise CalibrationError("the optimizer holds no exp_avg_sq for the model's parameters",
                               hint="second moments come from Adam or AdamW after a step")
    path = Path(folder) / SECOND_MOMENTS_FILE
    save_file(moments, str(path), metadata={"content": "Adam exp_avg_sq by tensor name"})
    return path


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


def _read_trainer_optimizer(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / TRAINER_OPTIMIZER_FILE
    groups, moments = _moments_by_index(_load_optimizer_state(path), path)
    return _name_moments(groups, moments, _trainer_orders(folder), path)


def _load_optimizer_state(path: Path) -> dict:
    try:  # memory-mapped: Adam's exp_avg, as large as the model, is never read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be mapped
        state = None
    except (pickle.UnpicklingError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a plain optimizer state ({exc})",
                              hint="only tensors, numbers and containers are loaded") from None
    if state is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: not a plain optimizer state ({exc})",
                                  hint="only tensors, numbers and containers are loaded") from None
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise CheckpointError(f"{path}: not a torch optimizer state_dict (no 'state' and "
                              "'param_groups')", hint=EXPORT_HINT)
    return state


def _moments_by_index(state: dict, path: Path) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
    """The optimizer's parameter indices, group by group, and exp_avg_sq by index."""
    groups = [list(group.get("params", [])) for group in state["param_groups"]]
    moments = {}
    for index, entry in state["state"].items():
        if not isinstance(entry, dict) or "exp_avg_sq" not in entry:
            raise CalibrationError(f"{path}: parameter {index} has no exp_avg_sq; the optimizer "
                                   "is not Adam or AdamW",
                                   hint="OTA and FFG read Adam's second moments")
        moments[index] = entry["exp_avg_sq"]
    if not moments:
        raise CalibrationError(f"{path}: the optimizer state is empty (saved before any step?)")
    return groups, moments


def _trainer_orders(folder: Path) -> dict[str, Order]:
    """The parameter orders a Trainer's optimizer may have used for the model in `folder`."""
    model = _meta_model(folder)
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    from transformers import Trainer

    # Trainer's own rule, called unbound (it uses no state), so that it follows the installed
    # transformers' notion of which parameters decay
    decay = set(Trainer.get_decay_parameter_names(None, model))
    return {
        "Trainer's groups (weight decay, then none)": [[p for p in params if p[0] in decay],
                                                       [p for p in params if p[0] not in decay]],
        "one group in the model's order": [params],
    }


def _meta_model(folder: Path) -> torch.nn.Module:
    """The model's modules on the meta device, from config.json: names and shapes, no weights."""
    import transformers

    if not (folder / "config.json").is_file():
        raise CalibrationError(f"{folder}: no config.json, so the parameter order behind "
                               f"{TRAINER_OPTIMIZER_FILE} is unknown", hint=EXPORT_HINT)
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as exc:
        raise CalibrationError(f"{folder}/config.json: unusable ({exc})",
                               hint=EXPORT_HINT) from None
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, name) for name in names if hasattr(transformers, name)), None)
    if cls is None:
        raise CalibrationError(f"{folder}/config.json: architectures {names} name no transformers "
                               "class, so the parameter order is unknown", hint=EXPORT_HINT)
    with torch.device("meta"):
        return cls(config)


def _name_moments(groups: list[list[int]], moments: dict[int, torch.Tensor],
                  orders: dict[str, Order], path: Path) -> dict[str, torch.Tensor]:
    """exp_avg_sq by tensor name, under the one order whose group sizes and shapes fit."""
    fits: dict[str, dict[str, torch.Tensor]] = {}
    for label, order in orders.items():
        named = _match(groups, moments, order)
        if named is not None and not any(_same(named, other) for other in fits.values()):
            fits[label] = named
    sizes = [len(g) for g in groups if g]
    if not fits:
        expected = "; ".join(f"{label}: {[len(g) for g in order if g]}"
                             for label, order in orders.items())
        raise CalibrationError(f"{path}: its parameter groups (sizes {sizes}) match no order of "
                               f"the model's parameters ({expected}); were some frozen?",
                               hint=EXPORT_HINT)
    if len(fits) > 1:
        raise CalibrationError(f"{path}: its parameter groups (sizes {sizes}) fit several orders "
                               f"of the model's parameters ({', '.join(fits)}): ambiguous",
                               hint=EXPORT_HINT)
    return next(iter(fits.values()))


def _match(groups: list[list[int]], moments: dict[int, torch.Tensor],
           order: Order) -> dict[str, torch.Tensor] | None:
    """Pair the optimizer's indices with the order's names group by group, or None when the
    group sizes or any moment's shape disagree."""
    groups = [g for g in groups if g]
    order = [g for g in order if g]
    if [len(g) for g in groups] != [len(g) for g in order]:
        return None
    named = {}
    for indices, params in zip(groups, order):
        for index, (name, shape) in zip(indices, params):
            if index not in moments:  # never stepped (no gradient): no moment
                continue
            if tuple(moments[index].shape) != shape:
                return None
            named[name] = moments[index]
    return named


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[name] is b[name] for name in a)


def _check_against_checkpoint(folder: Path, moments: dict[str, torch.Tensor]) -> None:
    """Every moment must name a tensor of the folder's checkpoint, if any, and have its shape."""
    from mergesmith.io.checkpoint import Checkpoint

    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return
    tensors = Checkpoint(folder).tensors
    for name, moment in moments.items():
        if name not in tensors:
            raise CalibrationError(f"{folder}: second moment {name!r} names no tensor of the "
                                   "checkpoint", hint="the moments come from another model")
        if tuple(moment.shape) != tuple(tensors[name].shape):
            raise CalibrationError(f"{folder}: second moment {name!r} has shape "
                                   f"{list(moment.shape)}, the tensor {list(tensors[name].shape)}",
                                   hint="the moments come from another model")
