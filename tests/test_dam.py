"""DAM, Arcee's Differentiable Adaptive Merging (methods/dam.py), against the definitions read in
arcee-ai/DAM: a merged Linear is F.linear(x, Σi f(ci) ⊙ Wi, Σi f(cbi) bi) with ci one entry per
input column, and the loss Σi T²·KL(softmax(zi/T) ‖ softmax(z/T)) on model i's inputs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import mergesmith
from conftest import read_tensors, write_recipe
from mergesmith.calibrate.store import read_statistics
from mergesmith.methods import get_method
from test_adaptive import learn, mlp_problem

pytestmark = pytest.mark.usefixtures("one_thread")


def fold(problem, learned):
    """The plain weights: dam_fold per tensor on the full models θi = θ0 + τi."""
    return {name: get_method("dam").fn(theta0, [theta0 + tau[name] for tau in problem.task_vectors],
                                            **learned.for_tensor(name))
            for name, theta0 in problem.base.items()}


def dam_forward(problem, raw, x, head):
    """The code's DAMLinearLayer forward, written out: each Linear's weight Σi tanh(ci) ⊙ Wi with
    ci broadcast over the rows (one per input column), its bias Σi tanh(cbi) bi."""
    models = [{n: t + tau[n] for n, t in problem.base.items()} for tau in problem.task_vectors]
    h = x
    for layer in ("layers.0", "layers.2"):
        w = sum(torch.tanh(c) * m[f"{layer}.weight"] for c, m in zip(raw[f"{layer}.weight"], models))
        b = sum(torch.tanh(c) * m[f"{layer}.bias"] for c, m in zip(raw[f"{layer}.bias"], models))
        h = torch.tanh(F.linear(h, w, b))
    return h @ head.T


def test_coefficients_at_atanh_one_over_n_give_the_uniform_average():
    problem = mlp_problem(experts=3)
    learned = learn("dam", problem, init="average", steps=0)
    for name, theta0 in problem.base.items():
        assert all(torch.allclose(a, torch.full_like(a, 1 / 3)) for a in learned.coefficients[name])
        average = sum(theta0 + tau[name] for tau in problem.task_vectors) / 3
        torch.testing.assert_close(fold(problem, learned)[name], average)


def test_the_codes_start_is_tanh_of_one_over_n_not_the_average():
    problem = mlp_problem(experts=2)
    learned = learn("dam", problem, init="code", steps=0)
    name = "layers.0.weight"
    expected = math.tanh(0.5) * sum(problem.base[name] + tau[name] for tau in problem.task_vectors)
    torch.testing.assert_close(fold(problem, learned)[name], expected)


def test_first_loss_is_the_sum_over_models_of_the_tempered_kl_to_each():
    problem = mlp_problem(experts=2, batches=1)
    learned = learn("dam", problem, init="average", steps=1, similarity_weight=0.0, temperature=2.0)
    average = fold(problem, learn("dam", problem, init="average", steps=0))
    expected = 0.0
    for task, tau in enumerate(problem.task_vectors):
        x = problem.batches[task][0].inputs
        expert = {n: t + tau[n] for n, t in problem.base.items()}
        target = F.softmax(problem.forward(expert, task, x) / 2, dim=-1)
        merged = F.log_softmax(problem.forward(average, task, x) / 2, dim=-1)
        expected += 4 * float(F.kl_div(merged, target, reduction="batchmean"))
    assert learned.losses[0] == pytest.approx(expected, rel=1e-5)


def test_folding_the_trained_coefficients_gives_the_dam_forwards_logits():
    problem = mlp_problem(experts=2, batches=2)
    learned = learn("dam", problem, steps=15, lr=0.05)
    raw = {}
    for name, scales in learned.coefficients.items():
        # one coefficient per input column: the same in every row
        assert all(torch.equal(a, a[:1].expand_as(a)) for a in scales if a.ndim == 2)
        raw[name] = [torch.atanh(a[0] if a.ndim == 2 else a) for a in scales]
    assert not torch.allclose(raw["layers.0.weight"][0], raw["layers.0.weight"][1])  # it learned
    plain = fold(problem, learned)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 6, generator=gen)
    head = torch.randn(3, 8, generator=gen)
    from torch.func import functional_call
    from test_adaptive import Encoder

    got = functional_call(Encoder(), plain, (x,)) @ head.T
    torch.testing.assert_close(got, dam_forward(problem, raw, x, head), rtol=1e-5, atol=1e-5)


def test_a_short_run_lowers_the_kl_loss():
    problem = mlp_problem(experts=2, batches=2, scale=0.8)
    learned = learn("dam", problem, steps=40, lr=0.05, similarity_weight=0.0)
    assert sum(learned.losses[-5:]) < 0.7 * sum(learned.losses[:5])


@pytest.mark.parametrize("non_linearity", ["tanh", "sigmoid"])
def test_init_average_is_refused_where_f_cannot_reach_one_over_n(non_linearity):
    problem = mlp_problem(experts=1)
    with pytest.raises(mergesmith.errors.MethodError, match="init average"):
        learn("dam", problem, init="average", non_linearity=non_linearity, steps=0)


@pytest.mark.parametrize("non_linearity", ["sigmoid", "none", "relu"])
def test_init_average_starts_at_the_average_for_every_non_linearity(non_linearity):
    problem = mlp_problem(experts=2)
    learned = learn("dam", problem, init="average", non_linearity=non_linearity, steps=0)
    name = "layers.2.weight"
    average = sum(problem.base[name] + tau[name] for tau in problem.task_vectors) / 2
    torch.testing.assert_close(fold(problem, learned)[name], average)


def test_dam_from_a_recipe_writes_the_fold_of_its_stored_coefficients(zoo, tmp_path):
    models = zoo("llama")
    cals = []
    for i in (1, 2):
        data = tmp_path / f"task{i}.txt"
        data.write_text("".join(f"task {i} sample {j} says hello\n" for j in range(6)))
        cals.append({"data": str(data)})
    recipe = write_recipe(tmp_path / "dam.yaml", {
        "merge_method": "dam", "base_model": str(models["base"]), "dtype": "float32",
        "models": [{"model": str(models[f"e{i}"]), "calibration": cal} for i, cal in zip((1, 2), cals)],
        "calibration": {"samples": 6, "max_length": 16, "batch_size": 3,
                        "cache": str(tmp_path / "cache")},
        "parameters": {"steps": 3, "lr": 0.05}})
    folder = mergesmith.merge(recipe, tmp_path / "out")
    learned = json.loads((folder / "learned.json").read_text())
    assert learned["method"] == "dam" and len(learned["losses"]) == 3
    out, base = read_tensors(folder), read_tensors(models["base"])
    experts = [read_tensors(models["e1"]), read_tensors(models["e2"])]
    stores = sorted((tmp_path / "cache").rglob("expert-*"))
    scales = [read_statistics(s) for s in stores]
    assert len(scales) == 2
    seen = 0
    for name, tensor in out.items():
        key = f"{name}::coefficient"
        if key not in scales[0]:
            torch.testing.assert_close(tensor, base[name])
            continue
        seen += 1
        expected = scales[0][key] * experts[0][name] + scales[1][key] * experts[1][name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
        if "norm" in name or "embed" in name:  # frozen by default: the code's start, tanh(1/N)
            assert torch.allclose(scales[0][key], torch.full_like(tensor, math.tanh(0.5)))
        elif tensor.ndim == 2:  # learned, one coefficient per input column
            a = scales[0][key]
            assert torch.equal(a, a[:1].expand_as(a))
    assert seen > 5
