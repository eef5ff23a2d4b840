"""Methods that pick whole tensors rather than mixing values: passthrough and layer swapping."""

from __future__ import annotations

import torch

from mergesmith.methods.registry import Param, TensorContext, register


@register(
    "passthrough",
    summary="Copy each tensor from its one source (frankenmerges, depth up-scaling with slices).",
    paper="Kim et al. 2023, SOLAR 10.7B: depth up-scaling, arXiv:2312.15166",
    needs_base=False,
    max_models=1,
    params=(Param("scale", default=None, per_model=True, arg="scales", doc="optional factor"),),
    elementwise=True,
)
def passthrough(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    *,
    scales: list[float | None] | None = None,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    (tensor,) = experts
    scale = scales[0] if scales else None
    return tensor if scale is None else tensor * scale


def parse_layers(spec: str) -> set[int]:
    """'0-3, 12, 14-15' -> {0, 1, 2, 3, 12, 14, 15} (ranges inclusive)."""
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        start, _, end = part.partition("-")
        try:
            first, last = int(start), int(end or start)
        except ValueError:
            raise ValueError(f"bad layer list {spec!r}: expected e.g. '0-3, 12, 14-15'") from None
        if first < 0 or last < first:
            raise ValueError(f"bad layer range {part!r} in {spec!r}")
        layers.update(range(first, last + 1))
    return layers


def _check_layer_lists(params: dict) -> None:
    claimed: dict[int, int] = {}
    for index, spec in enumerate(params.get("layers") or []):
        for layer in parse_layers(spec or ""):
            if layer in claimed:
                raise ValueError(f"layer {layer} is claimed by models {claimed[layer]} and {index}")
            claimed[layer] = index


@register(
    "layer_swap",
    summary="Take each listed layer from the model that lists it, everything else from the base.",
    paper="Bandarkar et al. 2024, Layer swapping for zero-shot cross-lingual transfer, arXiv:2410.01335",
    needs_base=True,
    params=(
        Param("layers", str, default="", per_model=True, doc="layers this model supplies: '0-3,12'"),
    ),
    elementwise=True,
    validate=_check_layer_lists,
)
def layer_swap(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    layers: list[str],
    ctx: TensorContext,
) -> torch.Tensor:
    if ctx.layer is not None:
        for expert, spec in zip(experts, layers):
            if ctx.layer in parse_layers(spec or ""):
                return expert
    return base
