"""Dense experts into a sparse MoE (mergekit-moe, Branch-Train-MiX, AquilaMoE's scale-out): the
tensor maths of it, which is small. Expert e's MLP in layer l is source e's, optionally with
Gaussian noise added (noise_scale) and its down projection scaled (residual_scale), in that
order, as mergekit-moe does; the rest is placement (moe/).
"""

from __future__ import annotations

import math

import torch

from mergesmith.methods.registry import RandomStream, register_operation


def gaussian_noise(key: str, offset: int, shape) -> torch.Tensor:
    """N(0, 1) draws (fp32) for entries offset, offset + 1, … of the tensor named by `key`, by
    Box–Muller on two counter-based uniform streams: any block of rows draws what the whole
    tensor would there, so a streamed tensor and a whole one get the same noise, on any
    machine and in any order."""
    u1 = RandomStream(f"{key}\0radius", offset).rand_at(0, shape)
    u2 = RandomStream(f"{key}\0angle", offset).rand_at(0, shape)
    return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos((2 * math.pi) * u2)


def noise_and_scale(x: torch.Tensor, *, noise_scale: float | None, residual_scale: float | None,
                    key: str, offset: int = 0) -> torch.Tensor:
    """(x + noise_scale · z) · residual_scale in fp32, z = gaussian_noise(key, offset); either
    step skipped when its scale is None (residual_scale is given only for down projections)."""
    x = x.float()
    if noise_scale is not None:
        x = x + noise_scale * gaussian_noise(key, offset, x.shape)
    if residual_scale is not None:
        x = x * residual_scale
    return x


register_operation(
    "moe_assemble", command="mergesmith moe CONFIG OUT",
    summary="dense experts' MLPs as the experts of a Mixtral / Qwen-MoE; router rows from prompts "
            "(gate_mode: hidden, cheap_embed, random); mergekit-moe's YAML",
    paper="mergekit-moe (Goddard et al., 2024)", needs="base + dense experts (+ prompts)")
register_operation(
    "btx", command="mergesmith moe CONFIG OUT (non_expert: average)",
    summary="Branch-Train-MiX: experts' MLPs as experts, every other tensor the experts' mean; "
            "router ready to fine-tune",
    paper="Sukhbaatar et al., 2024, arXiv 2403.07816", needs="dense experts branched from one seed")
register_operation(
    "upcycle_moe", command="mergesmith moe --upcycle MODEL --experts N OUT",
    summary="AquilaMoE scale-out: one dense model's MLP copied into N experts, random router, "
            "optional noise to break symmetry",
    paper="Zhang et al., 2024, arXiv 2408.06567", needs="one dense model")
