"""Numerics every method meets: 0-dim and 1-D tensors, NaN/Inf inputs, float16 overflow, and the
flat spectrum of Iso-C / Iso-CTS on rank-deficient sums."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import read_tensors, run_cli, write_recipe
from mergesmith.engine.run import Unit, merge_unit
from mergesmith.errors import MethodError
from mergesmith.io.writer import OutTensor
from mergesmith.methods import iso_c, iso_cts
from mergesmith.methods.registry import REQUIRED, TensorContext, all_methods

CPU = torch.device("cpu")


def arguments(spec, experts: int) -> dict:
    """The method's keyword arguments at its defaults (required ones: t = 0.5, others 1)."""
    if spec.learn is not None:  # the per-tensor merge of a learned method takes learned weights
        return {"weights": [0.5] * experts}
    args = {}
    for p in spec.params:
        value = p.default if p.default is not REQUIRED else (0.5 if p.name == "t" else 1.0)
        args[p.argname] = [value] * experts if p.per_model else value
    return args


def expert_count(spec) -> int:
    return 1 if spec.max_models == 1 else 2


def statistics(spec, shape, experts: int) -> dict:
    """Synthetic statistics shaped like the tensor (a Gram matrix only exists for 2-D weights:
    None, as the engine passes for a tensor without one)."""
    gen = torch.Generator().manual_seed(3)
    found = {}
    for kind in spec.statistics:
        if kind == "gram":
            found[kind] = None
        elif kind == "mask":
            found[kind] = [(torch.rand(shape, generator=gen) > 0.5).float() for _ in range(experts)]
        else:
            found[kind] = [torch.rand(shape, generator=gen) + 0.1 for _ in range(experts)]
    return found


def run_method(spec, base, experts, name="x"):
    args = arguments(spec, len(experts))
    args.update(statistics(spec, base.shape, len(experts)))
    return spec.fn(base if spec.uses_base else None, experts, ctx=TensorContext(name=name), **args)


# ---------------------------------------------------------------- 0-dim and 1-D tensors

# base 1.0, experts 1.5 and 0.75: τ = (0.5, −0.25), weights at their defaults (1, or 0.5 for a
# learned method's weights)
TA = 1.0 + 0.5 - 0.25          # θ0 + Σ τi
MEAN = 1.0 + (0.5 - 0.25) / 2  # θ0 + mean τi; the models' mean
ELECTED = 1.0 + 0.5            # TIES-style sign election keeps the positive τ only
soft = [math.exp(0.5), math.exp(0.25)]
WIDEN = 1.0 + (0.5 * soft[0] - 0.25 * soft[1]) / sum(soft)  # softmax over |τi|, none above its mean
SCALAR = {
    "linear": MEAN, "task_arithmetic": TA, "dare_linear": TA,
    "ties": ELECTED, "dare_ties": ELECTED, "della": ELECTED,
    # SVD methods on tensors that are not matrices: the mean task vector (documented fallback)
    "tsv_m": MEAN, "iso_c": MEAN, "iso_cts": MEAN,
    "pcb": MEAN,  # one entry has no rank in its task: equal weights (documented)
    "widen": WIDEN,
    "multislerp": MEAN,  # antipodal directions on {−1, 1}: two models go linear, as mergekit
    "karcher": MEAN,  # both positive: same point of the sphere, mean norm
    "nuslerp": MEAN,  # parallel: linear, t = 1/2
    "slerp": 1.25,  # base 1 and the first expert 1.5, t = 1/2, parallel: linear
    "magmax": ELECTED,  # the larger |τ|
    "adamerging": MEAN, "expert_merging": MEAN,  # weights 0.5 each
}


# methods of full tensors (adapter methods merge LoRA factors: tests/test_lora_combine.py)
TENSOR_METHODS = [s for s in all_methods() if s.output == "tensor"]


def scalar_inputs(spec):
    base = torch.tensor(1.0)
    return base, [torch.tensor(1.5), torch.tensor(0.75)][:expert_count(spec)]


@pytest.mark.parametrize("spec", TENSOR_METHODS, ids=lambda s: s.name)
def test_every_method_takes_a_0_dim_tensor(spec):
    """CLIP's logit_scale: each method returns a 0-dim result, the same as for the one-entry
    1-D tensor (its own definition on vectors), and the hand-computed value where there is one."""
    base, experts = scalar_inputs(spec)
    got = run_method(spec, base, experts)
    assert got.shape == () and torch.isfinite(got)
    as_vector = run_method(spec, base.reshape(1), [x.reshape(1) for x in experts])
    torch.testing.assert_close(got, as_vector.reshape(()))
    if spec.name in SCALAR:
        torch.testing.assert_close(got, torch.tensor(SCALAR[spec.name]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", TENSOR_METHODS, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", [(7,), (3, 2, 2, 2)], ids=["1d", "conv"])
def test_every_method_takes_vectors_and_conv_kernels(spec, shape):
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(shape, generator=gen)
    count = expert_count(spec)
    experts = [base + 0.1 * torch.randn(shape, generator=gen) for _ in range(count)]
    got = run_method(spec, base, experts)
    assert got.shape == shape and torch.isfinite(got).all()
    if spec.name in ("tsv_m", "iso_c", "iso_cts"):  # not a matrix: the mean task vector
        torch.testing.assert_close(got, base + sum(e - base for e in experts) / len(experts))


def with_logit_scale(zoo_models: dict[str, Path], root: Path, values: dict[str, float]) -> dict:
    """Copies of toy models, each with a 0-dim `logit_scale` added to its safetensors."""
    copies = {}
    for key, folder in zoo_models.items():
        copy = shutil.copytree(folder, root / key)
        (file,) = sorted(Path(copy).glob("*.safetensors"))
        tensors = load_file(file)
        tensors["logit_scale"] = torch.tensor(values[key], dtype=next(iter(tensors.values())).dtype)
        save_file(tensors, file, metadata={"format": "pt"})
        copies[key] = copy
    return copies


@pytest.mark.parametrize("method,params,expected", [
    ("multislerp", {}, MEAN), ("pcb", {"density": 0.5}, MEAN), ("widen", {}, WIDEN),
    ("ties", {"density": 0.5}, ELECTED), ("iso_c", {}, MEAN),
])
def test_cli_merges_a_0_dim_tensor(zoo, tmp_path, monkeypatch, capsys, method, params, expected):
    models = with_logit_scale(zoo("llama"), tmp_path, {"base": 1.0, "e1": 1.5, "e2": 0.75})
    spec = next(s for s in all_methods() if s.name == method)
    weights = {"weight": 1.0} if spec.param("weight") is not None else {}
    recipe = {
        "merge_method": method,
        "models": [{"model": str(models[k]), "parameters": dict(weights)} for k in ("e1", "e2")],
        "parameters": params,
        "dtype": "float32",
    }
    if spec.uses_base:
        recipe["base_model"] = str(models["base"])
    out = tmp_path / "out"
    rc, _, err = run_cli(monkeypatch, capsys, "merge", write_recipe(tmp_path / "r.yaml", recipe), out)
    assert rc == 0, err
    got = read_tensors(out)["logit_scale"]
    assert got.shape == ()
    torch.testing.assert_close(got.float(), torch.tensor(expected), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- NaN/Inf inputs, fp16 overflow

def engine_job(spec, shape, experts: int, load_dtype=None, out_dtype=torch.float32):
    """A one-tensor plan for the engine's merge_unit: base (when the method takes one), the
    experts, then their statistics, as the planner lays them out."""
    labels = (["base"] if spec.uses_base else []) + [f"expert{i}" for i in range(experts)]
    kinds = tuple(k for k in spec.statistics if k != "gram")
    inputs = [(SimpleNamespace(label=label), "w") for label in labels]
    inputs += [(SimpleNamespace(label=f"{label}-{kind}"), "w") for kind in kinds
               for label in labels[-experts:]]
    params = arguments(spec, experts)
    job = SimpleNamespace(out=OutTensor("w", out_dtype, shape), inputs=inputs,
                          has_base=spec.uses_base, params=params, ctx=TensorContext(name="w"),
                          copy=False, vocab_axis=False, lines_scale=None, statistics=kinds)
    plan = SimpleNamespace(method=spec, load_dtype=load_dtype, streams=lambda job: True)
    return plan, job


def engine_inputs(spec, shape, experts: int, poison=None, at=None):
    """The inputs, with `poison` in the last entry of input `at` (default: the first expert)."""
    at = (1 if spec.uses_base else 0) if at is None else at
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=gen)
    models = ([base] if spec.uses_base else []) + [
        base + 0.1 * torch.randn(shape, generator=gen) for _ in range(experts)]
    if poison is not None:
        models[at].view(-1)[-1] = poison
    stats = [t for kind in spec.statistics if kind != "gram"
             for t in statistics(spec, shape, experts)[kind]]
    return models + stats


@pytest.mark.parametrize("spec", TENSOR_METHODS, ids=lambda s: s.name)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_inputs_are_refused_before_any_method_sees_them(spec, poison):
    """The engine's one-line error, naming the tensor and the model, whatever the method
    (before: LinAlgError from eigh in tsv_m / iso_c / iso_cts, finite output from nearswap and
    pcb)."""
    experts = expert_count(spec)
    plan, job = engine_job(spec, (6, 4), experts)
    tensors = engine_inputs(spec, (6, 4), experts, poison)
    with pytest.raises(MethodError) as info:
        merge_unit(plan, Unit(job, None, "merge"), tensors, CPU, None)
    message = str(info.value)
    assert "\n" not in message and "'w'" in message and "of model expert0" in message
    assert "NaN or Inf" in message


def test_nan_in_the_last_tile_of_a_two_pass_merge_is_refused():
    """SLERP in cache-sized tiles: its first pass (the sums) sees the NaN, not only the tile
    that holds it."""
    spec = next(s for s in all_methods() if s.name == "slerp")
    shape = (700, 400)  # > one CPU tile
    plan, job = engine_job(spec, shape, 1)
    tensors = engine_inputs(spec, shape, 1, float("nan"))
    with pytest.raises(MethodError, match="'w' of model expert0 has NaN or Inf"):
        merge_unit(plan, Unit(job, None, "merge"), tensors, CPU, None)


def test_an_input_the_recipes_dtype_overflows_is_named_as_such():
    spec = next(s for s in all_methods() if s.name == "task_arithmetic")
    plan, job = engine_job(spec, (6, 4), 2, load_dtype=torch.float16)
    tensors = engine_inputs(spec, (6, 4), 2, 1e6, at=2)
    with pytest.raises(MethodError, match="'w' of model expert1 overflows the recipe's dtype "
                                          "float16 .max 65504"):
        merge_unit(plan, Unit(job, None, "merge"), tensors, CPU, None)


@pytest.mark.parametrize("size", [(6, 4), (700, 400)], ids=["whole", "tiled"])
def test_float16_output_overflow_is_refused_after_the_cast(size):
    """fp32 merge finite, float16 output inf: refused, naming the tensor, suggesting bfloat16."""
    spec = next(s for s in all_methods() if s.name == "task_arithmetic")
    plan, job = engine_job(spec, size, 2, out_dtype=torch.float16)
    tensors = engine_inputs(spec, size, 2)
    tensors[0].view(-1)[-1] = 50000.0  # base 5e4 + two task vectors of 5e4 each: 1.5e5
    tensors[1].view(-1)[-1] = 100000.0
    tensors[2].view(-1)[-1] = 100000.0
    with pytest.raises(MethodError) as info:
        merge_unit(plan, Unit(job, None, "merge"), tensors, CPU, None)
    message = str(info.value)
    assert "\n" not in message and "'w'" in message
    assert "float16" in message and "65504" in message and "out_dtype: bfloat16" in message
    job.out = OutTensor("w", torch.bfloat16, size)  # the suggestion works
    assert torch.isfinite(merge_unit(plan, Unit(job, None, "merge"), tensors, CPU, None)).all()


def test_cli_float16_overflow_fails_instead_of_writing_inf(zoo, tmp_path, monkeypatch, capsys):
    models = with_logit_scale(zoo("llama"), tmp_path, {"base": 1.0, "e1": 40000.0, "e2": 40000.0})
    recipe = {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
              "models": [{"model": str(models[k]), "parameters": {"weight": 1.0}}
                         for k in ("e1", "e2")],
              "dtype": "float32", "out_dtype": "float16"}
    rc, out, err = run_cli(monkeypatch, capsys, "merge", write_recipe(tmp_path / "r.yaml", recipe),
                           tmp_path / "out")
    assert rc != 0
    assert "logit_scale" in err and "65504" in err and "bfloat16" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- Iso-C / Iso-CTS flat spectrum

def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))[0]


def test_iso_c_averages_all_min_m_n_singular_values_of_a_rank_2_sum():
    """Two rank-1 task vectors on 8×6, τ1 = 3 e1 f1ᵀ, τ2 = 1 e2 f2ᵀ (orthonormal e, f): the sum's
    singular values are 3, 1, 0, 0, 0, 0; the authors' σ̄ is their mean over min(8, 6) = 6,
    2/3, not the mean of the non-zero ones (2). Merged τ = 2/3 (e1 f1ᵀ + e2 f2ᵀ)."""
    e, f = orthonormal(8, 2, 1), orthonormal(6, 2, 2)
    taus = [3 * torch.outer(e[:, 0], f[:, 0]), torch.outer(e[:, 1], f[:, 1])]
    base = torch.zeros(8, 6)
    expected = (2 / 3) * (e @ f.T)
    got = iso_c(base, [t.float() for t in taus])
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(iso_c(base, [t.float() for t in taus], lambda_=1.5).double(),
                               1.5 * expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(iso_cts(base, [t.float() for t in taus]).double(), expected,
                               rtol=0, atol=1e-6)


def test_iso_c_on_a_rank_deficient_sum_is_the_authors_output_on_its_span():
    """The authors' code (U diag(mean S) V over a reduced SVD) also puts σ̄ on the SVD's
    arbitrary null-space pairs; projected onto the sum's column and row spaces it is ours."""
    gen = torch.Generator().manual_seed(4)
    taus = [torch.outer(torch.randn(8, generator=gen), torch.randn(6, generator=gen))
            for _ in range(2)]
    total = sum(t.double() for t in taus)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    authors = u @ torch.diag(torch.ones_like(s) * s.mean()) @ vh
    left, right = u[:, :2] @ u[:, :2].T, vh[:2].T @ vh[:2]
    got = iso_c(torch.zeros(8, 6), taus).double()
    torch.testing.assert_close(got, left @ authors @ right, rtol=0, atol=1e-6)
    torch.testing.assert_close(float(torch.linalg.matrix_norm(got, 2)), float(s.sum() / 6),
                               rtol=1e-6, atol=0)


def test_iso_cts_counts_every_slot_of_the_flat_spectrum():
    """8×6, two tasks, common fraction 0.5: k = 2 common directions and s = 2 per task
    (k + 2s = 6). τ1 = 3 e1 f1ᵀ + 1 e3 f3ᵀ, τ2 = 2 e2 f2ᵀ: common = (3, e1 f1), (2, e2 f2);
    off it, τ1 keeps (1, e3 f3) and τ2 nothing. Kept values 3 + 2 + 1 over 6 slots: σ̄ = 1
    (the mean of the kept ones would be 2)."""
    e, f = orthonormal(8, 3, 5), orthonormal(6, 3, 6)
    outer = [torch.outer(e[:, i], f[:, i]) for i in range(3)]
    taus = [(3 * outer[0] + outer[2]).float(), (2 * outer[1]).float()]
    got = iso_cts(torch.zeros(8, 6), taus, common_space_fraction=0.5).double()
    torch.testing.assert_close(got, sum(outer), rtol=0, atol=1e-6)


def test_nan_in_a_statistic_or_a_stored_dtype_input_is_refused():
    """Statistics (a Fisher) are inputs too; the sparse family sees the stored bf16 tensors."""
    fisher = next(s for s in all_methods() if s.name == "fisher")
    plan, job = engine_job(fisher, (6, 4), 2)
    tensors = engine_inputs(fisher, (6, 4), 2)
    tensors[-1].view(-1)[0] = float("nan")  # the second expert's Fisher
    with pytest.raises(MethodError, match="'w' of model expert1-fisher has NaN or Inf"):
        merge_unit(plan, Unit(job, None, "merge"), tensors, CPU, None)
    ties = next(s for s in all_methods() if s.name == "ties")
    assert ties.stored_dtype_inputs
    plan, job = engine_job(ties, (6, 4), 2)
    tensors = [t.bfloat16() for t in engine_inputs(ties, (6, 4), 2, float("inf"))]
    with pytest.raises(MethodError, match="'w' of model expert0 has NaN or Inf"):
        merge_unit(plan, Unit(job, None, "merge"), tensors, CPU, None)


@pytest.mark.parametrize("method", ["tsv_m", "nearswap"])
def test_cli_names_the_tensor_and_model_with_nan(zoo, tmp_path, monkeypatch, capsys, method):
    """Before: a LinAlgError traceback from eigh (tsv_m), a finite merge with rc 0 (nearswap)."""
    models = with_logit_scale(zoo("llama"), tmp_path, {"base": 1.0, "e1": 1.5, "e2": 0.75})
    (file,) = sorted(Path(models["e1"]).glob("*.safetensors"))
    tensors = load_file(file)
    tensors["model.layers.0.mlp.down_proj.weight"].view(-1)[3] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    experts = ["e1"] if method == "nearswap" else ["e1", "e2"]
    recipe = {"merge_method": method, "base_model": str(models["base"]),
              "models": [{"model": str(models[k])} for k in experts],
              "parameters": {"t": 0.5} if method == "nearswap" else {}}
    rc, _, err = run_cli(monkeypatch, capsys, "merge", write_recipe(tmp_path / "r.yaml", recipe),
                         tmp_path / "out")
    assert rc != 0 and "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert "'model.layers.0.mlp.down_proj.weight'" in line and str(models["e1"]) in line
    assert "NaN or Inf" in line
