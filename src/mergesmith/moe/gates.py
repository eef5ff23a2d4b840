"""Router rows of an MoE assembled from dense experts, by mergekit-moe's `gate_mode`.

`gate_rows(config, base)` -> [num_layers, N + S, hidden] fp32: rows 0..N-1 are the experts' (in
config order), then, as mergekit-moe's `need_gates`, one row per shared expert (Qwen-MoE's
`shared_expert_gate`) when the shared experts have prompts or the mode is random; S = 0
otherwise. The maths is methods/moe_router.py's; the prompts' hidden states come from the base
model (calibrate/prompt_states.py; a `BASE+ADAPTER` base runs with its adapter merged in, and
cheap_embed reads its adapted embedding), run in the base's stored precision when that is bf16 or
fp32 (as mergekit-moe, which runs its forwards in bf16: an fp32 copy of a bf16 base would double
the memory), and in fp32 otherwise.
"""

from __future__ import annotations

import warnings

import torch

from mergesmith.calibrate.prompt_states import (load_prompt_model, load_prompt_tokenizer, padded_prompts,
                                                prompt_progress, prompt_states)
from mergesmith.io.tensor_names import INPUT_EMBEDDINGS
from mergesmith.errors import PlanError, RecipeError
from mergesmith.io.checkpoint import Checkpoint
from mergesmith.methods.moe_router import (
    cheap_embed_rows, degenerate_layers, difference_rows, random_rows, token_embedding_sum,
)

HIDDEN_MODES = ("hidden", "hidden_last", "hidden_avg")
RANDOM_MODES = ("random", "uniform_random")


class DegenerateRoutersWarning(UserWarning):
    """Some layer's router rows are nearly dependent (cond > 5): experts will share tokens."""


def routed_experts(config) -> list:
    """The experts that get a router row, in row order: the experts, then the shared experts
    when their gate is made like the others' (mergekit-moe's `need_gates`)."""
    shared = list(config.shared_experts or [])
    prompted = any(e.positive_prompts for e in shared)
    return list(config.experts) + (shared if prompted or config.gate_mode in RANDOM_MODES else [])


def gate_rows(config, base: Checkpoint, *, device: str = "cpu", seed: int = 0,
              progress: bool = False) -> torch.Tensor:
    """[num_layers, experts (+ shared), hidden] fp32 router rows by `config.gate_mode`, checked
    as mergekit-moe checks them (identical prompt sets refused; degenerate layers warned)."""
    mode = config.gate_mode
    experts = routed_experts(config)
    layers, hidden = _dims(base)
    if mode in RANDOM_MODES:
        rows = random_rows(layers, len(experts), hidden, seed, uniform=mode == "uniform_random")
    else:
        _check_prompts(config, experts)
        if mode == "cheap_embed":
            rows = _cheap_embed(base, experts, layers)
        else:
            rows = _hidden(base, experts, mode, device, progress)
    warn_degenerate(rows)
    return rows


def _forward_dtype(base: Checkpoint) -> torch.dtype:
    """The base's stored float precision if the prompt forwards can run in it, else fp32."""
    stored = {info.dtype for info in base.tensors.values() if info.dtype.is_floating_point}
    return stored.pop() if len(stored) == 1 and stored <= {torch.bfloat16, torch.float32} else torch.float32


def warn_degenerate(rows: torch.Tensor) -> list[int]:
    """Warn (as mergekit's warn_degenerate_gates) about layers whose rows are nearly dependent."""
    layers = degenerate_layers(rows)
    if layers:
        which = "all layers" if len(layers) == rows.shape[0] else \
            "layer" + ("s " if len(layers) > 1 else " ") + ", ".join(map(str, layers))
        warnings.warn(f"router rows of {which} are degenerate (condition number > 5): the prompts "
                      "may be too similar, and some experts will get few tokens",
                      DegenerateRoutersWarning, stacklevel=3)
    return layers


def _dims(base: Checkpoint) -> tuple[int, int]:
    cfg = base.config
    cfg = cfg.get("text_config", cfg)
    layers, hidden = cfg.get("num_hidden_layers"), cfg.get("hidden_size")
    if not isinstance(layers, int) or not isinstance(hidden, int):
        raise PlanError(f"{base.label}: config.json has no num_hidden_layers / hidden_size",
                        hint="the base model must be a decoder with a transformers config")
    return layers, hidden


def _label(config, expert, index: int) -> str:
    shared = index >= len(config.experts)
    field = ("shared_experts", index - len(config.experts)) if shared else ("experts", index)
    return f"{config.where(*field)}: {'shared expert' if shared else 'expert'} " \
           f"{field[1]} ({expert.source_model})"


def _check_prompts(config, experts: list) -> None:
    for i, expert in enumerate(experts):
        if not expert.positive_prompts:
            raise RecipeError(f"{_label(config, expert, i)} has no positive_prompts, which "
                              f"gate_mode {config.gate_mode} routes by",
                              hint="give it prompts, or use gate_mode: random")
    sets = {(tuple(e.positive_prompts), tuple(e.negative_prompts or ())) for e in config.experts}
    if len(config.experts) > 1 and len(sets) == 1:
        raise RecipeError(f"{config.where('experts')}: every expert has the same positive and "
                          "negative prompts, so every router row is the same",
                          hint="give each expert prompts of what should be routed to it")


def _hidden(base: Checkpoint, experts: list, mode: str, device: str, progress: bool) -> torch.Tensor:

    model = load_prompt_model(base, device=device, dtype=_forward_dtype(base))
    total = sum(len(e.positive_prompts) + len(e.negative_prompts or ()) for e in experts)
    rows = []
    with prompt_progress(progress) as bar:
        bar.start("router rows (prompts)", total)
        for i, expert in enumerate(experts):
            who = f"expert {i} ({expert.source_model})"
            pos = prompt_states(model, expert.positive_prompts, mode, who=who, bar=bar)
            neg = prompt_states(model, expert.negative_prompts, mode, who=who, bar=bar) \
                if expert.negative_prompts else None
            rows.append(difference_rows(pos, neg, who))
    return torch.stack(rows, dim=1)


def _cheap_embed(base: Checkpoint, experts: list, layers: int) -> torch.Tensor:

    name = next((n for n in sorted(base.tensors) if INPUT_EMBEDDINGS.search(n)), None)
    if name is None:
        raise PlanError(f"{base.label}: no input embedding tensor (embed_tokens) for gate_mode cheap_embed")
    embed = base.read(name)
    tokenizer = load_prompt_tokenizer(base.path)

    def summed(prompts, who):
        ids, mask = padded_prompts(tokenizer, prompts, who)
        return token_embedding_sum(embed, ids, mask)

    rows = []
    for i, expert in enumerate(experts):
        who = f"expert {i} ({expert.source_model})"
        neg = summed(expert.negative_prompts, who) if expert.negative_prompts else None
        rows.append(cheap_embed_rows(summed(expert.positive_prompts, who), neg, layers, who))
    return torch.stack(rows, dim=1)
