"""Routing statistics of an MoE over calibration data, from forward hooks on its routers.

For every sparse MoE block of a transformers model (a module with a `gate` router and fused
`experts`, as Mixtral, Qwen2-MoE and Qwen3-MoE are in transformers 5), over the real (unpadded)
tokens: how often each expert is among the top-k (MC-SMoE's usage), the Gram matrix of the router
logits (MC-SMoE's similarity of router-logit columns, without keeping the logits), and on request
each expert's mean output over all tokens, every token through every expert whatever the router
chose (HC-SMoE's and Sub-MoE's expert features; costs E times the MoE's expert FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergesmith.calibrate.collect import progress_bar
from mergesmith.calibrate.data import load_examples
from mergesmith.calibrate.forward import CalibrationModel
from mergesmith.methods.moe_compress import selection_counts
from mergesmith.recipe import Calibration


@dataclass
class LayerRouting:
    counts: torch.Tensor        # [E] top-k selections (float64)
    logit_gram: torch.Tensor    # [E, E] Σ_t l_t l_tᵀ (float64)
    output_sum: torch.Tensor | None  # [E, d] Σ_t expert_e(x_t) (float64)
    tokens: int = 0

    @property
    def mean_output(self) -> torch.Tensor | None:
        return None if self.output_sum is None else self.output_sum / max(self.tokens, 1)


@dataclass
class RoutingStatistics:
    layers: dict[int, LayerRouting] = field(default_factory=dict)
    top_k: int = 0
    examples: int = 0


def moe_blocks(module: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> sparse MoE block of a transformers causal LM (dense layers left out)."""
    layers = module.model.layers
    return {i: layer.mlp for i, layer in enumerate(layers)
            if hasattr(layer.mlp, "gate") and hasattr(getattr(layer.mlp, "experts", None), "gate_up_proj")}


def expert_output_sums(experts: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Σ_t expert_e(x_t) for every expert e over the rows of x: [E, d] (float64). One expert at a
    time, so the intermediate activations held are one expert's [T, I]."""
    sums = []
    for gate_up, down in zip(experts.gate_up_proj, experts.down_proj):
        gate, up = (x @ gate_up.T).chunk(2, dim=-1)
        sums.append((experts.act_fn(gate) * up @ down.T).double().sum(0))
    return torch.stack(sums)


class _Collector:
    def __init__(self, top_k: int, outputs: bool):
        self.top_k, self.outputs = top_k, outputs
        self.real: torch.Tensor | None = None  # [B*T] mask of the batch being run
        self.layers: dict[int, LayerRouting] = {}

    def hook(self, index: int, block: torch.nn.Module):
        def record(router, args, result):
            x = args[0].reshape(-1, args[0].shape[-1])[self.real]
            logits = result[0].reshape(-1, result[0].shape[-1])[self.real].double()
            stats = self.layers.get(index)
            if stats is None:
                n = logits.shape[-1]
                stats = self.layers[index] = LayerRouting(
                    torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64),
                    torch.zeros(n, x.shape[-1], dtype=torch.float64) if self.outputs else None)
            stats.counts += selection_counts(logits, self.top_k).cpu()
            stats.logit_gram += (logits.T @ logits).cpu()
            stats.tokens += logits.shape[0]
            if self.outputs:
                stats.output_sum += expert_output_sums(block.experts, x).cpu()
        return record


def routing_statistics(folder: str | Path, data: str | Path, *, samples: int = 128, max_length: int | None = None,
                       batch_size: int = 8, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
                       outputs: bool = False, progress: bool = False) -> RoutingStatistics:
    """Run the MoE at `folder` over `samples` examples of the calibration file `data` (.txt, .jsonl,
    .csv, .parquet; see calibrate/data.py) and collect each MoE layer's routing statistics (sums in
    float64 whatever `dtype` the model runs in)."""
    cal = Calibration(data=str(Path(data).resolve()), samples=samples, max_length=max_length,
                      batch_size=batch_size, seed=seed)
    examples = load_examples(cal, Path.cwd())
    model = CalibrationModel.load(folder, cal, Path.cwd(), device=device, dtype=dtype, objective="causal")
    top_k = int(model.module.config.num_experts_per_tok)
    collector = _Collector(top_k, outputs)
    handles = [block.gate.register_forward_hook(collector.hook(i, block))
               for i, block in moe_blocks(model.module).items()]
    try:
        with torch.no_grad(), progress_bar(progress) as bar:
            bar.start("routing", len(examples))
            for batch in model.batches(examples):
                collector.real = batch.inputs["attention_mask"].reshape(-1).bool()
                model.module(**batch.inputs)
                bar.advance(len(batch.examples))
    finally:
        for handle in handles:
            handle.remove()
    return RoutingStatistics(dict(sorted(collector.layers.items())), top_k, len(examples))

