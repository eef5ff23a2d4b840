"""A learned merge's problem (methods/adaptive.py's MergeProblem) built from model folders and data.

The base is loaded once per objective (one frozen head per task, or the model's own head); the
base weights and the task vectors are held in memory in fp32, which is what learning λ by
gradient needs: these methods are for models that fit in memory several times over.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergesmith.calibrate.data import head_path, load_examples
from mergesmith.calibrate.forward import CalibrationModel, objective_of
from mergesmith.io import tensor_names as L
from mergesmith.errors import CalibrationError
from mergesmith.io import Checkpoint
from mergesmith.methods.adaptive import Batch, MergeProblem
from mergesmith.recipe import Calibration


def build_problem(base_folder: Path, expert_folders: list[Path], cals: list[Calibration],
                  root: Path, *, device: str = "cpu") -> MergeProblem:
    """Task i reads its calibration examples (cals[i]) through the base architecture with its
    own objective; the merged tensors are every float tensor the module reads from the files."""
    models: list[CalibrationModel] = []
    loaded: dict[tuple, CalibrationModel] = {}
    for cal in cals:
        key = (objective_of(Path(base_folder), cal), str(head_path(cal, root)), cal.max_length)
        if key not in loaded:
            loaded[key] = CalibrationModel.load(base_folder, cal, root, device)
        models.append(loaded[key])
    base_ck = Checkpoint(Path(base_folder), label=str(base_folder))
    names = [n for n in models[0].parameters() if base_ck.tensors[n].dtype.is_floating_point]
    base = {n: base_ck.read(n).float().to(device) for n in names}
    task_vectors = []
    for folder in expert_folders:
        expert = Checkpoint(Path(folder), label=str(folder))
        missing = [n for n in names if n not in expert.tensors]
        if missing:
            raise CalibrationError(f"{folder}: has no tensor {missing[0]!r}, which the base has",
                                   hint="experts must share the base's architecture")
        task_vectors.append({n: expert.read(n).float().to(device).sub_(base[n]) for n in names})
    batches = [[Batch(batch, batch.targets) for batch in model.batches(load_examples(cal, root))]
               for model, cal in zip(models, cals)]

    def forward(params: dict[str, torch.Tensor], task: int, inputs):
        return models[task].logits_and_hidden(inputs, params)

    return MergeProblem(base=base, task_vectors=task_vectors,
                        layer_of={n: L.layer_of(n) for n in names}, forward=forward,
                        batches=batches)
