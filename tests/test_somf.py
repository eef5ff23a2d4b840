"""SOMF (methods/somf.py): a Concrete mask shared by the task vectors, trained on safety data.

Expected values come from the definition read in the authors' code (xinykou/safety_realignment,
concrete_mask.py): θ = θ_safe + λ Σi δi ⊙ m / mean(m), the mean taken per tensor, m exported as
one Bernoulli(σ(ℓ)) draw (RelaxedBernoulli sample > ½), or σ(ℓ) > ½ as our option.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mergesmith
from conftest import read_tensors, write_recipe
from mergesmith.methods import get_method
from test_adaptive import learn, mlp_problem

pytestmark = pytest.mark.usefixtures("one_thread")


def merge_tensor(problem, learned, name):
    experts = [problem.base[name] + tau[name] for tau in problem.task_vectors]
    return get_method("somf").fn(problem.base[name], experts, **learned.for_tensor(name))


@pytest.mark.parametrize("export", ["sample", "threshold"])
def test_logits_to_infinity_give_the_safe_model_plus_every_task_vector(export):
    problem = mlp_problem(labels=True)
    learned = learn("somf", problem, init_logit=40.0, steps=0, export=export, lambda_=0.7)
    for name, theta0 in problem.base.items():
        assert all(bool(m.all()) for m in learned.masks[name])
        expected = theta0 + 0.7 * (problem.task_vectors[0][name] + problem.task_vectors[1][name])
        torch.testing.assert_close(merge_tensor(problem, learned, name), expected)


def test_first_loss_is_the_cross_entropy_of_the_unmasked_merge_when_logits_are_large():
    problem = mlp_problem(labels=True, batches=1)
    learned = learn("somf", problem, init_logit=40.0, steps=1, lambda_=0.5)
    params = {n: t + 0.5 * (problem.task_vectors[0][n] + problem.task_vectors[1][n])
              for n, t in problem.base.items()}
    # the step's batch is one of the pooled (task, batch) pairs, drawn by the seed
    candidates = [float(F.cross_entropy(problem.forward(params, t, b.inputs), b.targets))
                  for t, batches in enumerate(problem.batches) for b in batches]
    assert min(abs(learned.losses[0] - c) for c in candidates) < 1e-5


def test_export_is_deterministic_given_the_seed_and_a_bernoulli_draw_of_sigma():
    problem = mlp_problem(labels=True)
    one = learn("somf", problem, init_logit=1.0, steps=0, seed=3)
    two = learn("somf", problem, init_logit=1.0, steps=0, seed=3)
    other = learn("somf", problem, init_logit=1.0, steps=0, seed=4)
    names = list(problem.base)
    assert all(torch.equal(one.masks[n][0], two.masks[n][0]) for n in names)
    assert any(not torch.equal(one.masks[n][0], other.masks[n][0]) for n in names)
    kept = torch.cat([one.masks[n][0].reshape(-1) for n in names]).float().mean()
    assert abs(float(kept) - float(torch.sigmoid(torch.tensor(1.0)))) < 0.1  # 128 draws at σ(1)


@pytest.mark.parametrize("logit, kept", [(0.3, True), (-0.3, False)])
def test_threshold_export_keeps_exactly_the_entries_with_sigma_above_half(logit, kept):
    problem = mlp_problem(labels=True)
    learned = learn("somf", problem, init_logit=logit, steps=0, export="threshold")
    for name, theta0 in problem.base.items():
        assert bool((learned.masks[name][0] == kept).all())
        if not kept:  # nothing kept: the safe model, not 0/0
            assert learned.weights[name] == [0.0, 0.0]
            torch.testing.assert_close(merge_tensor(problem, learned, name), theta0)


def test_the_mean_rescale_is_per_tensor():
    problem = mlp_problem(labels=True)
    learned = learn("somf", problem, init_logit=0.0, steps=0, seed=1, lambda_=0.4)
    fractions = {}
    for name, theta0 in problem.base.items():
        m = learned.masks[name][0].float()
        fractions[name] = float(m.mean())
        assert learned.weights[name] == pytest.approx([0.4 / fractions[name]] * 2)
        delta = problem.task_vectors[0][name] + problem.task_vectors[1][name]
        torch.testing.assert_close(merge_tensor(problem, learned, name),
                                   theta0 + 0.4 * delta * m / m.mean())
    assert len({round(f, 6) for f in fractions.values()}) > 1  # each tensor its own mean


def test_training_on_safety_data_lowers_its_loss():
    """The safe model's own predictions are the safety labels and the task vectors spoil them:
    the mask learns to drop the entries that hurt."""
    problem = mlp_problem(experts=1, batches=2, rows=32, scale=1.5, labels=True)
    with torch.no_grad():
        for batches in problem.batches:
            for batch in batches:
                batch.targets = problem.forward(problem.base, 0, batch.inputs).argmax(-1)
    learned = learn("somf", problem, steps=80, lr=0.1)
    early, late = learned.losses[:10], learned.losses[-10:]
    assert sum(late) < 0.8 * sum(early)


def test_somf_from_a_recipe_on_a_causal_lm(zoo, tmp_path):
    models = zoo("llama")
    data = tmp_path / "safety.txt"
    data.write_text("".join(f"the safe answer number {i} is no\n" for i in range(8)))
    recipe = write_recipe(tmp_path / "somf.yaml", {
        "merge_method": "somf", "base_model": str(models["base"]), "dtype": "float32",
        "models": [{"model": str(models["e1"])}, {"model": str(models["e2"])}],
        "calibration": {"data": str(data), "samples": 8, "max_length": 16, "batch_size": 4,
                        "cache": str(tmp_path / "cache")},
        "parameters": {"steps": 3, "lr": 0.05, "lambda": 0.5}})
    folder = mergesmith.merge(recipe, tmp_path / "out")
    learned = json.loads((folder / "learned.json").read_text())
    assert learned["method"] == "somf" and len(learned["losses"]) == 3
    out, base = read_tensors(folder), read_tensors(models["base"])
    e1, e2 = read_tensors(models["e1"]), read_tensors(models["e2"])
    name = next(n for n in out if n.endswith("q_proj.weight"))
    delta = (e1[name] - base[name]) + (e2[name] - base[name])
    moved = out[name] != base[name]
    m = moved.float()  # where δ ≠ 0, the kept entries are exactly those that moved
    torch.testing.assert_close(out[name], base[name] + 0.5 * delta * m / m.mean(), rtol=0, atol=1e-6)
