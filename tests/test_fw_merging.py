"""FW-Merging (fw_merging; Chen et al. 2025, arXiv:2503.12649), hard variant, checked against an
independent transcription of FusionBench's fw_hard.py loop that works on whole tensors (merged
model, gradients by autograd, per-tensor cosines with each checkpoint, θ + γλ(s* − θ)), where
ours tracks the coefficients of θ0 + Σ ci τi.

The METHODS.md properties: (1) θ^(t+1) lies on the segment [θ^(t), s*] and is s* when γλ = 1;
(2) with g = −s_2 the oracle picks s_2; (3) a pool of copies of θ^(0) leaves θ unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, read_tensors, run_cli, write_recipe
from torch import nn
from torch.func import functional_call

from mergesmith.errors import MethodError
from mergesmith.methods import get_method
from mergesmith.methods.adaptive import Batch, MergeProblem, coefficient_rows
from mergesmith.methods.frank_wolfe import Oracle, pool_coefficients

pytestmark = pytest.mark.usefixtures("one_thread")

D, H, C = 6, 8, 3


def toy_problem(experts=3, seed=0, same=False, labels=True) -> MergeProblem:
    """A 2-layer tanh encoder, one frozen linear head per task, labelled batches."""
    gen = torch.Generator().manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh())
    base = {n: torch.randn(p.shape, generator=gen) * 0.5 for n, p in encoder.named_parameters()}
    taus = [{n: torch.randn(t.shape, generator=gen) * 0.5 for n, t in base.items()}
            for _ in range(experts)]
    if same:
        taus = [taus[0]] * experts
    heads = [torch.randn(C, H, generator=gen) for _ in range(experts)]

    def forward(params, task, x):
        return functional_call(encoder, params, (x,)) @ heads[task].T

    data = [[Batch(torch.randn(8, D, generator=gen),
                   torch.randint(0, C, (8,), generator=gen) if labels else None)
             for _ in range(2)] for _ in range(experts)]
    return MergeProblem(base=base, task_vectors=taus, layer_of={n: int(n[0]) // 2 for n in base},
                        forward=forward, batches=data)


def learn(problem, **params):
    spec = get_method("fw_merging")
    defaults = {p.argname: p.default for p in spec.params}
    return spec.learn(problem, **{**defaults, **params})


def merged(problem, weights):
    return {n: t0 + sum(w * tau[n] for w, tau in zip(weights[n], problem.task_vectors))
            for n, t0 in problem.base.items()}


# ------------------------------------------------------------------ FusionBench, transcribed

def reference_fw_hard(problem, *, granularity, scaling_factor, step_size, max_iters):
    """fw_hard.py's run(): TA init, "initial" joins the pool, then per iteration the mean
    cross-entropy's gradient, the per-tensor cosine oracle (strict <: first model on a tie) and
    task_arithmetic_merge(merged, [s*], step·λ). Returns the final tensors, the losses and
    the chosen names."""
    base = problem.base
    pool = {f"e{i}": {n: base[n] + tau[n] for n in base} for i, tau in enumerate(problem.task_vectors)}
    merged_sd = {n: base[n] + scaling_factor * sum(tau[n] for tau in problem.task_vectors) for n in base}
    pool["initial"] = {n: v.clone() for n, v in merged_sd.items()}
    losses, choices = [], []
    total = sum(len(b) for b in problem.batches)
    for step_idx in range(max_iters):
        params = {n: v.clone().requires_grad_(True) for n, v in merged_sd.items()}
        value = 0.0
        for task, batches in enumerate(problem.batches):
            for batch in batches:
                loss = F.cross_entropy(problem.forward(params, task, batch.inputs), batch.targets) / total
                loss.backward()
                value += loss.item()
        losses.append(value)
        grads = {n: p.grad for n, p in params.items()}

        def cos(g, ck):
            return torch.dot(g.flatten(), ck.flatten()) / (torch.norm(g) * torch.norm(ck))

        if granularity == "task":
            best, chosen = float("inf"), None
            for name, ck in pool.items():
                score = sum(cos(grads[n], ck[n]) for n in ck)
                if score < best:
                    best, chosen = score, name
            target = pool[chosen]
            choices.append(chosen)
        else:
            best, target = {}, {}
            for name, ck in pool.items():
                for n in ck:
                    score = cos(grads[n], ck[n])
                    if n not in best or score < best[n]:
                        best[n], target[n] = score, ck[n]
                        choices.append(name)
        step = 2 / (step_idx + 2) * step_size
        merged_sd = {n: merged_sd[n] + step * scaling_factor * (target[n] - merged_sd[n]) for n in base}
    return merged_sd, losses, choices


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_same_model_and_losses_as_fusionbench_fw_hard(granularity):
    problem = toy_problem(seed=2)
    want, want_losses, choices = reference_fw_hard(problem, granularity=granularity,
                                                   scaling_factor=1.0, step_size=1.0, max_iters=6)
    assert {"e0", "e1", "initial"} <= set(choices)  # the oracle's choice matters in this run
    got = learn(problem, granularity=granularity, lambda_=1.0, step_size=1.0, iterations=6)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want_losses), rtol=1e-5, atol=1e-6)
    result = merged(problem, got.weights)
    for n in want:
        torch.testing.assert_close(result[n], want[n], rtol=1e-5, atol=1e-6)
    rows, _ = coefficient_rows(problem, granularity)
    if granularity == "task":  # one row: the same coefficients for every tensor
        assert len({tuple(w) for w in got.weights.values()}) == 1


def test_a_step_lies_on_the_segment_to_the_chosen_member_and_reaches_it_when_gamma_lambda_is_one():
    problem = toy_problem()
    initial = torch.full((1, 3), 0.3, dtype=torch.float64)
    members = pool_coefficients(initial)[:, 0].tolist()  # e1, e2, e3, initial
    one = learn(problem, iterations=1, step_size=0.1, lambda_=0.3).weights
    coeffs = next(iter(one.values()))
    gamma_lambda = 0.1 * 0.3  # γ_0 = step_size·2/2
    assert any(torch.allclose(torch.tensor(coeffs, dtype=torch.float64),
                              (1 - gamma_lambda) * initial[0] + gamma_lambda * torch.tensor(m))
               for m in members)
    # γλ = 1 (step_size 1, λ 1): the iterate becomes the chosen checkpoint, the one the
    # transcribed oracle picks
    want, _, choices = reference_fw_hard(problem, granularity="task", scaling_factor=1.0,
                                         step_size=1.0, max_iters=1)
    got = learn(problem, iterations=1, step_size=1.0, lambda_=1.0).weights
    expected = {"e0": [1.0, 0, 0], "e1": [0, 1.0, 0], "e2": [0, 0, 1.0], "initial": [1.0] * 3}
    assert all(w == pytest.approx(expected[choices[0]]) for w in got.values())
    for n, value in merged(problem, got).items():
        torch.testing.assert_close(value, want[n], rtol=1e-5, atol=1e-6)


def test_oracle_picks_the_checkpoint_opposite_the_gradient():
    """g = −s_2 on every tensor: cos(g_p, s_2,p) = −1 per tensor, the least of all."""
    problem = toy_problem()
    rows, count = coefficient_rows(problem, "task")
    pool = pool_coefficients(torch.full((count, 3), 0.3, dtype=torch.float64))
    second = {n: -(t0 + problem.task_vectors[1][n]) for n, t0 in problem.base.items()}
    scores = Oracle(problem, rows, count).scores(second, pool)
    assert int(scores.argmin()) == 1
    assert float(scores[0, 1]) == pytest.approx(-len(problem.base), abs=1e-6)
    # per tensor (layer): each tensor's own argmin, also the second checkpoint
    rows, count = coefficient_rows(problem, "layer")
    pool = pool_coefficients(torch.full((count, 3), 0.3, dtype=torch.float64))
    assert Oracle(problem, rows, count).scores(second, pool).argmin(dim=1).tolist() == [1] * count
    # a tensor without a gradient scores 0 for every member (no 0/0)
    names = list(second)
    partial = {**second, names[0]: None, names[1]: torch.zeros_like(second[names[1]])}
    scores = Oracle(problem, rows, count).scores(partial, pool)
    assert torch.isfinite(scores).all() and scores[rows[names[0]]].eq(0).all()


def test_a_pool_of_copies_of_the_initial_model_leaves_it_unchanged():
    problem = toy_problem(experts=2, same=True)  # θ^(0) = θ0 + 0.5·2τ = θ0 + τ = each expert
    got = learn(problem, lambda_=0.5, step_size=1.0, iterations=3, granularity="layer")
    start = {n: t0 + problem.task_vectors[0][n] for n, t0 in problem.base.items()}
    for n, value in merged(problem, got.weights).items():
        torch.testing.assert_close(value, start[n], rtol=1e-6, atol=1e-6)


def test_cross_entropy_needs_labels_and_entropy_does_not():
    problem = toy_problem(labels=False)
    with pytest.raises(MethodError, match="without labels"):
        learn(problem, iterations=1)
    got = learn(problem, iterations=2, loss="entropy")
    assert len(got.losses) == 2 and all(v > 0 for v in got.losses)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """test_data_aware's labelled classification set-up: a 2-layer BERT, a frozen head per task."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("fw-heads")
    base = build_model(root / "base", "bert", seed=0, layers=2)
    experts = [build_model(root / f"e{i}", "bert", seed=i, base=base, layers=2, delta=0.05)
               for i in (1, 2)]
    words = [f"w{i}" for i in range(2, 60)]
    tasks = []
    for i in (1, 2):
        gen = torch.Generator().manual_seed(20 + i)
        save_file({"weight": torch.randn(3, 32, generator=gen), "bias": torch.zeros(3)},
                  root / f"head{i}.safetensors")
        rows = [{"text": " ".join(words[j] for j in torch.randint(0, len(words), (6,), generator=gen)),
                 "label": int(torch.randint(0, 3, (1,), generator=gen))} for _ in range(16)]
        (root / f"train{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks.append({"data": str(root / f"train{i}.jsonl"), "head": str(root / f"head{i}.safetensors"),
                      "label_field": "label"})
    return {"base": base, "experts": experts, "tasks": tasks}


def test_merge_from_a_recipe_writes_the_learned_task_arithmetic(heads, tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "fw.yaml", {
        "merge_method": "fw_merging", "base_model": str(heads["base"]), "dtype": "float32",
        "models": [{"model": str(e), "calibration": t} for e, t in zip(heads["experts"], heads["tasks"])],
        "calibration": {"samples": 16, "max_length": 16, "batch_size": 8,
                        "cache": str(tmp_path / "cache")},
        "parameters": {"iterations": 2, "step_size": 1.0, "granularity": "layer"}})
    rc, _, err = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out")
    assert rc == 0, err
    learned = json.loads((tmp_path / "out" / "learned.json").read_text())
    assert learned["method"] == "fw_merging" and len(learned["losses"]) == 2
    weights = learned["weights"]
    assert any(w != [0.3, 0.3] for w in weights.values())  # the steps moved the coefficients
    out, base = read_tensors(tmp_path / "out"), read_tensors(heads["base"])
    experts = [read_tensors(e) for e in heads["experts"]]
    for key in weights:
        expected = base[key] + sum(w * (x[key] - base[key]) for w, x in zip(weights[key], experts))
        torch.testing.assert_close(out[key], expected, rtol=0, atol=1e-6)
