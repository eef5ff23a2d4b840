"""TIES, DARE, breadcrumbs, DELLA (methods/sparse.py, magnitude_trim.py, random_drop.py): hand computations of each definition,
their documented properties, and parity with mergekit 0.1.5 through the engine.

Definitions (METHODS.md and the papers), τi = θi − θ0:
- TIES (Yadav et al. 2023, Algorithm 1): trim each τi to its top-d magnitudes, elect
  s = sign(Σ wi trim(τi)), average per entry the trimmed values whose sign is s;
- DARE (Yu et al. 2024): drop each entry with probability p = 1 − d, rescale the kept by 1/(1 − p);
- breadcrumbs (Davari & Belilovsky 2024): per layer, drop the largest-magnitude outliers and the
  smallest entries (mergekit's gamma: the outlier fraction, density: the kept fraction);
- DELLA (Deep et al. 2024, MagPrune): per row, drop with a probability that falls with the
  magnitude rank, rescale the kept by 1/(1 − p_i); keep probabilities d ± ε as in the authors'
  code and mergekit.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import mergesmith
from conftest import read_tensors, write_recipe
from mergesmith.errors import PlanError
from mergesmith.methods import (
    TensorContext,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    get_method,
    task_arithmetic,
    ties,
)
from mergesmith.methods import random_drop, sparse
from mergesmith.methods.blocks import drop_random, keep_magnitude_band, keep_topk, kth_largest
from test_parity import compare, input_scale, llama, merge_both, ta_scale, ulp_at  # noqa: F401

T = torch.tensor
CTX = TensorContext("model.layers.0.mlp.up_proj.weight", seed=7)
SPARSE = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
          "della_linear")


def experts_from(base: torch.Tensor, taus: list[torch.Tensor]) -> list[torch.Tensor]:
    return [base + tau for tau in taus]


def expert_draws(ctx: TensorContext, count: int, shape) -> list[torch.Tensor]:
    """The uniform draws of each expert, as registry.RandomStream promises them: entry j of
    expert i is word j mod 2^16 of block j // 2^16, the 32-bit words (low half first) of numpy's
    SFC64 from state (x, y, z, 1), x, y, z from blake2b(block, key=sha256("seed\0name\0i"));
    its top 24 bits times 2^-24 (written out here independently of the class)."""
    import hashlib

    import numpy as np

    n = math.prod(shape)
    draws = []
    for i in range(count):
        key = hashlib.sha256(f"{ctx.seed}\0{ctx.name}\0{i}".encode()).digest()
        words = []
        for b in range((n + (1 << 16) - 1) // (1 << 16)):
            digest = hashlib.blake2b(b.to_bytes(8, "little"), key=key, digest_size=24).digest()
            state = [int.from_bytes(digest[k:k + 8], "little") for k in (0, 8, 16)] + [1]
            bits = np.random.SFC64()
            bits.state = {"bit_generator": "SFC64", "has_uint32": 0, "uinteger": 0,
                          "state": {"state": np.array(state, dtype=np.uint64)}}
            words.append(bits.random_raw(1 << 15).astype("<u8").view("<u4"))
        words = np.concatenate(words)[:n]
        draws.append(torch.from_numpy((words // 256).astype(np.float32) / (1 << 24)).view(shape))
    return draws


# --------------------------------------------------------------------------------------------
# TIES: trim (keep top-d |τi|), elect s = sign(Σ wi trim(τi)), disjoint mean of the agreeing


BASE8 = T([0.5, -1.0, 2.0, 0.0, 1.0, 3.0, -2.0, 0.25])
TAUS8 = [T([4.0, -1.0, 0.5, 3.0, -2.0, 0.25, 1.0, -6.0]),
         T([-3.0, 2.0, -5.0, 0.5, -1.0, 4.0, 0.25, 1.0]),
         T([1.0, -4.0, 2.0, -0.5, 3.0, -1.0, -6.0, 0.25])]


def test_ties_trim_elect_merge_by_hand():
    # density 0.5 keeps 4 of 8 per expert:
    #   trim1 = [4, 0, 0, 3, -2, 0, 0, -6]   trim2 = [-3, 2, -5, 0, 0, 4, 0, 0]
    #   trim3 = [0, -4, 2, 0, 3, 0, -6, 0]
    # weights (1, 0.5, 2): Σ wi trim = [2.5, -7, 1.5, 3, 4, 2, -12, -6], signs + - + + + + - -
    # per entry, Σ wi trim over the agreeing / Σ wi over the agreeing:
    #   e0 4·1/1 = 4; e1 -4·2/2 = -4; e2 2·2/2 = 2 (trim2's -5 disagrees); e3 3; e4 3·2/2 = 3
    #   (trim1's -2 disagrees); e5 4·0.5/0.5 = 4; e6 -6·2/2 = -6; e7 -6
    merged = ties(BASE8, experts_from(BASE8, TAUS8), weights=[1.0, 0.5, 2.0],
                  densities=[0.5, 0.5, 0.5])
    torch.testing.assert_close(merged, BASE8 + T([4.0, -4.0, 2.0, 3.0, 3.0, 4.0, -6.0, -6.0]),
                               rtol=0, atol=1e-6)


def test_ties_disjoint_mean_with_sign_conflicts_by_hand():
    base = T([0.1, 0.2, 0.3, 0.4])
    taus = [T([1.0, -2.0, 3.0, 0.0]), T([3.0, 1.0, -1.0, 0.0]), T([-1.0, -4.0, 2.0, 0.0])]
    experts = experts_from(base, taus)
    # weights 1, 2, 1: Σ wi τi = [6, -4, 3, 0]; e0 agree τ1, τ2: (1·1 + 2·3)/(1 + 2) = 7/3;
    # e1 agree τ1, τ3: (-2 - 4)/2 = -3; e2 agree τ1, τ3: (3 + 2)/2 = 2.5; e3 no sign: base
    merged = ties(base, experts, weights=[1.0, 2.0, 1.0], densities=[1.0] * 3)
    torch.testing.assert_close(merged, base + T([7 / 3, -3.0, 2.5, 0.0]), rtol=0, atol=1e-6)
    # without normalize the agreeing terms are only summed: [7, -6, 5, 0]; λ scales the sum
    merged = ties(base, experts, weights=[1.0, 2.0, 1.0], densities=[1.0] * 3, normalize=False,
                  lambda_=0.5)
    torch.testing.assert_close(merged, base + 0.5 * T([7.0, -6.0, 5.0, 0.0]), rtol=0, atol=1e-6)


def test_ties_exact_tie_elects_no_sign_and_merge_is_odd():
    """Σ wi τi = 0 exactly: no sign, the base stays (mergekit elects + and returns base + 1);
    so flipping every τi flips the merge."""
    base = T([0.0, 0.0])
    taus = [T([1.0, 2.0]), T([-1.0, 1.0])]
    merged = ties(base, experts_from(base, taus), weights=[1.0, 1.0], densities=[1.0, 1.0])
    assert torch.equal(merged, T([0.0, 1.5]))
    flipped = ties(base, experts_from(base, [-t for t in taus]), weights=[1.0, 1.0],
                   densities=[1.0, 1.0])
    assert torch.equal(flipped, -merged)


def test_ties_one_expert_density_one_is_the_expert():
    # values on a 2^-10 grid, so θ1 − θ0 and θ0 + τ are exact in fp32 and "exactly" is bitwise
    generator = torch.Generator().manual_seed(0)
    base = torch.randint(-4096, 4096, (33, 17), generator=generator) / 1024
    expert = base + torch.randint(-64, 64, (33, 17), generator=generator) / 1024
    for weight in (1.0, 0.5, 4.0):  # normalized: w·τ/w = τ (powers of 2: exactly)
        merged = ties(base, [expert], weights=[weight], densities=[1.0], lambda_=1.0)
        assert torch.equal(merged, expert)


def test_kth_largest_selection_paths_agree_with_sorting():
    """numpy's partition (fp32 on the CPU) and torch.kthvalue (other dtypes and devices) give
    the k-th largest, as a sort would (sorting only here, in the test)."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    ks = [1, 2, 10, 500, 999, 1000]
    for values in (x, x.bfloat16()):
        ordered = values.sort(descending=True).values
        assert kth_largest(values.clone(), ks) == [float(ordered[k - 1]) for k in ks]


def test_magnitude_band_keeps_ties_at_both_bounds():
    x = T([1.0, -2.0, 2.0, 3.0, -3.0, 4.0, 0.0])
    assert torch.equal(keep_magnitude_band(x, 2.0, 3.0), T([0.0, -2.0, 2.0, 3.0, -3.0, 0.0, 0.0]))
    assert torch.equal(keep_magnitude_band(x, 3.0), T([0.0, 0.0, 0.0, 3.0, -3.0, 4.0, 0.0]))


def test_trim_keeps_all_entries_tied_at_the_cut():
    """k = 2 of [3, -3, 3, 1]: the 2nd largest |x| is 3, held by three entries: all kept."""
    assert torch.equal(keep_topk(T([3.0, -3.0, 3.0, 1.0]), 0.5), T([3.0, -3.0, 3.0, 0.0]))


# --------------------------------------------------------------------------------------------
# breadcrumbs: drop the ⌊γ·n⌋ largest |τi|, keep the next k = max(1, ⌊d·n⌋)

TAU10_A = T([0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 1.5, -0.4, 0.6, 0.8])
TAU10_B = T([-0.2, 0.1, 0.05, 1.0, 0.3, -0.6, 0.4, 0.7, -0.9, 0.15])


def test_breadcrumbs_by_hand():
    base = torch.ones(10)
    # d = 0.5, γ = 0.1: drop the largest, keep the next 5
    #   A: drop 1.5, keep 0.9 0.8 0.7 0.6 0.5;  B: drop 1.0, keep 0.9 0.7 0.6 0.4 0.3
    band_a = T([0.0, -0.9, 0.5, 0.0, -0.7, 0.0, 0.0, 0.0, 0.6, 0.8])
    band_b = T([0.0, 0.0, 0.0, 0.0, 0.3, -0.6, 0.4, 0.7, -0.9, 0.0])
    merged = breadcrumbs(base, experts_from(base, [TAU10_A, TAU10_B]), weights=[1.0, 0.5],
                         densities=[0.5, 0.5], gammas=[0.1, 0.1])
    torch.testing.assert_close(merged, base + band_a + 0.5 * band_b, rtol=0, atol=1e-6)
    # with sign election: entries 4 (-0.7 vs 0.15) and 8 (0.6 vs -0.45) conflict; Σ is -0.55
    # and +0.15: the agreeing term alone, summed (normalize is off by default)
    merged = breadcrumbs_ties(base, experts_from(base, [TAU10_A, TAU10_B]), weights=[1.0, 0.5],
                              densities=[0.5, 0.5], gammas=[0.1, 0.1])
    expected = band_a + 0.5 * band_b
    expected[4], expected[8] = -0.7, 0.6
    torch.testing.assert_close(merged, base + expected, rtol=0, atol=1e-6)


def test_breadcrumbs_gamma_below_one_entry_drops_no_outlier():
    """γ·n = 0.5 < 1: no outlier dropped (not every entry): the top 3 of 10 stay, 1.5 included."""
    base = torch.zeros(10)
    merged = breadcrumbs(base, [TAU10_A], weights=[1.0], densities=[0.3], gammas=[0.05])
    assert torch.equal(merged, T([0.0, -0.9, 0.0, 0.0, 0.0, 0.0, 1.5, 0.0, 0.0, 0.8]))


def test_breadcrumbs_small_tensor_keeps_at_least_one():
    """A norm vector of 4 with d = 0.2 (d·n < 1): the largest entry stays, as in TIES' trim;
    mergekit's magnitude_outliers zeroes the whole task vector there."""
    base, tau = torch.zeros(4), T([0.2, -0.5, 0.1, 0.3])
    merged = breadcrumbs(base, [base + tau], weights=[1.0], densities=[0.2], gammas=[0.0])
    assert torch.equal(merged, T([0.0, -0.5, 0.0, 0.0]))
    from mergekit.sparsify import magnitude_outliers

    assert torch.equal(magnitude_outliers(tau, density=0.2, gamma=0.0), torch.zeros(4))


def test_breadcrumbs_outliers_give_way_to_density():
    """d + γ > 1: fewer outliers dropped so that ⌊d·n⌋ stay (d = 0.9, γ = 0.2 on 10: drop 1)."""
    merged = breadcrumbs(torch.zeros(10), [TAU10_A], weights=[1.0], densities=[0.9],
                         gammas=[0.2])
    expected = TAU10_A.clone()
    expected[6] = 0.0
    assert torch.equal(merged, expected)


# --------------------------------------------------------------------------------------------
# DARE: m ~ Bernoulli(d), τ̂ = m ⊙ τ / d


def test_drop_random_by_hand():
    tau = torch.arange(1.0, 13.0)
    (draws,) = expert_draws(CTX, 1, (12,))
    got = drop_random(tau, 0.5, CTX.stream(0))
    assert torch.equal(got, torch.where(draws < 0.5, tau / 0.5, 0.0))
    got = drop_random(tau, 0.5, CTX.stream(0), rescale=False)
    assert torch.equal(got, torch.where(draws < 0.5, tau, 0.0))


def test_keep_at_keeps_exactly_the_entries_whose_draw_is_below_the_probability():
    """keep_at compares the raw words; it must agree with rand_at < p (p as fp32) everywhere,
    including probabilities that round to 0 or 1 in fp32 and one draw's width from either end."""
    n = 2 * (1 << 16) + 77
    stream = CTX.stream(3)
    draws = stream.rand_at(1000, (n,))
    for p in (0.0, 2.0 ** -24, 1e-8, 0.1, 0.5, 0.9, 1 - 2.0 ** -24, 1 - 2.0 ** -26, 1.0):
        kept = stream.keep_at(1000, (n,), p)
        assert kept.dtype == torch.float32
        assert torch.equal(kept, (draws < p).float()), p
    assert 0.45 < float(stream.keep_at(0, (n,), 0.5).mean()) < 0.55


def test_keep_at_takes_a_probability_and_a_value_per_column():
    """With one probability and one value per column (DELLA's by rank), entry (r, c) is
    value[c] where its draw is below p[c], else 0, for the same draws as a scalar p."""
    rows, cols = 300, 7
    stream = CTX.stream(2)
    draws = stream.rand_at(55, (rows, cols))
    p = np.array([0.0, 2.0 ** -24, 0.1, 0.5, 0.9, 1 - 2.0 ** -24, 1.0], dtype=np.float32)
    value = np.array([3.0, -1.0, 0.5, 2.0, 7.0, 1.0, 0.25], dtype=np.float32)
    kept = stream.keep_at(55, (rows, cols), p, value)
    expected = torch.where(draws < torch.from_numpy(p), torch.from_numpy(value), 0.0)
    assert kept.dtype == torch.float32 and torch.equal(kept, expected)
    assert torch.equal(stream.keep_at(55, (rows, cols), 0.5, 4.0), (draws < 0.5).float() * 4)


def test_random_streams_give_each_entry_the_same_draw_in_any_chunking():
    """A chunk starting at entry j (ctx.offset = j) draws what the whole tensor draws there,
    across block boundaries of the stream; streams of other experts or tensors differ."""
    n = 3 * (1 << 16) + 123
    whole = CTX.stream(1).rand((n,))
    for start, stop in [(0, 10), (65530, 65600), (70000, 196700), (n - 5, n)]:
        piece = replace(CTX, offset=start).stream(1).rand((stop - start,))
        assert torch.equal(piece, whole[start:stop])
    stream = CTX.stream(1)
    parts = [stream.rand((7,)), stream.rand((65536,)), stream.rand((3, 5))]
    assert torch.equal(torch.cat([p.reshape(-1) for p in parts]), whole[:65558])
    assert not torch.equal(CTX.stream(2).rand((100,)), whole[:100])
    assert not torch.equal(TensorContext("other", seed=7).stream(1).rand((100,)), whole[:100])


def test_dare_linear_and_ties_by_hand():
    base = T([0.5, -1.0, 2.0, 0.0, 1.0, 3.0, -2.0, 0.25])
    draws = expert_draws(CTX, 3, (8,))
    kept = [torch.where(u < d, tau / d, 0.0) for u, tau, d in zip(draws, TAUS8, (0.5, 0.7, 0.3))]
    weights = [1.0, 0.5, 2.0]
    got = dare_linear(base, experts_from(base, TAUS8), weights=weights,
                      densities=[0.5, 0.7, 0.3], ctx=CTX)
    expected = base + sum(w * k for w, k in zip(weights, kept))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # dare_ties: the same masks, then TIES' election and (unnormalized) disjoint sum
    got = dare_ties(base, experts_from(base, TAUS8), weights=weights, densities=[0.5, 0.7, 0.3],
                    ctx=CTX)
    weighted = [w * k for w, k in zip(weights, kept)]
    sign = torch.sign(sum(weighted))
    agreeing = sum(torch.where(torch.sign(x) == sign, x, 0.0) for x in weighted)
    torch.testing.assert_close(got, base + agreeing, rtol=1e-6, atol=1e-6)


def test_dare_density_one_is_task_arithmetic():
    torch.manual_seed(1)
    base = torch.randn(40, 24)
    experts = [base + 0.01 * torch.randn(40, 24) for _ in range(3)]
    kw = dict(weights=[0.5, -0.3, 0.8], lambda_=0.7)
    reference = task_arithmetic(base, experts, **kw)
    assert torch.equal(dare_linear(base, experts, densities=[1.0] * 3, ctx=CTX, **kw), reference)
    assert torch.equal(della_linear(base, experts, densities=[1.0] * 3, ctx=CTX, **kw), reference)
    # and the TIES-flavoured ones are TIES at density 1
    tied = ties(base, experts, densities=[1.0] * 3, normalize=False, **kw)
    assert torch.equal(dare_ties(base, experts, densities=[1.0] * 3, ctx=CTX, **kw), tied)


def test_dare_keep_rate_and_unbiased_mean():
    """Keep rate ≈ d, and E[τ̂] = τ: the mean over many tensors (each its own mask) → τ."""
    tau = torch.linspace(-1, 1, 4000)
    base = torch.zeros(4000)
    d, draws = 0.3, 400
    total = torch.zeros(4000)
    kept = 0
    for i in range(draws):
        out = dare_linear(base, [tau], weights=[1.0], densities=[d], ctx=TensorContext(f"t{i}"))
        kept += int((out != 0).sum())
        total += out
    rate = kept / (draws * 4000)
    assert abs(rate - d) < 4 * (d * (1 - d) / (draws * 4000)) ** 0.5 + 1e-3, rate
    # per entry the mean of 400 draws has sd |τ|·sqrt((1−d)/d/400) = 0.076|τ|, so the average
    # absolute error is ~0.8·0.076·E|τ| = 0.03; without the 1/d rescale it would be 0.35
    error = (total / draws - tau).abs().mean()
    assert error < 0.05, error


def test_dare_l1_rescale_restores_the_l1_norm():
    torch.manual_seed(2)
    base, tau = torch.zeros(50, 20), torch.randn(50, 20)
    out = dare_linear(base, [tau], weights=[1.0], densities=[0.4], rescale="l1", ctx=CTX)
    torch.testing.assert_close(out.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)
    plain = dare_linear(base, [tau], weights=[1.0], densities=[0.4], rescale=False, ctx=CTX)
    assert torch.equal(out != 0, plain != 0)  # same mask: the first pass rewinds its generators


def test_dare_randomness_depends_on_seed_and_name_only():
    torch.manual_seed(3)
    base = torch.randn(64, 64)
    experts = [base + torch.randn(64, 64) for _ in range(2)]
    kw = dict(weights=[1.0, 1.0], densities=[0.5, 0.5])
    a = dare_ties(base, experts, ctx=CTX, **kw)
    dare_ties(base, experts, ctx=TensorContext("another"), **kw)  # other calls in between
    assert torch.equal(dare_ties(base, experts, ctx=CTX, **kw), a)
    other_name = TensorContext("other.weight", seed=7)
    assert not torch.equal(dare_ties(base, experts, ctx=other_name, **kw), a)
    assert not torch.equal(dare_ties(base, experts, ctx=TensorContext(CTX.name, seed=8), **kw), a)


@pytest.mark.parametrize("method", [dare_ties, della])
def test_random_masks_do_not_depend_on_the_block_size(monkeypatch, method):
    torch.manual_seed(4)
    base = torch.randn(300, 70)
    experts = [base + torch.randn(300, 70) for _ in range(3)]
    kw = dict(weights=[1.0, 0.5, 0.2], densities=[0.5, 0.6, 0.4], ctx=CTX)
    whole = method(base, experts, **kw)
    monkeypatch.setattr(sparse, "BLOCK_ELEMENTS", 3 * 70)  # blocks of 3 rows
    assert torch.equal(method(base, experts, **kw), whole)


# --------------------------------------------------------------------------------------------
# DELLA: per row, the r-th smallest |τ| is kept with p(r) = d − ε + 2ε(r − 1)/(n − 1), ÷ p(r)


def test_della_by_hand():
    base = torch.zeros(2, 5)
    tau = T([[0.3, -0.1, 0.5, -0.2, 0.4], [1.0, 2.0, -3.0, 0.5, -0.25]])
    d, eps = 0.5, 0.2
    p = [0.3, 0.4, 0.5, 0.6, 0.7]  # by rank, smallest first
    (u,) = expert_draws(CTX, 1, (2, 5))  # drawn along each row in rank order
    expected = torch.zeros(2, 5)
    for row in range(2):
        for rank, col in enumerate(sorted(range(5), key=lambda c: abs(float(tau[row, c])))):
            if u[row, rank] < p[rank]:
                expected[row, col] = tau[row, col] / torch.tensor(p[rank])
    got = della_linear(base, [tau], weights=[1.0], densities=[d], epsilons=[eps], ctx=CTX)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_della_ranks_by_magnitude_then_column():
    """Ties in |τ| are ranked by column, so a rank never depends on the sort's algorithm."""
    rows = T([[2.0, -1.0, 1.0, 0.0, -2.0], [0.5, 0.25, -0.75, 0.125, 1.0]])
    assert random_drop.magnitude_order(rows).tolist() == [[3, 1, 2, 0, 4], [3, 1, 0, 2, 4]]


def test_della_keep_probability_rises_with_rank():
    """4000 rows, each a shuffle of magnitudes 1..11: kept fraction at rank r ≈ p(r)."""
    torch.manual_seed(5)
    rows, n, d, eps = 4000, 11, 0.5, 0.2
    magnitude = torch.argsort(torch.rand(rows, n), dim=1).float() + 1  # rank r has |τ| = r
    tau = magnitude * torch.where(torch.rand(rows, n) < 0.5, -1.0, 1.0)
    out = della_linear(torch.zeros(rows, n), [tau], weights=[1.0], densities=[d], epsilons=[eps],
                       rescale=False, ctx=CTX)
    kept = torch.stack([(out != 0)[magnitude == r].float().mean() for r in range(1, n + 1)])
    p = d - eps + 2 * eps * torch.arange(n) / (n - 1)
    assert (kept - p).abs().max() < 4 * (0.25 / rows) ** 0.5, (kept, p)
    assert kept[-1] - kept[0] > 0.3  # rises: p runs from 0.3 to 0.7
    # kept entries are the inputs themselves without rescale, τ/p(r) with "1/density"
    assert torch.equal(out[out != 0], tau[out != 0])
    scaled = della_linear(torch.zeros(rows, n), [tau], weights=[1.0], densities=[d],
                          epsilons=[eps], rescale="1/density", ctx=CTX)
    assert torch.equal(scaled != 0, out != 0)
    ratio = (scaled[out != 0] / tau[out != 0]).double()
    expected = 1 / p.float().double()[magnitude[out != 0].long() - 1]
    torch.testing.assert_close(ratio, expected, rtol=1e-6, atol=0)  # so E[τ̂] = τ


def test_della_at_density_equal_to_epsilon_never_keeps_the_smallest_and_makes_no_nan():
    """d = ε is allowed: the smallest |τ| of each row has p = 0, is never kept, and its 1/p
    rescale must not turn the dropped 0 into 0·∞ = NaN."""
    torch.manual_seed(2)
    tau = torch.randn(500, 6)
    for rescale in (True, False):
        got = della_linear(torch.zeros(500, 6), [tau], weights=[1.0], densities=[0.2],
                           epsilons=[0.2], rescale=rescale, ctx=CTX)
        assert torch.isfinite(got).all()
        smallest = tau.abs().argmin(dim=1)
        assert (got[torch.arange(500), smallest] == 0).all()
        assert (got != 0).float().mean() > 0.1  # the other ranks are kept, some of them


def test_della_rejects_probabilities_outside_zero_one(tmp_path, llama):
    with pytest.raises(ValueError, match="density ± epsilon"):
        della(torch.zeros(4), [torch.ones(4)], weights=[1.0], densities=[0.1], epsilons=[0.2],
              ctx=CTX)
    recipe = sparse_recipe(llama, "della", density=0.1, epsilon=0.2)
    with pytest.raises(PlanError, match="density ± epsilon"):
        mergesmith.merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")


# --------------------------------------------------------------------------------------------
# registry: mergekit's names, parameters, defaults and scopes


@pytest.mark.parametrize("name", SPARSE)
def test_parameters_match_mergekit(name):
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import ParameterScope

    theirs = {p.name: p for p in registry.get(name).spec.parameters}
    ours = {p.name: p for p in get_method(name).params}
    assert sorted(ours) == sorted(theirs)
    for key, p in theirs.items():
        assert ours[key].per_model == (p.scope == ParameterScope.NON_BASE), key
        assert ours[key].required == p.required, key
        if not p.required:
            assert ours[key].default == p.default, key


def test_rescale_values(tmp_path, llama):
    base, tau = torch.zeros(10), TAU10_A
    kw = dict(weights=[1.0], densities=[0.5])
    assert torch.equal(ties(base, [tau], rescale="none", **kw), ties(base, [tau], **kw))
    halved = ties(base, [tau], rescale="1/density", **kw)
    assert torch.equal(halved, ties(base, [tau], **kw) / 0.5)
    l1 = ties(base, [tau], rescale=True, **kw)  # true is mergekit's L1 for TIES
    torch.testing.assert_close(l1.abs().sum(), tau.abs().sum())
    # through a recipe: true and "l1" are the same for TIES; an unknown value is a plan error
    merged = {}
    for value in (True, "l1"):
        recipe = sparse_recipe(llama, "ties", parameters={"rescale": value})
        folder = mergesmith.merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / str(value))
        merged[value] = read_tensors(folder)
    assert all(torch.equal(merged[True][k], merged["l1"][k]) for k in merged[True])
    recipe = sparse_recipe(llama, "ties", parameters={"rescale": "L2"})
    with pytest.raises(PlanError, match="rescale"):
        mergesmith.merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")


# --------------------------------------------------------------------------------------------
# parity with mergekit 0.1.5 through the engine (tiny Llama, fp32)


def sparse_recipe(models: dict, method: str, *, density=(0.5, 0.7), weights=(0.6, 0.4),
                  dtype: str = "float32", parameters: dict | None = None, **per_model) -> dict:
    densities = density if isinstance(density, tuple) else (density, density)
    return {
        "merge_method": method,
        "base_model": models["base"],
        "models": [{"model": models[key], "parameters": {"weight": w, "density": d, **per_model}}
                   for key, w, d in zip(("e1", "e2"), weights, densities)],
        "parameters": parameters or {},
        "dtype": dtype,
    }


def sum_scale(models: dict, weights=(0.6, 0.4), lam: float = 1.0):
    """Ulps at the size of the terms summed (test_parity's task-arithmetic scale)."""
    return ta_scale(models["base"], [models["e1"], models["e2"]], list(weights), lam, False,
                    torch.float32)


@pytest.mark.parametrize("parameters", [{}, {"lambda": 0.8, "normalize": False}],
                         ids=["default", "lambda"])
def test_ties_parity(tmp_path, llama, parameters):
    """Bitwise: the same kept entries, the terms wi·τi rounded once and added in model order."""
    theirs, ours = merge_both(tmp_path, sparse_recipe(llama, "ties", parameters=parameters))
    compare(theirs, ours, max_ulps=0, dtype=torch.float32)


def ties_exact(models: dict, name: str, weights=(0.6, 0.4), densities=(0.5, 0.7)) -> torch.Tensor:
    """TIES with mergekit's L1 rescale, in float64 from the fp32 inputs (the definition)."""
    tensors = {k: read_tensors(models[k])[name].double() for k in ("base", "e1", "e2")}
    base = tensors["base"]
    terms = []
    for key, w, d in zip(("e1", "e2"), weights, densities):
        tau = tensors[key] - base
        k = max(1, int(d * tau.numel()))
        kept = torch.where(tau.abs() >= tau.abs().flatten().topk(k).values[-1], tau, 0.0)
        terms.append(w * kept * (tau.abs().sum() / kept.abs().sum()))
    sign = torch.sign(sum(terms))
    agree = [torch.sign(t) == sign for t in terms]
    count = sum(w * a for w, a in zip(weights, agree))
    total = sum(torch.where(a, t, 0.0) for a, t in zip(agree, terms))
    return base + total / torch.where(count == 0, 1.0, count)


def test_ties_parity_l1_rescale(tmp_path, llama):
    """`rescale: true` is mergekit's L1 rescale for TIES: τi·||τi||₁/||trim(τi)||₁. mergekit sums
    the norms in fp32, mergesmith in fp64: the factors differ in their last bits, which shows as
    a few ulps at the inputs' scale (measured 8) where θ0 + τ nearly cancels. mergesmith is the
    closer of the two to the definition computed in float64 (measured 4.4 ulps, mergekit 6.3)."""
    recipe = sparse_recipe(llama, "ties", parameters={"rescale": True})
    theirs, ours = merge_both(tmp_path, recipe)
    scale = input_scale([llama["base"], llama["e1"], llama["e2"]], torch.float32)
    compare(theirs, ours, max_ulps=8, dtype=torch.float32, scale=scale)
    theirs_t, ours_t = read_tensors(theirs), read_tensors(ours)
    worst = {"mergekit": 0.0, "mergesmith": 0.0}
    for name in ours_t:
        exact = ties_exact(llama, name)
        ulp = ulp_at(scale(name, theirs_t[name]), torch.float32)
        for who, got in (("mergekit", theirs_t[name]), ("mergesmith", ours_t[name])):
            worst[who] = max(worst[who], float(((got.double() - exact).abs() / ulp).max()))
    assert worst["mergesmith"] < worst["mergekit"], worst


# The TIES-flavoured methods match bitwise (disjoint_mean rounds wi·τi once and adds in model
# order, as mergekit). The linear ones add Σ wi τi with weighted_sum's fused multiply-add, where
# mergekit rounds wi·τi first: up to 2 ulps at the size of the terms summed, as task arithmetic
# in test_parity (measured 2).


def parity_tolerance(models: dict, method: str) -> dict:
    if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
        return {"max_ulps": 0}
    return {"max_ulps": 2, "scale": sum_scale(models)}


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_parity(tmp_path, llama, method):
    recipe = sparse_recipe(llama, method, density=(0.5, 0.8), gamma=0.05)
    theirs, ours = merge_both(tmp_path, recipe)
    compare(theirs, ours, dtype=torch.float32, **parity_tolerance(llama, method))


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_parity_at_density_one(tmp_path, llama, method):
    """At density 1 nothing is dropped: task arithmetic, or TIES without trim (int8_mask, a
    no-op here, is accepted)."""
    recipe = sparse_recipe(llama, method, density=1.0, parameters={"int8_mask": True})
    theirs, ours = merge_both(tmp_path, recipe)
    compare(theirs, ours, dtype=torch.float32, **parity_tolerance(llama, method))


def test_seeded_merge_is_the_same_bytes_whatever_the_chunk_size(tmp_path, llama):
    recipe = write_recipe(tmp_path / "r.yaml", sparse_recipe(llama, "dare_ties", density=0.5))
    one = read_tensors(mergesmith.merge(recipe, tmp_path / "a", seed=3))
    two = read_tensors(mergesmith.merge(recipe, tmp_path / "b", seed=3, chunk_size="1KiB"))
    other = read_tensors(mergesmith.merge(recipe, tmp_path / "c", seed=4))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)


def whole_tensor_merge(models: dict, method: str, recipe: dict, seed: int) -> dict:
    """The method called once per tensor on whole tensors (its own l1 sums, no engine pass)."""
    from mergesmith.methods.registry import TensorContext

    base, *experts = [read_tensors(models[k]) for k in ("base", "e1", "e2")]
    params = recipe["parameters"]
    weights = [m["parameters"]["weight"] for m in recipe["models"]]
    densities = [m["parameters"]["density"] for m in recipe["models"]]
    fn = get_method(method).fn
    return {name: fn(base[name].float(), [e[name].float() for e in experts], weights=weights,
                     densities=densities, ctx=TensorContext(name, seed=seed),
                     rescale=params.get("rescale", True))
            for name in base}


@pytest.mark.parametrize("rescale", [True, "l1"])
def test_dare_streams_in_chunks_and_tiles_with_the_whole_tensors_draws(tmp_path, llama, monkeypatch,
                                                                       rescale):
    """DARE goes through the engine in row chunks and cache tiles (tiny ones here), each drawing
    from its entries' place in the stream: the same bytes as whole tensors. With mergekit's l1
    rescale, a first pass over the chunks sums each τi's L1 norms before and after its drops
    exactly, so that too streams (but not under compat, whose sums are torch's over the whole
    tensor in the compute dtype)."""
    from mergesmith.engine import run

    spec = get_method("dare_ties")
    assert spec.streams({"rescale": True}) and spec.streams({"rescale": "l1"})
    assert spec.reduce_passes({"rescale": "l1"}) == 1 and spec.reduce_passes({"rescale": True}) == 0
    assert not spec.streams({"rescale": "l1", "compute_dtype": torch.bfloat16})
    recipe = sparse_recipe(llama, "dare_linear", density=0.5, parameters={"rescale": rescale})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    whole = read_tensors(mergesmith.merge(path, tmp_path / "whole", seed=3, chunk_size="1GB"))
    monkeypatch.setattr(run, "CPU_TILE", 96)
    tiled = read_tensors(mergesmith.merge(path, tmp_path / "tiled", seed=3, chunk_size="2KiB"))
    assert all(torch.equal(whole[k], tiled[k]) for k in whole)
    direct = whole_tensor_merge(llama, "dare_linear", recipe, seed=3)
    assert all(torch.equal(direct[k], tiled[k]) for k in whole)


@pytest.mark.parametrize("method,rescale", [("della", True), ("della_linear", True),
                                            ("della", "l1")])
def test_della_streams_in_chunks_of_whole_rows_with_the_whole_tensors_draws(
        tmp_path, llama, monkeypatch, method, rescale):
    """DELLA ranks within rows, so the engine gives it blocks of whole rows (never tiles, which
    cut rows; never a split vector, which is one row), each drawing from its entries' place in
    the stream: the same bytes as whole tensors, at a chunk's memory; with the l1 rescale too
    (a first pass of exact sums)."""
    from mergesmith.engine import run

    spec = get_method(method)
    assert spec.streams({"rescale": True}) and spec.streams({"rescale": "l1"})
    assert not spec.tiles({"rescale": True})
    recipe = write_recipe(tmp_path / "r.yaml", sparse_recipe(llama, method, density=0.5,
                                                             parameters={"rescale": rescale}))
    whole = read_tensors(mergesmith.merge(recipe, tmp_path / "whole", seed=3, chunk_size="1GB"))
    seen = []
    merge_unit = run.merge_unit

    def spy(plan, unit, tensors, device, stats):
        seen.append((unit.job.out.shape, unit.rows, [t.shape for t in tensors]))
        return merge_unit(plan, unit, tensors, device, stats)

    monkeypatch.setattr(run, "merge_unit", spy)
    monkeypatch.setattr(run, "CPU_TILE", 96)
    chunked = read_tensors(mergesmith.merge(recipe, tmp_path / "chunked", seed=3,
                                            chunk_size="2KiB"))
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)
    blocks = [(shape, rows, shapes) for shape, rows, shapes in seen if rows is not None]
    assert blocks and all(len(shape) == 2 for shape, _, _ in blocks)
    assert all(s[1:] == shape[1:] for shape, _, shapes in blocks for s in shapes)
    assert all(rows is None for shape, rows, _ in seen if len(shape) < 2)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_threads_share_the_blocks_without_changing_a_bit(method):
    """A large tensor's row blocks go to several threads: the same bytes as one thread, and the
    random draws still come from each entry's place in the stream."""
    gen = torch.Generator().manual_seed(5)
    rows = 2 * sparse.MIN_BLOCKS_PER_THREAD * (random_drop.RANKED_BLOCK_ELEMENTS // 256)
    base = torch.randn(rows, 256, generator=gen)
    experts = [base + 0.01 * torch.randn(rows, 256, generator=gen) for _ in range(3)]
    spec = get_method(method)
    kwargs = dict(weights=[1.0, 0.5, 2.0], densities=[0.3] * 3, ctx=CTX)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = spec.fn(base, experts, **kwargs)
        torch.set_num_threads(2)
        two = spec.fn(base, experts, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    # bf16 inputs, cast block by block, give what fp32 copies of them give
    low = [x.bfloat16() for x in (base, *experts)]
    assert torch.equal(spec.fn(low[0], low[1:], **kwargs),
                       spec.fn(low[0].float(), [x.float() for x in low[1:]], **kwargs))


@pytest.mark.parametrize("method,threads", [("della", 2), ("dare_ties", 1)])
def test_della_keeps_the_threads_it_shares_its_blocks_among(tmp_path, llama, method, threads):
    """DELLA's per-row sorts are compute-bound and it splits its blocks among the intra-op
    threads itself; the engine runs other chunkable methods' cache-sized work on one thread.
    (DELLA's l1 pass made it chunkable, which had cost it its second thread: 54 → 75 s at 1B.)"""
    from mergesmith.engine.run import merge_threads

    the_plan = mergesmith.plan(write_recipe(tmp_path / "r.yaml", sparse_recipe(llama, method)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with merge_threads(the_plan, torch.device("cpu")):
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
