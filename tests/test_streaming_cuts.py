"""TIES' and breadcrumbs' magnitude cuts, streamed: an exact radix select (methods/kth.py) over
chunks gives the thresholds a selection over the whole tensor gives, so the same bytes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_model, read_tensors
from safetensors.torch import load_file, save_file

from mergesmith.engine.api import merge, plan
from mergesmith.engine.run import units
from mergesmith.methods import kth, magnitude_trim, sparse
from mergesmith.methods.blocks import kth_largest, topk_count

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def awkward_magnitudes(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values with many exact duplicates (every cut falls on a tie), zeros of both signs and
    subnormals of `dtype`."""
    g = torch.Generator().manual_seed(seed)
    tiny = torch.finfo(dtype).smallest_normal
    levels = torch.tensor([0.0, -0.0, tiny / 4, tiny / 2, 2.0**-10, 3 * 2.0**-10, 2.0**-8, 1.5])
    values = levels[torch.randint(len(levels), (n,), generator=g)]
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    spread = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.2)
    return (values * sign + spread * 1e-3).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_select_equals_kthvalue_over_any_chunks(dtype):
    x = awkward_magnitudes(6007, dtype, seed=3)
    magnitudes = x.float().abs()
    n = magnitudes.numel()
    ks = [1, 2, 7, n // 10, n // 3, n // 2, n - 1000, n - 1, n]
    expected = [float(torch.kthvalue(magnitudes, n - k + 1).values) for k in ks]
    assert kth.kth_largest_magnitudes(x, ks) == expected
    for size in (7, 331, 4096):
        assert kth.kth_largest_magnitudes(list(x.split(size)), ks) == expected, size
    assert kth_largest(magnitudes.clone(), ks) == expected  # the whole-tensor selection


def test_radix_select_orders_zeros_subnormals_and_infinity():
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([-0.0, 0.0, tiny / 8, -tiny / 8, tiny, -math.inf, 1.0, -1.0])
    assert kth.kth_largest_magnitudes(list(x.split(3)), [1, 2, 3, 4, 5, 6, 7, 8]) == \
        [math.inf, 1.0, 1.0, tiny, tiny / 8, tiny / 8, 0.0, 0.0]
    # −0 is a magnitude of 0, never a NaN bit pattern or a huge integer
    assert kth.magnitude_bits(torch.tensor([-0.0])).item() == 0


def whole_tensor_reference(method: str, base: torch.Tensor, experts: list[torch.Tensor],
                           densities: list[float], gammas: list[float],
                           weights: list[float]) -> torch.Tensor:
    """The merge as before streaming: each τi's thresholds by a selection over the whole |τi|
    (blocks.kth_largest, introselect), then the block-by-block merge."""
    n = base.numel()
    cuts = []
    for expert, density, gamma in zip(experts, densities, gammas):
        keep = topk_count(n, density)
        skip = min(int(gamma * n), n - keep)
        if keep in (0, n):
            cuts.append(magnitude_trim.keep_band(math.inf if keep == 0 else 0.0, math.inf))
            continue
        scratch = (expert.float() - base.float()).abs()
        low, *high = kth_largest(scratch, [skip + keep] + ([skip + 1] if skip else []))
        cuts.append(magnitude_trim.keep_band(low, high[0] if high else math.inf))
    consensus, normalize = {"ties": (True, True), "breadcrumbs": (False, False),
                            "breadcrumbs_ties": (True, False)}[method]
    return sparse.merge_sparse(base, experts, cuts, weights=weights, consensus=consensus,
                               normalize=normalize, lambda_=1.0)


@pytest.fixture(scope="module")
def awkward_models(tmp_path_factory):
    """awkward_models(dtype) -> [base, e1, e2, e3] folders whose task vectors are made of
    duplicates, ±0 and subnormals, stored in `dtype`."""
    built = {}

    def get(dtype: torch.dtype):
        if dtype not in built:
            root = tmp_path_factory.mktemp(f"awkward-{str(dtype)[6:]}")
            base = build_model(root / "base", "llama", seed=0, dtype=dtype)
            folders = [base] + [build_model(root / f"e{i}", "llama", seed=i, base=base, dtype=dtype)
                                for i in (1, 2, 3)]
            for i, folder in enumerate(folders[1:], 1):
                (file,) = folder.glob("*.safetensors")
                base_tensors = load_file(next(base.glob("*.safetensors")))
                tensors = {name: (base_tensors[name].float() + awkward_magnitudes(
                    t.numel(), dtype, seed=10 * i + k).float().view(t.shape)).to(dtype)
                    if t.is_floating_point() else t
                    for k, (name, t) in enumerate(load_file(file).items())}
                save_file(tensors, file, metadata={"format": "pt"})
            built[dtype] = folders
        return built[dtype]

    return get


CASES = [("ties", {}), ("breadcrumbs", {"gamma": 0.05}), ("breadcrumbs_ties", {"gamma": 0.2})]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,extra", CASES)
def test_streamed_cuts_give_the_whole_tensor_bytes(tmp_path, awkward_models, dtype, method, extra):
    base, *experts = awkward_models(dtype)
    densities, weights = [0.3, 1.0, 0.55], [1.0, 0.5, 0.7]
    recipe = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(e), "parameters": {"weight": w, "density": d, **extra}}
                         for e, w, d in zip(experts, weights, densities)]}
    if dtype == torch.bfloat16:  # a float32 recipe over bf16 models, as published ones say
        recipe["dtype"] = "float32"
    the_plan = plan(recipe)
    streamed = [job for job in the_plan.jobs if len(units(the_plan, job, 1024)) > 4]
    assert streamed  # two counting passes and the merge, in several chunks each
    got = read_tensors(merge(recipe, tmp_path / "out", chunk_size=1024))
    inputs = [load_file(next(folder.glob("*.safetensors"))) for folder in (base, *experts)]
    gammas = [extra.get("gamma", 0.0)] * 3
    for job in the_plan.jobs:
        name = job.out.name
        ins = [tensors[name] for tensors in inputs]
        expected = whole_tensor_reference(method, ins[0], ins[1:], densities, gammas, weights)
        assert torch.equal(got[name], expected.to(got[name].dtype)), (method, name)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_consensus_ties_streams_its_trims_with_the_same_bytes(tmp_path, awkward_models, dtype):
    from mergesmith.methods.blocks import disjoint_mean, elect_sign, keep_topk
    from mergesmith.methods.consensus import consensus_merge

    base, *experts = awkward_models(dtype)
    densities, weights, lambdas = [0.3, 1.0, 0.55], [1.0, 0.5, 0.7], [0.4, 0.6, 0.5]
    recipe = {"merge_method": "consensus_ties", "base_model": str(base),
              "models": [{"model": str(e), "parameters": {"weight": w, "density": d,
                                                          "tall_mask_lambda": lam}}
                         for e, w, d, lam in zip(experts, weights, densities, lambdas)]}
    the_plan = plan(recipe)
    assert any(len(units(the_plan, job, 1024)) > 4 for job in the_plan.jobs)
    got = read_tensors(merge(recipe, tmp_path / "out", chunk_size=1024))
    inputs = [load_file(next(folder.glob("*.safetensors"))) for folder in (base, *experts)]
    for job in the_plan.jobs:
        name = job.out.name
        theta0, *thetas = [tensors[name].float() for tensors in inputs]
        taus = [theta - theta0 for theta in thetas]
        trimmed = [keep_topk(tau, d) for tau, d in zip(taus, densities)]  # whole-tensor cuts
        multi_task = disjoint_mean(trimmed, elect_sign(trimmed, weights), weights, True)
        expected = consensus_merge(theta0, taus, multi_task, tall_mask_lambdas=lambdas, k=2,
                                   lambda_=1.0)
        assert torch.equal(got[name], expected.to(got[name].dtype)), name
