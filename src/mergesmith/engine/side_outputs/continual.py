"""A continual merge's state beside its weights, `continual/state.json`: what the next
`mergesmith merge --onto` needs to add a model to it (engine/continual.py).

    format          mergesmith-continual/1
    rule            opcm, continual_task_arithmetic, continual_average, continual_ties,
                    continual_magmax (methods/continual.py)
    params          the rule's parameters at the last step
    count           t, the number of models merged so far
    order           the models in the order they were added (as the recipes named them)
    norms           ‖τ_i‖ of each, over the whole model (OPCM's n̄_t is their mean)
    scale           λ_t: OPCM's ‖S_t‖/n̄_t (the merge is θ0 + S_t/λ_t), MagMax's λ; else 1
    base            the base model's folder and the digest of its weights
    weights         the digest of this merge's weights: a state copied beside other weights,
                    or weights changed after the merge, are refused
    projections     OPCM: per projected tensor, [rank of the merge before the last step, r_α]

No tensors: OPCM's projection bases are the singular vectors of the merge itself (θ̄_t − θ0),
recomputed at the next step, so the state stays a few scalars per tensor whatever t is; only
`order` and `norms` grow, by one entry per model.

A digest is sha256 over each weight file's name, size, and first and last MiB: cheap on any
model size, and two checkpoints of one architecture differ there (their first tensors).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mergesmith.errors import CheckpointError, MergesmithError
from mergesmith.io.checkpoint import weight_files
from mergesmith.io.output import write_json

SIDE_FOLDER = "continual"
STATE = "state.json"
FORMAT = "mergesmith-continual/1"
SAMPLE = 1 << 20
START_HINT = ("start a chain with a recipe whose merge_method is a continual rule (opcm, "
              "continual_task_arithmetic, ...): its models are merged one at a time, and the "
              "output can then take --onto")


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(weight_files(Path(folder)), key=lambda f: f.name):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(SAMPLE))
            if size > 2 * SAMPLE:
                f.seek(size - SAMPLE)
                digest.update(f.read(SAMPLE))
    return digest.hexdigest()


def read_state(merged: Path) -> dict:
    """The state of the continual merge in `merged`, checked against its weights."""
    merged = Path(merged)
    if not (merged / "config.json").is_file() or not weight_files(merged):
        raise MergesmithError(f"--onto {merged}: not a model folder (no config.json or weights)",
                              hint=START_HINT)
    path = merged / SIDE_FOLDER / STATE
    if not path.is_file():
        raise MergesmithError(f"--onto {merged}: not a continual mergesmith merge (no "
                              f"{SIDE_FOLDER}/{STATE} beside its weights)", hint=START_HINT)
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{path}: unknown format {found!r}, expected {FORMAT}")
    if state.get("weights") != weights_digest(merged):
        raise MergesmithError(f"--onto {merged}: its weights are not the ones {SIDE_FOLDER}/{STATE} "
                              "was written with (changed after the merge, or the state was copied "
                              "from another merge)", hint="give the folder the continual merge wrote")
    return state


def write_state(folder: Path, state: dict) -> Path:
    """`folder`/continual/state.json, with the digest of the weights already in `folder`."""
    path = Path(folder) / SIDE_FOLDER / STATE
    path.parent.mkdir(exist_ok=True)
    write_json(path, {"format": FORMAT, **state, "weights": weights_digest(folder)})
    return path
