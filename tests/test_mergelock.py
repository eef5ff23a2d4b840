"""MergeLock: `mergesmith lock` keeps the logits and breaks merging, `check` flags a locked input
with the evidence, `unlock` undoes the lock so that the merge is the unlocked merge again."""

import math

import pytest
import torch
import transformers

import mergesmith
from conftest import read_tensors, run_cli, write_recipe
from mergesmith.engine.mergelock import evidence, lock, lock_findings, locked_view, unlock
from mergesmith.errors import PlanError
from mergesmith.io import Checkpoint
from mergesmith.methods.mergelock import (Heads, LayerLock, draw_general, draw_lock, draw_rope, fit_transform,
                                          is_rope_compatible, product_gap, transform_o,
                                          transform_rows)
from mergesmith.toy import build_model

IDS = torch.tensor([[3, 5, 7, 11, 2, 9, 4, 30, 17, 8]])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(arch) -> base, two fine-tunes close to it (as real fine-tunes are) and e1 locked."""
    built = {}

    def get(arch):
        if arch not in built:
            root = tmp_path_factory.mktemp(f"lock-{arch}")
            base = build_model(root / "base", arch, seed=0, layers=2)
            e1 = build_model(root / "e1", arch, seed=1, base=base, layers=2, delta=0.002)
            e2 = build_model(root / "e2", arch, seed=2, base=base, layers=2, delta=0.002)
            built[arch] = {"base": base, "e1": e1, "e2": e2, "locked": lock(e1, root / "locked", seed=7),
                           "root": root}
        return built[arch]

    return get


def _logits(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def _rope(dim, position, theta=10000.0):
    """transformers' rotary map of one position as a matrix acting on row vectors:
    x ↦ x·cos + rotate_half(x)·sin."""
    half = dim // 2
    angle = position * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    cos, sin = torch.cat([torch.cos(angle)] * 2), torch.cat([torch.sin(angle)] * 2)
    rotate_half = torch.zeros(dim, dim, dtype=torch.float64)  # x @ rotate_half = cat(-x2, x1)
    rotate_half[torch.arange(half) + half, torch.arange(half)] = -1
    rotate_half[torch.arange(half), torch.arange(half) + half] = 1
    return torch.diag(cos) + rotate_half @ torch.diag(sin)


def test_rotation_scalings_commute_with_rope_and_general_transforms_do_not():
    gen = torch.Generator().manual_seed(0)
    m, g = draw_rope(8, gen), draw_general(8, gen)
    for position in (1, 5, 31):
        r = _rope(8, position)
        torch.testing.assert_close(m @ r, r @ m)
        assert not torch.allclose(g @ r, r @ g, atol=1e-3)
    assert is_rope_compatible(m) and not is_rope_compatible(g)
    singular = torch.linalg.svdvals(draw_general(8, gen, spread=2.0))
    assert singular.max() / singular.min() <= 4 + 1e-9  # well conditioned: κ ≤ spread²


def test_locked_rows_follow_the_papers_row_convention():
    """q_proj rows of head h = (W_Q^h)ᵀ: locking must give (W_Q^h M_g)ᵀ, k (W_K^g M_g^{−T})ᵀ,
    v (W_V^g N_g)ᵀ and o_proj's columns of head h (N_g^{−1} W_O^h)ᵀ, with GQA groups shared."""
    heads, gen = Heads(4, 2, 4), torch.Generator().manual_seed(1)
    lk = draw_lock(heads, gen)
    q, k, v = torch.randn(16, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64), \
        torch.randn(8, 6, dtype=torch.float64)
    o = torch.randn(6, 16, dtype=torch.float64)
    lq, lkk, lv, lo = (transform_rows("q", q, lk, heads), transform_rows("k", k, lk, heads),
                       transform_rows("v", v, lk, heads), transform_o(o, lk, heads))
    for h in range(4):
        g, rows = h // 2, slice(4 * h, 4 * h + 4)
        torch.testing.assert_close(lq[rows].T, q[rows].T @ lk.qk[g])
        torch.testing.assert_close(lo[:, rows].T, torch.linalg.inv(lk.vo[g]) @ o[:, rows].T)
    for g in range(2):
        rows = slice(4 * g, 4 * g + 4)
        torch.testing.assert_close(lkk[rows].T, k[rows].T @ torch.linalg.inv(lk.qk[g]).T)
        torch.testing.assert_close(lv[rows].T, v[rows].T @ lk.vo[g])
    # rows of whole heads from head 2 on are those of the whole tensor
    torch.testing.assert_close(transform_rows("q", q[8:], lk, heads, first_head=2), lq[8:])


def test_fits_and_invariants_are_exact():
    gen = torch.Generator().manual_seed(2)
    ref = torch.randn(40, 8, dtype=torch.float64, generator=gen)
    for m, rope in ((draw_rope(8, gen), True), (draw_general(8, gen), False)):
        torch.testing.assert_close(fit_transform(ref, ref @ m, rope), m)
    xa, ya, xb, yb = (torch.randn(n, 8, dtype=torch.float64, generator=gen) for n in (10, 12, 10, 12))
    gap, size = product_gap(xa, ya, xb, yb)
    assert math.isclose(gap, float(torch.sum((xa @ ya.T - xb @ yb.T) ** 2)), rel_tol=1e-9)
    assert math.isclose(size, float(torch.sum((xb @ yb.T) ** 2)), rel_tol=1e-9)
    # batched over 4 query heads whose key/value factors come in 2 groups (GQA)
    xa, xb = (torch.randn(4, 10, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    ya, yb = (torch.randn(2, 12, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    gap, size = product_gap(xa, ya, xb, yb, group=2)
    assert math.isclose(gap, sum(float(torch.sum((xa[h] @ ya[h // 2].T - xb[h] @ yb[h // 2].T) ** 2))
                                 for h in range(4)), rel_tol=1e-9)
    assert math.isclose(size, sum(float(torch.sum((xb[h] @ yb[h // 2].T) ** 2)) for h in range(4)),
                        rel_tol=1e-9)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_lock_keeps_the_logits_and_the_invariants_and_moves_the_weights(family, arch):
    """Tiny Llama with GQA (4 query heads, 2 key/value heads), Qwen2 with q/k/v biases, Gemma
    with tied embeddings."""
    f = family(arch)
    torch.testing.assert_close(_logits(f["locked"]), _logits(f["e1"]), rtol=1e-5, atol=1e-5)
    layers = evidence(Checkpoint(f["locked"]), Checkpoint(f["e1"]))
    assert all(e.weights > 0.5 and e.qk < 1e-6 and e.vo < 1e-6 for e in layers)
    got, want = read_tensors(f["locked"]), read_tensors(f["e1"])
    moved = {n for n in want if not torch.equal(got[n], want[n])}
    assert moved == {n for n in want if ".self_attn." in n and "o_proj.bias" not in n}
    if arch == "qwen2":
        assert "model.layers.0.self_attn.k_proj.bias" in moved


def test_a_transform_that_does_not_commute_with_rope_changes_the_logits_and_is_refused(family):
    f = family("llama")
    ck = Checkpoint(f["e1"])
    heads, gen = Heads(4, 2, 8), torch.Generator().manual_seed(3)
    bad = LayerLock(torch.stack([draw_general(8, gen) for _ in range(2)]), draw_lock(heads, gen).vo)
    with pytest.raises(ValueError, match="RoPE"):
        locked_view(ck, {0: bad})
    model = transformers.AutoModelForCausalLM.from_pretrained(f["e1"]).eval()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight.copy_(transform_rows("q", attn.q_proj.weight, bad, heads))
        attn.k_proj.weight.copy_(transform_rows("k", attn.k_proj.weight, bad, heads))
        assert (model(IDS).logits - _logits(f["e1"])).abs().max() > 1e-3


def _merge(tmp_path, name, models, base):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]}
    return mergesmith.merge(write_recipe(tmp_path / f"{name}.yaml", recipe), tmp_path / name)


def test_merging_a_locked_model_breaks_and_unlock_restores_the_merge(family, tmp_path):
    f = family("llama")
    plain = _merge(tmp_path, "plain", [f["e1"], f["e2"]], f["base"])
    broken = _merge(tmp_path, "broken", [f["locked"], f["e2"]], f["base"])
    want, bad = read_tensors(plain), read_tensors(broken)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (bad[q] - want[q]).norm() > 0.5 * want[q].norm()
    # what attention computes (per-head W_Q·W_Kᵀ, W_V·W_O) is far from the plain merge's: the
    # transforms do not cancel (random toy attention barely moves the logits, so test it there)
    assert all(min(e.qk, e.vo) > 0.3 for e in evidence(Checkpoint(broken), Checkpoint(plain)))

    # reference = the model before the lock: exactly the pre-lock weights, hence the plain merge
    unlocked = unlock(f["locked"], f["e1"], tmp_path / "unlocked")
    for name, tensor in read_tensors(f["e1"]).items():
        torch.testing.assert_close(read_tensors(unlocked)[name], tensor, rtol=1e-5, atol=1e-6)
    again = read_tensors(_merge(tmp_path, "again", [unlocked, f["e2"]], f["base"]))
    for name in want:
        torch.testing.assert_close(again[name], want[name], rtol=1e-5, atol=1e-6)

    # reference = the base: the locked model's function, weights back near the base, and a merge
    # far closer to the plain one than the broken merge
    near = unlock(f["locked"], f["base"], tmp_path / "near")
    torch.testing.assert_close(_logits(near), _logits(f["locked"]), rtol=1e-5, atol=1e-5)
    assert all(e.weights < 0.2 for e in evidence(Checkpoint(near), Checkpoint(f["base"])))
    merged = read_tensors(_merge(tmp_path, "near-merge", [near, f["e2"]], f["base"]))
    assert (merged[q] - want[q]).norm() < 0.1 * (bad[q] - want[q]).norm()


def test_check_flags_the_locked_model_with_the_evidence(family, tmp_path, monkeypatch, capsys):
    f = family("qwen2")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(f["base"]),
              "models": [{"model": str(f["locked"]), "parameters": {"weight": 0.5}},
                         {"model": str(f["e2"]), "parameters": {"weight": 0.5}}]}
    code, _, err = run_cli(monkeypatch, capsys, "check", write_recipe(tmp_path / "locked.yaml", recipe))
    assert code != 0 and "Traceback" not in err
    err = " ".join(err.split())  # rich wraps long lines
    line = err[err.index("locked: "):]
    assert line.startswith(f"locked: {f['locked']} looks MergeLock-ed (against {f['base']}) in layer(s) 0-1")
    assert "W_Q·W_Kᵀ" in line and "W_V·W_O" in line
    assert str(f["e2"]) not in err.replace(str(f["locked"]), "")
    assert "mergesmith unlock" in err
    recipe["models"][0]["model"] = str(f["e1"])  # siblings merged as they are: no false alarm
    code, out, err = run_cli(monkeypatch, capsys, "check", write_recipe(tmp_path / "plain.yaml", recipe))
    assert code == 0 and "looks MergeLock-ed" not in err and "ok" in out


def test_detection_without_a_base_and_with_a_locked_reference(family, zoo):
    f = family("llama")
    ck = {k: Checkpoint(f[k]) for k in ("base", "e1", "e2", "locked")}
    gpt2 = {k: Checkpoint(p) for k, p in zoo("gpt2").items()}
    assert lock_findings(gpt2, "base") == []  # an architecture MergeLock cannot read is skipped
    assert lock_findings({"a": ck["e1"], "b": ck["e2"]}) == []
    pair = lock_findings({"a": ck["e2"], "b": ck["locked"]})
    assert len(pair) == 1 and pair[0].startswith("b looks MergeLock-ed") and "or a against b" in pair[0]
    # the first model (the reference without a base) is locked: the two others agree with each other
    three = lock_findings({"x": ck["locked"], "y": ck["e2"], "z": ck["base"]})
    assert len(three) == 1 and three[0].startswith("x looks MergeLock-ed")


def test_lock_and_unlock_commands_and_refusals(family, tmp_path, monkeypatch, capsys):
    f = family("llama")
    code, _, err = run_cli(monkeypatch, capsys, "lock", f["e2"], tmp_path / "l2", "--seed", "1")
    assert code == 0, err
    assert "seed" not in (tmp_path / "l2" / "mergelock.yml").read_text()  # the key is not written
    code, _, err = run_cli(monkeypatch, capsys, "unlock", tmp_path / "l2", tmp_path / "u2",
                           "--reference", f["base"])
    assert code == 0 and "unlock: attention weights" in err
    torch.testing.assert_close(_logits(tmp_path / "u2"), _logits(f["e2"]), rtol=1e-5, atol=1e-5)
    gpt2 = build_model(tmp_path / "gpt2", "gpt2", seed=0, layers=1)
    code, _, err = run_cli(monkeypatch, capsys, "lock", gpt2, tmp_path / "g")
    assert code != 0 and "gpt2" in err and "Traceback" not in err
    other = build_model(tmp_path / "wide", "llama", seed=0, layers=2, hidden=48)
    with pytest.raises(PlanError, match="different models"):
        unlock(f["locked"], other, tmp_path / "u3")
    assert not (tmp_path / "g").exists() and not (tmp_path / "u3").exists()


def _copies(n, low, high, gen):
    """Sequences of 8 random tokens, then the same 8 again: the second half needs attention (an
    induction head), which is what the lock transforms."""
    half = torch.randint(low, high, (n, 8), generator=gen) + 2  # ids 0, 1 are [UNK], [PAD]
    return torch.cat([half, half], dim=1)


def _train_copy(folder, out, low, high, steps, lr, seed):
    gen = torch.Generator().manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        ids = _copies(32, low, high, gen)
        labels = ids.clone()
        labels[:, :8] = -100  # the first half is random: only the copy is learnable
        optimizer.zero_grad()
        model(ids, labels=labels).loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


def _copy_accuracy(folder):
    ids = _copies(64, 0, 90, torch.Generator().manual_seed(99))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        predicted = model(ids).logits[:, 8:-1].argmax(-1)
    return float((predicted == ids[:, 9:]).float().mean())


def test_a_merge_with_the_locked_model_loses_a_skill_that_lives_in_attention(tmp_path, one_thread):
    """Base pre-trained to copy (an attention skill); two fine-tunes on different tokens. Their
    average copies; the average with one of them locked does not (the paper: > 95% drop);
    unlocked from the base, it copies again."""
    torch.manual_seed(0)
    raw = build_model(tmp_path / "raw", "llama", seed=0, layers=2)
    base = _train_copy(raw, tmp_path / "base", 0, 90, steps=150, lr=1e-2, seed=0)
    e1 = _train_copy(base, tmp_path / "e1", 0, 45, steps=10, lr=1e-3, seed=1)
    e2 = _train_copy(base, tmp_path / "e2", 45, 90, steps=10, lr=1e-3, seed=2)
    locked = lock(e1, tmp_path / "locked", seed=3)
    unlocked = unlock(locked, base, tmp_path / "unlocked")
    plain = _copy_accuracy(_merge(tmp_path, "plain", [e1, e2], base))
    broken = _copy_accuracy(_merge(tmp_path, "broken", [locked, e2], base))
    fixed = _copy_accuracy(_merge(tmp_path, "fixed", [unlocked, e2], base))
    assert _copy_accuracy(locked) == _copy_accuracy(e1) > 0.5  # chance: 1/90
    # (how well a 150-step model copies depends on the seed; what the lock does to it does not)
    assert plain > 0.5 and broken < plain / 3 and abs(fixed - plain) < 0.02
