"""`mergesmith moe` with mergekit's `BASE+ADAPTER` references (an expert's source_model, base_model,
`--upcycle MODEL`): the MoE equals the one built from the folders PEFT's merge_and_unload writes,
and mergekit-moe's on the folders mergekit's own LoRA merge writes (mergekit-moe 0.1.5 itself
refuses a `+lora` reference: "LoRA not merged"); bad adapters are named before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import read_tensors, run_cli
from mergesmith.errors import CheckpointError, ModelNotFoundError, PlanError, RecipeError
from mergesmith.moe.assemble import build_moe, moe_program, open_model
from mergesmith.moe.gates import gate_rows
from mergesmith.recipe.moe import load_moe_config
from mergesmith.toy import build_model, model_class
from test_adapter_io import make_adapter
from test_moe_assemble import PROMPTS, bos_tokenizer, fused, moe_yaml
from test_moe_router import mergekit_rows

peft = pytest.importorskip("peft")

MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base, a dense expert, an adapter on the MLPs (rsLoRA: the expert) and one on attention,
    MLPs and the embedding (DoRA: the base, whose forward and embedding make the router rows),
    and the folders PEFT merges each adapter into."""
    root = tmp_path_factory.mktemp("moe-lora")
    base = bos_tokenizer(build_model(root / "base", "llama", seed=0, layers=2))
    world = {"base": base,
             "e1": bos_tokenizer(build_model(root / "e1", "llama", seed=1, base=base, layers=2, delta=0.05)),
             "ax": make_adapter(base, root / "ax", "llama", seed=1, r=4, lora_alpha=8, use_rslora=True,
                                target_modules=MLP),
             "ab": make_adapter(base, root / "ab", "llama", seed=2, r=2, lora_alpha=4,
                                target_modules=["q_proj", "v_proj", "embed_tokens", *MLP])}
    for key in ("ax", "ab"):
        world[f"{key}-merged"] = bos_tokenizer(peft_merged(base, world[key], root / f"{key}-merged"))
    return world


def peft_merged(base, adapter, folder, arch="llama"):
    """The folder PEFT's merge_and_unload writes (weights and config; no tokenizer)."""
    model = peft.PeftModel.from_pretrained(model_class(arch).from_pretrained(base), adapter)
    model.merge_and_unload().save_pretrained(folder)
    return folder


def refs(world, merged: bool) -> tuple[str, list[str]]:
    """(base_model, expert sources): the adapters as `base+adapter`, or their PEFT-merged folders."""
    def ref(key):
        return str(world[f"{key}-merged"]) if merged else f"{world['base']}+{world[key]}"

    return ref("ab"), [str(world["e1"]), ref("ax"), ref("ab")]


def test_adapter_references_equal_the_moe_of_peft_merged_folders(world, tmp_path):
    """Expert slots, attention and embedding (the adapted base's) bitwise; router rows from the
    adapted base's forward bitwise too (fp32 throughout: the adapter's arithmetic is fp32, and
    PEFT's merge rounds nothing). The base's adapter does change the rows."""
    built = {}
    for merged in (False, True):
        base, experts = refs(world, merged)
        config = moe_yaml(tmp_path / f"moe{merged}.yml", base, list(zip(experts, PROMPTS)),
                          experts_per_token=2)
        built[merged] = read_tensors(build_moe(load_moe_config(config), tmp_path / f"out{merged}"))
    assert set(built[False]) == set(built[True])
    for name, tensor in built[True].items():
        assert torch.equal(built[False][name], tensor), name
    slot = "model.layers.1.block_sparse_moe.experts.{}.w3.weight"
    assert not torch.equal(built[False][slot.format(1)], built[False][slot.format(0)])
    plain = gate_rows(load_moe_config({"base_model": str(world["base"]), "experts": [
        {"source_model": str(world["base"]), **p} for p in PROMPTS]}), open_model(str(world["base"]), {}))
    for layer in range(2):
        rows = built[False][f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert not torch.allclose(rows, plain[layer], atol=1e-3), layer


def test_upcycle_of_base_plus_adapter_is_the_upcycle_of_the_merged_folder(world, tmp_path, monkeypatch,
                                                                         capsys):
    """`--upcycle BASE+ADAPTER` with noise: the noise is seeded per output tensor, so the two
    agree bitwise."""
    outs = []
    for i, model in enumerate((f"{world['base']}+{world['ax']}", world["ax-merged"])):
        outs.append(tmp_path / f"up{i}")
        code, _, err = run_cli(monkeypatch, capsys, "moe", "--upcycle", model, "--experts", 3,
                               "--noise-scale", 0.01, outs[-1], "-q")
        assert code == 0, err
    ours, want = read_tensors(outs[0]), read_tensors(outs[1])
    assert set(ours) == set(want) and all(torch.equal(ours[n], want[n]) for n in want)


def test_two_adapters_on_one_base_are_two_experts_one_adapter_twice_is_refused(world, tmp_path):
    base, (_, ax, ab) = world["base"], refs(world, merged=False)[1]
    program = moe_program(load_moe_config({"base_model": str(base), "gate_mode": "random", "experts": [
        {"source_model": ax}, {"source_model": ab}]}))
    assert len(program.models) == 3
    with pytest.raises(PlanError, match=r"experts: every expert is .*\+.*ax: the MoE would compute"):
        moe_program(load_moe_config({"base_model": str(base), "gate_mode": "random", "experts": [
            {"source_model": ax}, {"source_model": ax}]}))


def test_mergekit_moe_on_the_folders_mergekit_merges_the_adapters_into(world, tmp_path, monkeypatch):
    """mergekit-moe 0.1.5 refuses `+lora` references; mergekit means `X+A` as X with A merged by
    its ModelReference.merged() (PEFT merge_and_unload), which is what mergekit-moe is run on
    here. cheap_embed (the adapted embedding): every tensor bitwise but the router rows (fp32
    rounding), config.json the same; hidden: the rows of the adapted base's forward equal
    mergekit's get_gate_params on its merged base."""
    from mergekit.common import ModelReference
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    base, experts = refs(world, merged=False)
    config = moe_yaml(tmp_path / "moe.yml", base, list(zip(experts, PROMPTS)), gate_mode="cheap_embed",
                      experts_per_token=1)
    with pytest.raises(AssertionError, match="LoRA not merged"):
        build(MoEMergeConfig.model_validate(yaml.safe_load(config.read_text())), str(tmp_path / "refused"),
              MergeOptions(), device="cpu")

    def mergekit_merged(ref: str) -> str:
        if "+" not in ref:
            return ref
        folder = ModelReference.parse(ref).merged(cache_dir=str(tmp_path / "cache")).model.path
        return str(bos_tokenizer(folder))  # mergekit writes the weights and config only

    theirs_config = moe_yaml(tmp_path / "mk.yml", mergekit_merged(base),
                             [(mergekit_merged(e), p) for e, p in zip(experts, PROMPTS)],
                             gate_mode="cheap_embed", experts_per_token=1)
    build(MoEMergeConfig.model_validate(yaml.safe_load(theirs_config.read_text())), str(tmp_path / "mk"),
          MergeOptions(), device="cpu")
    ours = read_tensors(build_moe(load_moe_config(config), tmp_path / "ours"))
    theirs = read_tensors(tmp_path / "mk")
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == \
        json.loads((tmp_path / "mk" / "config.json").read_text())
    for layer in range(2):
        gate_up, down = fused(ours, layer, 3)
        assert torch.equal(theirs.pop(f"model.layers.{layer}.mlp.experts.gate_up_proj"), gate_up)
        assert torch.equal(theirs.pop(f"model.layers.{layer}.mlp.experts.down_proj"), down)
    ours = {n.replace("block_sparse_moe.gate", "mlp.gate"): t for n, t in ours.items() if ".experts." not in n}
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        if name.endswith("mlp.gate.weight"):
            torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(ours[name], tensor), name

    hidden = load_moe_config({"base_model": base, "experts": [
        {"source_model": str(world["base"]), **p} for p in PROMPTS]})
    rows = gate_rows(hidden, open_model(base, {}))
    torch.testing.assert_close(rows, mergekit_rows(mergekit_merged(base), PROMPTS, "hidden", monkeypatch),
                               rtol=1e-5, atol=1e-5)


def test_flexolmo_dense_expert_and_embedder_as_public_plus_adapter(tmp_path):
    """FlexOlmo's inputs open the same way: a dense expert `public+adapter` (on its FFN) and an
    embedder `public+adapter` (on attention: the domain embeddings run through it) give bitwise
    the MoE of their PEFT-merged folders; an adapter on attention makes an expert whose shared
    tensors are no longer the public model's, which is named."""
    import transformers

    from mergesmith.moe.flexolmo import flexolmo
    from mergesmith.toy import default_tokens, save_tokenizer
    from test_flexolmo import SIZES, save

    torch.manual_seed(0)
    public = save(transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SIZES)).eval(), tmp_path / "public")
    ffn = make_adapter(public, tmp_path / "ffn", "olmo2", r=2, lora_alpha=4, target_modules=MLP)
    attn = make_adapter(public, tmp_path / "attn", "olmo2", seed=1, r=2, lora_alpha=4,
                        target_modules=["q_proj", "v_proj"])
    merged = {}
    for key, adapter in (("ffn", ffn), ("attn", attn)):
        merged[key] = peft_merged(public, adapter, tmp_path / f"{key}-merged", "olmo2")
        save_tokenizer(merged[key], default_tokens())
    texts = {"texts": [["w3 w4 w5", "w6 w7"]], "public_texts": ["w10 w11 w12"]}
    ours = read_tensors(flexolmo(public, [f"{public}+{ffn}"], tmp_path / "ours", embedder=f"{public}+{attn}",
                                 **texts))
    want = read_tensors(flexolmo(public, [merged["ffn"]], tmp_path / "want", embedder=merged["attn"], **texts))
    assert set(ours) == set(want) and all(torch.equal(ours[n], want[n]) for n in want)
    assert not torch.equal(ours["model.layers.0.mlp.experts.1.up_proj.weight"],
                           ours["model.layers.0.mlp.experts.0.up_proj.weight"])
    with pytest.raises(PlanError, match=r"\+.*attn: its shared tensor 'model.layers.0.self_attn.q_proj.weight' "
                                        r"differs from the public model's"):
        flexolmo(public, [f"{public}+{attn}"], tmp_path / "bad", **texts)


def test_bad_adapter_references_are_named_and_nothing_is_written(world, tmp_path, monkeypatch, capsys):
    """The merge engine's errors: an adapter of another base (module and both shapes), a target
    module the base lacks, an adapter type other than LoRA, a missing adapter; and the half-given
    form by its line. For an expert and for the base (whose adapter is checked before any
    forward)."""
    base, out = world["base"], tmp_path / "out"
    wide = build_model(tmp_path / "wide", "llama", seed=0, layers=2, hidden=48)
    deep = build_model(tmp_path / "deep", "llama", seed=0, layers=3)
    other = make_adapter(wide, tmp_path / "other", "llama", r=2, target_modules=["up_proj"])
    deeper = make_adapter(deep, tmp_path / "deeper", "llama", r=2, target_modules=["q_proj"])
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "base_model_name_or_path": str(base)}))
    cases = [
        (PlanError, f"{base}+{other}: module 'model.layers.0.mlp.up_proj.weight' has shape [96, 48], but "
                    f"'model.layers.0.mlp.up_proj.weight' of the base {base} has [64, 32]"),
        (PlanError, f"{base}+{deeper}: target module 'model.layers.2.self_attn.q_proj.weight' is absent "
                    f"from the base {base}"),
        (CheckpointError, f"{ia3}: adapter type 'IA3' is not supported"),
        (ModelNotFoundError, "nowhere"),
    ]
    for (error, message), adapter in zip(cases, (other, deeper, ia3, tmp_path / "nowhere")):
        for at_base in (False, True):
            ref = f"{base}+{adapter}"
            config = moe_yaml(tmp_path / "moe.yml", ref if at_base else base,
                              [(world["e1"], PROMPTS[0]), (base if at_base else ref, PROMPTS[1])])
            with pytest.raises(error) as info:
                build_moe(load_moe_config(config), out)
            assert message in " ".join(info.value.message.split()), (at_base, info.value.message)
            assert not out.exists()
    code, _, err = run_cli(monkeypatch, capsys, "moe", config, out)
    assert code != 0 and "Traceback" not in err and not out.exists()
    config = moe_yaml(tmp_path / "moe.yml", base, [(world["e1"], {}), ("org/base+", {})], gate_mode="random")
    with pytest.raises(RecipeError, match=r"moe.yml:5: experts\[1\].source_model: 'org/base\+': "
                                          r"mergekit's model\+adapter form needs both"):
        load_moe_config(config)
