"""`mergesmith moe`: dense experts into a Mixtral / Qwen2-MoE / Qwen3-MoE (mergekit-moe's YAML),
BTX's averaged non-expert tensors, AquilaMoE's upcycling: recipe/moe.py, moe/assemble.py,
moe/layouts.py, methods/moe_assemble.py."""

import gc
import json

import pytest
import torch
import transformers
import yaml

from conftest import read_tensors, run_cli
from mergesmith.moe.assemble import build_moe
from mergesmith.errors import PlanError, RecipeError
from mergesmith.methods.moe_assemble import gaussian_noise
from mergesmith.recipe.moe import load_moe_config
from mergesmith.toy import VOCAB, build_model, default_tokens

PROMPTS = [{"positive_prompts": ["w3 w4 w5", "w6"]},
           {"positive_prompts": ["w11 w12"], "negative_prompts": ["w40"]},
           {"positive_prompts": ["w60 w61"]}]


def bos_tokenizer(folder):
    """A word-level tokenizer with BOS, which prompts are prefixed with (mergekit-moe pads with it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens = default_tokens()
    tokens[2] = "[BOS]"
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                         bos_token="[BOS]").save_pretrained(folder)
    return folder


def qwen3(folder, seed=0):
    """A tiny dense Qwen3 (mergesmith.toy has none)."""
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return bos_tokenizer(folder)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    base = bos_tokenizer(build_model(root / "base", "llama", seed=0, layers=2))
    return {"base": base,
            **{f"e{i}": bos_tokenizer(build_model(root / f"e{i}", "llama", seed=i, base=base, layers=2,
                                                  delta=0.05)) for i in (1, 2)},
            "qwen2": bos_tokenizer(build_model(root / "qwen2", "qwen2", seed=3, layers=2)),
            "qwen3": qwen3(root / "qwen3", seed=4)}


def moe_yaml(path, base, experts, **fields):
    data = {"base_model": str(base), **fields,
            "experts": [{"source_model": str(m), **extra} for m, extra in experts]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[2, 5, 9, 13, 40, 61, 7, 3]])


@pytest.mark.parametrize("arch, dense_key",
                         [("mixtral", "base"), ("qwen2_moe", "qwen2"), ("qwen3_moe", "qwen3")])
def test_copies_of_one_dense_model_give_its_logits(dense, tmp_path, arch, dense_key):
    """Three copies of one dense model, top-2 renormalised (Qwen: norm_topk_prob, as mergekit sets
    it): every token's output is the dense MLP's whatever the router; Qwen2-MoE's shared expert
    is silenced by residual_scale 0. Loads in transformers with no missing or unexpected tensor,
    and generates."""
    model = dense[dense_key]
    fields = {"gate_mode": "random", "architecture": arch, "allow_identical_experts": True}
    if arch == "qwen2_moe":
        fields["shared_experts"] = [{"source_model": str(model), "residual_scale": 0.0}]
    config = moe_yaml(tmp_path / "moe.yml", model, [(model, {})] * 3, **fields)
    out = build_moe(load_moe_config(config), tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["num_experts_per_tok"] == 2
    moe, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                  output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(IDS).logits, logits(model, IDS), rtol=1e-5, atol=1e-5)
        generated = moe.generate(IDS[:, :3], max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert generated.shape == (1, 7)


@pytest.mark.parametrize("key, arch", [("base", "MixtralForCausalLM"), ("qwen2", "Qwen2MoeForCausalLM")])
def test_upcycle_cli_without_noise_is_the_dense_model(dense, tmp_path, monkeypatch, capsys, key, arch):
    """Qwen2's layout needs a shared expert: the model's MLP with a zero down projection."""
    out = tmp_path / "up"
    code, _, err = run_cli(monkeypatch, capsys, "moe", "--upcycle", dense[key], "--experts", 4, out, "-q")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("num_local_experts", cfg.get("num_experts")) == 4 and cfg["architectures"] == [arch]
    torch.testing.assert_close(logits(out, IDS), logits(dense[key], IDS), rtol=1e-5, atol=1e-5)


def test_expert_slots_are_their_sources_bitwise_and_btx_averages(dense, tmp_path):
    sources = [dense["e1"], dense["e2"], dense["base"]]
    config = moe_yaml(tmp_path / "moe.yml", dense["base"], [(m, {}) for m in sources], gate_mode="random",
                      non_expert="average")
    got = read_tensors(build_moe(load_moe_config(config), tmp_path / "out", shard_size="30KB"))
    assert gc.isenabled()  # paused while planning only
    src = [read_tensors(m) for m in sources]
    for layer in range(2):
        for e in range(3):
            for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                mine = got[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                assert torch.equal(mine, src[e][f"model.layers.{layer}.mlp.{proj}.weight"])
        assert got[f"model.layers.{layer}.block_sparse_moe.gate.weight"].shape == (3, 32)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        mean = torch.stack([s[name] for s in src]).mean(0)
        torch.testing.assert_close(got[name], mean, rtol=0, atol=1e-6)
        assert not torch.allclose(got[name], src[2][name], atol=1e-3)  # not the base's
    assert not any(".mlp." in n for n in got)


def test_noise_and_residual_scale_as_defined_and_reproducible(dense, tmp_path):
    """Expert e = (source + σ·z) · r on down projections, z the seeded N(0, 1) draws of the output
    tensor's name: the same in every run, different in every slot (upcycling's symmetry break),
    and a block of rows draws what the whole tensor draws there."""
    sigma, r = 0.01, 0.5
    spec = {"noise_scale": sigma, "residual_scale": r}
    config = moe_yaml(tmp_path / "moe.yml", dense["base"], [(dense["base"], spec)] * 2, gate_mode="random",
                      allow_identical_experts=True, seed=7)
    runs = [read_tensors(build_moe(load_moe_config(config), tmp_path / f"out{i}", shard_size="30KB"))
            for i in range(2)]
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    source = read_tensors(dense["base"])
    for proj, w, scale in (("down_proj", "w2", r), ("up_proj", "w3", 1.0)):
        name = f"model.layers.1.block_sparse_moe.experts.1.{w}.weight"
        x = source[f"model.layers.1.mlp.{proj}.weight"]
        z = gaussian_noise(f"7\0{name}", 0, x.shape)
        torch.testing.assert_close(runs[0][name], (x + sigma * z) * scale, rtol=0, atol=1e-7)
        assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1 and z.abs().max() > 2.5
    assert not torch.equal(runs[0]["model.layers.0.block_sparse_moe.experts.0.w1.weight"],
                           runs[0]["model.layers.0.block_sparse_moe.experts.1.w1.weight"])
    whole = gaussian_noise("k", 0, (10, 6))
    assert torch.equal(gaussian_noise("k", 18, (4, 6)), whole[3:7])


def fused(tensors, layer, experts):
    """Our per-expert Mixtral tensors in transformers 5's fused layout, which mergekit 0.1.5 writes."""
    name = f"model.layers.{layer}.block_sparse_moe.experts.{{}}.{{}}.weight"
    gate_up = torch.stack([torch.cat([tensors[name.format(e, "w1")], tensors[name.format(e, "w3")]])
                           for e in range(experts)])
    return gate_up, torch.stack([tensors[name.format(e, "w2")] for e in range(experts)])


@pytest.mark.parametrize("architecture", [None, "qwen"])
def test_tensors_and_config_equal_mergekit_moe(dense, tmp_path, architecture):
    """mergekit-moe 0.1.5 run in process on the same config (cheap_embed: its gates are
    deterministic): every tensor bitwise but the router rows (fp32 rounding), the config.json
    the same. Qwen-MoE from Llama, in bfloat16: attention biases of zeros, a shared expert and its
    gate."""
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    experts = [(dense["e1"], PROMPTS[0]), (dense["e2"], {**PROMPTS[1], "residual_scale": 0.5}),
               (dense["base"], PROMPTS[2])]
    fields = {"gate_mode": "cheap_embed", "experts_per_token": 1}
    if architecture:
        fields.update(architecture=architecture, dtype="bfloat16",
                      shared_experts=[{"source_model": str(dense["e1"]), "positive_prompts": ["w20 w21"]}])
    config = moe_yaml(tmp_path / "moe.yml", dense["base"], experts, **fields)
    build(MoEMergeConfig.model_validate(yaml.safe_load(config.read_text())), str(tmp_path / "mk"),
          MergeOptions(), device="cpu")
    ours = read_tensors(build_moe(load_moe_config(config), tmp_path / "ours"))
    theirs = read_tensors(tmp_path / "mk")
    mine = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert mine == json.loads((tmp_path / "mk" / "config.json").read_text())
    if architecture is None:
        for layer in range(2):
            gate_up, down = fused(ours, layer, 3)
            assert torch.equal(theirs.pop(f"model.layers.{layer}.mlp.experts.gate_up_proj"), gate_up)
            assert torch.equal(theirs.pop(f"model.layers.{layer}.mlp.experts.down_proj"), down)
        ours = {n.replace("block_sparse_moe.gate", "mlp.gate"): t for n, t in ours.items()
                if ".experts." not in n}
    assert set(ours) == set(theirs)
    # rows equal to fp32 rounding, which may flip a bfloat16 rounding: one bf16 step
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if architecture is None else {"rtol": 2 ** -7, "atol": 1e-6}
    for name, tensor in theirs.items():
        if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            torch.testing.assert_close(ours[name].float(), tensor.float(), **tolerance)
        else:
            assert torch.equal(ours[name], tensor), name


def test_bad_inputs_are_refused_naming_what_is_wrong(dense, tmp_path, monkeypatch, capsys):
    base = dense["base"]
    cases = [
        ([(dense["qwen2"], {}), (dense["e1"], {})], {}, PlanError,
         f"expert {dense['qwen2']} does not match.*architectures"),
        ([(build_model(tmp_path / "wide", "llama", seed=5, layers=2, hidden=48), {}), (dense["e1"], {})], {},
         PlanError, "hidden_size 32 against 48"),
        ([(build_model(tmp_path / "deep", "llama", seed=5, layers=3), {}), (dense["e1"], {})], {},
         PlanError, "num_hidden_layers 2 against 3"),
        ([(dense["e1"], {})] * 2, {}, PlanError, "every expert is"),
        ([(dense["e1"], {}), (dense["e2"], {})], {"architecture": "switch"}, PlanError,
         "moe.yml:3: architecture: 'switch' is not an MoE layout"),
        ([(dense["e1"], {}), (dense["e2"], {})],
         {"architecture": "mixtral", "shared_experts": [{"source_model": str(base)}]},
         PlanError, "mixtral takes no shared experts; the config gives 1"),
    ]
    for experts, fields, error, match in cases:
        config = moe_yaml(tmp_path / "moe.yml", base, experts, gate_mode="random", **fields)
        with pytest.raises(error, match=match):
            build_moe(load_moe_config(config), tmp_path / "out")
    config = moe_yaml(tmp_path / "moe.yml", dense["qwen2"], [(dense["qwen2"], {})] * 2, gate_mode="random",
                      allow_identical_experts=True)
    with pytest.raises(PlanError, match="qwen2 is a qwen2 model, whose MoE layout qwen2_moe takes "
                                        "exactly one shared expert.*gives 0"):
        build_moe(load_moe_config(config), tmp_path / "out")
    gpt2 = build_model(tmp_path / "gpt2", "gpt2", seed=0, layers=2)
    config = moe_yaml(tmp_path / "moe.yml", gpt2, [(gpt2, {}), (gpt2, {})], gate_mode="random")
    code, _, err = run_cli(monkeypatch, capsys, "moe", config, tmp_path / "out",
                           "--allow-identical-experts")
    assert code == 1 and "is a gpt2 model, which no MoE layout takes" in err and "mixtral from llama" in err
    assert not (tmp_path / "out").exists()

    config = moe_yaml(tmp_path / "moe.yml", base, [(dense["e1"], {}), (dense["e2"], {})], gate_mode="random",
                      experts_per_token=3)
    with pytest.raises(RecipeError, match=r"moe.yml:3: experts_per_token: 3 experts per token, with 2"):
        load_moe_config(config)
    text = config.read_text().replace("experts_per_token", "expert_per_token")
    config.write_text(text)
    with pytest.raises(RecipeError, match=r"moe.yml:3: expert_per_token: unknown field 'expert_per_token' "
                                          r"\(hint: did you mean 'experts_per_token'"):
        load_moe_config(config)
    config.write_text(text.replace("expert_per_token: 3\n", "").replace("source_model", "source_modle", 1))
    with pytest.raises(RecipeError, match=r"moe.yml:4: experts\[0\].source_modle: unknown field"):
        load_moe_config(config)


@pytest.mark.parametrize("layout, model_type, fields", [
    ("mixtral", "llama", {}), ("mixtral", "llama", {"tie_word_embeddings": True, "attention_bias": True}),
    ("mixtral", "mistral", {"head_dim": 16}), ("qwen2_moe", "llama", {"num_key_value_heads": 4}),
    ("qwen2_moe", "qwen2", {"tie_word_embeddings": True}), ("qwen3_moe", "qwen3", {"head_dim": 16}),
    ("qwen3_moe", "qwen3", {"attention_bias": True, "tie_word_embeddings": True}),
])
def test_layout_table_is_the_modeling_codes_parameters(layout, model_type, fields):
    """non_expert_shapes, the check's table, against a transformers model of the same MoE config
    built on the meta device (what the check built before); qkv_bias off for Qwen2-MoE too."""
    from mergesmith.moe.layouts import LAYOUTS, moe_config, non_expert_shapes

    base = {"model_type": model_type, "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **fields}
    moe = moe_config(LAYOUTS[layout], base, 3, 2, "float32", None)
    for config in [moe] + ([{**moe, "qkv_bias": False}] if layout == "qwen2_moe" else []):
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
        want = {n: tuple(p.shape) for n, p in model.named_parameters() if ".mlp." not in n}
        assert non_expert_shapes(LAYOUTS[layout], config) == want


def altered(src, dst, config=None, add=None, drop=()):
    """A copy of the model folder `src` with config fields changed and tensors added or dropped."""
    from safetensors.torch import save_file

    dst.mkdir()
    tensors = {n: t for n, t in read_tensors(src).items() if n not in drop}
    save_file({**tensors, **(add or {})}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    return dst


@pytest.mark.parametrize("change, match", [
    ({"add": {f"model.layers.{l}.self_attn.q_proj.bias": torch.zeros(32) for l in range(2)},
      "config": {"attention_bias": True}},
     "'model.layers.0.self_attn.q_proj.bias' has no place in a mixtral model"),
    ({"config": {"num_key_value_heads": 4}},
     r"model.layers.0.self_attn.k_proj.weight is \[16, 32\]; a mixtral model of its config holds \[32, 32\]"),
    ({"drop": ("lm_head.weight",)}, "has no tensor 'lm_head.weight', which a mixtral model holds"),
])
def test_tensors_the_layout_has_no_place_for_are_refused(dense, tmp_path, change, match):
    """The base's non-MLP tensors against the layout's: one it lacks a place for (attention
    biases in Mixtral), one of another shape than its config implies, one the layout needs and
    the base lacks (an untied head); refused before anything is written."""
    models = [altered(dense[k], tmp_path / k, **change) for k in ("base", "e1", "e2")]
    config = moe_yaml(tmp_path / "moe.yml", models[0], [(m, {}) for m in models[1:]], gate_mode="random")
    with pytest.raises(PlanError, match=match):
        build_moe(load_moe_config(config), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert gc.isenabled()  # paused while planning only
