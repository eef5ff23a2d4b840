"""Learned merges (methods/adaptive.py, adaptive_masks.py) on tiny torch models built here.

Each expected value is computed in the test from the definition: AdaMerging's objective is the
mean prediction entropy of the merged model (Yang et al. 2024, task-wise and layer-wise);
Expert Merging's is T²·KL(expert ‖ merged) + w·MSE of hidden states (Zhang et al. 2025);
Concrete's weights are λ / mean(mask) (FusionBench's rescale); Localize keeps exactly the top-d
fraction of the model's entries (He et al. 2024, with a density budget).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mergesmith.errors import MethodError
from mergesmith.methods import get_method
from mergesmith.methods.adaptive import Batch, Learned, MergeProblem, WeightedTaskSum, coefficient_rows
from mergesmith.methods.blocks import topk_count

pytestmark = pytest.mark.usefixtures("one_thread")

D, H, C = 6, 8, 3


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh())

    def forward(self, x):
        return self.layers(x)


def mlp_problem(experts: int = 2, batches: int = 1, rows: int = 16, seed: int = 0,
                scale: float = 0.5, hidden: bool = False, labels: bool = False) -> MergeProblem:
    """A 2-layer encoder with one frozen linear head per task; experts = base + random deltas."""
    gen = torch.Generator().manual_seed(seed)
    encoder = Encoder()
    base = {name: torch.randn(p.shape, generator=gen) * 0.5 for name, p in encoder.named_parameters()}
    taus = [{name: torch.randn(t.shape, generator=gen) * scale for name, t in base.items()}
            for _ in range(experts)]
    heads = [torch.randn(C, H, generator=gen) for _ in range(experts)]

    def forward(params, task, x):
        features = functional_call(encoder, params, (x,))
        logits = features @ heads[task].T
        return (logits, [features]) if hidden else logits

    data = [[Batch(torch.randn(rows, D, generator=gen),
                   torch.randint(0, C, (rows,), generator=gen) if labels else None)
             for _ in range(batches)] for _ in range(experts)]
    layer_of = {name: int(name.split(".")[1]) // 2 for name in base}
    return MergeProblem(base=base, task_vectors=taus, layer_of=layer_of, forward=forward, batches=data)


def merged(problem: MergeProblem, weights: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """θ0 + Σ λi τi per tensor, written out independently of the module under test."""
    return {name: theta0 + sum(w * tau[name] for w, tau in zip(weights[name], problem.task_vectors))
            for name, theta0 in problem.base.items()}


def mean_entropy(problem: MergeProblem, params) -> float:
    """Mean over tasks and their batches of −Σ p log p per row, averaged over rows."""
    values = []
    with torch.no_grad():
        for task, batches in enumerate(problem.batches):
            for batch in batches:
                p = torch.softmax(problem.forward(params, task, batch.inputs), dim=-1)
                values.append(float(-(p * p.log()).sum(-1).mean()))
    return sum(values) / len(values)


def uniform(problem: MergeProblem, value: float) -> dict[str, list[float]]:
    return {name: [value] * len(problem.task_vectors) for name in problem.base}


def learn(method: str, problem: MergeProblem, **params) -> Learned:
    spec = get_method(method)
    defaults = {p.argname: p.default for p in spec.params}
    return spec.learn(problem, **{**defaults, **params})


def test_weighted_task_sum_is_theta0_plus_weighted_taus_with_dot_product_gradients():
    gen = torch.Generator().manual_seed(0)
    base, taus = torch.randn(3, 4, generator=gen), [torch.randn(3, 4, generator=gen) for _ in range(2)]
    lambdas = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    out = WeightedTaskSum.apply(lambdas, base, *taus)
    torch.testing.assert_close(out, base + 0.3 * taus[0] - 0.7 * taus[1])
    upstream = torch.randn(3, 4, generator=gen)
    out.backward(upstream)
    torch.testing.assert_close(lambdas.grad, torch.stack([(upstream * t).sum() for t in taus]).double())


# --------------------------------------------------------------------------------------------
# AdaMerging


def test_adamerging_first_loss_is_the_mean_entropy_at_init():
    problem = mlp_problem()
    learned = learn("adamerging", problem, steps=1)
    at_init = mean_entropy(problem, merged(problem, uniform(problem, 0.3)))
    assert learned.losses[0] == pytest.approx(at_init, rel=1e-5)


@pytest.mark.parametrize("granularity", ["task", "layer", "block"])
def test_adamerging_lowers_the_entropy_on_its_data(granularity):
    problem = mlp_problem()
    learned = learn("adamerging", problem, granularity=granularity, steps=40, lr=0.05)
    assert learned.losses[-1] < learned.losses[0]
    at_init = mean_entropy(problem, merged(problem, uniform(problem, 0.3)))
    assert mean_entropy(problem, merged(problem, learned.weights)) < at_init


def test_adamerging_granularity_gives_one_lambda_per_expert_and_task_layer_or_block():
    problem = mlp_problem(experts=3)
    names = list(problem.base)
    task = learn("adamerging", problem, granularity="task", steps=5, lr=0.05).weights
    assert all(len(w) == 3 for w in task.values())
    assert all(task[n] == task[names[0]] for n in names)
    layer = learn("adamerging", problem, granularity="layer", steps=5, lr=0.05).weights
    assert len({tuple(w) for w in layer.values()}) == len(names)  # every tensor its own λ
    block = learn("adamerging", problem, granularity="block", steps=5, lr=0.05).weights
    assert block["layers.0.weight"] == block["layers.0.bias"]
    assert block["layers.2.weight"] == block["layers.2.bias"]
    assert block["layers.0.weight"] != block["layers.2.weight"]
    assert coefficient_rows(problem, "block")[1] == 2


@pytest.mark.parametrize("lr", [1e-3, 100.0])
def test_adamerging_lambdas_stay_within_bounds(lr):
    problem = mlp_problem()
    learned = learn("adamerging", problem, steps=10, lr=lr, lower=0.1, upper=0.6)
    values = [v for w in learned.weights.values() for v in w]
    assert all(0.1 <= v <= 0.6 for v in values)
    if lr > 1:
        assert {0.1, 0.6} & set(values)  # a huge step lands on a bound, clamped


def test_adamerging_same_seed_same_lambdas_and_seed_orders_batches():
    problem = mlp_problem(batches=3)
    first = learn("adamerging", problem, steps=8, lr=0.05, seed=3)
    again = learn("adamerging", problem, steps=8, lr=0.05, seed=3)
    other = learn("adamerging", problem, steps=8, lr=0.05, seed=4)
    assert first.weights == again.weights and first.losses == again.losses
    assert first.losses != other.losses


def test_adamerging_raises_lambda_of_a_task_vector_that_sharpens_predictions():
    """θ = (1 + λ)W for τ = W: the logits scale by 1 + λ, and the entropy of softmax(βz) falls
    strictly as β grows (z not constant), so λ must rise from 0.3."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(C, D, generator=gen)
    problem = MergeProblem(base={"w": weight}, task_vectors=[{"w": weight.clone()}],
                           layer_of={"w": None}, forward=lambda p, task, x: x @ p["w"].T,
                           batches=[[Batch(torch.randn(32, D, generator=gen))]])
    learned = learn("adamerging", problem, granularity="task", steps=20, lr=0.01)
    assert learned.weights["w"][0] > 0.3 + 0.1
    assert all(b < a for a, b in zip(learned.losses, learned.losses[1:]))


def test_adamerging_bad_bounds_and_mismatched_batches_are_method_errors():
    problem = mlp_problem()
    with pytest.raises(MethodError, match="init"):
        learn("adamerging", problem, init=2.0)
    with pytest.raises(ValueError):
        get_method("adamerging").validate({"init": 0.3, "lower": 0.5, "upper": 1.0})
    problem.batches = problem.batches[:1]
    with pytest.raises(MethodError, match="1 tasks of calibration batches for 2 experts"):
        learn("adamerging", problem)


def test_learned_weights_merge_by_task_arithmetic():
    problem = mlp_problem()
    learned = learn("adamerging", problem, steps=3, lr=0.05)
    spec = get_method("adamerging")
    name = "layers.0.weight"
    experts = [problem.base[name] + tau[name] for tau in problem.task_vectors]
    out = spec.fn(problem.base[name], experts, **learned.for_tensor(name))
    torch.testing.assert_close(out, merged(problem, learned.weights)[name])


# --------------------------------------------------------------------------------------------
# Expert Merging


def alignment_loss(problem: MergeProblem, weights, temperature: float, hidden_weight: float) -> float:
    """Mean over tasks of T²·KL(p_expert ‖ p_merged) + w·MSE(hidden), on each expert's batch."""
    params = merged(problem, weights)
    values = []
    with torch.no_grad():
        for task, batches in enumerate(problem.batches):
            expert = {n: t + problem.task_vectors[task][n] for n, t in problem.base.items()}
            for batch in batches:
                (z, [h]), (ze, [he]) = (problem.forward(params, task, batch.inputs),
                                        problem.forward(expert, task, batch.inputs))
                p, q = torch.softmax(ze / temperature, -1), torch.softmax(z / temperature, -1)
                kl = float((p * (p.log() - q.log())).sum(-1).mean()) * temperature**2
                values.append(kl + hidden_weight * float(((h - he) ** 2).mean()))
    return sum(values) / len(values)


def test_expert_merging_first_loss_is_the_alignment_at_init():
    problem = mlp_problem(hidden=True)
    learned = learn("expert_merging", problem, steps=1, temperature=2.0, hidden_weight=0.5)
    expected = alignment_loss(problem, uniform(problem, 0.1), 2.0, 0.5)
    assert learned.losses[0] == pytest.approx(expected, rel=1e-5)


def test_expert_merging_brings_outputs_closer_to_the_experts():
    problem = mlp_problem(hidden=True)
    learned = learn("expert_merging", problem, steps=40, lr=0.1, regularization=0.0)
    assert learned.losses[-1] < learned.losses[0]
    before = alignment_loss(problem, uniform(problem, 0.1), 1.0, 0.1)
    assert alignment_loss(problem, learned.weights, 1.0, 0.1) < 0.7 * before
    values = [v for w in learned.weights.values() for v in w]
    assert all(0 < v < 1 for v in values)


def test_expert_merging_works_from_logits_alone_and_with_regularization():
    problem = mlp_problem(hidden=False)
    learned = learn("expert_merging", problem, granularity="task", steps=20, lr=0.1)
    assert learned.losses[-1] < learned.losses[0]
    assert all(len(w) == 2 for w in learned.weights.values())


# --------------------------------------------------------------------------------------------
# Concrete subspace masks


def test_concrete_masks_are_shared_bool_tensors_with_rescaled_weights():
    problem = mlp_problem()
    learned = learn("concrete_ta", problem, steps=60, lr=0.05, lambda_=0.4)
    for name, theta0 in problem.base.items():
        masks = learned.masks[name]
        assert len(masks) == 2 and masks[0].dtype == torch.bool and masks[0].shape == theta0.shape
        assert torch.equal(masks[0], masks[1])
        kept = float(masks[0].float().mean())
        assert 0 < kept <= 1
        assert learned.weights[name] == pytest.approx([0.4 / kept] * 2)
    early, late = learned.losses[:10], learned.losses[-10:]
    assert sum(late) < sum(early)  # noisy (one Concrete sample a step): compare means


def test_concrete_without_rescale_keeps_lambda_and_merges_masked_task_vectors():
    problem = mlp_problem()
    learned = learn("concrete_ta", problem, steps=5, lr=0.05, rescale=False, lambda_=0.3)
    name = "layers.2.weight"
    assert learned.weights[name] == [0.3, 0.3]
    experts = [problem.base[name] + tau[name] for tau in problem.task_vectors]
    out = get_method("concrete_ta").fn(problem.base[name], experts, **learned.for_tensor(name))
    m = learned.masks[name][0].float()
    expected = problem.base[name] + 0.3 * m * (problem.task_vectors[0][name] + problem.task_vectors[1][name])
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------------------------
# Localize-and-Stitch: localize


def test_localize_keeps_exactly_the_density_fraction_of_entries():
    problem = mlp_problem(labels=True)
    learned = learn("localize_stitch", problem, density=0.3, steps=10)
    total = sum(t.numel() for t in problem.base.values())
    for expert in range(2):
        kept = sum(int(learned.masks[name][expert].sum()) for name in problem.base)
        assert kept == topk_count(total, 0.3)


def test_localize_finds_the_entries_that_matter():
    """A linear classifier whose inputs use only features 0-4, each expert's class-0 row there
    holding its true weights. Its τ also holds larger, useless entries on features 5-19, which the
    data never activates: the magnitude start picks only useless ones, learning must move the
    mask onto the useful ones."""
    gen = torch.Generator().manual_seed(0)
    useful = torch.zeros(2, 20, dtype=torch.bool)
    useful[0, :5] = True
    taus, batches = [], []
    for _ in range(2):
        truth = (0.5 + torch.rand(5, generator=gen)) * torch.randn(5, generator=gen).sign()
        tau = torch.zeros(2, 20)
        tau[0, :5] = truth
        tau[:, 5:] = (3 + torch.rand(2, 15, generator=gen)) * torch.randn(2, 15, generator=gen).sign()
        x = torch.zeros(64, 20)
        x[:, :5] = torch.randn(64, 5, generator=gen)
        taus.append({"w": tau})
        batches.append([Batch(x, (x[:, :5] @ truth < 0).long())])  # class 0 where its logit > 0
    problem = MergeProblem(base={"w": torch.zeros(2, 20)}, task_vectors=taus, layer_of={"w": None},
                           forward=lambda p, task, x: x @ p["w"].T, batches=batches)
    learned = learn("localize_stitch", problem, density=0.125, steps=100)  # k = 5 = |useful|
    for expert in range(2):
        assert not (top_magnitudes(taus[expert]["w"], 5) & useful).any()
        mask = learned.masks["w"][expert]
        assert int(mask.sum()) == 5
        assert int((mask & useful).sum()) >= 4
        assert learned.losses[expert * 100 + 99] < learned.losses[expert * 100]


def top_magnitudes(x: torch.Tensor, k: int) -> torch.Tensor:
    chosen = torch.zeros(x.numel(), dtype=torch.bool)
    chosen[x.abs().reshape(-1).topk(k).indices] = True
    return chosen.view(x.shape)


def test_localize_needs_labels_and_stitch_averages_overlaps():
    with pytest.raises(MethodError, match="without labels"):
        learn("localize_stitch", mlp_problem(labels=False))
    base = torch.zeros(4)
    experts = [torch.tensor([2.0, 2.0, 0.0, 5.0]), torch.tensor([4.0, 0.0, 6.0, 5.0])]
    masks = [torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])]
    learned = Learned(masks={"w": masks})
    out = get_method("localize_stitch").fn(base, experts, **learned.for_tensor("w"))
    torch.testing.assert_close(out, torch.tensor([3.0, 2.0, 6.0, 0.0]))
