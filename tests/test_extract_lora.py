"""LoRA extraction (engine/extract_lora.py, `mergesmith extract-lora`): the truncated SVD against
Eckart–Young and float64 SVDs, the adapter against PEFT's merge_and_unload, and the files
against mergekit-extract-lora 0.1.5's on the same toy Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesmith.engine.extract_lora import Options, RankRule, extract_lora, lora_factors
from mergesmith.errors import MergesmithError, ModelNotFoundError, PlanError
from mergesmith.toy import build_model

from conftest import run_cli

PREFIX = "base_model.model."


def spectrum(tau: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(tau.double())


def low_rank(m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])  # wide and tall: the Gram of either side
@pytest.mark.parametrize("rank", [5, 40])  # the subset eigensolver and the whole eigh
def test_truncation_error_is_the_tail_singular_values(shape, rank, one_thread):
    tau = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    f = lora_factors(tau, RankRule(rank))
    s = spectrum(tau)
    assert (f.b.shape, f.a.shape) == ((shape[0], rank), (rank, shape[1]))
    error = (tau.double() - f.b.double() @ f.a.double()).square().sum()
    assert error == pytest.approx(float(s[rank:].square().sum()), rel=1e-5)
    assert f.energy == pytest.approx(float(s[:rank].square().sum() / s.square().sum()), rel=1e-6)


def test_exact_when_the_rank_reaches_the_task_vector_s(one_thread):
    tau = low_rank(64, 40, 6)
    f = lora_factors(tau, RankRule(6))
    assert torch.allclose(f.b @ f.a, tau, atol=1e-5 * tau.abs().max())
    full = lora_factors(torch.randn(30, 20), RankRule(128))  # rank capped at min(m, n)
    assert full.rank == 20


@pytest.mark.parametrize("shape", [(24, 56), (56, 24)])
def test_distribute_scale_balances_the_factors(shape, one_thread):
    tau = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    s = spectrum(tau)[:8]
    split = lora_factors(tau, RankRule(8))
    assert float(split.a.norm()) == pytest.approx(float(split.b.norm()), rel=1e-5)
    assert torch.allclose(split.a.norm(dim=1).double(), s.sqrt(), rtol=1e-5)
    whole = lora_factors(tau, RankRule(8), distribute_scale=False)  # B = U: orthonormal columns
    assert torch.allclose(whole.b.mT @ whole.b, torch.eye(8), atol=1e-5)
    assert torch.allclose(whole.a.norm(dim=1).double(), s, rtol=1e-5)
    assert torch.allclose(whole.b @ whole.a, split.b @ split.a, atol=1e-5)


def test_energy_and_epsilon_rules(one_thread):
    tau = low_rank(40, 60, 12, seed=3) + 1e-3 * torch.randn(40, 60)
    sq = spectrum(tau).square()
    for energy in (0.5, 0.9, 0.999):
        want = int((torch.cumsum(sq, 0) < energy * sq.sum()).sum()) + 1  # min{k: Σ_{≤k} ≥ e·Σ}
        f = lora_factors(tau, RankRule(128, energy=energy))
        assert f.rank == want and f.energy >= energy
    assert lora_factors(tau, RankRule(5, energy=0.999)).rank == 5  # --rank still caps it
    eps = float(spectrum(tau)[12] + 1e-4)  # the noise floor's singular values are below it
    assert lora_factors(tau, RankRule(128, epsilon=eps)).rank == 12
    assert lora_factors(torch.zeros(8, 6), RankRule(4, energy=0.9)).rank == 0


def test_randomized_is_exact_on_a_low_rank_task_vector(one_thread):
    tau = low_rank(200, 120, 4, seed=4)
    f = lora_factors(tau, RankRule(16), randomized=True)
    assert torch.allclose(f.b @ f.a, tau, atol=1e-4 * tau.abs().max())


# ---------------------------------------------------------------- whole models, through PEFT

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = build_model(root / "base", "llama", seed=0)
    return {"root": root, "base": base, "ft": build_model(root / "ft", "llama", seed=1, base=base)}


def merged_state(base: Path, adapter: Path, arch_cls=None) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = (arch_cls or AutoModelForCausalLM).from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def state(folder: Path, arch_cls=None) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return (arch_cls or AutoModelForCausalLM).from_pretrained(folder, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("embed_lora", [False, True])
def test_full_rank_reproduces_the_fine_tune_through_peft(toy, tmp_path, embed_lora):
    out = tmp_path / "adapter"
    extract_lora(toy["base"], toy["ft"], out, Options(embed_lora=embed_lora))
    config = json.loads((out / "adapter_config.json").read_text())
    assert ("embed_tokens" in config["modules_to_save"]) != embed_lora
    names = load_file(out / "adapter_model.safetensors")
    assert any(n.endswith("embed_tokens.lora_embedding_A") for n in names) == embed_lora
    ft, got = state(toy["ft"]), merged_state(toy["base"], out)
    for name, want in ft.items():
        assert torch.allclose(got[name], want, rtol=0, atol=4 * torch.finfo(torch.float32).eps
                              * float(want.abs().max()) + 1e-7), name


def test_a_module_in_rank_pattern_loads_with_scaling_one(toy, tmp_path):
    out = tmp_path / "adapter"
    result = extract_lora(toy["base"], toy["ft"], out,
                          Options(RankRule(6, patterns=(("mlp\\.down", 3),))))
    config = json.loads((out / "adapter_config.json").read_text())
    module = "model.layers.1.mlp.down_proj"
    assert config["r"] == config["lora_alpha"] == 6 and result.ranks[module] == 3
    assert config["rank_pattern"][module] == config["alpha_pattern"][module] == 3
    tensors = load_file(out / "adapter_model.safetensors")
    b, a = tensors[f"{PREFIX}{module}.lora_B.weight"], tensors[f"{PREFIX}{module}.lora_A.weight"]
    assert a.shape == (3, 64)
    want = state(toy["base"])[f"{module}.weight"] + b @ a
    assert torch.allclose(merged_state(toy["base"], out)[f"{module}.weight"], want, atol=1e-6)


def test_gpt2_conv1d_weights_are_factored_with_fan_in_fan_out(tmp_path):
    from transformers import GPT2LMHeadModel

    base = build_model(tmp_path / "base", "gpt2", seed=0)
    ft = build_model(tmp_path / "ft", "gpt2", seed=1, base=base)
    out = tmp_path / "adapter"
    result = extract_lora(base, ft, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["lora_bias"]  # every Conv1D has a bias
    assert result.ranks["transformer.h.0.mlp.c_fc"] == 32
    got, want = merged_state(base, out, GPT2LMHeadModel), state(ft, GPT2LMHeadModel)
    for name in ("transformer.h.0.mlp.c_fc.weight", "transformer.h.0.attn.c_attn.bias",
                 "transformer.wte.weight", "transformer.ln_f.weight"):
        assert torch.allclose(got[name], want[name], atol=1e-6), name


EMBED = ("--embed-lora", "--no-distribute-scale")
SKIP = ("--skip-undecomposable", "-e", "mlp")  # mergekit's --save-module crashes (tuple.append)


@pytest.mark.parametrize("flags", [(), EMBED, SKIP])
def test_parity_with_mergekit_extract_lora(toy, tmp_path, flags):
    from mergekit.scripts.extract_lora import main as mergekit_extract_lora

    mk = tmp_path / "mergekit"
    mergekit_extract_lora([  # in process: no second interpreter to start
        "--model", str(toy["ft"]), "--base-model", str(toy["base"]), "--out-path", str(mk),
        "--max-rank", "8", *flags], standalone_mode=False)
    ours = tmp_path / "ours"
    skip = flags == SKIP
    extract_lora(toy["base"], toy["ft"], ours, Options(
        RankRule(8), embed_lora=flags == EMBED, distribute_scale=flags != EMBED,
        skip_undecomposable=skip, exclude=("mlp",) if skip else ()))
    theirs_cfg, ours_cfg = (json.loads((p / "adapter_config.json").read_text()) for p in (mk, ours))
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "task_type"):
        assert ours_cfg[key] == theirs_cfg[key], key
    for key in ("target_modules", "modules_to_save"):
        assert sorted(ours_cfg[key]) == sorted(theirs_cfg[key]), key
    theirs, mine = load_file(mk / "adapter_model.safetensors"), load_file(ours / "adapter_model.safetensors")
    assert set(mine) == set(theirs)
    assert any("lora_embedding_A" in name for name in mine) == (flags == EMBED)
    assert any("mlp" in name or "norm" in name for name in mine) != skip
    for name in theirs:
        if name.endswith(("lora_A.weight", "lora_embedding_A")):
            # signs of singular vector pairs are free: compare B·A and A's row norms (√S or S)
            b = name.replace("_A", "_B")
            assert torch.allclose(mine[b] @ mine[name], theirs[b] @ theirs[name], atol=2e-6), name
            assert torch.allclose(mine[name].norm(dim=1), theirs[name].norm(dim=1), rtol=1e-4), name
        elif not name.endswith(("lora_B.weight", "lora_embedding_B")):
            assert torch.equal(mine[name], theirs[name]), name


def test_bad_inputs_name_the_tensor_and_the_model(toy, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other"
    shutil.copytree(toy["ft"], other)
    tensors = load_file(other / "model.safetensors")
    name = "model.layers.2.self_attn.o_proj.weight"
    tensors[name] = torch.zeros(32, 16)
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PlanError, match=r"o_proj.weight.*\[32, 16\].*\[32, 32\]"):
        extract_lora(toy["base"], other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelNotFoundError, match="missing"):
        extract_lora(toy["base"], tmp_path / "missing", tmp_path / "out")
    code, _, err = run_cli(monkeypatch, capsys, "extract-lora", toy["base"], toy["ft"],
                           tmp_path / "out", "--module-rank", "mlp")
    assert code != 0 and "REGEX=RANK" in err and "Traceback" not in err
    with pytest.raises(MergesmithError):
        extract_lora(toy["base"], toy["ft"], toy["ft"])  # the output may not replace an input


def test_cli_writes_the_adapter(toy, tmp_path, monkeypatch, capsys):
    out = tmp_path / "lora"
    code, _, err = run_cli(monkeypatch, capsys, "extract-lora", toy["base"], toy["ft"], out,
                           "--rank", "4", "--energy", "0.99", "--module-rank", "k_proj=2", "-q",
                           "--save-module", "o_proj")
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 2
    assert "o_proj" in config["modules_to_save"] and "o_proj" not in config["target_modules"]
    name = "model.layers.3.self_attn.o_proj.weight"
    assert torch.equal(load_file(out / "adapter_model.safetensors")[PREFIX + name],
                       load_file(toy["ft"] / "model.safetensors")[name])
    assert "saved whole: embed_tokens" in err and not list(tmp_path.glob(".lora*"))


def test_bf16_models_with_data_dependent_ranks(tmp_path):
    """bf16 factors (mergekit stores τ's dtype) and ranks known only after each SVD: the header
    written last must still describe the file exactly."""
    base = build_model(tmp_path / "base", "llama", seed=0, dtype=torch.bfloat16, layers=1)
    ft = build_model(tmp_path / "ft", "llama", seed=1, base=base, dtype=torch.bfloat16, layers=1)
    out = tmp_path / "adapter"
    result = extract_lora(base, ft, out, Options(RankRule(32, energy=0.6)))
    tensors = load_file(out / "adapter_model.safetensors")  # safetensors checks every offset
    module = "model.layers.0.mlp.up_proj"
    a, b = tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"]
    assert a.dtype == torch.bfloat16 and 0 < a.shape[0] == result.ranks[module] < 32
    tau = load_file(ft / "model.safetensors")[f"{module}.weight"].float() \
        - load_file(base / "model.safetensors")[f"{module}.weight"].float()
    f = lora_factors(tau, RankRule(32, energy=0.6))
    assert torch.allclose(b.float() @ a.float(), f.b @ f.a, atol=2e-2 * float(tau.abs().max()))


def test_reserved_header_room(tmp_path):
    """Shapes may shrink after the room is reserved; a header that would not fit (a longer dtype
    name than the layout's) fails loudly instead of overwriting the first tensor's bytes."""
    from mergesmith.io import OutTensor
    from mergesmith.io.writer import ReservedShard

    layout = [OutTensor(f"t{i}", torch.bfloat16, (64, 1000)) for i in range(12)]
    file = ReservedShard(tmp_path / "a.safetensors", layout)
    written = {f"t{i}": torch.randn(i + 1, 1000).bfloat16() for i in range(12)}
    for name, tensor in written.items():
        file.write(name, tensor)
    file.close()
    back = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(back[n], t) for n, t in written.items())
    file = ReservedShard(tmp_path / "b.safetensors", [OutTensor(f"t{i}", torch.float64, (1, 1))
                                                      for i in range(12)])
    for i in range(12):
        file.write(f"t{i}", torch.zeros(1, 1, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="outgrew"):
        file.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma"])  # gemma: the head is tied
def test_decoders_walked_from_their_tensors_as_from_the_built_model(arch, tmp_path):
    from mergesmith.engine.extract_targets import _decoder_modules, _meta_modules
    from mergesmith.io import Checkpoint

    ck = Checkpoint(build_model(tmp_path / arch, arch, seed=0, layers=2))
    from_tensors = _decoder_modules(ck)
    assert from_tensors is not None
    assert set(from_tensors) == set(_meta_modules(ck))


def test_a_resized_vocabulary_keeps_the_embeddings_whole(toy, tmp_path):
    """mergekit: a vocabulary size change forces the embeddings into modules_to_save, even with
    embed_lora (their τ has no meaning: the new rows have no base)."""
    grown = tmp_path / "grown"
    shutil.copytree(toy["ft"], grown)
    tensors = load_file(grown / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], torch.randn(4, 32)])
    save_file(tensors, grown / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "adapter"
    extract_lora(toy["base"], grown, out, Options(embed_lora=True))
    config = json.loads((out / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(config["modules_to_save"])
    saved = load_file(out / "adapter_model.safetensors")[f"{PREFIX}model.embed_tokens.weight"]
    assert torch.equal(saved, tensors["model.embed_tokens.weight"])


def test_an_unchanged_module_is_left_out_and_peft_still_loads(toy, tmp_path):
    """τ = 0 gives rank 0 under an energy rule; PEFT takes no rank 0, so the module goes to
    exclude_modules and keeps the base's weight."""
    same = tmp_path / "same"
    shutil.copytree(toy["ft"], same)
    tensors = load_file(same / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = load_file(toy["base"] / "model.safetensors")[name]
    save_file(tensors, same / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "adapter"
    result = extract_lora(toy["base"], same, out, Options(RankRule(32, energy=0.999)))
    config = json.loads((out / "adapter_config.json").read_text())
    assert result.ranks["model.layers.1.self_attn.o_proj"] == 0
    assert config["exclude_modules"] == ["model.layers.1.self_attn.o_proj"]
    got = merged_state(toy["base"], out)
    assert torch.equal(got[name], tensors[name])
    assert not torch.equal(got["model.layers.0.self_attn.o_proj.weight"],
                           state(toy["base"])["model.layers.0.self_attn.o_proj.weight"])
