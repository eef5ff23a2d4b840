"""Continual merging (methods/continual.py, engine/continual.py): OPCM's projection against
FusionBench's full-SVD code, its orthogonal case, the chains' closed forms through
`merge --onto`, the bounded state beside the merge, and the refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import read_tensors, run_cli, write_recipe

from mergesmith import MergesmithError
from mergesmith.engine.continual import continual_merge
from mergesmith.methods.continual import opcm_project, split_rank
from mergesmith.toy import build_model


# ------------------------------------------------------------------------------------------
# OPCM's projection (pure)


def fb_project(reference: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """FusionBench's merge_linear_weights projection as written there: full SVD, P = Uᵀτ V,
    P's diagonal and its top-left split_rank block zeroed, U P Vᵀ."""
    u, s, vh = torch.linalg.svd(reference.double(), full_matrices=True)
    v = vh.T
    split = (s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item()
    p = u.T @ tau.double() @ v
    p.diagonal().fill_(0)
    p[:split, :split] = 0
    return u @ p @ v.T


@pytest.mark.parametrize("shape", [(12, 12), (16, 6), (5, 11)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_opcm_projection_is_fusionbench_on_a_full_rank_reference(shape, alpha):
    gen = torch.Generator().manual_seed(sum(shape))
    reference = torch.randn(*shape, generator=gen, dtype=torch.float64)
    tau = torch.randn(*shape, generator=gen, dtype=torch.float64)
    ours, info = opcm_project(reference, tau, alpha)
    assert info["rank"] == min(shape)
    torch.testing.assert_close(ours, fb_project(reference, tau, alpha), rtol=0, atol=1e-12)


def test_opcm_projection_is_orthogonal_to_the_kept_directions():
    """u_iᵀ τ⊥ v_i = 0 for every i, and u_iᵀ τ⊥ v_j = 0 for i, j < r_α (METHODS.md opcm (1))."""
    gen = torch.Generator().manual_seed(0)
    # a spread spectrum, so that r_α is neither 0 nor the rank
    u, _ = torch.linalg.qr(torch.randn(20, 8, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(10, 8, generator=gen, dtype=torch.float64))
    sigma = torch.tensor([8.0, 4, 2, 1, 0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    reference = u @ torch.diag(sigma) @ v.T  # rank 8 of 10 columns
    tau = torch.randn(20, 10, generator=gen, dtype=torch.float64)
    out, info = opcm_project(reference, tau, 0.5)
    r = info["split_rank"]
    assert info["rank"] == 8 and r == split_rank(sigma, 0.5) == 0  # 8/15.9 > 0.5 at index 0
    out, info = opcm_project(reference, tau, 0.8)
    assert info["split_rank"] == 2  # (8 + 4)/15.9 = 0.75, (8 + 4 + 2)/15.9 = 0.88
    p = u.T @ out @ v
    assert p.diagonal().abs().max() < 1e-12
    assert p[:2, :2].abs().max() < 1e-12
    assert p[2:, :2].abs().min() > 1e-6  # the rest of τ stays
    # and τ − τ⊥ lies in the zeroed entries only: the rest of P is τ's
    q = u.T @ tau @ v
    keep = ~torch.eye(8, dtype=torch.bool)
    keep[:2, :2] = False
    torch.testing.assert_close(p[keep], q[keep], rtol=0, atol=1e-12)
    # so the added update is orthogonal to the merge so far: ⟨U S Vᵀ, τ⊥⟩ = Σ σ_i P_ii = 0
    assert abs(float((reference * out).sum())) < 1e-10 < abs(float((reference * tau).sum()))


def test_split_rank_when_no_index_exceeds_alpha():
    """FB: argmax of an all-false mask is 0; alpha ≥ 1 never exceeded, Σσ = 0 has no ratios."""
    sigma = torch.tensor([3.0, 2.0, 1.0])
    assert split_rank(sigma, 1.0) == 0 == int((sigma.cumsum(0) / sigma.sum() > 1.0).float().argmax())
    assert split_rank(torch.zeros(3), 0.5) == 0
    assert split_rank(sigma, 0.5) == 1  # 3/6 = 0.5 is not above 0.5; 5/6 is


# ------------------------------------------------------------------------------------------
# chains through the engine


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy llama base and four experts, and another base of the same architecture."""
    root = tmp_path_factory.mktemp("continual")
    base = build_model(root / "base", "llama", seed=0, layers=2)
    experts = [build_model(root / f"e{i}", "llama", seed=i, base=base, layers=2) for i in (1, 2, 3, 4)]
    other = build_model(root / "other", "llama", seed=9, layers=2)
    return root, base, experts, other


def recipe(path, rule, base, models, **params):
    data = {"merge_method": rule, "base_model": str(base), "models": [{"model": str(m)} for m in models]}
    if params:
        data["parameters"] = params
    return write_recipe(path, data)


def chain(root, rule, base, experts, name, **params):
    """Merge experts one call each: the first from the base, each next --onto the last."""
    out = None
    for i, expert in enumerate(experts):
        step = root / f"{name}-{i}"
        continual_merge(recipe(root / f"{name}-{i}.yaml", rule, base, [expert], **params), step,
                        onto=out)
        out = step
    return out


def task_vectors(base, experts):
    b = read_tensors(base)
    return b, [{k: read_tensors(e)[k] - b[k] for k in b} for e in experts]


def close(a: dict, b: dict, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=k)


def test_continual_task_arithmetic_chain_is_task_arithmetic(world, tmp_path):
    root, base, experts, _ = world
    out = chain(tmp_path, "continual_task_arithmetic", base, experts[:3], "ta", **{"lambda": 0.3})
    b, taus = task_vectors(base, experts[:3])
    close(read_tensors(out), {k: b[k] + 0.3 * sum(t[k] for t in taus) for k in b})
    state = json.loads((out / "continual" / "state.json").read_text())
    assert state["count"] == 3 and state["order"] == [str(e) for e in experts[:3]]
    for n, t in zip(state["norms"], taus):
        assert n == pytest.approx(math.sqrt(sum(float(x.double().square().sum()) for x in t.values())))


def test_continual_average_and_magmax_chains_are_their_closed_forms(world, tmp_path):
    root, base, experts, _ = world
    b, taus = task_vectors(base, experts[:3])
    avg = chain(tmp_path, "continual_average", base, experts[:3], "avg")
    models = [read_tensors(e) for e in experts[:3]]
    close(read_tensors(avg), {k: sum(m[k] for m in models) / 3 for k in b})
    mag = chain(tmp_path, "continual_magmax", base, experts[:3], "mag", **{"lambda": 0.5})
    want = {}
    for k in b:
        stacked = torch.stack([t[k] for t in taus])
        pick = stacked.abs().argmax(0, keepdim=True)
        want[k] = b[k] + 0.5 * stacked.gather(0, pick)[0]
    close(read_tensors(mag), want)


def test_continual_ties_chain_follows_fusionbench_recursion(world, tmp_path):
    """τ̄_1 = λτ_1; τ̄_t = τ̄_{t−1} + λ·TIES_sum(τ̄_{t−1}, τ_t), TIES per tensor (top ⌊d·n⌋)."""
    root, base, experts, _ = world
    lam, d = 0.5, 0.2
    out = chain(tmp_path, "continual_ties", base, experts[:3], "ties", **{"lambda": lam, "density": d})
    b, taus = task_vectors(base, experts[:3])

    def trim(x):
        k = max(1, int(d * x.numel()))
        flat = x.flatten()
        kept = torch.zeros_like(flat)
        idx = flat.abs().topk(k).indices
        kept[idx] = flat[idx]
        return kept.view_as(x)

    want = {}
    for k in b:
        merged = lam * taus[0][k]
        for t in taus[1:]:
            v = torch.stack([trim(merged), trim(t[k])])
            sign = v.sum(0).sign()
            sign[sign == 0] = sign.sum().sign()
            agree = torch.where(sign > 0, v > 0, v < 0)
            merged = merged + lam * (v * agree).sum(0)
        want[k] = b[k] + merged
    close(read_tensors(out), want, atol=1e-5)


def fb_opcm(base: dict, taus: list[dict], alpha: float) -> dict:
    """FusionBench's OPCM loop on whole state dicts: λ_1 = 1; each step projects the Linear
    weights (here: 2-D tensors but the embedding), rescales to the mean task-vector norm."""
    norm = lambda d: math.sqrt(sum(float(x.double().square().sum()) for x in d.values()))  # noqa: E731
    merged = {k: v.double() for k, v in taus[0].items()}
    norms, lam = [norm(taus[0])], 1.0
    for tau in taus[1:]:
        norms.append(norm(tau))
        new = {}
        for k, t in tau.items():
            t = t.double()
            if t.ndim == 2 and "embed" not in k:
                t = fb_project(merged[k], t, alpha)
            new[k] = lam * merged[k] + t
        lam = norm(new) / (sum(norms) / len(norms))
        merged = {k: v / lam for k, v in new.items()}
    return {k: base[k] + v.float() for k, v in merged.items()}


def test_opcm_chain_is_fusionbench_opcm_and_keeps_the_mean_norm(world, tmp_path, one_thread):
    root, base, experts, _ = world
    stepwise = chain(tmp_path, "opcm", base, experts, "opcm", alpha=0.5)
    b, taus = task_vectors(base, experts)
    got = read_tensors(stepwise)
    close(got, fb_opcm(b, taus, 0.5), atol=2e-6)
    # ‖θ̄_t − θ0‖ = n̄_t (METHODS.md opcm (2))
    state = json.loads((stepwise / "continual" / "state.json").read_text())
    moved = math.sqrt(sum(float((got[k] - b[k]).double().square().sum()) for k in b))
    assert moved == pytest.approx(sum(state["norms"]) / 4, rel=1e-5)
    assert state["scale"] > 1.2  # λ_4 of four near-orthogonal random task vectors: about √4
    # one recipe of all four gives the same merge as four --onto steps
    at_once = continual_merge(recipe(tmp_path / "all.yaml", "opcm", base, experts, alpha=0.5),
                              tmp_path / "all")
    close(read_tensors(at_once), got, atol=2e-6)


def block_experts(root, base, count):
    """Experts whose task vectors sit in disjoint row blocks of every tensor: each new one is
    orthogonal to the rows (left singular vectors) of all the earlier ones."""
    tensors = read_tensors(base)
    gen = torch.Generator().manual_seed(7)
    folders = []
    for i in range(count):
        folder = root / f"block{i}"
        shutil.copytree(base, folder)
        out = {}
        for name, x in tensors.items():
            rows = x.shape[0]
            lo, hi = rows * i // count, rows * (i + 1) // count
            tau = torch.zeros_like(x)
            tau[lo:hi] = 0.01 * (1 + i) * torch.randn(x[lo:hi].shape, generator=gen)
            out[name] = x + tau
        from safetensors.torch import save_file

        for f in folder.glob("*.safetensors"):
            f.unlink()
        save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    return folders


def test_opcm_of_orthogonal_task_vectors_is_task_arithmetic(world, tmp_path, one_thread):
    """Nothing to project away: θ̄_t = θ0 + Σ τ_i/λ_t with λ_t = ‖Σ τ_i‖/n̄_t (task arithmetic
    with λ = n̄_t/‖Σ τ_i‖; ‖Σ τ_i‖ = √Σ n_i² for these disjoint supports)."""
    root, base, _, _ = world
    experts = block_experts(tmp_path, base, 3)
    out = chain(tmp_path, "opcm", base, experts, "orth", alpha=0.5)
    b, taus = task_vectors(base, experts)
    norms = [math.sqrt(sum(float(x.double().square().sum()) for x in t.values())) for t in taus]
    lam = (sum(norms) / 3) / math.sqrt(sum(n * n for n in norms))
    ta = tmp_path / "ta.yaml"
    write_recipe(ta, {"merge_method": "task_arithmetic", "base_model": str(base),
                      "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts],
                      "parameters": {"lambda": lam}})
    from mergesmith.engine.api import merge

    close(read_tensors(out), read_tensors(merge(ta, tmp_path / "ta")), atol=1e-6)
    state = json.loads((out / "continual" / "state.json").read_text())
    assert state["scale"] == pytest.approx(1 / lam)


def test_state_is_bounded_in_the_number_of_models(world, tmp_path, one_thread):
    """No tensors beside the merge; per-tensor entries fixed; only order and norms grow."""
    root, base, experts, _ = world
    chain(tmp_path, "opcm", base, experts, "bounded", alpha=0.5)
    two = tmp_path / "bounded-1"
    four = tmp_path / "bounded-3"
    for folder in (two, four):
        assert [p.name for p in (folder / "continual").iterdir()] == ["state.json"]
    s2, s4 = (json.loads((f / "continual" / "state.json").read_text()) for f in (two, four))
    assert set(s2["projections"]) == set(s4["projections"])
    assert len(s2["projections"]) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    per_step = ("order", "norms", "weights", "count", "scale", "projections")
    assert {k: v for k, v in s2.items() if k not in per_step} == \
        {k: v for k, v in s4.items() if k not in per_step}
    assert len(s4["order"]) == len(s4["norms"]) == 4
    assert sum(f.stat().st_size for f in four.glob("*.safetensors")) == \
        sum(f.stat().st_size for f in two.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------
# refusals


def test_onto_refuses_what_is_not_a_continual_merge_of_this_base(world, tmp_path, monkeypatch, capsys):
    root, base, experts, other = world
    first = tmp_path / "first"
    continual_merge(recipe(tmp_path / "r1.yaml", "opcm", base, experts[:1]), first)
    add = recipe(tmp_path / "r2.yaml", "opcm", base, experts[1:2])
    # a plain model folder, and an ordinary (non-continual) merge
    plain = tmp_path / "plain.yaml"
    write_recipe(plain, {"merge_method": "task_arithmetic", "base_model": str(base),
                         "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts[:2]]})
    code, _, err = run_cli(monkeypatch, capsys, "merge", plain, tmp_path / "ta", "-q")
    assert code == 0
    for folder in (experts[0], tmp_path / "ta"):
        code, _, err = run_cli(monkeypatch, capsys, "merge", add, tmp_path / "x", "--onto", folder, "-q")
        assert code != 0 and "not a continual mergesmith merge" in err and "Traceback" not in err
    # another base
    wrong = recipe(tmp_path / "r3.yaml", "opcm", other, experts[1:2])
    with pytest.raises(MergesmithError, match="merged onto base .* whose weights differ"):
        continual_merge(wrong, tmp_path / "y", onto=first)
    # per-model parameters
    weighted = write_recipe(tmp_path / "r5.yaml", {
        "merge_method": "opcm", "base_model": str(base),
        "models": [{"model": str(experts[1]), "parameters": {"weight": 2.0}}]})
    with pytest.raises(MergesmithError, match="takes no per-model parameters"):
        continual_merge(weighted, tmp_path / "v", onto=first)
    # another rule
    ta = recipe(tmp_path / "r4.yaml", "continual_task_arithmetic", base, experts[1:2])
    with pytest.raises(MergesmithError, match="was merged with opcm"):
        continual_merge(ta, tmp_path / "z", onto=first)
    # weights changed after the merge
    tampered = tmp_path / "tampered"
    shutil.copytree(first, tampered)
    tensors = read_tensors(tampered)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    from safetensors.torch import save_file

    save_file(tensors, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergesmithError, match="not the ones continual/state.json was written with"):
        continual_merge(add, tmp_path / "w", onto=tampered)
    for out in ("x", "y", "z", "w", "v"):
        assert not (tmp_path / out).exists()


def test_onto_through_the_cli_and_a_continual_section(world, tmp_path, monkeypatch, capsys):
    root, base, experts, _ = world
    first = recipe(tmp_path / "a.yaml", "continual_task_arithmetic", base, experts[:1], **{"lambda": 1.0})
    code, _, err = run_cli(monkeypatch, capsys, "merge", first, tmp_path / "m1", "-q")
    assert code == 0, err
    second = recipe(tmp_path / "b.yaml", "continual_task_arithmetic", base, experts[1:2], **{"lambda": 1.0})
    code, _, err = run_cli(monkeypatch, capsys, "merge", second, tmp_path / "m2",
                           "--onto", tmp_path / "m1", "-q")
    assert code == 0, err
    data = {"merge_method": "continual_task_arithmetic", "base_model": str(base),
            "models": [{"model": str(experts[1])}], "parameters": {"lambda": 1.0},
            "continual": {"onto": str(tmp_path / "m1")}}
    code, _, err = run_cli(monkeypatch, capsys, "merge", write_recipe(tmp_path / "c.yaml", data),
                           tmp_path / "m3", "-q")
    assert code == 0, err
    b, taus = task_vectors(base, experts[:2])
    want = {k: b[k] + taus[0][k] + taus[1][k] for k in b}
    close(read_tensors(tmp_path / "m2"), want)
    close(read_tensors(tmp_path / "m3"), want)
    code, _, err = run_cli(monkeypatch, capsys, "merge", first, tmp_path / "m5", "--ray", "-q")
    assert code != 0 and "a continual merge runs here" in err
    code, out, err = run_cli(monkeypatch, capsys, "check", tmp_path / "c.yaml")
    assert code == 0 and "continual_task_arithmetic — continual" in out.replace("\n", " "), err
    bad = recipe(tmp_path / "d.yaml", "continual_ties", base, experts[:1], alpha=0.5)
    code, _, err = run_cli(monkeypatch, capsys, "merge", bad, tmp_path / "m4", "-q")
    assert code != 0 and "continual_ties takes no parameter 'alpha'" in err


# ------------------------------------------------------------------------------------------
# DOP


def fb_dop(base, previous, new, *, alpha, lr, steps, ema_beta, epsilon):
    """FusionBench's _optimize_weight (mgda, ema, "uv") as written there: autograd per loss,
    gradients divided by their losses, MinNormSolver's two-vector rule, EMA, Adam on the
    weighted loss."""
    models = [previous, new]
    proj = []
    for m in models:
        u, s, vh = torch.linalg.svd(m - base, full_matrices=True)
        v = vh.T
        k = torch.searchsorted(s.cumsum(0) / s.sum(), epsilon).item()
        proj.append((u[:, :k], s[:k], v[:, :k]))

    def loss_of(w, m, p):
        u, s, v = p
        d = w - m
        return (torch.linalg.matrix_norm(torch.diag(s) @ u.T @ d) ** 2
                + torch.linalg.matrix_norm(d @ v @ torch.diag(s)) ** 2)

    w = torch.nn.Parameter((previous + new) / 2)
    opt = torch.optim.Adam([w], lr=lr)
    ema = [alpha, 1 - alpha]
    for _ in range(steps):
        grads, losses = [], []
        for m, p in zip(models, proj):
            loss = loss_of(w, m, p)
            opt.zero_grad()
            loss.backward()
            grads.append(w.grad.clone() / float(loss.detach()))
            losses.append(float(loss.detach()))
        v11, v12, v22 = [float((a * b).sum()) for a, b in ((grads[0], grads[0]), (grads[0], grads[1]),
                                                           (grads[1], grads[1]))]
        gamma = 0.999 if v12 >= v11 else 0.001 if v12 >= v22 else -(v12 - v22) / (v11 + v22 - 2 * v12)
        ema = [ema_beta * c + (1 - ema_beta) * x for c, x in zip(ema, (gamma, 1 - gamma))]
        total = sum(c * loss_of(w, m, p) for c, m, p in zip(ema, models, proj))
        opt.zero_grad()
        total.backward()
        opt.step()
    return w.detach()


def test_dop_is_fusionbench_dop(one_thread):
    from mergesmith.methods.continual import dop_merge

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(9, 7, generator=gen)
    previous = base + 0.1 * torch.randn(9, 7, generator=gen)
    new = base + 0.1 * torch.randn(9, 7, generator=gen)
    settings = dict(alpha=0.8, lr=1e-2, steps=40, ema_beta=0.9, epsilon=0.9)
    ours = dop_merge(base, previous, new, **settings)
    torch.testing.assert_close(ours, fb_dop(base, previous, new, **settings), rtol=0, atol=2e-5)
    assert (ours - (previous + new) / 2).abs().max() > 0.05  # it moved from the average


def test_dop_edge_cases():
    """METHODS.md dop (1)-(3): equal models stay; no kept components leave the average;
    each model's loss is 0 at itself."""
    from mergesmith.methods.continual import dop_loss, dop_merge, principal

    gen = torch.Generator().manual_seed(4)
    base = torch.randn(6, 5, generator=gen)
    model = base + 0.1 * torch.randn(6, 5, generator=gen)
    other = base + 0.1 * torch.randn(6, 5, generator=gen)
    assert torch.equal(dop_merge(base, model, model, lr=1e-2, steps=20), model)
    torch.testing.assert_close(dop_merge(base, model, other, lr=1e-2, steps=20, epsilon=0.0),
                               (model + other) / 2, rtol=0, atol=0)
    u, s, v = principal(model - base, 0.99999)
    assert s.numel() == 4  # FB keeps those before the one whose cumulative share reaches ε
    loss, grad = dop_loss(model - model, u, s, v)
    assert float(loss) == 0 and float(grad.abs().max()) == 0
    # the projector form dop_merge uses on wide spectra is the same loss and gradient
    from mergesmith.methods.continual import _loss_of

    delta = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    u, s, v = principal((model - base).double(), 1.0)
    for got, want in zip(_loss_of((u, s, v))(delta), dop_loss(delta, u, s, v)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dop_chain_averages_all_but_linear_weights(world, tmp_path, one_thread):
    from mergesmith.methods.continual import dop_merge

    root, base, experts, _ = world
    out = chain(tmp_path, "dop", base, experts[:2], "dop", steps=20, lr=1e-3)
    b, m1, m2 = (read_tensors(f) for f in (base, *experts[:2]))
    got = read_tensors(out)
    for k in b:
        if b[k].ndim == 2 and "embed" not in k:
            want = dop_merge(b[k], m1[k], m2[k], steps=20, lr=1e-3)
        else:
            want = (m1[k] + m2[k]) / 2
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-7, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_continual_rules_on_cuda_match_the_cpu(world, tmp_path):
    root, base, experts, _ = world
    for rule, params in (("opcm", {"alpha": 0.5}), ("dop", {"steps": 20, "lr": 1e-3}),
                         ("continual_ties", {}), ("continual_magmax", {})):
        outs = []
        for device in ("cpu", "cuda"):
            first = tmp_path / f"{rule}-{device}-1"
            continual_merge(recipe(tmp_path / "a.yaml", rule, base, experts[:1], **params), first,
                            device=device)
            outs.append(continual_merge(recipe(tmp_path / "b.yaml", rule, base, experts[1:3], **params),
                                        tmp_path / f"{rule}-{device}-2", onto=first, device=device))
        close(read_tensors(outs[0]), read_tensors(outs[1]), atol=1e-5)
