"""SCE, Arcee Fusion and TIES'/breadcrumbs' L1 rescale, streamed: their whole-tensor statistics
(a variance's top-k threshold, quartiles, energies and L1 norms) come from passes over chunks
(a radix select over fp32 keys, exact sums), and the merge gives the bytes of the whole-tensor
definitions they had before (selections by kthvalue/introselect, float64 sums)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import read_tensors
from safetensors.torch import load_file
from test_streaming_cuts import awkward_magnitudes, awkward_models  # noqa: F401 (a fixture)

from mergesmith.engine.api import merge, plan
from mergesmith.engine.run import units
from mergesmith.methods import kth, magnitude_trim, sparse
from mergesmith.methods.blocks import disjoint_mean, elect_sign, kth_largest, topk_count
from mergesmith.methods.fusion import row_kl
from mergesmith.methods.sce_merging import energy_weights, finish_sce, variance
from mergesmith.methods.magnitude_trim import (
    band_passes, band_sums, finish_bands, keep_band, magnitude_cuts,
)
from mergesmith.methods.sparse import l1_scales
from mergesmith.methods.streamed import exact_total, exponent_sums, reduce_in_parts

CHUNK = 1024  # bytes: a few rows of the toy models per chunk, so every tensor streams


def test_signed_select_equals_kthvalue_over_any_chunks():
    x = awkward_magnitudes(6007, torch.bfloat16, seed=5).float() * 1e3
    x[:6] = torch.tensor([-math.inf, math.inf, -0.0, 0.0, -1e-45, 1e-45])
    n = x.numel()
    ks = [1, 2, 3, n // 4 + 1, n // 2 + 1, 3 * n // 4 + 1, n - 1, n]
    expected = [float(torch.kthvalue(x, k).values) for k in ks]
    for chunks in (x, list(x.split(97)), list(x.split(1000))):
        got = kth.kth_smallest_values(chunks, ks)
        assert got == expected
        # −0 and +0 are one value, as for kthvalue: the same bits once canonical
        assert [v + 0.0 for v in got] == [v + 0.0 for v in expected]


def test_exact_sums_are_correctly_rounded_whatever_the_chunks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20011, generator=g) * torch.exp(torch.randn(20011, generator=g) * 10)
    x[:6] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38])
    exact = float(sum(Fraction(abs(v)) for v in x.double().tolist()))  # Σ|x|, then rounded
    assert exact_total(exponent_sums(x)) == exact
    assert exact_total(sum(exponent_sums(c) for c in x.split(613))) == exact


@pytest.mark.parametrize("experts", (2, 3, 5))
def test_sce_variance_is_torch_var_bit_for_bit(experts):
    g = torch.Generator().manual_seed(experts)
    tvs = [awkward_magnitudes(50_000, torch.float32, seed=experts * 10 + i)
           * torch.exp(torch.randn(50_000, generator=g) * 8) for i in range(experts)]
    for tv in tvs[1:]:
        tv[:500] = tvs[0][:500]  # variance 0 where all agree
    expected = torch.var(torch.stack(tvs), dim=0, unbiased=False)
    assert torch.equal(variance(tvs), expected)


def test_sce_counts_its_top_k_as_the_whole_tensor_did():
    """k = int(torch.count_nonzero(variance) * d) is an fp32 product: for 47485069 varying
    entries and d = 0.1, 4748507 (a float64 product gives 4748506)."""
    sums = torch.zeros(kth.HIGH_BINS + 1, dtype=torch.int64)
    sums[12345], sums[-1] = 47485069 + 100, 100  # 100 entries that do not vary
    assert finish_sce(None, sums, select_topk=0.1).k == 4748507 != int(47485069 * 0.1)


def run(recipe: dict, out, passes: int) -> tuple[dict, list]:
    """The merged tensors, chunk by chunk; checks that every matrix streamed, with its passes."""
    the_plan = plan(recipe)
    for job in the_plan.jobs:
        if len(job.out.shape) == 2:
            assert the_plan.method.reduce_passes(job.params) == passes
            assert len(units(the_plan, job, CHUNK)) >= 2 * (passes + 1), job.out.name
    return read_tensors(merge(recipe, out, chunk_size=CHUNK)), the_plan.jobs


def inputs_of(folders) -> list[dict[str, torch.Tensor]]:
    return [load_file(next(folder.glob("*.safetensors"))) for folder in folders]


def sce_whole_tensor(base: torch.Tensor, experts: list[torch.Tensor], density: float):
    """SCE as it was defined on the whole tensor: the k-th largest variance by introselect,
    the energies by torch's float64 sum of the fp32 τ̂i²."""
    tvs = [e.float() - base.float() for e in experts]
    if density < 1:
        variance = torch.var(torch.stack(tvs), dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * density)
        keep = (variance >= kth_largest(variance.clone(), [k])[0] if k
                else torch.zeros_like(variance, dtype=torch.bool))
        tvs = [tv.mul_(keep) for tv in tvs]
    weights = energy_weights([float((tv * tv).double().sum()) for tv in tvs])
    return disjoint_mean(tvs, elect_sign(tvs), weights).add_(base.float())


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("density", (0.3, 1.0))
def test_sce_streams_with_the_whole_tensor_bytes(tmp_path, awkward_models, dtype, density):
    folders = awkward_models(dtype)  # duplicates: the variance has ties at its threshold
    recipe = {"merge_method": "sce", "base_model": str(folders[0]),
              "models": [{"model": str(e)} for e in folders[1:]],
              "parameters": {"select_topk": density}}
    got, jobs = run(recipe, tmp_path / "out", 3 if density < 1 else 1)
    inputs = inputs_of(folders)
    for job in jobs:
        name = job.out.name
        base, *experts = [tensors[name] for tensors in inputs]
        expected = sce_whole_tensor(base, experts, density)
        assert torch.equal(got[name], expected.to(got[name].dtype)), name


def arcee_whole_tensor(base: torch.Tensor, other: torch.Tensor, dtype: torch.dtype | None):
    """Arcee Fusion as it was defined on the whole tensor: quartiles by torch.kthvalue."""
    theta0 = base.float() if dtype is None else base.float().to(dtype)
    theta1 = other.float() if dtype is None else other.float().to(dtype)
    tau = theta1 - theta0
    scores = tau.abs() * row_kl(theta1, theta0)
    flat = scores.flatten()
    q1, median, q3 = [torch.kthvalue(flat, int(q * (flat.numel() - 1)) + 1).values
                      for q in (0.25, 0.5, 0.75)]
    return base.float() + tau.float() * (scores >= median + 1.5 * (q3 - q1))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("compat", (False, True))
def test_arcee_fusion_streams_by_rows_with_the_whole_tensor_bytes(tmp_path, awkward_models,
                                                                  dtype, compat):
    base, other = awkward_models(dtype)[:2]
    recipe = {"merge_method": "arcee_fusion", "base_model": str(base),
              "models": [{"model": str(other)}], "dtype": str(dtype)[6:]}
    if compat:  # the importance and its quartiles in the recipe's dtype
        recipe["compat"] = "mergekit"
    got, jobs = run(recipe, tmp_path / "out", 2)
    inputs = inputs_of((base, other))
    for job in jobs:
        name = job.out.name
        expected = arcee_whole_tensor(inputs[0][name], inputs[1][name], dtype if compat else None)
        assert torch.equal(got[name], expected.to(got[name].dtype)), name


def l1_whole_tensor(method: str, base: torch.Tensor, experts: list[torch.Tensor],
                    densities: list[float], gamma: float, weights: list[float]):
    """TIES and breadcrumbs with mergekit's L1 rescale as they were defined on the whole tensor:
    the cuts by introselect, ||τi||₁ / ||cut(τi)||₁ from float64 sums."""
    n = base.numel()
    cuts, scales = [], []
    for expert, density in zip(experts, densities):
        tau = expert.float() - base.float()
        keep = topk_count(n, density)
        skip = min(int(gamma * n), n - keep)
        low, *high = kth_largest(tau.abs(), [skip + keep] + ([skip + 1] if skip else []))
        cut = magnitude_trim.keep_band(low, high[0] if high else math.inf)
        before, after = float(tau.abs().double().sum()), float(cut(tau, 0).abs().double().sum())
        cuts.append(cut)
        scales.append(before / after)
    consensus, normalize = {"ties": (True, True), "breadcrumbs": (False, False)}[method]
    return sparse.merge_sparse(base, experts, cuts, weights=weights, consensus=consensus,
                               normalize=normalize, lambda_=1.0, l1=True, scales=scales)


@pytest.mark.parametrize("method,gamma", [("ties", 0.0), ("breadcrumbs", 0.05)])
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_l1_rescale_streams_with_the_whole_tensor_bytes(tmp_path, awkward_models, method,
                                                        gamma, dtype):
    """`rescale: true` (mergekit's L1 rescale for TIES and breadcrumbs), as published recipes
    say: the L1 norms' exact sums taken in the cuts' own two passes."""
    base, *experts = awkward_models(dtype)
    densities, weights = [0.3, 0.5, 0.55], [1.0, 0.5, 0.7]
    extra = {"gamma": gamma} if method == "breadcrumbs" else {}
    recipe = {"merge_method": method, "base_model": str(base), "dtype": "float32",
              "parameters": {"rescale": True},
              "models": [{"model": str(e), "parameters": {"weight": w, "density": d, **extra}}
                         for e, w, d in zip(experts, weights, densities)]}
    got, jobs = run(recipe, tmp_path / "out", 2)
    inputs = inputs_of((base, *experts))
    for job in jobs:
        name = job.out.name
        ins = [tensors[name] for tensors in inputs]
        expected = l1_whole_tensor(method, ins[0], ins[1:], densities, gamma, weights)
        assert torch.equal(got[name], expected.to(got[name].dtype)), name


@pytest.mark.parametrize("densities,gamma", [
    ([0.3, 1.0, 0.0], 0.0),  # one τi kept whole, one dropped whole: no cut bins
    ([0.3, 0.4, 0.2], 0.1),  # a band whose two cuts fall in one high bin
    ([0.6, 0.5, 0.3], 0.25),
])
def test_l1_scales_from_the_cut_passes_equal_the_whole_tensor_ones(densities, gamma):
    """The kept entries' L1 sums rebuilt from the cut bins' histograms and the sums between
    them (two passes over chunks) equal the sums over the kept entries of the whole tensor."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(96, 64, generator=g)
    # |τ| in [1, 1 + 2^-8): every entry in one or two high bins, so both cuts may share one
    experts = [base + (1 + torch.rand(96, 64, generator=g) / 256) * torch.randn(96, 64, generator=g).sign()
               for _ in range(3)]
    experts[2] = base + torch.randn(96, 64, generator=g) * torch.exp(torch.randn(96, 64, generator=g) * 4)
    params = {"densities": densities, "gammas": [gamma] * 3, "rescale": True}
    parts = [(base[r:r + 17], [e[r:r + 17] for e in experts]) for r in range(0, 96, 17)]
    streamed = reduce_in_parts(band_sums, finish_bands, band_passes(params), parts, **params)
    bands = magnitude_cuts(base, experts, densities, [gamma] * 3, unbiased=False)
    assert streamed.scales == l1_scales(base, experts, bands)
    whole = [keep_band(lo, hi) for lo, hi in streamed.bands]
    for i in range(3):
        tau = experts[i] - base
        assert torch.equal(whole[i](tau.clone(), 0), bands[i](tau.clone(), 0))


GPU_CASES = {
    "sce": {"parameters": {"select_topk": 0.3}},
    "arcee_fusion": {},
    "arcee_fusion-compat": {"compat": "mergekit", "dtype": "bfloat16"},
    "ties-l1": {"parameters": {"rescale": True, "density": 0.3}},
    "breadcrumbs-l1": {"parameters": {"rescale": True, "density": 0.4, "gamma": 0.05}},
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_cuda_streamed_statistics_equal_the_whole_tensor_ones(tmp_path, awkward_models, case):
    """On the GPU too, the passes over chunks find the whole tensor's statistics: the same
    bytes merged in chunks as merged whole."""
    base, *experts = awkward_models(torch.bfloat16)
    method = case.split("-")[0]
    experts = experts[:1] if method == "arcee_fusion" else experts
    recipe = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(e)} for e in experts], **GPU_CASES[case]}
    if method in ("ties", "breadcrumbs"):
        recipe["parameters"]["weight"] = 0.6
    whole = read_tensors(merge(recipe, tmp_path / "whole", device="cuda"))
    chunked = read_tensors(merge(recipe, tmp_path / "chunked", chunk_size=CHUNK, device="cuda"))
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name
