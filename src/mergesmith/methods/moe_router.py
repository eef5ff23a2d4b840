"""Router rows of an MoE built from dense experts (mergekit-moe's gate modes, FlexOlmo's domain
embeddings): pure functions of the hidden states or embeddings the calibrate layer gathers.

Router of layer l: logits(x) = R_l x, one row R_l[e] ∈ R^d per expert e.

    hidden:      R_l[e] = u(mean_p h_l(p) − mean_q h_l(q)),  p the expert's positive prompts, q its
                 negative ones (none: 0), h_l(p) the input of layer l at the prompt's last token
                 (`hidden_avg`: the mean over its tokens), u(v) = v/‖v‖
    cheap_embed: R_l[e] = u(c(P) − c(Q)),  c(P) = u(Σ_{p∈P} Σ_{t∈p} E[t]), E the token embeddings;
                 one row for every layer
    random:      R_l[e] ~ N(0, 1);  uniform_random: U(−1/√d, 1/√d)
    flexolmo:    r_i = mean over a sample of domain-i texts of the embedder's mean-pooled last
                 hidden states (Shi et al. 2025, arXiv:2507.07024 §3.3); one row for every layer

Unlike mergekit, whose `clamp(min=1e-8)` turns a zero difference into a zero row (an expert
no token is routed to), a zero row is refused.
"""

from __future__ import annotations

import math

import torch

from mergesmith.errors import MethodError
from mergesmith.methods.registry import register_operation

MOE_PAPER = "mergekit-moe (Goddard et al. 2024, arXiv:2403.13257; Arcee's mergekit/moe)"
FLEXOLMO_PAPER = ("Shi et al. 2025, FlexOlmo: open language models for flexible data use, "
                  "arXiv:2507.07024")
DEGENERATE_COND = 5.0  # mergekit's warn_degenerate_gates threshold
ZERO_NORM = 1e-6  # relative to the positive states' norm: below it the row has no direction


def unit_rows(states: torch.Tensor, scale: torch.Tensor, who: str) -> torch.Tensor:
    """states [L, d] / ‖states[l]‖ per layer; a row with no direction (‖·‖ <= ZERO_NORM·scale[l],
    scale the norm its terms had) is refused, naming `who` and the layer."""
    states = states.float()
    norms = states.norm(dim=-1, keepdim=True)
    zero = (norms.squeeze(-1) <= ZERO_NORM * scale.float().clamp(min=torch.finfo(torch.float32).tiny))
    if bool(zero.any()):
        layer = int(zero.nonzero()[0])
        raise MethodError(f"{who}: its router row is zero at layer {layer} (the negative prompts' "
                          "states equal the positive prompts')",
                          hint="give the expert positive prompts that differ from its negative prompts")
    return states / norms


def difference_rows(positive: torch.Tensor, negative: torch.Tensor | None, who: str) -> torch.Tensor:
    """u(positive − negative) per layer, [L, d] (mergekit's `hidden` rows)."""
    scale = positive.float().norm(dim=-1)
    if negative is None:
        return unit_rows(positive, scale, who)
    return unit_rows(positive.float() - negative.float(), scale, who)


def token_embedding_sum(embed: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over the batch's real tokens of their embeddings ([d], fp32): ids, mask [B, T]."""
    rows = embed.float()[ids]  # [B, T, d]
    return (rows * mask.unsqueeze(-1).float()).sum(dim=(0, 1))


def cheap_embed_rows(positive: torch.Tensor, negative: torch.Tensor | None, layers: int,
                     who: str) -> torch.Tensor:
    """mergekit's cheap_embed: each side's summed embeddings normalised, their difference
    normalised, the same row for all `layers` ([L, d])."""
    pos = unit_rows(positive[None], positive.float().norm()[None], who)
    rows = pos if negative is None else \
        difference_rows(pos, unit_rows(negative[None], negative.float().norm()[None], who), who)
    return rows.expand(layers, -1).clone()


def random_rows(layers: int, experts: int, hidden: int, seed: int, uniform: bool = False) -> torch.Tensor:
    """[L, N, d] fp32 from a generator seeded by `seed`: N(0, 1), or U(−1/√d, 1/√d) (`uniform`),
    the bound of a linear layer's default initialisation (mergekit's uniform_random)."""
    gen = torch.Generator().manual_seed(seed)
    if not uniform:
        return torch.randn((layers, experts, hidden), generator=gen)
    bound = 1.0 / math.sqrt(hidden)
    return (torch.rand((layers, experts, hidden), generator=gen) * 2 - 1) * bound


def mean_embedding(pooled: torch.Tensor) -> torch.Tensor:
    """FlexOlmo's domain embedding: the mean of the texts' pooled states [n, d] -> [d], not
    normalised (the paper's mean embedding; whether its script normalises is unconfirmed)."""
    return pooled.float().mean(dim=0)


def degenerate_layers(rows: torch.Tensor, threshold: float = DEGENERATE_COND) -> list[int]:
    """Layers l whose rows R_l [N, d] have condition number above `threshold`: experts whose
    rows nearly coincide (or are dependent) get the same tokens."""
    return [l for l in range(rows.shape[0])
            if float(torch.linalg.cond(rows[l].float())) > threshold]


register_operation(
    "flexolmo", command="mergesmith flexolmo PUBLIC EXPERT... -o OUT",
    summary="FlexOlmo: a public dense model and experts trained beside its frozen FFN -> one MoE "
            "(router rows public, 1..N from domain embeddings; experts can be dropped or appended)",
    paper=FLEXOLMO_PAPER, needs="public model + 2-expert MoE or dense experts (+ domain texts)")
