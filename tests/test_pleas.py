"""PLeaS (methods/pleas.py, calibrate/pleas_activations.py, align.py): partial matching of
MLP units on data, then least squares for down_proj, on two tiny Llamas."""

import numpy as np
import pytest
import torch
import transformers

from mergesmith.engine.weight_matching import (FAMILIES, align_models, aligned_view, open_models,
                                     permutation_spec)
from mergesmith.alignment import align, pleas_align
from mergesmith.engine.program import Output, Program, write_program
from mergesmith.errors import CalibrationError, OutputError, PlanError
from mergesmith.io import Checkpoint
from mergesmith.methods.pleas import LeastSquaresSums, merged_width, partial_match
from mergesmith.toy import build_model

LAYERS = 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pleas")
    return (build_model(root / "a", "llama", seed=1, layers=LAYERS),
            build_model(root / "b", "llama", seed=2, layers=LAYERS))


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _mlp_io(model, ids):
    """Per layer: (the MLP's input, down_proj's input) at every token of `ids`."""
    seen = {}
    hooks = []
    for layer, block in enumerate(model.model.layers):
        hooks.append(block.mlp.register_forward_hook(
            lambda m, i, o, layer=layer: seen.__setitem__(("x", layer), i[0][0])))
        hooks.append(block.mlp.down_proj.register_forward_hook(
            lambda m, i, o, layer=layer: seen.__setitem__(("h", layer), i[0][0])))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return [(seen["x", layer], seen["h", layer]) for layer in range(len(model.model.layers))]


def _units(model, layer, x):
    """A model's MLP hidden units of `layer` on input x: act(x W_gateᵀ) · (x W_upᵀ)."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def test_partial_match_pairs_by_assignment_and_merges_the_most_correlated():
    # B's unit perm[i] is A's unit i; pairs (0, 2) and (3, 1) correlate best
    perm = torch.tensor([2, 0, 3, 1])
    strength = torch.tensor([0.9, 0.5, 0.6, 0.8])
    corr = torch.full((4, 4), 0.1)
    corr[torch.arange(4), perm] = strength
    blocks = partial_match(corr, width=6)
    assert blocks.merged_a.tolist() == [0, 3] and blocks.merged_b.tolist() == [2, 1]
    assert blocks.only_a.tolist() == [1, 2] and blocks.only_b.tolist() == [0, 3]
    assert blocks.width == 6
    every = partial_match(corr, width=4)
    assert every.merged_b.tolist() == perm.tolist() and len(every.only_a) == 0
    none = partial_match(corr, width=8)
    assert len(none.merged_a) == 0 and none.only_b.tolist() == perm.tolist()
    assert [merged_width(64, b) for b in (1, 1.25, 1.5, 2)] == [64, 80, 96, 128]
    with pytest.raises(ValueError):
        merged_width(64, 2.5)


def test_closed_form_is_where_the_authors_optimiser_converges(one_thread):
    """The authors fit the layer by Adam on the stacked MSE; our closed form is its optimum."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(300, 12, generator=generator)
    y_a, y_b = torch.randn(300, 5, generator=generator), torch.randn(300, 5, generator=generator)
    sums = LeastSquaresSums(12, 5)
    sums.add(h[:150], y_a[:150], y_b[:150])  # in two batches, as over calibration batches
    sums.add(h[150:], y_a[150:], y_b[150:])
    closed = sums.solve()
    weight = torch.zeros(5, 12, requires_grad=True)
    optimiser = torch.optim.Adam([weight], lr=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, 1500)  # theirs, too
    for _ in range(1500):
        optimiser.zero_grad()
        loss = ((h @ weight.T - y_a) ** 2).mean() + ((h @ weight.T - y_b) ** 2).mean()
        loss.backward()
        optimiser.step()
        schedule.step()
    torch.testing.assert_close(weight.detach().double(), closed, rtol=0, atol=1e-5)


def test_keeping_every_unit_gives_both_models_features(pair, tmp_path, one_thread):
    """Budget 2 (width 2d): the merged MLP's hidden units are exactly A's units and aligned
    B's units, computed on the merged model's own MLP inputs (nothing to fit on the units)."""
    a, b = pair
    out = pleas_align([a, b], tmp_path / "out", budget=2.0, samples=8, max_length=16)
    merged, model_a = _load(out), _load(a)
    aligned = align_models(open_models([str(a), str(b)]))[1].model
    write_program(Program([Output(n, [(aligned, n)]) for n in aligned.tensors], aligned.config,
                          Checkpoint(b), "aligned", "."), tmp_path / "aligned")
    model_b = _load(tmp_path / "aligned")
    d = model_a.config.intermediate_size
    assert merged.config.intermediate_size == 2 * d
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]])
    for layer, (x, h) in enumerate(_mlp_io(merged, ids)):
        units_a, units_b = _units(model_a, layer, x), _units(model_b, layer, x)
        torch.testing.assert_close(h[:, :d], units_a)
        # B's units follow in the order the assignment paired them with A's: a permutation
        nearest = torch.cdist(h[:, d:].T, units_b.T).argmin(1)
        assert sorted(nearest.tolist()) == list(range(d))
        torch.testing.assert_close(h[:, d:], units_b[:, nearest])


def test_full_width_least_squares_is_numpys_lstsq(pair, tmp_path, one_thread):
    """Every layer's down_proj is argmin ‖H Wᵀ − Y_A‖² + ‖H Wᵀ − Y_B‖², H the merged
    model's own hidden units on the calibration text: np.linalg.lstsq on the stacked system,
    computed here from the written models one line at a time, gives the same weights."""
    a, b = pair
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{i}" for i in rng.integers(0, 90, size=rng.integers(8, 20))) for _ in range(24)]
    data = tmp_path / "data.txt"
    data.write_text("\n".join(lines) + "\n")
    out = pleas_align([a, b], tmp_path / "out", budget=2.0, data=data, samples=24, batch_size=5)
    align([a, b], tmp_path / "aligned")
    merged, model_a, model_b = _load(out), _load(a), _load(tmp_path / "aligned" / b.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(a)
    hidden, y_a, y_b = [[] for _ in range(LAYERS)], [[] for _ in range(LAYERS)], [[] for _ in range(LAYERS)]
    for line in lines:
        ids = torch.tensor([tokenizer(line)["input_ids"]])
        seen = zip(*(_mlp_io(m, ids) for m in (merged, model_a, model_b)))
        for layer, ((_, h), (_, ha), (_, hb)) in enumerate(seen):
            hidden[layer].append(h)
            y_a[layer].append(model_a.model.layers[layer].mlp.down_proj(ha).detach())
            y_b[layer].append(model_b.model.layers[layer].mlp.down_proj(hb).detach())
    assert sum(len(h) for h in hidden[0]) > 2 * model_a.config.intermediate_size  # overdetermined
    for layer in range(LAYERS):
        h = torch.cat(hidden[layer]).double().numpy()
        targets = np.vstack([torch.cat(y_a[layer]).double().numpy(), torch.cat(y_b[layer]).double().numpy()])
        want, *_ = np.linalg.lstsq(np.vstack([h, h]), targets, rcond=None)
        got = merged.model.layers[layer].mlp.down_proj.weight.detach().double().numpy()
        np.testing.assert_allclose(got, want.T, rtol=0, atol=1e-5 * np.abs(want).max())


def test_merging_a_model_with_its_permuted_self_returns_it(pair, tmp_path, one_thread):
    """B = A with its residual stream, heads and MLP units permuted: weight matching and the
    activation matching undo it, and at width d the merge computes A's function."""
    a, _ = pair
    ck = Checkpoint(a)
    spec = permutation_spec(ck).only(FAMILIES)  # what pleas_align's weight matching undoes
    generator = torch.Generator().manual_seed(7)
    perms = {p: torch.randperm(n, generator=generator) for p, n in spec.sizes.items()}
    permuted = aligned_view(ck, spec, perms, label="permuted")
    write_program(Program([Output(n, [(permuted, n)]) for n in ck.tensors], ck.config, ck, "p", "."),
                  tmp_path / "b")
    out = pleas_align([a, tmp_path / "b"], tmp_path / "out", budget=1.0, samples=16, max_length=32)
    merged, model_a = _load(out), _load(a)
    assert merged.config.intermediate_size == model_a.config.intermediate_size
    ids = torch.tensor([[5, 9, 2, 77, 31, 64, 12, 40, 8, 50]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model_a(ids).logits, rtol=1e-4, atol=1e-4)


def test_output_loads_with_its_new_width_and_bad_inputs_are_refused(pair, tmp_path, one_thread):
    a, b = pair
    # through mergesmith.align (alignment.py's dispatch), as `mergesmith align --method pleas` calls it
    [out] = align([a, b], tmp_path / "out", method="pleas", budget=1.5, samples=8, max_length=16)
    merged = _load(out)
    assert merged.config.intermediate_size == 96
    assert tuple(merged.model.layers[1].mlp.down_proj.weight.shape) == (32, 96)
    assert (out / "pleas.json").is_file()
    with torch.no_grad():
        assert torch.isfinite(merged(torch.tensor([[4, 8, 15, 16, 23, 42]])).logits).all()
    root = tmp_path / "zoo"
    qwen = build_model(root / "qwen", "qwen2", seed=1, layers=LAYERS)
    gpt2 = build_model(root / "gpt2", "gpt2", seed=1, layers=LAYERS)
    for budget in (0.5, 2.5):
        with pytest.raises(PlanError, match="budget"):
            pleas_align([a, b], tmp_path / "x", budget=budget)
    with pytest.raises(PlanError, match="different models"):
        pleas_align([a, qwen], tmp_path / "x")
    with pytest.raises(PlanError, match="gated MLP"):
        pleas_align([gpt2, gpt2], tmp_path / "x")
    with pytest.raises(PlanError, match="two models"):
        pleas_align([a, b, a], tmp_path / "x")
    with pytest.raises(CalibrationError, match="no such file"):
        pleas_align([a, b], tmp_path / "x", data=tmp_path / "missing.txt")
    with pytest.raises(PlanError, match="samples"):
        pleas_align([a, b], tmp_path / "x", samples=0)
    with pytest.raises(CalibrationError, match="at least as many tokens as units"):
        pleas_align([a, b], tmp_path / "x", budget=2.0, samples=2, max_length=8)
    assert not (tmp_path / "x").exists()
    with pytest.raises(OutputError, match="already exists"):
        pleas_align([a, b], out)  # before the weight matching and the forward passes
