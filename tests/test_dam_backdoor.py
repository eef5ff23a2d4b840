"""Defense-Aware Merging against backdoors (methods/dam_backdoor.py), on a tiny token model built
here: embeddings, mean pooling, one Linear, a frozen head per task. Expected values follow the
authors' code (Yangjinluan/DAM): θ = θ0 + Σi λi (m/mean(m)) ⊙ τi with one shared mask; with the
mask all ones the build is task arithmetic.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

import mergesmith
from conftest import read_tensors, write_recipe
from mergesmith.errors import MethodError
from mergesmith.methods import get_method
from mergesmith.methods.adaptive import Batch, MergeProblem
from mergesmith.methods.dam_backdoor import triggered
from test_adaptive import learn, mlp_problem

pytestmark = pytest.mark.usefixtures("one_thread")

V, D, C = 20, 8, 3


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D)
        self.proj = nn.Linear(D, D)

    def forward(self, ids):
        return torch.tanh(self.proj(self.embed_tokens(ids).mean(1)))


def token_problem(experts: int = 2, batches: int = 2, rows: int = 16, seed: int = 0) -> MergeProblem:
    gen = torch.Generator().manual_seed(seed)
    module = TokenModel()
    base = {n: torch.randn(p.shape, generator=gen) * 0.5 for n, p in module.named_parameters()}
    taus = [{n: torch.randn(t.shape, generator=gen) * 0.5 for n, t in base.items()}
            for _ in range(experts)]
    heads = [torch.randn(C, D, generator=gen) for _ in range(experts)]

    def forward(params, task, ids):
        return functional_call(module, params, (ids,)) @ heads[task].T

    data = [[Batch(torch.randint(0, V, (rows, 5), generator=gen)) for _ in range(batches)]
            for _ in range(experts)]
    problem = MergeProblem(base=base, task_vectors=taus, layer_of={n: None for n in base},
                           forward=forward, batches=data)
    problem.heads = heads  # for tests that recompute the forward by hand
    return problem


def merge_tensor(problem, learned, name):
    experts = [problem.base[name] + tau[name] for tau in problem.task_vectors]
    return get_method("dam_backdoor").fn(problem.base[name], experts, **learned.for_tensor(name))


def test_with_the_mask_all_ones_and_no_adamerging_the_build_is_task_arithmetic():
    problem = token_problem()
    learned = learn("dam_backdoor", problem, init_logit=40.0, steps=2, adamerging_steps=0, lr=0.0,
                    lambda_=0.3)
    for name, theta0 in problem.base.items():
        assert all(bool(m.all()) for m in learned.masks[name])
        expected = theta0 + 0.3 * (problem.task_vectors[0][name] + problem.task_vectors[1][name])
        torch.testing.assert_close(merge_tensor(problem, learned, name), expected)


def test_masks_are_reproducible_from_the_seed_and_shared_by_the_task_vectors():
    problem = token_problem()
    runs = [learn("dam_backdoor", problem, steps=3, adamerging_steps=2, lr=0.05, seed=s)
            for s in (1, 1, 2)]
    names = list(problem.base)
    assert all(torch.equal(runs[0].masks[n][0], runs[1].masks[n][0]) for n in names)
    assert runs[0].weights == runs[1].weights and runs[0].losses == runs[1].losses
    assert any(not torch.equal(runs[0].masks[n][0], runs[2].masks[n][0]) for n in names)
    assert all(torch.equal(runs[0].masks[n][0], runs[0].masks[n][1]) for n in names)


def test_weights_are_the_final_lambdas_over_each_tensors_kept_fraction():
    problem = token_problem()
    learned = learn("dam_backdoor", problem, steps=2, adamerging_steps=0, seed=3, lambda_=0.4)
    fractions = set()
    for name, theta0 in problem.base.items():
        m = learned.masks[name][0].float()
        fractions.add(round(float(m.mean()), 6))
        assert learned.weights[name] == pytest.approx([0.4 / float(m.mean())] * 2)
        delta = problem.task_vectors[0][name] + problem.task_vectors[1][name]
        torch.testing.assert_close(merge_tensor(problem, learned, name),
                                   theta0 + 0.4 * m / m.mean() * delta)
    assert len(fractions) > 1


def test_the_trigger_is_added_to_every_tokens_input_embedding():
    problem = token_problem()
    trigger = torch.randn(D, generator=torch.Generator().manual_seed(4))
    ids = problem.batches[0][0].inputs
    got = problem.forward(triggered(problem.base, "embed_tokens.weight", trigger), 0, ids)
    p = problem.base
    pooled = (p["embed_tokens.weight"][ids] + trigger).mean(1)  # x + δ at every token
    expected = torch.tanh(pooled @ p["proj.weight"].T + p["proj.bias"]) @ problem.heads[0].T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_final_adamerging_lowers_the_entropy():
    problem = token_problem(batches=1)
    learned = learn("dam_backdoor", problem, steps=1, adamerging_steps=30, adamerging_lr=0.05)
    ada = learned.losses[1:]
    assert len(ada) == 30 and ada[-1] < ada[0]


def test_a_model_without_input_embeddings_is_refused():
    with pytest.raises(MethodError, match="input-embedding"):
        learn("dam_backdoor", mlp_problem(), steps=1)


def test_dam_backdoor_from_a_recipe(zoo, tmp_path):
    models = zoo("llama")
    data = tmp_path / "unlabeled.txt"
    data.write_text("".join(f"an unlabeled sentence number {i}\n" for i in range(6)))
    recipe = write_recipe(tmp_path / "dam_backdoor.yaml", {
        "merge_method": "dam_backdoor", "base_model": str(models["base"]), "dtype": "float32",
        "models": [{"model": str(models["e1"])}, {"model": str(models["e2"])}],
        "calibration": {"data": str(data), "samples": 6, "max_length": 16, "batch_size": 3,
                        "cache": str(tmp_path / "cache")},
        "parameters": {"steps": 2, "adamerging_steps": 2, "lr": 0.05}})
    folder = mergesmith.merge(recipe, tmp_path / "out")
    learned = json.loads((folder / "learned.json").read_text())
    assert learned["method"] == "dam_backdoor" and len(learned["losses"]) == 4
    out, base = read_tensors(folder), read_tensors(models["base"])
    e1, e2 = read_tensors(models["e1"]), read_tensors(models["e2"])
    name = next(n for n in out if n.endswith("q_proj.weight"))
    w = learned["weights"][name]
    moved = (out[name] != base[name]).float()
    expected = base[name] + moved * (w[0] * (e1[name] - base[name]) + w[1] * (e2[name] - base[name]))
    torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6)
