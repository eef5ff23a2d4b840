"""PEFT LoRA adapter folders read and written (io/adapter.py, io/adapted.py): applying an adapter
tensor by tensor equals PEFT's own merge_and_unload on tiny Llama, GPT-2 (Conv1D,
fan_in_fan_out) and BERT models; what write_adapter writes, PeftModel loads with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergesmith.errors import CheckpointError
from mergesmith.io import Checkpoint
from mergesmith.io.adapted import AdaptedCheckpoint
from mergesmith.io.adapter import read_adapter, write_adapter
from mergesmith.toy import build_model, model_class

peft = pytest.importorskip("peft")


def make_adapter(base: Path, folder: Path, arch: str, *, seed: int = 0, magnitude_noise: bool = True,
                 **lora) -> Path:
    """A LoRA adapter with random non-zero A and B (and, for DoRA, magnitudes that are not the
    weights' own norms, so the rescaling shows)."""
    torch.manual_seed(seed)
    model = model_class(arch).from_pretrained(base)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "magnitude" in name:
                param.mul_(torch.rand_like(param) + 0.5 if magnitude_noise else 1)
            elif "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param))
    wrapped.save_pretrained(folder)
    return folder


def merged_by_peft(base: Path, adapter: Path, arch: str) -> dict[str, torch.Tensor]:
    model = peft.PeftModel.from_pretrained(model_class(arch).from_pretrained(base), adapter)
    return model.merge_and_unload().state_dict()


def assert_applies_like_peft(base: Path, adapter: Path, arch: str, rows: int) -> int:
    """Every base tensor read whole through the adapted view equals PEFT's merged model bitwise
    (fp32); read in blocks of `rows` rows, to fp32 rounding (a block's B·A is a smaller matmul,
    which BLAS may round differently). Returns how many tensors the adapter changed."""
    ck = Checkpoint(base)
    view = AdaptedCheckpoint(ck, read_adapter(adapter), "adapted")
    expected, changed = merged_by_peft(base, adapter, arch), 0
    for name, info in ck.tensors.items():
        if name not in expected:  # a tied head, or a buffer the saved model lacks
            continue
        got = view.read(name)
        assert got.dtype == info.dtype
        torch.testing.assert_close(got, expected[name], rtol=0, atol=0, msg=name)
        if len(info.shape) == 2:
            blocks = torch.cat([view.read(name, (i, min(i + rows, info.shape[0])))
                                for i in range(0, info.shape[0], rows)])
            torch.testing.assert_close(blocks, got, rtol=1e-6, atol=1e-6, msg=name)
        changed += not torch.equal(got, ck.read(name))
    return changed


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-bases")
    return {arch: build_model(root / arch, arch, seed=0) for arch in ("llama", "gpt2", "bert")}


def test_llama_rank_alpha_patterns_embedding_and_saved_head_like_peft(bases, tmp_path):
    adapter = make_adapter(bases["llama"], tmp_path / "a", "llama", r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                           rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                           alpha_pattern={"down_proj": 3}, modules_to_save=["lm_head"])
    read = read_adapter(adapter)
    q1, v0 = (read.modules[f"model.layers.{i}.self_attn.{m}.weight"] for i, m in ((1, "q_proj"), (0, "v_proj")))
    assert (q1.rank, q1.scaling, v0.rank, v0.scaling) == (6, 8 / 6, 2, 4.0)
    assert read.modules["model.layers.0.mlp.down_proj.weight"].scaling == 3 / 4
    assert read.modules["model.embed_tokens.weight"].embedding
    assert "lm_head.weight" in read.saved
    assert assert_applies_like_peft(bases["llama"], adapter, "llama", rows=5) == 4 * 3 + 2


def test_gpt2_conv1d_fan_in_fan_out_with_rslora_like_peft(bases, tmp_path):
    adapter = make_adapter(bases["gpt2"], tmp_path / "a", "gpt2", r=4, lora_alpha=6, use_rslora=True,
                           fan_in_fan_out=True, target_modules=["c_attn", "c_fc", "c_proj"])
    module = read_adapter(adapter).modules["transformer.h.0.attn.c_attn.weight"]
    assert module.fan_in_fan_out and module.scaling == 6 / 2
    assert assert_applies_like_peft(bases["gpt2"], adapter, "gpt2", rows=7) == 4 * 4


def test_bert_with_modules_to_save_and_lora_bias_like_peft(bases, tmp_path):
    adapter = make_adapter(bases["bert"], tmp_path / "a", "bert", r=3, lora_alpha=5, lora_bias=True,
                           target_modules=["query", "value", "dense"],
                           modules_to_save=["cls.predictions.transform.dense"])
    assert "bert.encoder.layer.0.attention.self.query.bias" in read_adapter(adapter).biases
    # per layer: query, value and 3 dense weights and biases; the head's dense weight and bias
    assert assert_applies_like_peft(bases["bert"], adapter, "bert", rows=6) == 4 * 10 + 2


def test_gpt2_lora_bias_like_peft(bases, tmp_path):
    adapter = make_adapter(bases["gpt2"], tmp_path / "a", "gpt2", r=2, lora_alpha=3, lora_bias=True,
                           fan_in_fan_out=True, target_modules=["c_fc"])
    assert assert_applies_like_peft(bases["gpt2"], adapter, "gpt2", rows=5) == 4 * 2


@pytest.mark.parametrize("arch, targets", [("llama", ["q_proj", "up_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_dora_like_peft_whole_and_in_row_blocks(bases, tmp_path, arch, targets):
    adapter = make_adapter(bases[arch], tmp_path / "a", arch, r=4, lora_alpha=8, use_dora=True,
                           target_modules=targets, fan_in_fan_out=arch == "gpt2")
    assert all(m.magnitude for m in read_adapter(adapter).modules.values())
    assert assert_applies_like_peft(bases[arch], adapter, arch, rows=3) == 8


def test_bf16_base_rounds_once_from_fp32(tmp_path):
    """Documented rounding: W + s·B·A in fp32, rounded once to the base's bf16."""
    base = build_model(tmp_path / "base", "llama", seed=0, dtype=torch.bfloat16)
    adapter = make_adapter(tmp_path / "base", tmp_path / "a", "llama", r=4, lora_alpha=4,
                           target_modules=["q_proj"])
    ck, read = Checkpoint(base), read_adapter(adapter)
    name = "model.layers.2.self_attn.q_proj.weight"
    got = AdaptedCheckpoint(ck, read, "x").read(name)
    b, a = read.factors(name)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (ck.read(name).float() + b @ a).to(torch.bfloat16))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_written_adapter_loads_in_peft_with_the_factors_logits(bases, tmp_path):
    """Factors of mixed ranks, an embedding and a saved head: PeftModel (unmerged forward)
    gives the logits of the base with W + B·A put in by hand."""
    gen = torch.Generator().manual_seed(1)
    ref = model_class("llama").from_pretrained(bases["llama"])
    state = ref.state_dict()
    factors, embeddings = {}, {"model.embed_tokens.weight"}
    for i, (name, rank) in enumerate([("model.layers.0.self_attn.q_proj.weight", 3),
                                      ("model.layers.2.mlp.up_proj.weight", 5),
                                      ("model.embed_tokens.weight", 2)]):
        d_out, d_in = state[name].shape[::-1] if name in embeddings else state[name].shape
        factors[name] = (torch.randn(d_out, rank, generator=gen), torch.randn(rank, d_in, generator=gen) * 0.2)
    head = torch.randn(state["lm_head.weight"].shape, generator=gen)
    write_adapter(tmp_path / "w", factors, base_model=str(bases["llama"]), embeddings=embeddings,
                  saved={"lm_head.weight": head})
    config = json.loads((tmp_path / "w" / "adapter_config.json").read_text())
    assert config["r"] == 5 and config["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 3
    loaded = peft.PeftModel.from_pretrained(model_class("llama").from_pretrained(bases["llama"]), tmp_path / "w")
    with torch.no_grad():
        for name, (b, a) in factors.items():
            state[name] += (b @ a).T if name in embeddings else b @ a
        state["lm_head.weight"].copy_(head)
    ids = torch.randint(0, 96, (2, 9), generator=gen)
    torch.testing.assert_close(logits(loaded, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    back = read_adapter(tmp_path / "w")  # and our reader gives back what was written, scaling 1
    for name, (b, a) in factors.items():
        assert back.modules[name].scaling == 1.0
        torch.testing.assert_close(back.factors(name), (b, a), rtol=0, atol=0)


def test_read_then_written_adapter_merges_as_the_original_in_peft(bases, tmp_path):
    """An embedding LoRA whose base weight PEFT saved too (save_embedding_layers), a saved head,
    mixed ranks: written back with the scalings folded in, PEFT merges it to the same model."""
    original = make_adapter(bases["llama"], tmp_path / "a", "llama", r=4, lora_alpha=8,
                            target_modules=["embed_tokens", "v_proj"], rank_pattern={"v_proj": 2},
                            modules_to_save=["lm_head"])
    read = read_adapter(original)
    assert set(read.saved) == {"lm_head.weight", "model.embed_tokens.weight"}
    factors = {w: (b * m.scaling, a) for w, m in read.modules.items() for b, a in [read.factors(w)]}
    write_adapter(tmp_path / "w", factors, base_model=None, saved={n: read.read_saved(n) for n in read.saved},
                  embeddings={w for w, m in read.modules.items() if m.embedding})
    want, got = (merged_by_peft(bases["llama"], folder, "llama") for folder in (original, tmp_path / "w"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6, msg=name)


def test_refuses_other_adapter_types_and_variants(bases, tmp_path):
    ia3 = peft.get_peft_model(model_class("llama").from_pretrained(bases["llama"]),
                              peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(CheckpointError, match=r"ia3: adapter type 'IA3' is not supported"):
        read_adapter(tmp_path / "ia3", "ia3")
    lora = make_adapter(bases["llama"], tmp_path / "lora", "llama", r=2, target_modules=["q_proj"])
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "use_qalora": True}))
    with pytest.raises(CheckpointError, match=r"LoRA variant use_qalora=True is not supported"):
        read_adapter(lora)


def test_missing_adapter_files_are_named(bases, tmp_path):
    with pytest.raises(CheckpointError, match=r"no adapter_config.json in"):
        read_adapter(tmp_path)
    lora = make_adapter(bases["llama"], tmp_path / "lora", "llama", r=2, target_modules=["q_proj"])
    (lora / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no adapter weights in .*adapter_model.safetensors"):
        read_adapter(lora)
