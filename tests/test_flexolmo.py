"""FlexOlmo: a public dense OLMo-2 model and experts trained beside its frozen FFN, merged into one
FlexOlmo MoE (moe/flexolmo.py); opt-out and opt-in of experts."""

import json

import pytest
import torch
import transformers

from conftest import read_tensors
from mergesmith.moe.flexolmo import add_experts, drop_experts, flexolmo
from mergesmith.errors import PlanError
from mergesmith.toy import build_model, default_tokens, save_tokenizer

SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1, bos_token_id=None,
             eos_token_id=None, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
LAYERS, D = 2, 32
PROJ = ("gate_proj", "up_proj", "down_proj")


def save(model, folder):
    model.save_pretrained(folder)
    save_tokenizer(folder, default_tokens())
    return folder


def mlp_names(layer):
    return {p: f"model.layers.{layer}.mlp.{p}.weight" for p in PROJ}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """public (dense OLMo-2), m1..m3 (2-expert FlexOlmo experts sharing r_pub), d1 (dense expert),
    bad_attn (an expert whose attention moved), bad_ffn (public FFN moved), bad_row (r_pub moved)."""
    root = tmp_path_factory.mktemp("flexolmo")
    torch.manual_seed(0)
    public = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SIZES)).eval()
    state = public.state_dict()
    paths = {"public": save(public, root / "public")}
    r_pub = torch.randn(LAYERS, D)

    def moe_expert(name, seed, change=None):
        gen = torch.Generator().manual_seed(seed)
        cfg = transformers.FlexOlmoConfig(**SIZES, num_experts=2, num_experts_per_tok=2)
        tensors = {k: v.clone() for k, v in state.items() if ".mlp." not in k}
        for l in range(LAYERS):
            for p, n in mlp_names(l).items():
                tensors[f"model.layers.{l}.mlp.experts.0.{p}.weight"] = state[n].clone()
                tensors[f"model.layers.{l}.mlp.experts.1.{p}.weight"] = state[n] + 0.05 * torch.randn(
                    state[n].shape, generator=gen)
            tensors[f"model.layers.{l}.mlp.gate.weight"] = torch.stack([r_pub[l], torch.randn(D, generator=gen)])
        if change:
            tensors[change] = tensors[change] + 1e-3
        from safetensors.torch import save_file

        folder = root / name
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors")
        cfg.save_pretrained(folder)
        save_tokenizer(folder, default_tokens())
        paths[name] = folder

    for i in (1, 2, 3):
        moe_expert(f"m{i}", i)
    moe_expert("bad_attn", 7, "model.layers.1.self_attn.q_proj.weight")
    moe_expert("bad_ffn", 8, "model.layers.0.mlp.experts.0.up_proj.weight")
    moe_expert("bad_row", 9, "model.layers.1.mlp.gate.weight")
    dense = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SIZES)).eval()
    dense.load_state_dict(state)
    with torch.no_grad():
        for l in range(LAYERS):
            dense.model.layers[l].mlp.down_proj.weight.add_(0.1)
    paths["d1"] = save(dense, root / "d1")
    return paths


def hand_built(zoo, members, rows, top_k=2):
    """The FlexOlmo model built by hand in memory: the public model's shared tensors, member k's
    FFN as expert k (fused as transformers holds it), `rows` [L, E, d] as the routers."""
    pub = read_tensors(zoo["public"])
    cfg = transformers.FlexOlmoConfig(**SIZES, num_experts=len(members), num_experts_per_tok=top_k)
    model = transformers.FlexOlmoForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in pub:
                param.copy_(pub[name])
        for l, layer in enumerate(model.model.layers):
            for e, (folder, slot) in enumerate(members):
                t = read_tensors(folder)
                ffn = {p: t[f"model.layers.{l}.mlp.experts.{slot}.{p}.weight" if slot is not None
                            else mlp_names(l)[p]] for p in PROJ}
                layer.mlp.experts.gate_up_proj[e] = torch.cat([ffn["gate_proj"], ffn["up_proj"]])
                layer.mlp.experts.down_proj[e] = ffn["down_proj"]
            layer.mlp.gate.weight.copy_(rows[l])
    return model


def test_rows_in_order_and_the_output_is_the_hand_built_model(zoo, tmp_path):
    out = flexolmo(zoo["public"], [zoo["m1"], zoo["m2"], zoo["m3"]], tmp_path / "out")
    got = read_tensors(out)
    gates = [read_tensors(zoo[f"m{i}"]) for i in (1, 2, 3)]
    rows = torch.stack([torch.stack([gates[0][f"model.layers.{l}.mlp.gate.weight"][0]]
                                    + [g[f"model.layers.{l}.mlp.gate.weight"][1] for g in gates])
                        for l in range(LAYERS)])
    for l in range(LAYERS):
        assert torch.equal(got[f"model.layers.{l}.mlp.gate.weight"], rows[l])  # [r_pub, r_1, r_2, r_3]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "flex_olmo" and config["num_experts"] == 4
    members = [(zoo["public"], None)] + [(zoo[f"m{i}"], 1) for i in (1, 2, 3)]
    want = hand_built(zoo, members, rows)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "FlexOlmoForCausalLM"
    ids = torch.tensor([[3, 17, 5, 40, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want(ids).logits, rtol=1e-5, atol=1e-5)
        # not vacuous: dropping the router's preference changes the output
        want.model.layers[0].mlp.gate.weight.mul_(-1)
        assert not torch.allclose(loaded(ids).logits, want(ids).logits, atol=1e-4)


def test_opt_out_equals_building_without_and_opt_in_equals_building_with(zoo, tmp_path):
    three = flexolmo(zoo["public"], [zoo["m1"], zoo["m2"], zoo["m3"]], tmp_path / "three")
    dropped = drop_experts(three, [2], tmp_path / "dropped")
    without = flexolmo(zoo["public"], [zoo["m1"], zoo["m3"]], tmp_path / "without")
    a, b = read_tensors(dropped), read_tensors(without)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((dropped / "config.json").read_text())["num_experts"] == 3
    assert not torch.equal(a["model.layers.0.mlp.experts.2.up_proj.weight"],
                           read_tensors(three)["model.layers.0.mlp.experts.2.up_proj.weight"])
    appended = add_experts(without, [zoo["m2"]], tmp_path / "appended")
    want = flexolmo(zoo["public"], [zoo["m1"], zoo["m3"], zoo["m2"]], tmp_path / "want")
    a, b = read_tensors(appended), read_tensors(want)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PlanError, match="cannot drop expert"):
        drop_experts(three, [0], tmp_path / "no")


@pytest.mark.parametrize("bad, message", [
    ("bad_attn", r"shared tensor 'model\.layers\.1\.self_attn\.q_proj\.weight' differs"),
    ("bad_ffn", r"public FFN \(expert 0\) differs"),
    ("bad_row", r"router row 0 .* differs"),
])
def test_experts_that_moved_shared_tensors_are_refused(zoo, tmp_path, bad, message):
    with pytest.raises(PlanError, match=message):
        flexolmo(zoo["public"], [zoo["m1"], zoo[bad]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dense_experts_get_domain_embeddings(zoo, tmp_path):
    """r_i = mean over the texts of the embedder's (here the public model's) mean-pooled last
    hidden states, the same row in every layer; a dense expert without texts is refused."""
    texts = ["w3 w4 w5", "w9 w10", "w20"]
    public_texts = ["w40 w41 w42 w43", "w50"]
    with pytest.raises(PlanError, match="dense expert has no router row"):
        flexolmo(zoo["public"], [zoo["d1"]], tmp_path / "no")
    out = flexolmo(zoo["public"], [zoo["m1"], zoo["d1"]], tmp_path / "out",
                   texts=[None, texts], public_texts=public_texts)
    encoder = transformers.AutoModel.from_pretrained(zoo["public"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(zoo["public"])

    def embedding(batch):
        with torch.no_grad():
            return torch.stack([encoder(torch.tensor([tok(t)["input_ids"]])).last_hidden_state[0].mean(0)
                                for t in batch]).mean(0)

    got = read_tensors(out)
    m1 = read_tensors(zoo["m1"])
    for l in range(LAYERS):
        rows = got[f"model.layers.{l}.mlp.gate.weight"]
        torch.testing.assert_close(rows[0], embedding(public_texts), rtol=1e-5, atol=1e-6)
        assert torch.equal(rows[1], m1[f"model.layers.{l}.mlp.gate.weight"][1])
        torch.testing.assert_close(rows[2], embedding(texts), rtol=1e-5, atol=1e-6)
    assert torch.equal(got["model.layers.1.mlp.experts.2.down_proj.weight"],
                       read_tensors(zoo["d1"])["model.layers.1.mlp.down_proj.weight"])


def test_bad_inputs_are_refused(zoo, tmp_path):
    small = build_model(tmp_path / "small", "llama", seed=0, layers=2, hidden=16)
    with pytest.raises(PlanError, match="embedder's hidden size is 16, the model's is 32"):
        flexolmo(zoo["public"], [zoo["d1"]], tmp_path / "out", texts=[["w3"]], public_texts=["w4"],
                 embedder=small)
    with pytest.raises(PlanError, match="FlexOlmo's MoE is OLMo-2's architecture"):
        flexolmo(small, [zoo["m1"]], tmp_path / "out")
    three = flexolmo(zoo["public"], [zoo["m1"], zoo["m2"]], tmp_path / "three")
    with pytest.raises(PlanError, match="a FlexOlmo expert is a 2-expert MoE"):
        flexolmo(zoo["public"], [zoo["m1"], three], tmp_path / "out")


def test_cli_builds_drops_and_appends(zoo, tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    domain = tmp_path / "d1.txt"
    domain.write_text("w3 w4 w5\nw9 w10\n")
    code, _, err = run_cli(monkeypatch, capsys, "flexolmo", zoo["public"], zoo["m1"], zoo["d1"], "-o",
                           tmp_path / "both", "--texts", f"2={domain}", "-q")
    assert code == 0, err
    want = flexolmo(zoo["public"], [zoo["m1"], zoo["d1"]], tmp_path / "api", texts=[None, ["w3 w4 w5", "w9 w10"]])
    a, b = read_tensors(tmp_path / "both"), read_tensors(want)
    assert all(torch.equal(a[k], b[k]) for k in b)
    code, _, err = run_cli(monkeypatch, capsys, "flexolmo", tmp_path / "both", "--drop", "2", "-o",
                           tmp_path / "one", "-q")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "flexolmo", tmp_path / "one", zoo["m2"], "--append", "-o",
                           tmp_path / "two", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "two" / "config.json").read_text())["num_experts"] == 3
    code, _, err = run_cli(monkeypatch, capsys, "flexolmo", zoo["public"], zoo["d1"], "-o", tmp_path / "no")
    assert code != 0 and "dense expert has no router row" in err and "Traceback" not in err
