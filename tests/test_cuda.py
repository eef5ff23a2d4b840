"""The CUDA path against the CPU path, for every data-free method (skipped without a GPU).

The selections (TIES' and breadcrumbs' streamed cuts, DELLA's ranks) must pick the same
entries on both devices, and the random methods draw the same masks (their streams are made on
the CPU), so any difference beyond float rounding is a bug. Merged in small chunks too, so the
streamed cut passes run on the device.
"""

from __future__ import annotations

import pytest
import torch
from conftest import read_tensors, write_recipe

import mergesmith
from mergesmith.errors import MergesmithError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RECIPES = {
    "task_arithmetic": {"lambda": 0.8},
    "ties": {"density": 0.3},
    "breadcrumbs": {"density": 0.4, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.4, "gamma": 0.05},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "della": {"density": 0.5, "epsilon": 0.1},
    "consensus_ties": {},
    "magmax": {},
    "model_stock": {},
    "sce": {},
    "slerp": {"t": 0.3},
    "multislerp": {},
    "karcher": {},
    "pcb": {},
    "widen": {},
    "emr": {},
    "tsv_m": {},
    "iso_c": {},
    "iso_cts": {},
}


def recipe(models, method: str, params: dict, **extra) -> dict:
    experts = ["e1"] if method == "slerp" else ["e1", "e2"]
    entries = [{"model": str(models[e]), "parameters": {"weight": 0.6}} for e in experts]
    return {"merge_method": method, "base_model": str(models["base"]), "models": entries,
            "parameters": params, **extra}


@pytest.mark.parametrize("chunk", ["8MiB", 1024])
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_cuda_merge_equals_cpu_merge(tmp_path, zoo, method, chunk):
    models = zoo("llama")
    path = write_recipe(tmp_path / "r.yaml", recipe(models, method, RECIPES[method]))
    cpu = read_tensors(mergesmith.merge(path, tmp_path / "cpu", chunk_size=chunk))
    gpu = read_tensors(mergesmith.merge(path, tmp_path / "gpu", chunk_size=chunk, device="cuda"))
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        # SVDs and eigendecompositions differ by more than rounding between LAPACK and cuSOLVER
        tolerance = 1e-4 if method in ("tsv_m", "iso_c", "iso_cts") else 1e-5
        torch.testing.assert_close(gpu[name], cpu[name], rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_cuda_streamed_cuts_equal_the_whole_tensor_cut(tmp_path, zoo, method, dtype):
    """The two-pass radix select on the GPU finds the CPU's thresholds exactly."""
    models = zoo("llama")
    path = write_recipe(tmp_path / "r.yaml", recipe(models, method, RECIPES[method], dtype=dtype))
    whole = read_tensors(mergesmith.merge(path, tmp_path / "whole", device="cuda"))
    chunked = read_tensors(mergesmith.merge(path, tmp_path / "chunked", chunk_size=512, device="cuda"))
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name


def test_cuda_refuses_float16_overflow(tmp_path, zoo):
    models = zoo("llama")
    spec = recipe(models, "task_arithmetic", {"lambda": 1e6}, out_dtype="float16")
    with pytest.raises(MergesmithError, match="float16"):
        mergesmith.merge(write_recipe(tmp_path / "r.yaml", spec), tmp_path / "out", device="cuda")


# --------------------------------------------------------------------------------------------
# --compat mergekit on the GPU against mergekit 0.1.5 on the CPU

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# (case of test_compat_mergekit.CASES, recipe dtype); float16 recipes also set out_dtype
COMPAT_CASES = [("task_arithmetic", "bfloat16"), ("ties", "bfloat16"), ("ties", "float32"),
                ("breadcrumbs", "bfloat16"), ("dare_ties-density-1", "bfloat16"),
                ("model_stock", "bfloat16"), ("nuslerp", "float32"), ("linear", "float16"),
                ("ties", "float16"), ("model_stock", "float16")]


@pytest.fixture(scope="module")
def stored_as(tmp_path_factory):
    """dtype -> {"base", "e1", "e2", "e3"}: tiny Llamas stored in that dtype, built on first use."""
    from conftest import build_model

    built: dict[str, dict[str, str]] = {}

    def get(dtype: str) -> dict[str, str]:
        if dtype not in built:
            root = tmp_path_factory.mktemp(f"stored-{dtype}")
            base = build_model(root / "base", "llama", seed=0, dtype=DTYPES[dtype])
            built[dtype] = {"base": str(base)}
            for key, seed in (("e1", 1), ("e2", 2), ("e3", 3)):
                built[dtype][key] = str(build_model(root / key, "llama", seed=seed, base=base,
                                                    dtype=DTYPES[dtype]))
        return built[dtype]

    return get


def compat_against_mergekit(tmp_path, models: dict, case: str, dtype: str, device: str) -> None:
    """The case merged by mergekit (CPU) and by mergesmith under compat on `device`: within one
    rounding of the output dtype, same names, shapes, dtypes and config."""
    pytest.importorskip("mergekit")
    from test_compat_mergekit import case_recipe
    from test_parity import compare, run_mergekit

    spec = case_recipe(case, models, dtype)
    if dtype == "float16":
        spec["out_dtype"] = "float16"
    path = write_recipe(tmp_path / "r.yaml", spec)
    theirs = run_mergekit(path, tmp_path / "mergekit")
    ours = mergesmith.merge(path, tmp_path / device, compat="mergekit", device=device)
    compare(theirs, ours, max_ulps=1, dtype=DTYPES[dtype])


@pytest.mark.parametrize("case, dtype", COMPAT_CASES)
def test_cuda_compat_merge_is_within_one_rounding_of_mergekit_on_cpu(tmp_path, stored_as, case,
                                                                      dtype):
    compat_against_mergekit(tmp_path, stored_as(dtype), case, dtype, "cuda")


@pytest.mark.parametrize("case, dtype", COMPAT_CASES)
def test_cuda_compat_merge_is_within_one_rounding_of_the_cpu_compat_merge(tmp_path, stored_as, case,
                                                                          dtype):
    """For GPU machines without mergekit: the CPU compat merge is mergekit's bytes
    (test_compat_mergekit.py), and the CUDA one is within one rounding of it."""
    from test_compat_mergekit import case_recipe
    from test_parity import compare

    spec = case_recipe(case, stored_as(dtype), dtype)
    if dtype == "float16":
        spec["out_dtype"] = "float16"
    path = write_recipe(tmp_path / "r.yaml", spec)
    cpu = mergesmith.merge(path, tmp_path / "cpu", compat="mergekit", device="cpu")
    cuda = mergesmith.merge(path, tmp_path / "cuda", compat="mergekit", device="cuda")
    compare(cpu, cuda, max_ulps=1, dtype=DTYPES[dtype])
