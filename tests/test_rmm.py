"""Reversible Model Merging (methods/rmm.py): the closed-form basis and coefficients, against
numpy's SVD and METHODS.md's "rmm" tests (k = N exact; error = discarded σ²)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergesmith.errors import MethodError
from mergesmith.methods import rmm as R
from mergesmith.methods.registry import TensorContext

D_OUT, D_IN, RANK, TASKS = 12, 10, 3, 4
SCALINGS = [0.5, 2.0, 1.5, 1.0]


def loras(seed=0, tasks=TASKS):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(D_OUT, RANK, generator=g) for _ in range(tasks)]
    As = [torch.randn(RANK, D_IN, generator=g) for _ in range(tasks)]
    return Bs, As


def columns(Bs, As, grouping):
    """The tasks' stacked factors by hand: per module one long vector; per position the rows of
    s_i B_i and the columns of A_i."""
    if grouping == "module":
        return [np.stack([np.concatenate([(s * b.double()).numpy().ravel(),
                                          a.double().numpy().ravel()])
                          for b, a, s in zip(Bs, As, SCALINGS)], axis=1)]
    rows = [np.stack([(s * b.double())[p].numpy() for b, s in zip(Bs, SCALINGS)], axis=1)
            for p in range(D_OUT)]
    return rows + [np.stack([a[:, p].double().numpy() for a in As], axis=1) for p in range(D_IN)]


@pytest.mark.parametrize("grouping", R.GROUPINGS)
def test_as_many_basis_vectors_as_tasks_is_exact(grouping):
    Bs, As = loras()
    basis = R.rmm_fit(Bs, As, SCALINGS, basis_size=TASKS, grouping=grouping)
    for i in range(TASKS):
        b, a = R.task_factors(basis, i, D_OUT, D_IN, RANK, grouping)
        torch.testing.assert_close(b, Bs[i] * SCALINGS[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, As[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grouping", R.GROUPINGS)
@pytest.mark.parametrize("k", [1, 2])
def test_rebuilt_tasks_are_the_closed_form_and_the_error_is_the_discarded_energy(grouping, k):
    """Task i's rebuilt factors are U_k U_kᵀ x_i (U_k: numpy's top-k left singular vectors of each
    X), and Σ_i ‖x_i − x̂_i‖² = Σ_{j>k} σ_j² over every X (Eckart–Young)."""
    Bs, As = loras(seed=1)
    basis = R.rmm_fit(Bs, As, SCALINGS, basis_size=k, grouping=grouping)
    xs = columns(Bs, As, grouping)
    projected = []
    discarded = 0.0
    for x in xs:
        u, sigma, _ = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        projected.append(u[:, :k] @ (u[:, :k].T @ x))
        discarded += float((sigma[k:] ** 2).sum())
    error = 0.0
    for i in range(TASKS):
        b, a = R.task_factors(basis, i, D_OUT, D_IN, RANK, grouping)
        if grouping == "module":
            expected = projected[0][:, i]
            got = np.concatenate([b.numpy().ravel(), a.numpy().ravel()])
        else:
            expected = np.concatenate([p[:, i] for p in projected])
            got = np.concatenate([b.numpy().ravel(), a.mT.numpy().ravel()])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        error += float(((np.concatenate([x[:, i] for x in xs]) - expected) ** 2).sum())
    assert R.discarded_energy(basis.sigma, k) == pytest.approx(discarded, rel=1e-9)
    assert error == pytest.approx(discarded, rel=1e-6)
    assert basis.vectors.shape[-1] == k and basis.coefficients.shape[-2:] == (k, TASKS)


def test_merged_adapter_is_the_weighted_sum_of_the_rebuilt_tasks():
    Bs, As = loras(seed=2)
    weights = [1.0, -0.5, 0.25, 2.0]
    ctx = TensorContext(name="layers.0.q_proj.weight")
    B, A, info = R.rmm(Bs, As, SCALINGS, weights=weights, ctx=ctx, basis_size=2)
    basis = R.rmm_fit(Bs, As, SCALINGS, basis_size=2)
    expected = sum(w * (lambda f: f[0].double() @ f[1].double())(
        R.task_factors(basis, i, D_OUT, D_IN, RANK, "module")) for i, w in enumerate(weights))
    assert B.shape == (D_OUT, TASKS * RANK)
    torch.testing.assert_close(B.double() @ A.double(), expected, atol=1e-5, rtol=1e-5)
    sigma = basis.sigma.double().square()
    assert info["rmm_relative_error"] == pytest.approx(float(sigma[..., 2:].sum() / sigma.sum()))


def test_unequal_ranks_are_refused_naming_the_module():
    Bs, As = loras()
    Bs[1], As[1] = Bs[1][:, :2], As[1][:2]
    with pytest.raises(MethodError, match="q_proj.*") as info:
        R.rmm(Bs, As, SCALINGS, weights=[1.0] * TASKS,
              ctx=TensorContext(name="layers.0.q_proj.weight"))
    assert "ranks 2, 3" in info.value.message and info.value.hint


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def rmm_inputs(tmp_path_factory):
    """A toy Llama and three rank-2 LoRAs (one rsLoRA) with their own saved lm_head."""
    pytest.importorskip("peft")
    from test_adapter_io import make_adapter

    from mergesmith.toy import build_model

    root = tmp_path_factory.mktemp("rmm")
    base = build_model(root / "base", "llama", seed=0)
    lora = dict(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    paths = [make_adapter(base, root / f"t{i}", "llama", seed=i, lora_alpha=alpha,
                          use_rslora=i == 2, **lora) for i, alpha in enumerate([4, 2, 3])]
    return base, paths


def merge_rmm(paths, folder, monkeypatch, capsys, **params):
    from conftest import run_cli, write_recipe

    recipe = write_recipe(folder / "recipe.yml", {
        "merge_method": "rmm", "models": [{"model": str(p)} for p in paths], "parameters": params})
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, folder / "merged")
    assert code == 0, err
    return folder / "merged"


def test_rmm_apply_with_as_many_basis_vectors_as_tasks_rebuilds_each_adapter(
        rmm_inputs, tmp_path, monkeypatch, capsys, one_thread):
    """k = N: `rmm apply` gives back task i's ΔW and saved head; with --model, the model PEFT's
    merge_and_unload makes of the original adapter."""
    import peft
    from conftest import read_tensors, run_cli

    from mergesmith.io.adapter import read_adapter
    from mergesmith.toy import model_class

    base, paths = rmm_inputs
    merged = merge_rmm(paths, tmp_path, monkeypatch, capsys, basis_size=3)
    assert (merged / "rmm" / "rmm.json").is_file()
    code, _, err = run_cli(monkeypatch, capsys, "rmm", "apply", merged, str(paths[1]),
                           tmp_path / "t1")
    assert code == 0, err
    rebuilt, original = read_adapter(tmp_path / "t1"), read_adapter(paths[1])
    assert set(rebuilt.modules) == set(original.modules)
    for weight in original.modules:
        torch.testing.assert_close(rebuilt.delta(weight), original.delta(weight), atol=1e-5,
                                   rtol=1e-5)
    torch.testing.assert_close(rebuilt.read_saved("lm_head.weight"),
                               original.read_saved("lm_head.weight"))
    code, _, err = run_cli(monkeypatch, capsys, "rmm", "apply", merged, "2", tmp_path / "m2",
                           "--model", base)
    assert code == 0, err
    expected = peft.PeftModel.from_pretrained(model_class("llama").from_pretrained(base),
                                              paths[2]).merge_and_unload().state_dict()
    got = read_tensors(tmp_path / "m2")
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-5, msg=name)
    assert (tmp_path / "m2" / "config.json").is_file()


def stacked_factors(adapter, weight):
    """[vec(s B); vec(A)] of one adapter's module, in float64."""
    b, a = adapter.factors(weight)
    scaled = adapter.modules[weight].scaling * b.double()
    return np.concatenate([scaled.numpy().ravel(), a.double().numpy().ravel()])


def test_rmm_apply_with_a_smaller_basis_is_the_closed_form(rmm_inputs, tmp_path, monkeypatch,
                                                           capsys, one_thread):
    """k = 1: task i's rebuilt factors are U_1 U_1ᵀ x_i, U_1 numpy's top left singular vector of
    the stacked [vec(s_j B_j); vec(A_j)]; the merged adapter loads in PEFT."""
    import peft
    from conftest import run_cli

    from mergesmith.io.adapter import read_adapter
    from mergesmith.toy import model_class

    base, paths = rmm_inputs
    merged = merge_rmm(paths, tmp_path, monkeypatch, capsys, basis_size=1)
    peft.PeftModel.from_pretrained(model_class("llama").from_pretrained(base), merged)
    code, _, err = run_cli(monkeypatch, capsys, "rmm", "apply", merged, "0", tmp_path / "t0")
    assert code == 0, err
    rebuilt, inputs = read_adapter(tmp_path / "t0"), [read_adapter(p) for p in paths]
    for weight in inputs[0].modules:
        x = np.stack([stacked_factors(a, weight) for a in inputs], axis=1)
        u = np.linalg.svd(x, full_matrices=False)[0][:, :1]
        expected = u @ (u.T @ x[:, 0])
        b, a = rebuilt.factors(weight)
        assert rebuilt.modules[weight].scaling == 1.0
        np.testing.assert_allclose(np.concatenate([b.numpy().ravel(), a.numpy().ravel()]),
                                   expected, atol=1e-5)


def test_rmm_refuses_unequal_ranks_before_merging_and_unknown_tasks(rmm_inputs, tmp_path,
                                                                    monkeypatch, capsys):
    from conftest import run_cli, write_recipe
    from test_adapter_io import make_adapter

    base, paths = rmm_inputs
    other = make_adapter(base, tmp_path / "r3", "llama", seed=5, r=3, lora_alpha=3,
                         target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    recipe = write_recipe(tmp_path / "bad.yml", {
        "merge_method": "rmm", "models": [{"model": str(paths[0])}, {"model": str(other)}]})
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out")
    assert code != 0 and "q_proj" in err and "r=3" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    merged = merge_rmm(paths, tmp_path, monkeypatch, capsys)
    code, _, err = run_cli(monkeypatch, capsys, "rmm", "apply", merged, "7", tmp_path / "t")
    assert code != 0 and "unknown task" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, "rmm", "apply", paths[0], "0", tmp_path / "t")
    assert code != 0 and "merge_method: rmm" in err
