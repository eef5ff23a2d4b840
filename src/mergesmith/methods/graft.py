"""GraftLLM's delta compression (Du et al., "Knowledge Grafting of Large Language Models",
arXiv 2505.18502; code duguodong7/GraftLLM, Adaptive-Compression/): the encoding half, pure.

From the code (load_delta.py, llama.py, run.sh): for each attention / MLP projection weight
Δ = θ_ft − θ0 = U S Vᵀ; the singular triplets go to precision tiers by index — the first n16 in
fp16, the next n8 in int8, then n4 int4, n3 int3, n2 int2, the rest dropped (run.sh: attention
0/20/180/0/800, MLP 0/20/180/0/1200) — and the model reads θ0 + Σ_tiers U_t diag(S_t) V_tᵀ. U and
Vᵀ are quantised per row in groups of 128 columns (asymmetric min–max grid, GPTQ's quantiser
with sym off); S is not quantised. Every other tensor (embeddings, norms, the LM head) is θ_ft
whole.

Ours, not the paper's: the factors are rounded to the nearest grid point (RTN, the `--nearest`
baseline of the same code) instead of GPTQ's calibrated rounding, which needs the model's
activations on C4; the fp16 grid scales are rounded up so that |x − deq(x)| ≤ s/2 holds exactly;
`sparse` (keep the largest |Δ| entries) is offered for the non-projection tensors, whose
treatment in the paper ("module-aware" pruning / low rank / quantisation) is not in its code.
The decoding half (io/pack.py) is what a pack reader needs, so it lives below this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergesmith.errors import MergesmithError
from mergesmith.io.pack import FLOAT_PRECISIONS, INT_BITS, groups, lowrank_delta, pack_bits, packed_bytes
from mergesmith.methods.lowrank import gram_svd
from mergesmith.methods.registry import register_operation

register_operation(
    "graft_delta", command="mergesmith pack BASE EXPERT OUT; then model: OUT in a recipe",
    summary="an expert as its base's fingerprint + θ_ft − θ0 compressed: SVD of each attention/MLP "
            "matrix in rank tiers (fp16/int8/int4/int3/int2), the rest whole or sparse",
    paper="GraftLLM, Du et al. 2025 (arXiv 2505.18502); RTN instead of GPTQ and `sparse`: ours",
    needs="the base and the fine-tune; no data")

GROUP = 128  # GraftLLM's --groupsize


@dataclass(frozen=True)
class Tier:
    """The next `size` singular triplets (None: all that are left) at `precision`."""

    precision: str
    size: int | None

    def __str__(self) -> str:
        return f"{self.precision}:{'*' if self.size is None else self.size}"


# run.sh's example configuration (Llama-3.1-8B); no fp16 and no int3 triplets
ATTENTION_TIERS = (Tier("int8", 20), Tier("int4", 180), Tier("int2", 800))
MLP_TIERS = (Tier("int8", 20), Tier("int4", 180), Tier("int2", 1200))


def parse_tiers(text: str, what: str = "tiers") -> tuple[Tier, ...]:
    """'int8:20,int4:180,int2:800' (a size `*` takes the rest) -> tiers, checked."""
    tiers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        precision, _, size = item.partition(":")
        ok = precision in FLOAT_PRECISIONS or precision in INT_BITS
        ok = ok and (size == "*" or size.isdigit())
        if not ok:
            raise MergesmithError(f"{what} {item!r}: expected PRECISION:COUNT",
                                  hint=f"PRECISION is one of {', '.join([*FLOAT_PRECISIONS, *INT_BITS])}; "
                                  "COUNT a whole number, or * for every triplet left, e.g. "
                                  "int8:20,int4:180,int2:800")
        tiers.append(Tier(precision, None if size == "*" else int(size)))
    return tuple(tiers)


def tier_spans(rank: int, tiers: tuple[Tier, ...]) -> list[tuple[Tier, int, int]]:
    """[(tier, start, stop)]: consecutive runs of triplet indices, clipped to `rank`; the
    triplets past the last run are dropped."""
    spans, start = [], 0
    for tier in tiers:
        stop = rank if tier.size is None else min(rank, start + tier.size)
        spans.append((tier, start, stop))
        start = stop
    return spans


# ---------------------------------------------------------------- round to nearest

def quantize(x: torch.Tensor, bits: int, group: int = GROUP) -> dict[str, torch.Tensor]:
    """x (rows × cols) on the asymmetric grid of each group of `group` columns of a row:
    s = (max(x, 0) − min(x, 0)) / (2^b − 1) (1 where the group is all 0; rounded up to fp16),
    z = round(−min(x, 0)/s), q = clamp(round(x/s) + z, 0, 2^b − 1). Then x ≈ (q − z)·s with
    |x − (q − z)·s| ≤ s/2. Returns the packed codes, scales (fp16) and zero points (uint8)."""
    rows, cols = x.shape
    maxq = 2**bits - 1
    pad = -cols % group
    g = torch.nn.functional.pad(x.to(torch.float32), (0, pad)).view(rows, -1, group)
    low = g.amin(-1).clamp(max=0)
    high = g.amax(-1).clamp(min=0)
    scale = torch.where(high > low, (high - low) / maxq, torch.ones_like(low))
    scale = _round_up_fp16(scale)
    zero = torch.round(-low / scale.float()).clamp(0, maxq)
    q = torch.round(g / scale.float()[..., None]) + zero[..., None]
    q = q.clamp(0, maxq).view(rows, -1)[:, :cols]
    return {"": pack_bits(q.to(torch.uint8), bits), "_scale": scale,
            "_zero": zero.to(torch.uint8)}


def _round_up_fp16(scale: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 ≥ each scale: a grid no finer than asked still spans the group."""
    half = scale.to(torch.float16)
    low = half.float() < scale
    return torch.where(low, torch.nextafter(half, torch.tensor(float("inf"), dtype=torch.float16)),
                       half)


def encode_factor(x: torch.Tensor, key: str, precision: str, group: int) -> dict[str, torch.Tensor]:
    if precision in FLOAT_PRECISIONS:
        return {key: x.to(FLOAT_PRECISIONS[precision]).contiguous()}
    return {key + suffix: t for suffix, t in quantize(x, INT_BITS[precision], group).items()}


# ---------------------------------------------------------------- one matrix

@dataclass
class Compressed:
    """A matrix's pack record (tiers with their ranks) and stored parts, with what it kept."""

    record: dict
    parts: dict[str, torch.Tensor]
    rank: int  # of Δ, above the noise floor
    kept_energy: float  # Σ of the kept S² / ‖Δ‖²
    error: float  # ‖Δ − Δ̂‖ / ‖Δ‖, quantisation included


def compress_lowrank(delta: torch.Tensor, tiers: tuple[Tier, ...], group: int = GROUP) -> Compressed:
    """Δ's singular triplets split into `tiers` by index, each tier's U and Vᵀ encoded at its
    precision (S in fp32); triplets past the tiers are dropped."""
    delta = delta.to(torch.float32)
    u, s, vt = gram_svd(delta).top()
    record = {"kind": "lowrank", "group_size": group, "tiers": []}
    parts: dict[str, torch.Tensor] = {}
    kept = 0.0
    for i, (tier, start, stop) in enumerate(tier_spans(len(s), tiers)):
        record["tiers"].append({"precision": tier.precision, "rank": stop - start})
        if stop == start:
            continue
        parts[f"t{i}.s"] = s[start:stop].to(torch.float32)
        parts.update(encode_factor(u[:, start:stop], f"t{i}.u", tier.precision, group))
        parts.update(encode_factor(vt[start:stop], f"t{i}.vt", tier.precision, group))
        kept += float(s[start:stop].square().sum())
    total = float(delta.double().square().sum())
    approx = lowrank_delta(record, tuple(delta.shape), lambda key: parts[key])
    error = float((delta - approx).double().norm()) / total**0.5 if total else 0.0
    record["dropped"] = len(s) - sum(t["rank"] for t in record["tiers"])
    return Compressed(record, parts, len(s), kept / total if total else 1.0, error)


def lowrank_sizes(shape: tuple[int, int], tiers: tuple[Tier, ...], group: int
                  ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Every part compress_lowrank may write for a matrix of `shape`, at the largest ranks."""
    m, n = shape
    out = []
    for i, (tier, start, stop) in enumerate(tier_spans(min(m, n), tiers)):
        k = stop - start
        if not k:
            continue
        out.append((f"t{i}.s", torch.float32, (k,)))
        for key, (rows, cols) in (("u", (m, k)), ("vt", (k, n))):
            if tier.precision in FLOAT_PRECISIONS:
                out.append((f"t{i}.{key}", FLOAT_PRECISIONS[tier.precision], (rows, cols)))
                continue
            width = groups(cols, group)
            out += [(f"t{i}.{key}", torch.uint8, (packed_bytes(rows * cols, INT_BITS[tier.precision]),)),
                    (f"t{i}.{key}_scale", torch.float16, (rows, width)),
                    (f"t{i}.{key}_zero", torch.uint8, (rows, width))]
    return out


# ---------------------------------------------------------------- sparse (ours)

def compress_sparse(delta: torch.Tensor, density: float, dtype: torch.dtype) -> tuple[dict, dict]:
    """Ours: the ⌈density·numel⌉ entries of largest |Δ| (flat indices, values in `dtype`)."""
    flat = delta.reshape(-1)
    k = sparse_count(flat.numel(), density)
    index = flat.abs().topk(k, sorted=False).indices.sort().values
    index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    return ({"kind": "sparse", "density": density, "kept": k},
            {"index": index.to(index_dtype), "value": flat[index].to(dtype)})


def sparse_count(numel: int, density: float) -> int:
    return min(numel, max(1, math.ceil(density * numel - 1e-9)))
