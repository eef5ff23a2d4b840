"""LiNeS on top of other methods, and EMR-merging end to end (merge, side files, `emr apply`).

LiNeS: Wang et al. 2025, arXiv:2410.17146, §3: θ = θ0 + (α + β·l/(L − 1))·(θ_merged − θ0) for
block l of L, α outside the blocks (the authors' code). EMR: Huang et al. 2024,
arXiv:2405.17461, §3.2: τ_uni (elect), M_i = τi ⊙ τ_uni > 0 (mask), λ_i = Σ|τi| / Σ|M_i ⊙ τ_uni|
over the whole model (rescale), task i = θ0 + λ_i·M_i ⊙ τ_uni.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from conftest import build_model, model_class, read_tensors, write_recipe

import mergesmith
from mergesmith.engine.side_outputs.emr import apply_emr
from mergesmith.errors import CheckpointError, MergesmithError, OutputError, PlanError, RecipeError
from mergesmith.methods.emr import emr_side, rescalers, task_model, unified_task_vector

LAYERS = 4  # the zoo's llama
LAYER = re.compile(r"\.layers\.(\d+)\.")
SMALL_SHARDS = "60KB"  # a few shards of the zoo's llama


def merge(tmp_path, recipe: dict, name: str, **options):
    return mergesmith.merge(write_recipe(tmp_path / f"{name}.yaml", recipe), tmp_path / name, **options)


def experts(models, names=("e1", "e2"), **parameters):
    return [{"model": str(models[m]), "parameters": dict(parameters)} for m in names]


# ---------------------------------------------------------------------------------------------
# LiNeS


def expected_scale(name: str, alpha: float, beta: float) -> float:
    """Layer 0 gets α, layer L − 1 gets α + β, linearly between; non-block tensors α."""
    match = LAYER.search(name)
    if match is None:
        return alpha
    return {0: alpha, 1: alpha + beta / 3, 2: alpha + 2 * beta / 3, 3: alpha + beta}[int(match.group(1))]


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", {"weight": 0.7}),
    ("ties", {"weight": 1.0, "density": 0.5}),
    ("consensus_ta", {"tall_mask_lambda": 0.3}),
])
def test_lines_scales_each_layer_of_the_merge(tmp_path, zoo, method, params):
    """θ = θ0 + s(l)·(θ_merged − θ0), θ_merged the same recipe without `lines:`; exact under row
    chunking (chunked and whole-tensor merges are bit-identical)."""
    models = zoo("llama")
    recipe = {"merge_method": method, "base_model": str(models["base"]),
              "models": experts(models, **params)}
    plain = read_tensors(merge(tmp_path, recipe, "plain"))
    scaled_recipe = dict(recipe, lines={"alpha": 0.2, "beta": 0.6})
    scaled = read_tensors(merge(tmp_path, scaled_recipe, "scaled"))
    chunked = read_tensors(merge(tmp_path, scaled_recipe, "chunked", chunk_size=700))
    base = read_tensors(models["base"])
    assert set(scaled) == set(base)
    for name, tensor in scaled.items():
        s = expected_scale(name, 0.2, 0.6)
        torch.testing.assert_close(tensor, base[name] + s * (plain[name] - base[name]),
                                   rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(chunked[name], tensor), name
    first, last = "model.layers.0.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"
    for name, s in ((first, 0.2), (last, 0.8)):  # α and α + β, written out
        torch.testing.assert_close(scaled[name] - base[name], s * (plain[name] - base[name]),
                                   rtol=1e-5, atol=1e-7)


def test_lines_on_a_method_without_a_base_reads_the_base(tmp_path, zoo):
    """linear takes no base; LiNeS still scales (average − θ0) from the recipe's base_model."""
    models = zoo("llama")
    recipe = {"merge_method": "linear", "base_model": str(models["base"]),
              "models": experts(models, names=("base",), weight=0.0) + experts(models, weight=1.0),
              "lines": {"alpha": 0.5, "beta": -0.25}}
    out = read_tensors(merge(tmp_path, recipe, "linear"))
    base, e1, e2 = (read_tensors(models[m]) for m in ("base", "e1", "e2"))
    for name, tensor in out.items():
        average = (e1[name] + e2[name]) / 2
        s = expected_scale(name, 0.5, -0.25)
        torch.testing.assert_close(tensor, base[name] + s * (average - base[name]),
                                   rtol=1e-6, atol=1e-7, msg=name)


def test_lines_alpha_one_beta_zero_changes_nothing(tmp_path, zoo):
    models = zoo("llama")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
              "models": experts(models, weight=0.5)}
    plain = read_tensors(merge(tmp_path, recipe, "plain"))
    same = read_tensors(merge(tmp_path, dict(recipe, lines={"alpha": 1.0, "beta": 0.0}), "same"))
    assert all(torch.equal(same[n], plain[n]) for n in plain)


def test_lines_in_memory_merge_matches_the_folder(tmp_path, zoo):
    """merge_tensors (sweeps, searches) applies LiNeS too."""
    from mergesmith.engine.memory import merge_tensors

    models = zoo("llama")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
              "models": experts(models, weight=0.5), "lines": {"alpha": 0.3, "beta": 0.7}}
    folder = read_tensors(merge(tmp_path, recipe, "folder"))
    memory = merge_tensors(recipe)
    assert all(torch.equal(memory[n], folder[n]) for n in folder)


def test_lines_needs_a_base_model(tmp_path, zoo):
    models = zoo("llama")
    recipe = {"merge_method": "linear", "models": experts(models, weight=1.0),
              "lines": {"alpha": 0.2, "beta": 0.8}}
    with pytest.raises(PlanError, match=r"^lines: LiNeS .* the recipe has no base_model"):
        mergesmith.plan(recipe)


@pytest.mark.parametrize("lines, message", [
    ({"alpha": 0.2}, r"lines\.beta: required field missing"),
    ({"alpha": "high", "beta": 0.1}, r"lines\.alpha: expected a number"),
    ({"alpha": 0.2, "beta": 0.8, "gamma": 1}, r"lines\.gamma: unknown field"),
])
def test_lines_section_is_validated(tmp_path, zoo, lines, message):
    models = zoo("llama")
    path = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(models["base"]),
        "models": experts(models, weight=1.0), "lines": lines})
    with pytest.raises(RecipeError, match=message):
        mergesmith.plan(path)


# ---------------------------------------------------------------------------------------------
# EMR: the tensor functions


TAUS = [torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0]),
        torch.tensor([3.0, 1.0, -0.5, 0.0, -1.0]),
        torch.tensor([-1.0, 1.0, 0.25, 0.0, -0.5])]


def test_emr_by_hand():
    """Elect: Σ τi = [3, 0, .25, 0, -.5] -> γ = [+, 0, +, 0, -]; the largest agreeing |τi| gives
    τ_uni = [3, 0, .5, 0, -1] (sign(0) = 0: the second entry joins no mask).
    Mask: M1 = [1, 0, 1, 0, 0], M2 = [1, 0, 0, 0, 1], M3 = [0, 0, 1, 0, 1].
    Rescale: λ = [4.5 / 3.5, 5.5 / 4, 2.75 / 1.5]."""
    unified = unified_task_vector(TAUS)
    torch.testing.assert_close(unified, torch.tensor([3.0, 0.0, 0.5, 0.0, -1.0]))
    base = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])
    masks, sums = emr_side(base, [base + tau for tau in TAUS])
    assert [m.int().tolist() for m in masks] == [[1, 0, 1, 0, 0], [1, 0, 0, 0, 1], [0, 0, 1, 0, 1]]
    assert rescalers(sums) == pytest.approx([4.5 / 3.5, 5.5 / 4, 2.75 / 1.5])
    rebuilt = task_model(base, base + unified, masks[0], 4.5 / 3.5)
    torch.testing.assert_close(rebuilt, base + 4.5 / 3.5 * torch.tensor([3.0, 0, 0.5, 0, 0]))


def test_emr_rescalers_sum_over_the_whole_model():
    """λ_i uses sums over every entry of the model, not a ratio per tensor: two 'tensors'
    (the halves of TAUS) add their sums; the result equals the one-tensor computation."""
    base = torch.zeros(5)
    _, whole = emr_side(base, TAUS)
    _, head = emr_side(base[:2], [t[:2] for t in TAUS])
    _, tail = emr_side(base[2:], [t[2:] for t in TAUS])
    assert rescalers(head + tail) == pytest.approx(rescalers(whole))
    assert rescalers(head) != pytest.approx(rescalers(whole))


def test_masks_pack_in_pieces_of_any_length():
    """Row chunks need not hold a multiple of 8 entries: the packed rows still equal
    numpy.packbits of the whole rows (big-endian bit order, the last byte zero-padded)."""
    import numpy as np

    from mergesmith.engine.side_outputs.emr import PackedRows, unpack_bits

    bits = np.random.default_rng(0).random((3, 61)) < 0.5
    packed = PackedRows(3, 61)
    for start, stop in ((0, 5), (5, 6), (6, 22), (22, 22), (22, 60), (60, 61)):
        assert not packed.complete
        packed.add(bits[:, start:stop])
    assert packed.complete
    assert np.array_equal(packed.packed, np.packbits(bits, axis=1))
    for start, stop in ((0, 61), (3, 17), (8, 16), (13, 61), (60, 61)):  # apply's row blocks
        assert np.array_equal(unpack_bits(packed.packed[1], start, stop).numpy(), bits[1, start:stop])


# ---------------------------------------------------------------------------------------------
# EMR end to end


@pytest.fixture(scope="module")
def emr_merge(zoo, tmp_path_factory):
    """Three llama experts merged with emr, streamed in small row chunks over several shards."""
    models = dict(zoo("llama"))
    root = tmp_path_factory.mktemp("emr")
    models["e3"] = build_model(root / "e3", "llama", seed=3, base=models["base"], delta=0.03)
    recipe = {"merge_method": "emr", "base_model": str(models["base"]),
              "models": [{"model": str(models[m])} for m in ("e1", "e2", "e3")]}
    out = merge(root, recipe, "merged", chunk_size=700, shard_size=SMALL_SHARDS)
    return models, out, root


def reference_emr(models) -> tuple[dict, dict, list[float]]:
    """τ_uni, masks and λ from the definition, on stacked tensors, independently of the code."""
    base = read_tensors(models["base"])
    tvs = {name: torch.stack([read_tensors(models[m])[name] - base[name] for m in ("e1", "e2", "e3")])
           for name in base}
    unified, masks = {}, {}
    totals, masked = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for name, tv in tvs.items():
        sign = torch.sign(tv.sum(0))
        agree = tv * sign > 0
        unified[name] = sign * (tv.abs() * agree).amax(0)
        masks[name] = tv * unified[name] > 0
        totals += tv.abs().flatten(1).sum(1, dtype=torch.float64)
        masked += (masks[name] * unified[name].abs()).flatten(1).sum(1, dtype=torch.float64)
    return unified, masks, (totals / masked).tolist()


def test_emr_merge_writes_the_unified_model_and_side_files(emr_merge):
    models, out, _ = emr_merge
    unified, _, lambdas = reference_emr(models)
    base = read_tensors(models["base"])
    merged = read_tensors(out)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, base[name] + unified[name], rtol=1e-6, atol=1e-7)
    index = json.loads((out / "emr" / "emr.json").read_text())
    assert index["tasks"] == [str(models[m]) for m in ("e1", "e2", "e3")]
    assert index["rescalers"] == pytest.approx(lambdas, rel=1e-9)
    assert len(list((out / "emr").glob("masks-*.safetensors"))) >= 3
    assert set(index["masks"]) == set(merged)
    assert not list(out.parent.glob(".merged.partial"))


@pytest.mark.parametrize("task", [0, 1, 2])
def test_emr_apply_rebuilds_each_task(emr_merge, task):
    """apply gives θ0 + λ_i·M_i ⊙ τ_uni (reference from the definition), loadable in transformers."""
    models, out, root = emr_merge
    unified, masks, lambdas = reference_emr(models)
    name = str(models[f"e{task + 1}"]) if task != 1 else "1"  # by name, and by index
    folder = apply_emr(out, name, root / f"task{task}")
    rebuilt, base = read_tensors(folder), read_tensors(models["base"])
    assert set(rebuilt) == set(base)
    for key, tensor in rebuilt.items():
        expected = base[key] + lambdas[task] * masks[key][task] * unified[key]
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=key)
    model = model_class("llama").from_pretrained(folder)
    logits = model(torch.tensor([[3, 5, 7]])).logits
    assert logits.shape == (1, 3, 96) and torch.isfinite(logits).all()


def test_emr_with_one_expert_gives_back_the_expert(tmp_path, zoo):
    models = zoo("llama")
    recipe = {"merge_method": "emr", "base_model": str(models["base"]),
              "models": [{"model": str(models["e1"])}]}
    out = merge(tmp_path, recipe, "one", chunk_size=900)
    rebuilt = read_tensors(apply_emr(out, 0, tmp_path / "e1"))
    for name, tensor in read_tensors(models["e1"]).items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=1e-6, atol=1e-7)


def test_emr_resume_after_a_failure_gives_the_same_files(emr_merge, tmp_path, monkeypatch):
    """A failure mid-merge, then --resume: masks files and emr.json match an uninterrupted run."""
    from mergesmith.io import ShardWriter

    models, clean, root = emr_merge
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "emr", "base_model": str(models["base"]),
        "models": [{"model": str(models[m])} for m in ("e1", "e2", "e3")]})
    calls, original = {"n": 0}, ShardWriter.write

    def failing(self, tensor):
        calls["n"] += 1
        if calls["n"] > 250:
            raise OSError(28, "No space left on device")
        original(self, tensor)

    monkeypatch.setattr(ShardWriter, "write", failing)
    with pytest.raises(OutputError, match="No space left on device"):
        mergesmith.merge(recipe, tmp_path / "out", chunk_size=700, shard_size=SMALL_SHARDS)
    monkeypatch.undo()
    partial = tmp_path / ".out.partial"
    assert list((partial / "emr").glob("masks-*.safetensors")), "no shard finished before the failure"
    out = mergesmith.merge(recipe, tmp_path / "out", chunk_size=700, shard_size=SMALL_SHARDS,
                           resume=True)
    for file in sorted((clean / "emr").iterdir()):
        assert (out / "emr" / file.name).read_bytes() == file.read_bytes(), file.name


def test_emr_apply_errors_are_one_line(emr_merge, tmp_path, zoo, monkeypatch, capsys):
    models, out, root = emr_merge
    with pytest.raises(MergesmithError, match=r"^unknown task 'nope'; this merge has 0: .*e1, 1: "):
        apply_emr(out, "nope", tmp_path / "x")
    with pytest.raises(MergesmithError, match=r"^unknown task '3'"):
        apply_emr(out, "3", tmp_path / "x")
    not_emr = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(zoo("llama")["base"]),
                               "models": experts(zoo("llama"), weight=1.0)}, "ta")
    with pytest.raises(MergesmithError, match=r"has no emr/emr.json: not a merge made with merge_method: emr"):
        apply_emr(not_emr, 0, tmp_path / "x")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for item in out.iterdir():
        if item.is_file():
            (damaged / item.name).write_bytes(item.read_bytes())
    (damaged / "emr").mkdir()
    (damaged / "emr" / "emr.json").write_bytes((out / "emr" / "emr.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"masks-00001-of-\d{5}\.safetensors: missing"):
        apply_emr(damaged, 0, tmp_path / "y")
    assert not (tmp_path / "y").exists()

    from mergesmith import cli

    monkeypatch.setattr(sys, "argv", ["mergesmith", "emr", "apply", str(out), "nope", str(tmp_path / "z")])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: unknown task 'nope'") and lines[1].startswith("hint: ")


def test_emr_apply_never_writes_over_its_inputs(emr_merge, tmp_path):
    models, out, root = emr_merge
    before = {f.name: f.read_bytes() for f in out.glob("*.safetensors")}
    for target in (out, out / "task0", models["base"]):
        with pytest.raises(OutputError, match=r"output .* (is|contains|lies inside) the input "):
            apply_emr(out, 0, target, overwrite=True)
    assert {f.name: f.read_bytes() for f in out.glob("*.safetensors")} == before


def test_emr_rejects_a_merged_vocabulary(tmp_path, zoo):
    models = zoo("llama")
    recipe = {"merge_method": "emr", "base_model": str(models["base"]), "tokenizer_source": "union",
              "models": [{"model": str(models[m])} for m in ("e1", "e2")]}
    with pytest.raises(PlanError, match=r"^tokenizer_source: emr does not support a merged vocabulary"):
        mergesmith.plan(recipe)
