"""orthogonal_lora_sum's report beside the merged adapter, `cross_orthogonality.json`: per module,
C[i, j] = ‖A_iA_jᵀ‖_F / (‖A_i‖_F‖A_j‖_F) of the adapters' down-projections
(methods/lora_modular.py), and the largest off-diagonal value over the model. Orthogonal
adaptation sums without crosstalk only where C is 0 off the diagonal; adapters trained without
its frozen orthogonal A_i show how far from that they are (random A's: about √(r_j/d_in))."""

from __future__ import annotations

from pathlib import Path

import torch

from mergesmith.io.output import write_json

REPORT = "cross_orthogonality.json"


class CrossOrthogonalityReport:
    """Receives each module's N × N matrix during the merge and writes the report at the end."""

    def __init__(self, plan, folder: Path):
        self.folder, self.adapters = Path(folder), [a.label for a in plan.adapters]
        self.modules: dict[str, list[list[float]]] = {}
        self.worst, self.where = 0.0, None

    def add(self, weight: str, matrix: torch.Tensor) -> None:
        self.modules[weight] = matrix.tolist()
        off = matrix - torch.diag_embed(torch.diagonal(matrix))
        if off.numel() and float(off.max()) > self.worst:
            self.worst, self.where = float(off.max()), weight

    def finish(self) -> Path:
        path = self.folder / REPORT
        write_json(path, {"adapters": self.adapters, "largest_off_diagonal": self.worst,
                          "largest_at": self.where, "modules": self.modules})
        return path
