"""engine/program.py and io/views.py: a merge given as its output tensors, streamed by the engine."""

import json

import pytest
import torch
import transformers

from conftest import read_tensors
from mergesmith.engine.program import Output, Program, write_program
from mergesmith.errors import OutputError, PlanError
from mergesmith.io import Checkpoint
from mergesmith.io.views import View, computed, reindexed, stored


def _program(ck, entries, dtype=None):
    view = View("view", ck.config, entries, [ck])
    outputs = [Output(name, [(view, name)]) for name in entries]
    return Program(outputs, ck.config, ck, "test model", "a test.", record=("given.yml", "a: 1\n"),
                   dtype=dtype)


def test_permuted_mlp_units_leave_the_logits_unchanged(zoo, tmp_path):
    """A view that permutes every layer's MLP hidden units (rows of gate/up, columns of down)
    writes a model with the same function and permuted tensors."""
    ck = Checkpoint(zoo("llama")["base"])
    perms, entries = {}, {}
    for name in ck.tensors:
        layer = name.split(".")[2] if ".mlp." in name else None
        if layer is not None:
            perm = perms.setdefault(layer, torch.randperm(ck.config["intermediate_size"],
                                                          generator=torch.Generator().manual_seed(int(layer))))
            axis = 1 if "down_proj" in name else 0
            entries[name] = reindexed(ck, name, {axis: perm})
        else:
            entries[name] = stored(ck, name)
    out = write_program(_program(ck, entries), tmp_path / "out", shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file() and (out / "given.yml").read_text() == "a: 1\n"
    assert "test model" in (out / "README.md").read_text()
    got, want = read_tensors(out), read_tensors(ck.path)
    down = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(got[down], want[down][:, perms["1"]])
    assert not torch.equal(got[down], want[down])
    ids = torch.tensor([[3, 5, 7, 11, 2]])
    a = transformers.AutoModelForCausalLM.from_pretrained(ck.path).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-5, atol=1e-5)


def test_rows_of_a_first_axis_reindexed_view(zoo):
    ck = Checkpoint(zoo("llama")["base"])
    name = "model.embed_tokens.weight"
    index = torch.tensor([5, 0, 3])
    entry = reindexed(ck, name, {0: index})
    assert entry.info.shape == (3, ck.tensors[name].shape[1])
    whole = ck.read(name)
    assert torch.equal(entry.read(None), whole[index])
    assert torch.equal(entry.read((1, 3)), whole[index[1:3]])


def test_weighted_outputs_cast_and_computed_tensors(zoo, tmp_path):
    paths = zoo("llama")
    a, b = Checkpoint(paths["base"]), Checkpoint(paths["e1"])
    router = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    memory = View("router", {}, {"router": computed("router", router)})
    name = "model.norm.weight"
    program = Program([Output(name, [(a, name), (b, name)], [1.0, 3.0]),
                       Output("router", [(memory, "router")])],
                      a.config, a, "t", "s.", dtype=torch.bfloat16)
    out = write_program(program, tmp_path / "out")
    got = read_tensors(out)
    want = ((a.read(name) + 3 * b.read(name)) / 4).to(torch.bfloat16)
    assert torch.equal(got[name], want) and torch.equal(got["router"], router.to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["hidden_size"] == a.config["hidden_size"]


def test_bad_programs_are_refused_before_writing(zoo, tmp_path):
    paths = zoo("llama")
    a = Checkpoint(paths["base"])
    program = Program([Output("x", [(a, "model.norm.weight"), (a, "model.embed_tokens.weight")], [1, 1])],
                      a.config, a, "t", "s.")
    with pytest.raises(PlanError, match="shapes differ"):
        write_program(program, tmp_path / "out")
    program = Program([Output("x", [(a, "model.norm.weight")])], a.config, a, "t", "s.")
    with pytest.raises(OutputError):
        write_program(program, paths["base"] / "inside")
    assert not (tmp_path / "out").exists()
