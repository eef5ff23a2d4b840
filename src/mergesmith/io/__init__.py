"""Checkpoints in and out: knows files, not methods."""

from mergesmith.io.checkpoint import Checkpoint, TensorInfo, read_safetensors_header
from mergesmith.io.output import OutputFolder
from mergesmith.io.resolve import resolve_model
from mergesmith.io.writer import OutTensor, Shard, ShardWriter, layout_shards, weight_index

__all__ = [
    "Checkpoint", "TensorInfo", "read_safetensors_header", "OutputFolder", "resolve_model",
    "OutTensor", "Shard", "ShardWriter", "layout_shards", "weight_index",
]
