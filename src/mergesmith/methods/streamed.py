"""What a whole-tensor statistic needs to stream: exact sums over chunks, and the reduce passes
run over the parts of a tensor that a method was given whole.

A float sum depends on the order of its additions, so a sum added up chunk by chunk differs in
its last bits with the chunks (and torch's own sum of a whole tensor with the thread count).
An exact sum does not: each fp32 value is m·2^(e − 150) (m its 24-bit significand, e its biased
exponent, 1 for subnormals), so the values that share an exponent add up exactly as integers,
and 256 integer sums, one per exponent, hold the sum of any number of chunks exactly. Rounded
once at the end, it is the correctly rounded float64 sum: the same whatever the chunks.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

EXPONENTS = 256  # fp32 biased exponents; 255 is inf and NaN
SIGNIFICAND_BITS = 23
SCALE_BITS = 149  # the smallest subnormal is 2^-149


def exponent_sums(x: torch.Tensor) -> torch.Tensor:
    """Σ m per fp32 exponent over the entries of |x| (int64, EXPONENTS): the exact sum of |x|
    as integers to be scaled by 2^(max(e, 1) − 150). Exact as long as one call sees fewer
    than 2^29 entries (each m < 2^24; a float64 bincount weight's integers are exact below
    2^53). As the stored fraction and, for normal numbers, its implicit 2^23 times a count."""
    return bits_exponent_sums(x.float().reshape(-1).view(torch.int32) & 0x7FFFFFFF)


def bits_exponent_sums(bits: torch.Tensor) -> torch.Tensor:
    """`exponent_sums` of the fp32 values whose bit patterns of |x| (int32, flat) are `bits`;
    a 0 pattern adds nothing, so entries to leave out can be set to 0."""
    exponent = bits >> SIGNIFICAND_BITS
    fraction = (bits & 0x7FFFFF).double()
    sums = torch.bincount(exponent, weights=fraction, minlength=EXPONENTS).long()
    implicit = torch.bincount(exponent, minlength=EXPONENTS)[1:] << SIGNIFICAND_BITS
    sums[1:] += implicit
    return sums


def repeated_exponent_sums(bits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`exponent_sums` of counts[j] entries whose |x| has the bit pattern bits[j], for each j
    (int64 tensors of one shape): a histogram of fp32 values summed exactly."""
    exponent = bits >> SIGNIFICAND_BITS
    significand = (bits & 0x7FFFFF) + ((exponent > 0).long() << SIGNIFICAND_BITS)
    sums = torch.zeros(EXPONENTS, dtype=torch.int64, device=bits.device)
    return sums.scatter_add_(0, exponent.reshape(-1), (counts * significand).reshape(-1))


def exact_total(sums: torch.Tensor) -> float:
    """The correctly rounded float64 value of `exponent_sums` added over chunks (inf where an
    entry was inf or NaN)."""
    counts = [int(s) for s in sums.tolist()]
    if counts[EXPONENTS - 1]:
        return float("inf")
    # Python's int / int is correctly rounded
    scaled = sum(s << (max(e, 1) - 1) for e, s in enumerate(counts[:-1]) if s)
    return scaled / (1 << SCALE_BITS)


def reduce_in_parts(reduce: Callable[..., Any], finish: Callable[..., Any], passes: int,
                    parts: Iterable[tuple[torch.Tensor, list[torch.Tensor]]], **params) -> Any:
    """A method's reduce passes over (base part, expert parts), as the engine makes them over
    chunks: for a method given the whole tensor (a small one, or on a GPU), so that it finds
    the statistics the streamed passes find. `parts` is read once per pass."""
    parts = list(parts)
    stats = None
    for _ in range(passes):
        sums = sum(reduce(base, experts, stats=stats, **params) for base, experts in parts)
        stats = finish(stats, sums, **params)
    return stats
