"""Tensor names by role: which layer a tensor belongs to, and whether it sits before or after them.

Architectures name their blocks differently (`model.layers.3.`, `transformer.h.3.`,
`encoder.layer.3.`, `blocks.3.`); one pattern covers the families transformers ships, so the
engine needs no per-architecture table.
"""

from __future__ import annotations

import re

LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# Tensors that come before the first block; everything else outside the blocks comes after.
BEFORE_LAYERS = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type")
# Tensors whose first axis is the vocabulary (input embeddings and output heads).
VOCAB_NAMES = re.compile(
    r"(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$"
    r"|(^|\.)(lm_head|embed_out|output)\.weight$"
)
INPUT_EMBEDDINGS = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_of(name: str) -> int | None:
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def with_layer(name: str, layer: int) -> str:
    """The same tensor name in another layer."""
    match = LAYER.search(name)
    return name[: match.start(1)] + str(layer) + name[match.end(1):]


def is_before_layers(name: str) -> bool:
    return bool(BEFORE_LAYERS.search(name))


def num_layers(names: list[str]) -> int:
    layers = [layer for layer in map(layer_of, names) if layer is not None]
    return max(layers) + 1 if layers else 0


def layer_count_key(config: dict) -> str | None:
    return next((key for key in LAYER_COUNT_KEYS if key in config), None)


def tied_embedding(names: set[str], missing: str) -> str | None:
    """For a missing output head, the input embedding it is tied to (None if not a head)."""
    if not re.search(r"(^|\.)(lm_head|embed_out)\.weight$", missing):
        return None
    return next((name for name in sorted(names) if INPUT_EMBEDDINGS.search(name)), None)
