"""Inputs that are not one folder's tensors as stored: tensors renamed, re-indexed along some
axes (a permutation, a selection of experts), or computed in memory (router rows). A view
reads like a Checkpoint (`label`, `path`, `config`, `tensors`, `sources`, `read(name, rows)`),
so the engine streams it like any model without knowing what is behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mergesmith.io.checkpoint import Checkpoint, TensorInfo

Reader = Callable[[tuple[int, int] | None], torch.Tensor]  # rows -> tensor (stored dtype)


@dataclass(frozen=True)
class Entry:
    info: TensorInfo
    read: Reader


def stored(ck: Checkpoint, name: str) -> Entry:
    """`ck`'s tensor as stored (under whatever name the view gives it)."""
    return Entry(ck.tensors[name], lambda rows: ck.read(name, rows))


def computed(name: str, tensor: torch.Tensor) -> Entry:
    """A tensor held in memory (small: router rows, permutation-aligned norms)."""
    info = TensorInfo(name, tensor.dtype, tuple(tensor.shape), Path("<memory>"), None)
    return Entry(info, lambda rows: (tensor if rows is None else tensor[rows[0]:rows[1]]).clone())


def reindexed(ck: Checkpoint, name: str, indices: dict[int, torch.Tensor]) -> Entry:
    """`ck`'s tensor with `index_select(axis, indices[axis])` on each given axis: a permutation
    of units, or a selection. Rows of a view whose first axis is re-indexed are read one source
    row at a time, so memory stays one output chunk."""
    info = ck.tensors[name]
    shape = list(info.shape)
    for axis, index in indices.items():
        shape[axis] = len(index)
    view_info = TensorInfo(name, info.dtype, tuple(shape), info.file, None)

    def read(rows):
        start, stop = rows if rows is not None else (0, shape[0] if shape else 1)
        if 0 in indices:
            wanted = indices[0][start:stop].tolist()
            tensor = torch.cat([ck.read(name, (r, r + 1)) for r in wanted]) if wanted else \
                torch.empty((0, *info.shape[1:]), dtype=info.dtype)
        else:
            tensor = ck.read(name, rows)
        for axis, index in indices.items():
            if axis != 0:
                tensor = tensor.index_select(axis, index)
        return tensor

    return Entry(view_info, read)


class View:
    """A model made of entries; `config` is the model's config.json as the view presents it."""

    note = ""

    def __init__(self, label: str, config: dict, entries: dict[str, Entry],
                 sources: list[Checkpoint] = ()):
        self.label, self.config, self.entries = label, config, entries
        self.tensors = {name: entry.info for name, entry in entries.items()}
        self._sources = list(sources)
        self.path = self._sources[0].path if self._sources else Path("<memory>")

    @property
    def sources(self) -> list[Path]:
        """The folders whose files this view reads (an output must not overlap them)."""
        return list(dict.fromkeys(p for ck in self._sources for p in ck.sources))

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.entries[name].read(rows)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(e.info.shape) * e.info.dtype.itemsize for e in self.entries.values())


def renamed(ck: Checkpoint, names: dict[str, str], label: str | None = None,
            config: dict | None = None) -> View:
    """`ck` with tensor `names[new] = old` under new names (only those)."""
    return View(label or ck.label, ck.config if config is None else config,
                {new: stored(ck, old) for new, old in names.items()}, [ck])
