"""Reversible Model Merging's side outputs: the basis and per-task coefficients beside the merged
adapter, and `apply`, which rebuilds one task's adapter (or full model) from them.

A merge with `merge_method: rmm` (an adapter merge, engine/adapters.py) writes a normal adapter
folder, Σ w_i B̂_i Â_i of the rebuilt tasks, plus an `rmm/` folder inside it:

    rmm/rmm.safetensors  for each module M (its base weight name): "basis.M" fp32 (G, D, k), the
                         basis vectors; "coefficients.M" fp32 (G, k, N), column i task i's;
                         "sigma.M" float64 (G, min(D, N)), every singular value of the stacked
                         factors (methods/rmm.py: G = 1 and D = r·(d_out + d_in) per module, or
                         G = d_out + d_in and D = r per factor position); and "saved.i.NAME", task
                         i's own modules_to_save tensors, when the adapters save any
    rmm/rmm.json         format, the tasks (the adapters as the recipe names them, in its order),
                         base model, k, grouping, per module its shape, rank and the fit's
                         relative error Σ_{j>k} σ_j² / Σ σ_j², and the adapters' layout settings

Both are written into the merge's partial folder, so they appear with the adapter or not at all.
`apply_rmm` rebuilds task i's LoRA, (B̂_i, Â_i) = U_k C[:, i] unstacked, as an adapter folder
(scaling 1) or, with `model`, the base model with it applied (io/adapted.py), written with the
base's shard layout like `emr apply`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch

from mergesmith.engine.side_outputs import store as side
from mergesmith.engine.side_outputs.store import task_index
from mergesmith.io import Checkpoint, OutputFolder
from mergesmith.io.adapted import AdaptedCheckpoint
from mergesmith.io.adapter import read_adapter, write_adapter
from mergesmith.io.output import write_json
from mergesmith.methods.rmm import RMM_PAPER, Basis, task_factors

SIDE_FOLDER = "rmm"
INDEX = "rmm.json"
TENSORS = "rmm.safetensors"
FORMAT = "mergesmith-rmm/1"


class RmmStore:
    """Receives each module's fit (the method's info["side"]) during an adapter merge and writes
    rmm/ into the merge's partial folder when the merge is complete."""

    def __init__(self, plan, folder: Path):
        self.plan, self.folder = plan, Path(folder)
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[str, dict] = {}
        self.grouping = self.basis_size = None

    def add(self, weight: str, fit: dict) -> None:
        basis: Basis = fit["basis"]
        self.tensors[f"basis.{weight}"] = basis.vectors.to(torch.float32).contiguous()
        self.tensors[f"coefficients.{weight}"] = basis.coefficients.to(torch.float32).contiguous()
        self.tensors[f"sigma.{weight}"] = basis.sigma.to(torch.float64).contiguous()
        squares = basis.sigma.double().square()
        k = basis.vectors.shape[-1]
        total = float(squares.sum())
        self.modules[weight] = {"d_out": fit["d_out"], "d_in": fit["d_in"], "rank": fit["rank"],
                                "relative_error": float(squares[..., k:].sum()) / total
                                if total > 0 else 0.0}
        self.grouping, self.basis_size = fit["grouping"], k

    def finish(self) -> Path:
        from safetensors.torch import save_file

        plan, out = self.plan, self.folder / SIDE_FOLDER
        for name in plan.saved:
            for i, adapter in enumerate(plan.adapters):
                self.tensors[f"saved.{i}.{name}"] = adapter.read_saved(name).contiguous()
        out.mkdir(exist_ok=True)
        save_file(self.tensors, str(out / TENSORS), metadata={"format": "pt"})
        first = plan.adapters[0]
        index = {
            "format": FORMAT,
            "method": f"Reversible Model Merging: {RMM_PAPER}",
            "tasks": [a.label for a in plan.adapters],
            "base_model": plan.base_model,
            "basis_size": self.basis_size,
            "grouping": self.grouping,
            "modules": self.modules,
            "saved": sorted(plan.saved),
            "fan_in_fan_out": bool(first.config.get("fan_in_fan_out")),
            "embeddings": sorted(w for w, m in first.modules.items() if m.embedding),
            "task_type": first.config.get("task_type"),
        }
        write_json(out / INDEX, index)
        return out / INDEX


def read_index(merged: Path) -> dict:
    return side.read_index(merged, SIDE_FOLDER, INDEX, FORMAT, "rmm")


def task_adapter(merged: Path, index: dict, i: int) -> tuple[dict, dict]:
    """Task i's rebuilt factors {weight: (B̂_i, Â_i)} and its saved tensors, from rmm/."""
    stored = side.SideFile(Path(merged) / SIDE_FOLDER / TENSORS, "the RMM basis and coefficients")
    factors = {}
    for weight, shape in index["modules"].items():
        basis = Basis(stored.read(f"basis.{weight}").double(),
                      stored.read(f"coefficients.{weight}").double(),
                      stored.read(f"sigma.{weight}"))
        factors[weight] = task_factors(basis, i, shape["d_out"], shape["d_in"], shape["rank"],
                                       index["grouping"])
    saved = {name: stored.read(f"saved.{i}.{name}") for name in index["saved"]}
    return factors, saved


def write_task_adapter(folder: Path, index: dict, factors: dict, saved: dict) -> None:
    write_adapter(folder, factors, base_model=index["base_model"], saved=saved or None,
                  fan_in_fan_out=index["fan_in_fan_out"], embeddings=set(index["embeddings"]),
                  extra_config={"task_type": index["task_type"]})


def apply_rmm(merged: str | Path, task: str | int, out: str | Path, *,
              model: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write task `task`'s adapter rebuilt from the RMM merge in `merged` to `out`, or, with
    `model` (the base model's folder), that base with the rebuilt adapter applied."""
    merged = Path(merged)
    index = read_index(merged)
    i = task_index(index["tasks"], task)
    factors, saved = task_adapter(merged, index, i)
    if model is None:
        key = _fingerprint(merged, i, None)
        output = OutputFolder(Path(out), key, overwrite=overwrite, inputs=[merged])
        try:
            write_task_adapter(output.partial, index, factors, saved)
            return output.finalize()
        finally:
            output.release()
    with tempfile.TemporaryDirectory() as scratch:
        write_task_adapter(Path(scratch), index, factors, saved)
        base = Checkpoint(Path(model))
        adapted = AdaptedCheckpoint(base, read_adapter(Path(scratch), index["tasks"][i]),
                                    label=str(model))
        note = (f"\n## RMM task model\n\nThis folder holds task `{index['tasks'][i]}` rebuilt "
                f"from the RMM merge in `{merged}` (`mergesmith rmm apply`): its LoRA from "
                f"{index['basis_size']} basis vectors and its coefficients, applied to this "
                f"base.\n")
        return side.rebuild(Path(model), Path(out), [_fingerprint(merged, i, model)],
                            lambda tensor: [adapted.read(tensor.name)], note,
                            overwrite=overwrite, reads=[merged])


def _fingerprint(merged: Path, task: int, model) -> str:
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns)
             for f in sorted((merged / SIDE_FOLDER).iterdir())]
    return hashlib.sha256(json.dumps([files, task, str(model)]).encode()).hexdigest()
