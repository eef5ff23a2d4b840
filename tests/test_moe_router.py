"""Router rows of an MoE from prompts (mergekit-moe's gate modes): methods/moe_router.py,
calibrate/prompt_states.py, moe/gates.py."""

import math

import pytest
import torch
import transformers

from mergesmith.moe.gates import DegenerateRoutersWarning, gate_rows, warn_degenerate
from mergesmith.errors import MethodError, RecipeError
from mergesmith.io import Checkpoint
from mergesmith.recipe.moe import load_moe_config
from mergesmith.toy import build_model, default_tokens


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A toy Llama whose tokenizer has a BOS token, which prompts are prefixed with."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = build_model(tmp_path_factory.mktemp("router") / "base", "llama", seed=0, layers=3)
    tokens = default_tokens()
    tokens[2] = "[BOS]"
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                            bos_token="[BOS]").save_pretrained(folder)
    return folder


def config(base, experts, mode="hidden", shared=None):
    data = {"base_model": str(base), "gate_mode": mode, "experts_per_token": 1,
            "experts": [{"source_model": str(base), **e} for e in experts]}
    if shared:
        data["shared_experts"] = [{"source_model": str(base), **e} for e in shared]
    return load_moe_config(data)


def layer_inputs(folder, text: str) -> torch.Tensor:
    """[L, d]: each layer's input at the last token of BOS + text, one prompt per forward."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    return torch.stack([h[0, -1] for h in hidden[:-1]])


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_one_prompt_rows_are_the_normalised_last_token_states(base):
    """R_l[e] = h_l/‖h_l‖ at the last token; a set of prompts of different lengths (batched,
    padded) averages each prompt's own last-token state, not a pad's."""
    cfg = config(base, [{"positive_prompts": ["w3 w4 w5"]},
                        {"positive_prompts": ["w9", "w10 w11 w12 w13"]}])
    rows = gate_rows(cfg, Checkpoint(base))
    assert rows.shape == (3, 2, 32) and rows.dtype == torch.float32
    torch.testing.assert_close(rows[:, 0], unit(layer_inputs(base, "w3 w4 w5")), rtol=1e-5, atol=1e-6)
    mean = (layer_inputs(base, "w9") + layer_inputs(base, "w10 w11 w12 w13")) / 2
    torch.testing.assert_close(rows[:, 1], unit(mean), rtol=1e-5, atol=1e-6)


def test_negative_prompts_are_subtracted_and_hidden_avg_averages_real_tokens(base):
    cfg = config(base, [{"positive_prompts": ["w3 w4"], "negative_prompts": ["w20"]},
                        {"positive_prompts": ["w7 w8 w9", "w30"]}], mode="hidden_avg")
    rows = gate_rows(cfg, Checkpoint(base))
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()

    def avg(ids):
        with torch.no_grad():
            hidden = model(torch.tensor([[2, *ids]]), output_hidden_states=True).hidden_states
        return torch.stack([h[0].mean(0) for h in hidden[:-1]])

    w = lambda i: i + 2  # noqa: E731  token "w{i}" has id i + 2 (ids 0-2: UNK, PAD, BOS)
    torch.testing.assert_close(rows[:, 0], unit(avg([w(3), w(4)]) - avg([w(20)])), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[:, 1], unit((avg([w(7), w(8), w(9)]) + avg([w(30)])) / 2),
                               rtol=1e-5, atol=1e-6)


def test_equal_positive_and_negative_prompts_are_refused(base):
    cfg = config(base, [{"positive_prompts": ["w3 w4"], "negative_prompts": ["w3 w4"]},
                        {"positive_prompts": ["w5"]}])
    with pytest.raises(MethodError, match=r"expert 0 .*router row is zero at layer 0"):
        gate_rows(cfg, Checkpoint(base))
    cfg = config(base, [{"positive_prompts": ["w3"], "negative_prompts": ["w3"]},
                        {"positive_prompts": ["w5"]}], mode="cheap_embed")
    with pytest.raises(MethodError, match="router row is zero"):
        gate_rows(cfg, Checkpoint(base))


def test_identical_prompt_sets_are_refused(base):
    same = {"positive_prompts": ["w3", "w4"], "negative_prompts": ["w9"]}
    for mode in ("hidden", "cheap_embed"):
        with pytest.raises(RecipeError, match="every expert has the same positive and negative prompts"):
            gate_rows(config(base, [same, dict(same)], mode=mode), Checkpoint(base))
    # the same prompts with other negatives are not identical sets
    gate_rows(config(base, [same, {"positive_prompts": ["w3", "w4"]}], mode="cheap_embed"), Checkpoint(base))


def test_cheap_embed_is_the_normalised_masked_sum_of_embeddings(base):
    cfg = config(base, [{"positive_prompts": ["w3 w4", "w5"]},
                        {"positive_prompts": ["w6"], "negative_prompts": ["w7 w8"]}], mode="cheap_embed")
    rows = gate_rows(cfg, Checkpoint(base))
    embed = Checkpoint(base).read("model.embed_tokens.weight").float()
    bos = embed[2]
    first = unit(2 * bos + embed[5] + embed[6] + embed[7])
    second = unit(unit(bos + embed[8]) - unit(bos + embed[9] + embed[10]))
    for layer in range(3):
        torch.testing.assert_close(rows[layer, 0], first)
        torch.testing.assert_close(rows[layer, 1], second)


def mergekit_rows(base, experts, mode, monkeypatch):
    """mergekit-moe 0.1.5's get_gate_params, in process, with the tokenizer set up as its build()
    does (left padding with BOS); its model loaded in fp32 rather than bf16 so the comparison is
    at fp32 rounding."""
    import mergekit.moe.router as router
    from mergekit.common import ModelReference
    from mergekit.moe.config import Expert

    class FP32:
        @staticmethod
        def from_pretrained(path, **kwargs):
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    monkeypatch.setattr(router, "AutoModelForCausalLM", FP32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    return router.get_gate_params(ModelReference.model_validate(str(base)), tokenizer,
                                  [Expert(source_model=str(base), **e) for e in experts], mode=mode)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "cheap_embed"])
def test_rows_equal_mergekit_moe(base, mode, monkeypatch):
    """Prompts of unequal length in "hidden" and "cheap_embed" (mergekit pads on the left: the
    last position is a real token, RoPE makes its state shift-invariant, pads are masked out of
    cheap_embed); equal lengths in "hidden_avg", whose mean mergekit takes over pads too."""
    uneven = mode != "hidden_avg"
    experts = [{"positive_prompts": ["w3 w4 w5", "w6" if uneven else "w6 w7 w8"]},
               {"positive_prompts": ["w11 w12"], "negative_prompts": ["w40 w41", "w42 w43"]},
               {"positive_prompts": ["w60" if uneven else "w60 w61", "w61 w62"]}]
    ours = gate_rows(config(base, experts, mode=mode), Checkpoint(base))
    theirs = mergekit_rows(base, experts, mode, monkeypatch)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)


def test_random_rows_reproducible_by_seed_with_their_distributions(base):
    cfg = config(base, [{}, {}, {}], mode="random", shared=[{}])
    rows = gate_rows(cfg, Checkpoint(base), seed=3)
    assert rows.shape == (3, 4, 32)  # 3 experts + the shared expert's gate row, as mergekit
    assert torch.equal(rows, gate_rows(cfg, Checkpoint(base), seed=3))
    assert not torch.equal(rows, gate_rows(cfg, Checkpoint(base), seed=4))
    assert abs(rows.mean()) < 0.2 and abs(rows.std() - 1) < 0.15
    cfg = config(base, [{}, {}, {}], mode="uniform_random")
    rows = gate_rows(cfg, Checkpoint(base), seed=3)
    bound = 1 / math.sqrt(32)
    assert rows.shape == (3, 3, 32) and rows.abs().max() <= bound
    assert rows.max() > 0.95 * bound and rows.min() < -0.95 * bound
    assert abs(rows.mean()) < 0.1 * bound
    assert torch.equal(rows, gate_rows(cfg, Checkpoint(base), seed=3))


def test_degenerate_layers_are_warned():
    rows = torch.zeros(3, 2, 4)
    rows[:, 0, 0] = 1
    rows[:, 1, 1] = 1  # orthogonal rows: cond 1
    rows[1, 1] = torch.tensor([1.0, 0.01, 0, 0])  # nearly the same as row 0
    with pytest.warns(DegenerateRoutersWarning, match="layer 1 "):
        assert warn_degenerate(rows) == [1]


def test_a_prompted_shared_expert_gets_the_last_row(base):
    """Qwen-MoE's shared_expert_gate row comes after the experts' rows, made like theirs (as
    mergekit-moe's need_gates); without prompts (and not random) it gets none."""
    experts = [{"positive_prompts": ["w3"]}, {"positive_prompts": ["w4"]}]
    rows = gate_rows(config(base, experts, mode="cheap_embed", shared=[{"positive_prompts": ["w5 w6"]}]),
                     Checkpoint(base))
    embed = Checkpoint(base).read("model.embed_tokens.weight").float()
    assert rows.shape == (3, 3, 32)
    torch.testing.assert_close(rows[1, 2], unit(embed[2] + embed[7] + embed[8]))
    assert gate_rows(config(base, experts, mode="cheap_embed", shared=[{}]), Checkpoint(base)).shape == (3, 2, 32)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_states_do_not_depend_on_the_batches(base, mode):
    """Prompts of mixed lengths give the same mean state in batches of 2 as in one batch, and as
    one at a time: a prompt's state is read at its own positions, never at a pad."""
    from mergesmith.calibrate.prompt_states import load_prompt_model, prompt_states

    prompts = ["w3", "w4 w5 w6 w7 w8", "w9 w10", "w11 w12 w13", "w14"]
    whole = prompt_states(load_prompt_model(base, batch_size=8), prompts, mode)
    pairs = prompt_states(load_prompt_model(base, batch_size=2), prompts, mode)
    single = load_prompt_model(base, batch_size=1)
    alone = torch.stack([prompt_states(single, [p], mode) for p in prompts]).mean(0)
    torch.testing.assert_close(whole, pairs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-6)


def test_a_bf16_base_runs_its_prompts_in_bf16(base, tmp_path):
    """As mergekit-moe: the prompt forwards of a bf16 base run in bf16 (an fp32 copy doubles
    the memory), and the rows are the bf16 model's states, normalised in fp32."""
    folder = tmp_path / "bf16"
    transformers.AutoModelForCausalLM.from_pretrained(base).to(torch.bfloat16).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    cfg = config(folder, [{"positive_prompts": ["w3 w4 w5"]}, {"positive_prompts": ["w9 w10"]}])
    rows = gate_rows(cfg, Checkpoint(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer("w3 w4 w5", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    want = unit(torch.stack([h[0, -1].float() for h in hidden[:-1]]))
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows[:, 0], want, rtol=0, atol=1e-6)
