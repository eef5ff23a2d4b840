"""PCB, WIDEN, stitch, Multi-SLERP and the Karcher mean, streamed: reduce passes over chunks of
rows (and flat tiles within them) give the statistics a whole tensor gives, so the engine's
output is, byte for byte, the method's function applied to whole tensors. PCB's and stitch's
order statistics are exact (radix select), so those bytes are also the ones before streaming."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, read_tensors
from safetensors.torch import load_file, save_file

from mergesmith.engine import run
from mergesmith.engine.api import merge, plan
from mergesmith.engine.run import units
from mergesmith.methods.blocks import keep_topk_mask
from mergesmith.methods.registry import get_method
from mergesmith.methods.spherical import karcher_rounded, multislerp_rounded

WEIGHTS = [1.0, 0.5, 0.7]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """[base, e1, e2, e3] in bf16. e1 leaves the base's first 3 columns (first 5 rows of the
    token embedding) and every other entry of the norms untouched, e2 a quarter of the entries
    at random: exact zeros in τ, so that order statistics and ranks fall on ties."""
    root = tmp_path_factory.mktemp("streaming-methods")
    base = build_model(root / "base", "llama", seed=0, layers=1, dtype=torch.bfloat16)
    folders = [base] + [build_model(root / f"e{i}", "llama", seed=i, base=base, layers=1,
                                    dtype=torch.bfloat16) for i in (1, 2, 3)]
    theta0 = load_file(next(base.glob("*.safetensors")))
    g = torch.Generator().manual_seed(7)
    for i, folder in ((1, folders[1]), (2, folders[2])):
        (file,) = folder.glob("*.safetensors")
        tensors = load_file(file)
        for name, t in tensors.items():
            if i == 1 and "embed_tokens" in name:
                t[:5] = theta0[name][:5]
            elif i == 1 and t.dim() == 2:
                t[:, :3] = theta0[name][:, :3]
            elif i == 1:
                t[::2] = theta0[name][::2]
            else:
                keep = torch.rand(t.shape, generator=g) < 0.25
                t[keep] = theta0[name][keep]
        save_file(tensors, file, metadata={"format": "pt"})
    return folders


def recipe_for(method: str, folders, **params) -> dict:
    base, *experts = folders
    entries = [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, WEIGHTS)]
    recipe = {"merge_method": method, "models": entries, "parameters": params}
    if method != "karcher":
        recipe["base_model"] = str(base)
    return recipe


CASES = [
    ("pcb", {"density": 0.3}),
    ("widen", {"above_average_value_ratio": 1.1, "score_calibration_value": 0.9}),
    ("stitch", {"density": 0.2}),
    ("multislerp", {}),
    ("karcher", {"max_iter": 20, "tol": 1e-7}),
]


def whole_tensor_outputs(the_plan, folders) -> dict[str, torch.Tensor]:
    """The method's function on each whole tensor (fp32), with the plan's parameters."""
    inputs = [load_file(next(folder.glob("*.safetensors"))) for folder in folders]
    spec, out = the_plan.method, {}
    for job in the_plan.jobs:
        xs = [tensors[job.out.name].float() for tensors in inputs]
        base, experts = (xs[0], xs[1:]) if spec.uses_base else (None, xs[1:])
        out[job.out.name] = spec.fn(base, experts, ctx=job.ctx, **job.params)
    return out


@pytest.mark.parametrize("chunk", [2048, 1 << 30], ids=["row-chunks", "whole-units"])
@pytest.mark.parametrize("method,params", CASES)
def test_streamed_merge_gives_the_whole_tensor_bytes(tmp_path, models, monkeypatch, method,
                                                     params, chunk):
    # tiles of 200 entries cut rows: in a chunk of rows, and in a whole tensor merged in one unit
    monkeypatch.setattr(run, "CPU_TILE", 200)
    recipe = recipe_for(method, models, **params)
    the_plan = plan(recipe)
    matrices = [job for job in the_plan.jobs if len(job.out.shape) == 2]
    assert all(the_plan.streams(job) for job in matrices)
    if chunk == 2048:  # the larger matrices in several chunks of rows, after the reduce passes
        large = [job for job in matrices if job.out.nbytes > 2 * chunk]
        assert large and all(len(units(the_plan, job, chunk)) > 3 for job in large)
    got = read_tensors(merge(recipe, tmp_path / "out", chunk_size=chunk))
    for name, expected in whole_tensor_outputs(the_plan, models).items():
        assert torch.equal(got[name], expected.to(got[name].dtype)), (method, name)


def test_every_matrix_streams_in_bounded_units(models):
    """No matrix is held whole: the plan's peak is that of a chunk, not of the largest tensor."""
    for method, params in CASES:
        the_plan = plan(recipe_for(method, models, **params))
        assert the_plan.method.reduce is not None, method
        biggest = max(the_plan.jobs, key=lambda job: job.out.nbytes)
        assert the_plan.peak_memory(1024) < the_plan.peak_memory(biggest.out.nbytes * 4), method


# ------------------------------------------------------------------ the bytes before streaming

def clip(values: torch.Tensor, low_k: int, high_k: int) -> torch.Tensor:
    low = torch.kthvalue(values, low_k, dim=1, keepdim=True).values
    high = torch.kthvalue(values, high_k, dim=1, keepdim=True).values
    return torch.maximum(torch.minimum(values, high), low)


def norm(x: torch.Tensor) -> torch.Tensor:
    low = x.amin(dim=1, keepdim=True)
    return (x - low) / (x.amax(dim=1, keepdim=True) - low).clamp_min(torch.finfo(x.dtype).tiny)


def pcb_by_sorting(base, experts, weights, density):
    """PCB as it was before streaming: torch.kthvalue over each whole task vector, min and max
    by amin/amax (the authors' code sorts)."""
    taus = torch.stack([x - base for x in experts]).reshape(len(experts), -1)
    tasks, d = taus.shape
    magnitudes = clip(taus.abs(), int(d * 1e-4) + 1, int(d * (1 - 1e-4) - 1) + 1)
    balance = torch.exp(tasks * norm(magnitudes) ** 2) * torch.tanh(taus * taus.sum(dim=0))
    cut = torch.kthvalue(balance, min(int(d * (1 - density)) + 1, d), dim=1, keepdim=True).values
    kept = norm(torch.maximum(balance, cut))
    clipped = taus.sign_().mul_(magnitudes) * torch.tensor(weights)[:, None]
    merged = (clipped * kept).sum(dim=0) / kept.sum(dim=0).clamp_min(1e-12)
    return merged.view_as(base).add_(base)


def stitch_by_selection(base, experts, weights, density, overlap):
    """Stitch's dataless masks as before streaming: a selection over each whole |τi|."""
    taus = [x - base for x in experts]
    masks = [keep_topk_mask(tau, density).float() for tau in taus]
    claims = sum(masks).clamp(min=1) if overlap == "average" else 1
    merged = base.clone()
    for tau, mask, w in zip(taus, masks, weights):
        merged.addcmul_(mask / claims, tau, value=w)
    return merged


def test_pcb_and_stitch_keep_the_bytes_of_a_whole_tensor_selection(tmp_path, models):
    inputs = [load_file(next(folder.glob("*.safetensors"))) for folder in models]
    for method, params in CASES:
        if method not in ("pcb", "stitch"):
            continue
        got = read_tensors(merge(recipe_for(method, models, **params), tmp_path / method,
                                 chunk_size=2048))
        for name, out in got.items():
            base, *experts = [tensors[name].float() for tensors in inputs]
            if method == "pcb":
                expected = pcb_by_sorting(base, experts, WEIGHTS, params["density"])
            else:
                expected = stitch_by_selection(base, experts, WEIGHTS, params["density"],
                                               params.get("overlap", "average"))
            assert torch.equal(out, expected.to(out.dtype)), (method, params, name)


# ------------------------------------------------------ float64 sums: the exact ranks and norms

def widen_by_definition(base, experts, by_row):
    """WIDEN's scores from norms and cosines taken over whole float64 columns (rows)."""
    from mergesmith.methods.competition import calibrated_scores, rank_within_model

    if by_row:
        base, experts = base.T, [x.T for x in experts]
    b = base.double()
    magnitude = torch.stack([(x.double().norm(dim=0) - b.norm(dim=0)).abs() for x in experts])
    # √(Σx²·Σb²): a column equal to the base's has cos exactly 1
    cos = torch.stack([(x.double() * b).sum(0) / ((x.double() ** 2).sum(0) * (b * b).sum(0)).sqrt()
                       for x in experts])
    scores = 0.5 * (calibrated_scores(rank_within_model(magnitude), 1.0, 1.0)
                    + calibrated_scores(rank_within_model(1 - cos), 1.0, 1.0))
    return scores[:, :, None] if by_row else scores[:, None, :]


def test_widen_ranks_by_exact_norms_and_cosines(models):
    """Columns the fine-tune left alone are exact ties (|Δm| = 0, 1 − cos = 0) in every chunking,
    where fp32 sums over the whole column would rank them by their rounding."""
    inputs = [load_file(next(folder.glob("*.safetensors"))) for folder in models]
    widen = get_method("widen")
    the_plan = plan(recipe_for("widen", models))
    for job in the_plan.jobs:
        if len(job.out.shape) != 2:
            continue
        base, *experts = [tensors[job.out.name].float() for tensors in inputs]
        scores = widen_by_definition(base, experts, "embed_tokens" in job.out.name)
        expected = base + sum(score.float() * (x - base) for score, x in zip(scores, experts))
        got = widen.fn(base, experts, ctx=job.ctx, **job.params)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_multislerp_and_karcher_match_a_whole_tensor_fp32_evaluation(models):
    """Within the fp32 rounding of a sum's order: mergekit's whole-tensor formulas in fp32
    (Karcher with equal weights, which is what mergekit computes)."""
    inputs = [load_file(next(folder.glob("*.safetensors"))) for folder in models]
    multislerp, karcher = get_method("multislerp"), get_method("karcher")
    for name in inputs[0]:
        base, *experts = [tensors[name].float() for tensors in inputs]
        got = multislerp.fn(base, experts, weights=WEIGHTS)
        expected = multislerp_rounded(base, experts, WEIGHTS, True, 1e-8, torch.float32)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        got = karcher.fn(None, experts, weights=[1.0] * 3, max_iter=50, tol=1e-7)
        torch.testing.assert_close(got, karcher_rounded(experts, 50, 1e-7), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,params", CASES)
def test_streamed_passes_on_the_gpu_give_the_cpu_merge(tmp_path, models, method, params):
    recipe = {**recipe_for(method, models, **params), "out_dtype": "float32"}
    cpu = read_tensors(merge(recipe, tmp_path / "cpu", chunk_size=2048))
    gpu = read_tensors(merge(recipe, tmp_path / "gpu", chunk_size=2048, device="cuda"))
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-5, msg=name)
