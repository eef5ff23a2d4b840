"""Calibration: data -> per-tensor statistics of each model (Gram matrices, Fisher diagonals, ...),
gathered with bounded memory and kept in a cache that the engine reads like a checkpoint."""

from mergesmith.calibrate.collect import KINDS, collect, collect_groups
from mergesmith.calibrate.data import Example, fingerprint, load_examples
from mergesmith.calibrate.forward import Batch, CalibrationModel, mean_pool
from mergesmith.calibrate.store import (default_cache, ensure_statistics, read_statistics, store_path,
                                        write_store)

__all__ = [
    "KINDS", "collect", "collect_groups", "Example", "fingerprint", "load_examples", "Batch",
    "CalibrationModel", "mean_pool", "default_cache", "ensure_statistics", "read_statistics",
    "store_path", "write_store",
]
