"""GraftLLM-style delta packs: methods/graft.py (encoding), io/pack.py (format, reader view),
engine/pack.py (`mergesmith pack`), and packs as recipe inputs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_model, read_tensors, run_cli, write_recipe
from mergesmith.engine.pack import PackOptions, module_of, pack
from mergesmith.engine.program import Output, Program, write_program
from mergesmith.errors import MergesmithError, PlanError
from mergesmith.io import Checkpoint
from mergesmith.io.adapted import open_input
from mergesmith.io.pack import dequantize, lowrank_delta, pack_bits, unpack_bits
from mergesmith.methods.graft import Tier, compress_lowrank, compress_sparse, parse_tiers, quantize


def known_svd(m=24, n=40, sigma=(10.0, 9.0, 7.0, 5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5), seed=0):
    """Δ = U diag(σ) Vᵀ with orthonormal U, V drawn in float64: the spectrum is known exactly."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(sigma), generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(sigma), generator=gen, dtype=torch.float64)).Q
    s = torch.tensor(sigma, dtype=torch.float64)
    return u, s, v, (u * s) @ v.T


def decoded(done, shape):
    return lowrank_delta(done.record, shape, lambda key: done.parts[key])


def test_fp32_and_fp16_tiers_reproduce_the_delta(one_thread):
    delta = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    done = compress_lowrank(delta, (Tier("fp32", None),))
    assert done.record["tiers"] == [{"precision": "fp32", "rank": 24}] and done.record["dropped"] == 0
    torch.testing.assert_close(decoded(done, (24, 40)), delta, rtol=0, atol=2e-5)
    half = compress_lowrank(delta, (Tier("fp16", 10), Tier("fp16", None)))
    assert [t["rank"] for t in half.record["tiers"]] == [10, 14]
    assert half.parts["t0.u"].dtype == torch.float16
    # U and Vᵀ rounded to fp16: each entry of Δ̂ is off by a few fp16 steps of Δ's scale
    assert (decoded(half, (24, 40)) - delta).abs().max() < 4e-3 * delta.abs().max()


def test_tier_sizes_dropped_ranks_and_error_without_quantisation(one_thread):
    u, s, v, delta = known_svd()
    done = compress_lowrank(delta.float(), (Tier("fp32", 2), Tier("fp32", 3)))
    assert [t["rank"] for t in done.record["tiers"]] == [2, 3] and done.record["dropped"] == 5
    # only the kept triplets are stored: nothing of the dropped five exists to contribute
    assert done.parts["t0.u"].shape == (24, 2) and done.parts["t1.vt"].shape == (3, 40)
    assert sorted(done.parts) == ["t0.s", "t0.u", "t0.vt", "t1.s", "t1.u", "t1.vt"]
    kept = (u[:, :5] * s[:5]) @ v[:, :5].T
    approx = decoded(done, (24, 40)).double()
    torch.testing.assert_close(approx, kept, rtol=0, atol=1e-5)
    dropped = float(s[5:].square().sum())
    assert float((delta - approx).square().sum()) == pytest.approx(dropped, rel=1e-4)
    assert done.error == pytest.approx((dropped / float(s.square().sum())) ** 0.5, rel=1e-4)
    # a tier larger than the rank takes what is left; the next gets nothing
    clipped = compress_lowrank(delta.float(), (Tier("fp32", 30), Tier("int4", 5)))
    assert [t["rank"] for t in clipped.record["tiers"]] == [10, 0]


def test_round_to_nearest_by_hand():
    # b = 2, one group: min −1, max 3 -> s = 4/3 (rounded up to fp16), z = round(0.75) = 1,
    # q = clamp(round(x/s) + 1, 0, 3) = [0, 1, 1, 3] -> (q − z)·s = [−s, 0, 0, 2s]
    x = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    parts = quantize(x, 2, group=4)
    s = parts["_scale"].float()
    assert s.item() >= 4 / 3 and s.item() - 4 / 3 < 1e-3 and parts["_zero"].tolist() == [[1]]
    assert unpack_bits(parts[""], 2, 4).tolist() == [0, 1, 1, 3]
    back = dequantize(parts[""], parts["_scale"], parts["_zero"], 2, (1, 4), 4)
    torch.testing.assert_close(back, torch.tensor([[-1.0, 0.0, 0.0, 2.0]]) * s)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_round_to_nearest_round_trip_within_half_a_step(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(7, 300, generator=gen) * torch.logspace(-3, 1, 7)[:, None]
    x[3, 128:256] = 0  # an all-zero group
    parts = quantize(x, bits, group=128)
    assert parts[""].numel() == -(-7 * 300 // 8) * bits if bits < 8 else 7 * 300
    assert parts["_scale"].shape == (7, 3) and parts["_scale"].dtype == torch.float16
    back = dequantize(parts[""], parts["_scale"], parts["_zero"], bits, (7, 300), 128)
    step = parts["_scale"].float().repeat_interleave(128, dim=1)[:, :300]
    assert bool(((back - x).abs() <= step / 2 * (1 + 1e-6)).all())
    assert bool((back[3, 128:256] == 0).all())
    codes = torch.randint(0, 2**bits, (1001,), generator=gen, dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, 1001), codes)


def test_sparse_rest_keeps_the_largest_entries():
    delta = torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]])
    record, parts = compress_sparse(delta, 1 / 3, torch.float32)
    assert record["kept"] == 2 and parts["index"].tolist() == [1, 3]
    assert parts["value"].tolist() == [-5.0, 3.0]


def test_module_aware_groups_and_bad_tiers():
    assert module_of("model.layers.0.self_attn.q_proj.weight", (32, 32)) == "attention"
    assert module_of("model.layers.3.mlp.down_proj.weight", (32, 64)) == "mlp"
    assert module_of("transformer.h.1.attn.c_attn.weight", (32, 96)) == "attention"
    assert module_of("bert.encoder.layer.0.intermediate.dense.weight", (64, 32)) == "mlp"
    for name, shape in [("model.embed_tokens.weight", (96, 32)), ("lm_head.weight", (96, 32)),
                        ("model.layers.0.input_layernorm.weight", (32,)),
                        ("transformer.h.1.attn.c_attn.bias", (96,))]:
        assert module_of(name, shape) == "rest"
    assert parse_tiers("fp16:4, int8:20,int2:*") == (Tier("fp16", 4), Tier("int8", 20), Tier("int2", None))
    with pytest.raises(MergesmithError, match="int5:3"):
        parse_tiers("int8:2,int5:3")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    base = build_model(root / "base", "llama", seed=0)
    return {"root": root, "base": base, "e1": build_model(root / "e1", "llama", seed=1, base=base),
            "e2": build_model(root / "e2", "llama", seed=2, base=base),
            "other": build_model(root / "other", "llama", seed=5)}


def unpacked(view, out):
    """The pack decompressed into a model folder, through the engine."""
    outputs = [Output(name, [(view, name)]) for name in view.tensors]
    return write_program(Program(outputs, view.config, view, "unpacked", "the pack, decompressed"), out)


def test_pack_as_a_recipe_model_equals_its_decompressed_folder(world, tmp_path, one_thread):
    from mergesmith.engine.api import merge

    packed = pack(world["base"], world["e1"], tmp_path / "p", PackOptions(rest="sparse", density=0.5))
    meta = json.loads((packed.path / "pack.json").read_text())
    records = meta["tensors"]
    assert records["model.layers.0.self_attn.q_proj.weight"]["tiers"][:2] == [
        {"precision": "int8", "rank": 20}, {"precision": "int4", "rank": 12}]
    assert records["model.embed_tokens.weight"]["kind"] == "sparse"
    assert records["model.norm.weight"]["kind"] == "full"
    view = open_input(str(packed.path), {}, None)
    folder = unpacked(view, tmp_path / "unpacked")
    expert, base = read_tensors(world["e1"]), read_tensors(world["base"])
    got = read_tensors(folder)
    # what the pack decodes to: θ0 + Δ̂, close to θ_ft where Δ is low rank and quantised
    name = "model.layers.1.mlp.up_proj.weight"
    assert (got[name] - expert[name]).norm() < 0.1 * (expert[name] - base[name]).norm()
    assert torch.equal(got["model.norm.weight"], expert["model.norm.weight"])
    results = {}
    for label, ref in (("pack", packed.path), ("folder", folder)):
        recipe = write_recipe(tmp_path / f"{label}.yaml", {
            "merge_method": "task_arithmetic", "base_model": str(world["base"]),
            "models": [{"model": str(ref), "parameters": {"weight": 0.7}},
                       {"model": str(world["e2"]), "parameters": {"weight": 0.4}}]})
        results[label] = read_tensors(merge(recipe, tmp_path / f"merged-{label}"))
    assert results["pack"].keys() == results["folder"].keys()
    for name, tensor in results["pack"].items():
        assert torch.equal(tensor, results["folder"][name]), name


def test_a_pack_of_another_base_is_refused(world, tmp_path, monkeypatch, capsys):
    packed = pack(world["base"], world["e1"], tmp_path / "p")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(world["other"]),
        "models": [{"model": str(packed.path)}, {"model": str(world["e2"])}]})
    code, _, stderr = run_cli(monkeypatch, capsys, "merge", recipe, tmp_path / "out")
    assert code == 1 and "the pack was made on base" in stderr
    assert "'lm_head.weight' holds other values" in stderr  # the first tensor by name
    assert str(world["base"]) in stderr and str(world["other"]) in stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(PlanError, match="pack was made on base"):
        open_input(f"{world['other']}+{packed.path}", {}, None)
    # its own base, named as BASE+PACK, opens
    assert open_input(f"{world['base']}+{packed.path}", {}, None).tensors.keys() == \
        Checkpoint(world["e1"]).tensors.keys()


def test_cli_pack_reports_its_size_against_the_model(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "skill"
    code, _, stderr = run_cli(monkeypatch, capsys, "pack", world["base"], world["e1"], out,
                              "--attention", "int4:8", "--mlp", "int4:8,int2:8")
    assert code == 0, stderr
    expert_bytes = (world["e1"] / "model.safetensors").stat().st_size
    pack_bytes = sum(p.stat().st_size for p in out.iterdir())
    assert "28 lowrank, 11 full tensors" in stderr and "against" in stderr
    assert f"({pack_bytes / expert_bytes:.1%})" in stderr and pack_bytes < 0.6 * expert_bytes
    records = json.loads((out / "pack.json").read_text())["tensors"]
    assert records["model.layers.2.mlp.down_proj.weight"]["dropped"] == 16
    code, _, stderr = run_cli(monkeypatch, capsys, "pack", world["base"], world["e1"], tmp_path / "x",
                              "--mlp", "int5:3")
    assert code == 1 and "int5:3" in stderr and "Traceback" not in stderr


def test_tensors_equal_to_the_base_are_stored_as_nothing(world, tmp_path):
    packed = pack(world["base"], world["base"], tmp_path / "same")
    assert packed.kinds == {"lowrank": 0, "sparse": 0, "full": 0, "unchanged": 39}
    view = open_input(str(packed.path), {}, None)
    base = read_tensors(world["base"])
    assert all(torch.equal(view.read(name), tensor) for name, tensor in base.items())
