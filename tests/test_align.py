"""Weight matching (Git Re-Basin): the permutation spec, the alignment, `mergesmith align`, `align:`."""

import json
import shutil

import pytest
import torch
import transformers

import mergesmith
from conftest import read_tensors, run_cli, write_recipe
from mergesmith.engine.weight_matching import FAMILIES, align, aligned_view, align_models, permutation_spec
from mergesmith.engine.plan import build_plan
from mergesmith.engine.program import Output, Program, write_program
from mergesmith.errors import OutputError, PlanError
from mergesmith.io import Checkpoint
from mergesmith.methods.permutation import weight_matching
from mergesmith.toy import build_model, default_tokens, save_tokenizer


def _random_perms(spec, seed):
    """A random permutation per unit set (one per unit for dims within a head), never the
    identity, so that every family really moves."""
    generator = torch.Generator().manual_seed(seed)

    def one(n):
        perm = torch.randperm(n, generator=generator)
        return perm.roll(1) if torch.equal(perm, torch.arange(n)) else perm

    return {name: torch.stack([one(n) for _ in range(spec.sizes[spec.inner[name]])])
            if name in spec.inner else one(n) for name, n in spec.sizes.items()}


def _permuted_copy(folder, perms, out, units=FAMILIES):
    ck = Checkpoint(folder)
    view = aligned_view(ck, permutation_spec(ck).only(units), perms)
    program = Program([Output(n, [(view, n)]) for n in sorted(view.tensors)], ck.config, ck, "t", "s.")
    return write_program(program, out)


def _logits(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([[3, 5, 7, 11, 2, 9, 4]])).logits


def _qwen3(folder):
    """A tiny Qwen3 (q/k norms over each head's dims), every tensor noisy (toy.py has no qwen3)."""
    config = transformers.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, head_dim=8,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.05 * torch.randn(tensor.shape))
    model.save_pretrained(folder)
    save_tokenizer(folder, default_tokens(96))
    return folder


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2"])
def test_permuting_units_leaves_the_logits_unchanged(arch, tmp_path):
    """Random permutations of every MLP's units, every layer's heads (GQA groups) and the
    residual stream: the function is the same (the spec moves every axis it must), the tensors
    are not. The model is base + noise, so norms and (qwen2) q/k/v biases are not constants."""
    if arch == "qwen3":
        model = _qwen3(tmp_path / "model")
    else:
        base = build_model(tmp_path / "base", arch, seed=0, layers=2)
        model = build_model(tmp_path / "model", arch, seed=1, base=base, layers=2)
    units = FAMILIES + ("head_dims",) * (arch != "gpt2")  # GPT-2's fused q|k|v keeps a head's dims
    spec = permutation_spec(Checkpoint(model)).only(units)
    assert {p.split(".")[0] for p in spec.sizes} == set(units)
    out = _permuted_copy(model, _random_perms(spec, 3), tmp_path / "permuted", units)
    torch.testing.assert_close(_logits(out), _logits(model), rtol=0, atol=1e-5)
    got, want = read_tensors(out), read_tensors(model)
    assert sum(not torch.equal(got[n], want[n]) for n in want) >= len(spec.axes) - 1


def test_weight_matching_recovers_the_permutation_and_the_merge_returns_the_model(
        zoo, tmp_path, monkeypatch, capsys):
    model = zoo("llama")["e1"]
    spec = permutation_spec(Checkpoint(model)).only(FAMILIES)
    perms = _random_perms(spec, 7)
    permuted = _permuted_copy(model, perms, tmp_path / "permuted")
    code, _, err = run_cli(monkeypatch, capsys, "align", model, permuted, tmp_path / "aligned")
    assert code == 0, err
    aligned = tmp_path / "aligned" / "permuted"
    got, want = read_tensors(aligned), read_tensors(model)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    found = json.loads((aligned / "alignment.json").read_text())["permutations"]
    # the permuted copy is model[σ]; aligning it back takes σ⁻¹
    assert found == {p: torch.argsort(perms[p]).tolist() for p in perms}
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(model), "parameters": {"weight": 1.0}},
        {"model": str(aligned), "parameters": {"weight": 1.0}}]})
    merged = read_tensors(mergesmith.merge(recipe, tmp_path / "merged"))
    assert all(torch.equal(merged[n], want[n]) for n in want)


def test_objective_never_decreases_and_singular_values_are_unchanged(tmp_path, one_thread):
    """Two models from different initialisations: coordinate descent raises Σ⟨W_A, π(W_B)⟩
    sweep by sweep, the returned permutations are the ones applied, and a permutation changes
    no singular value of any matrix."""
    a = Checkpoint(build_model(tmp_path / "a", "llama", seed=0, layers=2))
    b = Checkpoint(build_model(tmp_path / "b", "llama", seed=1, layers=2))
    spec = permutation_spec(a)
    ta = {n: a.read(n).float() for n in spec.axes}
    tb = {n: b.read(n).float() for n in spec.axes}
    matching = weight_matching(spec, ta, tb, max_sweeps=100, seed=0)
    history = matching.objective
    assert len(history) >= 3 and history[-1] > history[0]
    assert all(later >= earlier - 1e-9 * abs(earlier) for earlier, later in zip(history, history[1:]))
    view = aligned_view(b, spec, matching.perms)
    by_hand = sum(float((ta[n].double() * view.read(n).double()).sum()) for n in spec.axes)
    assert by_hand == pytest.approx(history[-1], rel=1e-9)
    moved = 0
    for name in b.tensors:
        before, after = b.read(name), view.read(name)
        moved += not torch.equal(before, after)
        if before.dim() == 2:
            torch.testing.assert_close(torch.linalg.svdvals(after), torch.linalg.svdvals(before),
                                       rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(after.sort().values, before.sort().values)
    assert moved > len(b.tensors) // 2


def test_three_models_each_recover_their_permutation(zoo, tmp_path):
    """Also the dims within each value head: copy[i, t] = model[h[i], D[h[i], t]] is undone by
    h' = h⁻¹ and, for the copy's own head u, D'[u] = D[h[u]]⁻¹."""
    model = zoo("llama")["e2"]
    units = FAMILIES + ("head_dims",)
    spec = permutation_spec(Checkpoint(model)).only(units)
    perms = [_random_perms(spec, seed) for seed in (11, 12)]
    copies = [_permuted_copy(model, p, tmp_path / f"p{k}", units) for k, p in enumerate(perms)]
    written = align([model, *copies], tmp_path / "aligned", units=units)
    assert [p.name for p in written] == ["p0", "p1"]
    want = read_tensors(model)
    for folder, p in zip(written, perms):
        got = read_tensors(folder)
        assert all(torch.equal(got[n], want[n]) for n in want)
        found = json.loads((folder / "alignment.json").read_text())["permutations"]
        inverse = {name: torch.argsort(perm[p[spec.inner[name]]], dim=1) if name in spec.inner
                   else torch.argsort(perm) for name, perm in p.items()}
        assert found == {name: perm.tolist() for name, perm in inverse.items()}


def test_a_recipe_with_align_merges_the_aligned_models(tmp_path, capsys):
    """`align:` in a recipe equals aligning the folders first, then merging them."""
    a = build_model(tmp_path / "a", "llama", seed=0, layers=2)
    b = build_model(tmp_path / "b", "llama", seed=1, layers=2)
    [aligned] = align([a, b], tmp_path / "aligned", units=("mlp", "residual"), max_sweeps=5)
    models = lambda second: [{"model": str(a), "parameters": {"weight": 0.5}},  # noqa: E731
                             {"model": str(second), "parameters": {"weight": 0.5}}]
    recipe = {"merge_method": "linear", "dtype": "float32"}
    in_recipe = write_recipe(tmp_path / "in.yml", {**recipe, "models": models(b), "align": {
        "units": ["mlp", "residual"], "max_sweeps": 5, "reference": str(a)}})
    folders = write_recipe(tmp_path / "folders.yml", {**recipe, "models": models(aligned)})
    plain = write_recipe(tmp_path / "plain.yml", {**recipe, "models": models(b)})
    got = read_tensors(mergesmith.merge(in_recipe, tmp_path / "m1", progress=True))
    # the weight matching at plan time reports its sweeps as `mergesmith align` does
    err = capsys.readouterr().err
    assert f"weight matching 1 model(s) onto {a}" in err and f"  {b}: sweep 1, objective" in err
    want = read_tensors(mergesmith.merge(folders, tmp_path / "m2"))
    unaligned = read_tensors(mergesmith.merge(plain, tmp_path / "m3"))
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert not all(torch.equal(got[n], unaligned[n]) for n in want)
    heads = "model.layers.0.self_attn.k_proj.weight"  # heads were not asked for: their order stays
    b_k, a_k = Checkpoint(b).read(heads), Checkpoint(aligned).read(heads)
    assert torch.equal(a_k.sort(dim=1).values, b_k.sort(dim=1).values) and a_k.shape == b_k.shape


def test_refusals_name_the_model_and_the_reason(zoo, tmp_path, monkeypatch, capsys):
    llama, qwen = zoo("llama")["base"], zoo("qwen2")["base"]
    with pytest.raises(PlanError, match="different models.*architectures"):
        align_models([Checkpoint(llama), Checkpoint(qwen)])
    wide = build_model(tmp_path / "wide", "llama", seed=0, hidden=48)
    with pytest.raises(PlanError, match="different models.*hidden_size"):
        align([llama, wide], tmp_path / "out")
    odd = tmp_path / "odd"
    shutil.copytree(llama, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "num_attention_heads": 3,
                                                 "num_key_value_heads": 3, "head_dim": 10}))
    with pytest.raises(PlanError, match="k_proj.weight' has 16 entries on axis 0: not a whole number"):
        permutation_spec(Checkpoint(odd))
    bert = zoo("bert")["base"]
    code, _, err = run_cli(monkeypatch, capsys, "align", bert, zoo("bert")["e1"], tmp_path / "out")
    assert code == 1 and "no permutation spec for architecture 'bert'" in err and "hint:" in err
    (tmp_path / "taken" / "e1").mkdir(parents=True)
    (tmp_path / "taken" / "e1" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="taken/e1 already exists"):
        align([llama, zoo("llama")["e1"]], tmp_path / "taken")
    with pytest.raises(PlanError, match="unknown unit family 'neurons'"):
        align([llama, llama], tmp_path / "out", units=("neurons",))
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(llama), "parameters": {"weight": 1.0}},
        {"model": str(zoo("llama")["e1"]), "parameters": {"weight": 1.0}}],
        "align": {"reference": "elsewhere"}})
    with pytest.raises(PlanError, match=r"r\.yml:\d+: align\.reference: 'elsewhere' is not a model"):
        mergesmith.plan(recipe)
    data_aware = write_recipe(tmp_path / "d.yml", {"merge_method": "regmean", "align": {}, "models": [
        {"model": str(llama)}, {"model": str(zoo("llama")["e1"])}]})
    with pytest.raises(PlanError, match="regmean needs data"):
        build_plan(data_aware)
    assert not (tmp_path / "out").exists()
