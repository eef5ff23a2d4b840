"""Building blocks shared by the methods; each reads like the equation it implements.

Task-vector methods (TIES, DARE, breadcrumbs, DELLA, consensus, ...) are compositions of these:
sparsify each τi (`keep_topk`, `drop_random`, ...), elect a sign per entry (`elect_sign`), and
combine the agreeing entries (`disjoint_mean`). A new method should add a block here only when
no composition of the existing ones expresses it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from mergesmith.methods.registry import RandomStream


def task_vectors(base: torch.Tensor, experts: list[torch.Tensor]) -> list[torch.Tensor]:
    """τi = θi − θ0."""
    return [expert - base for expert in experts]


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ wi xi, accumulated in one buffer."""
    total = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor, alpha=weight)
    return total


def unit(x: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """x / ||x|| (over all entries) and ||x||; a zero vector stays zero."""
    norm = torch.linalg.vector_norm(x)
    return (x / norm if norm > eps else torch.zeros_like(x)), norm


def topk_count(numel: int, density: float) -> int:
    """How many entries a density keeps: ⌊d·n⌋, at least one of a non-empty tensor (as mergekit)."""
    if density <= 0 or numel == 0:
        return 0
    return numel if density >= 1 else max(1, int(density * numel))


def kth_largest(values: torch.Tensor, ks: list[int]) -> list[float]:
    """The k-th largest entry of `values` for each k (1-based), found by selection (introselect,
    a few linear passes), never by sorting. `values` is reordered in place: pass a scratch tensor.

    On the CPU numpy's partition does it (~15x faster than torch.kthvalue on a 2048x5632
    tensor), one position at a time from the top, each in the part below the previous one (a
    call with several positions takes 10x longer); elsewhere torch.kthvalue.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    positions = [n - k for k in ks]  # 0-based, ascending
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        array = flat.numpy()
        end = n
        for position in sorted(set(positions), reverse=True):
            array[:end].partition(position)  # below `end`: the `end` smallest, in any order
            end = position
        return [float(array[p]) for p in positions]
    return [float(torch.kthvalue(flat, p + 1).values) for p in positions]


def magnitude_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |x|, found by selection, never by sorting the tensor."""
    (value,) = kth_largest(x.abs(), [k])
    return torch.tensor(value, dtype=x.dtype, device=x.device)


@functools.lru_cache(maxsize=256)
def float_below(value: float, dtype: torch.dtype) -> float:
    """The largest number of `dtype` below `value` (cached: called once per block)."""
    return float(torch.nextafter(torch.tensor(value, dtype=dtype),
                                 torch.tensor(-math.inf, dtype=dtype)))


def keep_magnitude_band(x: torch.Tensor, low: float, high: float = math.inf) -> torch.Tensor:
    """x where low ≤ |x| ≤ high, 0 elsewhere (ties with a bound are kept).

    As hardshrink(x, low⁻) − hardshrink(x, high), low⁻ the float just below low: two float
    passes where a bool mask and torch.where would take ~10x longer on the CPU.
    """
    kept = F.hardshrink(x, float_below(low, x.dtype)) if low > 0 else x.clone()
    if high != math.inf:
        kept.sub_(F.hardshrink(x, high))  # x − x = 0 above the band
    return kept


def keep_topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """mask = |x| ≥ k-th largest |x|, k = topk_count(n, d). Entries tied with the threshold are
    all kept, so the mask never depends on the order of equal values (mergekit's argsort keeps
    exactly k, an arbitrary subset of the tied ones)."""
    k = topk_count(x.numel(), density)
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k == x.numel():
        return torch.ones_like(x, dtype=torch.bool)
    (threshold,) = kth_largest(x.abs(), [k])
    return x.abs() >= threshold


def keep_topk(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the top-d fraction of entries by magnitude (and any tied with the k-th),
    zero the rest."""
    k = topk_count(x.numel(), density)
    if k == 0 or k == x.numel():
        return x.clone() if k else torch.zeros_like(x)
    (threshold,) = kth_largest(x.abs(), [k])
    return keep_magnitude_band(x, threshold)


def drop_random(x: torch.Tensor, density: float, stream: RandomStream,
                rescale: bool = True, at: int | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability d (Bernoulli), scale the kept ones by 1/d.

    One uniform draw per entry, in row-major order, from `stream`: its next ones, or those from
    entry `at` on (none when d ≥ 1 or d ≤ 0).
    """
    if density >= 1:
        return x.clone()
    if density <= 0:
        return torch.zeros_like(x)
    if at is None:
        at, stream.position = stream.position, stream.position + x.numel()
    # 1.0 / 0.0 floats: a bool mask costs ~10x more on the CPU
    kept = stream.keep_at(at, x.shape, density).to(x.dtype).mul_(x)
    return kept.div_(density) if rescale else kept


def elect_sign(task_vectors: list[torch.Tensor], weights: list[float] | None = None,
               mode: str = "sum", ties: str = "zero") -> torch.Tensor:
    """TIES' elect: s = sign(Σ wi τi) ("sum", the paper's mass vote) or the sign held by more
    models ("count"). Entries with no majority get sign 0 and are dropped by `disjoint_mean`
    (`ties="zero"`), or sign + (`ties="plus"`: mergekit's s = 1 if Σ ≥ 0 else −1, which breaks
    merge(−τ) = −merge(τ); the TIES authors' code gives them the tensor's majority sign)."""
    weights = weights or [1.0] * len(task_vectors)
    if mode == "sum":
        sign = weighted_sum(task_vectors, weights).sign_()
    elif mode == "count":
        sign = torch.sign(sum(torch.sign(tv) * (1 if w >= 0 else -1)
                              for tv, w in zip(task_vectors, weights)))
    else:
        raise ValueError(f"unknown sign election mode {mode!r}; use sum or count")
    return break_ties(sign, ties)


def break_ties(sign: torch.Tensor, ties: str = "zero") -> torch.Tensor:
    """An elected sign where the vote was exactly even (s = 0): left 0 ("zero"), or + ("plus",
    mergekit's), in place."""
    if ties == "plus":  # s + 1 − |s|: 0 becomes 1, ±1 stay
        return sign.sub_(sign.abs().sub_(1))
    if ties != "zero":
        raise ValueError(f"unknown sign tie rule {ties!r}; use zero or plus")
    return sign


def disjoint_mean(task_vectors: list[torch.Tensor], sign: torch.Tensor,
                  weights: list[float] | None = None, normalize: bool = True) -> torch.Tensor:
    """TIES' disjoint merge: per entry, Σ wi τi over the τi whose wi·τi has the elected sign s,
    divided (when `normalize`) by Σ wi over those same agreeing non-zero entries. Where no
    weight agrees, the sum is left undivided (it is 0 unless agreeing weights cancel; as mergekit).

    Rounded as mergekit: the terms are wi·τi rounded once, added in model order.
    """
    weights = weights or [1.0] * len(task_vectors)
    total = torch.zeros_like(sign)
    count = torch.zeros_like(sign) if normalize else None
    agreeing = torch.empty_like(sign)
    for tv, w in zip(task_vectors, weights):
        # |wi τi| where wi·τi has the sign s, else 0 (also where s = 0): no mask tensors
        torch.mul(tv, w, out=agreeing).mul_(sign).clamp_(min=0)
        total.add_(agreeing)
        if count is not None:
            count.add_(agreeing.sign_(), alpha=w)
    total.mul_(sign)
    if count is None:
        return total
    # count + [count = 0], in float ops (a bool mask costs ~10x more on the CPU)
    no_agreeing = torch.abs(count, out=agreeing).sign_().neg_().add_(1)
    return total.div_(count.add_(no_agreeing))


GRAM_BLOCK = 256  # entries per fp32 partial dot product: too few to accumulate error


def gram64(vectors: list[torch.Tensor]) -> torch.Tensor:
    """G[i, j] = Σ vi·vj over all entries, in float64, about as exact as float64 products.

    fp32 dot products over blocks of GRAM_BLOCK entries, added in float64: some 15 times faster
    than casting to float64 first. The error is the rounding of each block's fp32 result, which
    averages out over blocks: about 1e-7/√blocks of |vi||vj| (2e-9 at a million entries),
    where one fp32 dot product over the whole tensor is off by 1e-6."""
    flat = [v.reshape(-1) for v in vectors]
    cut = flat[0].numel() - flat[0].numel() % GRAM_BLOCK
    gram = torch.empty(len(flat), len(flat), dtype=torch.float64, device=flat[0].device)
    for i, a in enumerate(flat):
        for j in range(i, len(flat)):
            b = flat[j]
            head = torch.linalg.vecdot(a[:cut].view(-1, GRAM_BLOCK), b[:cut].view(-1, GRAM_BLOCK))
            value = head.sum(dtype=torch.float64) + a[cut:].double() @ b[cut:].double()
            gram[i, j] = gram[j, i] = value
    return gram
