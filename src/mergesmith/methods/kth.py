"""The exact k-th largest magnitude of a tensor seen chunk by chunk: a two-pass radix select.

Read as an integer, the fp32 bit pattern of |x| orders like |x| itself (its sign bit is 0:
+0, denormals, normal numbers, inf, then NaN, in this order), so the k-th largest |x| is found
16 bits at a time:

  pass 1  count the entries by the top 16 bits of |x| (2^15 bins: the sign bit is 0); counting
          down from the top bin, the bin h where the count reaches k, and the rank r of the k-th
          largest among the entries of h (1 = h's largest);
  pass 2  count the entries of bin h by their low 16 bits; counting down, the bin l where the
          count reaches r.

The k-th largest |x| has the bits h·2^16 + l: the value a selection over the whole tensor
finds, from two histograms, each filled in one linear pass over the chunks in any order (no
sort, no partition, no copy of the tensor). −0 counts as 0 (|−0| = +0).

Signed values (`order_keys`) select the same way over 32-bit keys that order like the values:
the fp32 bits with the sign bit flipped for x ≥ 0 and all bits flipped for x < 0 (2^16 high
bins), so the k-th smallest x is found as the (n − k + 1)-th largest key.
"""

from __future__ import annotations

from typing import Iterable

import torch

HIGH_BINS = 1 << 15  # the top 16 bits of |x|, whose sign bit is 0
ORDER_HIGH_BINS = 1 << 16  # the top 16 bits of a signed value's key
LOW_BINS = 1 << 16


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """The fp32 bit patterns of |x| as int32 (non-negative), flat."""
    return x.float().abs().reshape(-1).view(torch.int32)


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """Keys in [0, 2^32) (int64, flat) that order like x's values as fp32 (−0 as +0)."""
    bits = (x.float().reshape(-1) + 0.0).view(torch.int32).long()  # + 0.0: −0 becomes +0
    return torch.where(bits < 0, -1 - bits, bits + (1 << 31))


def key_value(key: int) -> float:
    """The fp32 number whose `order_keys` key is `key`."""
    bits = key - (1 << 31) if key >= 1 << 31 else -1 - key
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


def high_histogram(bits: torch.Tensor, bins: int = HIGH_BINS) -> torch.Tensor:
    """Pass 1: counts of the `magnitude_bits` (or `order_keys`, with ORDER_HIGH_BINS) by their
    top 16 bits (int64, `bins`)."""
    return torch.bincount(bits >> 16, minlength=bins)


def low_histogram(bits: torch.Tensor, high: int) -> torch.Tensor:
    """Pass 2: counts, by their low 16 bits, of the `magnitude_bits` whose top 16 bits are
    `high` (int64, LOW_BINS). As one bincount of bits − high·2^16 clamped to [−1, 2^16], the
    other entries in two bins dropped after: 3x faster than gathering the bin's entries."""
    keys = (bits - ((high << 16) - 1)).clamp_(0, LOW_BINS + 1)
    return torch.bincount(keys, minlength=LOW_BINS + 2)[1:-1]


def locate(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry (1-based k, counted from the top bin down), and
    that entry's rank among the bin's own entries (1 = the bin's largest)."""
    above = torch.flip(histogram, (0,)).cumsum(0)  # entries in this bin or higher, top down
    top_down = int(torch.searchsorted(above, k))  # first bin (from the top) where the count ≥ k
    bin_ = histogram.numel() - 1 - top_down
    before = int(above[top_down - 1]) if top_down else 0
    return bin_, k - before


def bits_value(high: int, low: int) -> float:
    """The fp32 number of bits high·2^16 + low."""
    return float(torch.tensor((high << 16) | low, dtype=torch.int32).view(torch.float32))


class MagnitudeSelect:
    """kth_largest_magnitudes for a caller that reads the chunks itself: `count(chunk)` every
    chunk in one pass, `end_pass()`, again in a second pass, then `values()`."""

    def __init__(self, ks: list[int]):
        self.ks, self.high, self.located, self.lows = ks, None, None, None

    def count(self, chunk: torch.Tensor) -> None:
        bits = magnitude_bits(chunk)
        if self.located is None:
            part = high_histogram(bits)
            self.high = part if self.high is None else self.high.add_(part)
        else:
            for h in self.lows:
                self.lows[h] += low_histogram(bits, h)

    def end_pass(self) -> None:
        if self.located is None:
            self.located = [locate(self.high, k) for k in self.ks]
            self.lows = {h: self.high.new_zeros(LOW_BINS) for h, _ in self.located}

    def values(self) -> list[float]:
        return [bits_value(h, locate(self.lows[h], rank)[0]) for h, rank in self.located]


def kth_largest_magnitudes(chunks: Iterable[torch.Tensor] | torch.Tensor,
                           ks: list[int]) -> list[float]:
    """The k-th largest |x| (fp32) for each k, 1 ≤ k ≤ numel, over the entries of all chunks
    (an iterable read twice, or one tensor): both passes."""
    chunks = [chunks] if isinstance(chunks, torch.Tensor) else chunks
    select = MagnitudeSelect(ks)
    for _ in range(2):
        for chunk in chunks:
            select.count(chunk)
        select.end_pass()
    return select.values()


def kth_smallest_values(chunks: Iterable[torch.Tensor] | torch.Tensor,
                        ks: list[int]) -> list[float]:
    """The k-th smallest x (fp32) for each k, 1 ≤ k ≤ numel, over the entries of all chunks
    (an iterable read twice, or one tensor): torch.kthvalue's values, in both passes."""
    chunks = [chunks] if isinstance(chunks, torch.Tensor) else chunks
    high = sum(high_histogram(order_keys(chunk), ORDER_HIGH_BINS) for chunk in chunks)
    n = int(high.sum())
    located = [locate(high, n - k + 1) for k in ks]
    lows = {h: sum(low_histogram(order_keys(chunk), h) for chunk in chunks)
            for h in {h for h, _ in located}}
    return [key_value((h << 16) | locate(lows[h], rank)[0]) for h, rank in located]
