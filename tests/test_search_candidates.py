"""search/candidates.py and fitness.py: in-memory candidates equal `mergesmith merge`'s folder bit
for bit, read their inputs once, and a fitness scores validation only, on fixed subsamples;
a fitness that raises or gives NaN fails its candidate, not the search."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import build_model, lm_eval_ready_llama, read_tensors, run_cli, write_recipe
from safetensors.torch import save_file
from test_cuda import RECIPES as DATA_FREE  # every data-free method, with working parameters
from transformers import AutoModelForCausalLM

import mergesmith
from mergesmith.errors import MergesmithError, RecipeError
from mergesmith.evaluate import evaluate_model, load_task
from mergesmith.io import Checkpoint
from mergesmith.search.candidates import Candidate, CandidateMerger, SearchWorker
from mergesmith.search.fitness import load_fitness, subsample

pytestmark = pytest.mark.usefixtures("one_thread")
CHUNK = 4096  # bytes: every matrix of the toy models is merged in two or more units
FINE = 512  # SLERP's float64 sums over units of this size differ from the whole tensor's


def recipe(models, method: str, params: dict, experts=("e1", "e2"), **extra) -> dict:
    entries = [{"model": str(models[e]), "parameters": {"weight": 0.6}} for e in experts]
    return {"merge_method": method, "base_model": str(models["base"]), "models": entries,
            "parameters": params, **extra}


def cases(models) -> dict[str, dict]:
    """Methods the search space uses, and a layer-stacking (slices) recipe; TIES and the other
    cuts are below, with every data-free method. SLERP fails if its tensors are merged whole,
    as the old in-memory merge did."""
    m = {k: str(v) for k, v in models.items()}
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": m["e1"], "parameters": {"weight": 0.3}},
            {"model": m["e2"], "parameters": {"weight": 0.7}}]},
        "task_arithmetic": recipe(models, "task_arithmetic", {"lambda": 0.8}),
        "dare_ties": recipe(models, "dare_ties", {"density": 0.5}, seed=7),
        "slerp": recipe(models, "slerp", {"t": 0.3}, experts=("e1",)),
        "slerp_bf16": recipe(models, "slerp", {"t": 0.77}, experts=("e1",), dtype="bfloat16"),
        "slices": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": m["e1"], "layer_range": [0, 3]}]},
            {"sources": [{"model": m["e2"], "layer_range": [1, 4]}]}]},
    }


def assert_same(got: dict, written: dict) -> None:
    assert got.keys() == written.keys()
    for name, tensor in written.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.fixture
def counted_reads(monkeypatch):
    """Counts tensors read from model files: (folder name, tensor name) -> reads."""
    counts: dict[tuple, int] = {}
    read = Checkpoint.read

    def counting(self, name, rows=None):
        key = (self.path.name, name)
        counts[key] = counts.get(key, 0) + 1
        return read(self, name, rows)

    monkeypatch.setattr(Checkpoint, "read", counting)
    return counts


def test_candidates_equal_the_merged_folder_bit_for_bit_and_read_inputs_once(
        tmp_path, zoo, counted_reads):
    models = zoo("llama")
    merger = CandidateMerger(recipe(models, "task_arithmetic", {}), chunk_bytes=FINE)
    pool = sum(len(Checkpoint(models[k]).tensors) for k in ("base", "e1", "e2"))
    assert len(counted_reads) == pool and set(counted_reads.values()) == {1}
    for name, spec in cases(models).items():
        path = write_recipe(tmp_path / f"{name}.yaml", spec)
        folder = mergesmith.merge(path, tmp_path / name, chunk_size=FINE)
        written = read_tensors(folder)
        before = dict(counted_reads)
        assert_same(merger.tensors(path), written)
        module, tokenizer = merger.merge(path)  # the one model, overwritten candidate by candidate
        assert dict(counted_reads) == before, f"{name} read its inputs again"
        if name in ("linear", "slerp", "slices"):  # the first model, its last values, a deeper one
            loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            assert_same(module.state_dict(), loaded.state_dict())  # as evaluate loads the folder
            ids = torch.tensor([tokenizer("w1 w2 w3 w4")["input_ids"]])
            with torch.no_grad():  # also the buffers no state dict holds (rotary frequencies)
                assert torch.equal(module(ids).logits, loaded(ids).logits)
    # the kept inputs were not changed by any merge (methods get views of them)
    for ck in (Checkpoint(models[k]) for k in ("base", "e1", "e2")):
        for name in ck.tensors:
            assert torch.equal(merger.inputs(ck, name, None), Checkpoint.read(ck, name)), name


def test_candidate_equals_the_cli_merge_at_its_default_chunk_size(tmp_path, zoo, monkeypatch, capsys):
    models = zoo("llama")
    path = write_recipe(tmp_path / "r.yaml", recipe(models, "slerp", {"t": 0.6}, experts=("e2",)))
    code, _, err = run_cli(monkeypatch, capsys, "merge", path, tmp_path / "out")
    assert code == 0, err
    assert_same(CandidateMerger(path).tensors(path), read_tensors(tmp_path / "out"))


@pytest.mark.parametrize("arch", ["gemma", "gpt2"])
def test_candidate_models_compute_what_the_merged_folder_computes(tmp_path, zoo, arch):
    """Built without random init, with the tied head tied (gemma) and GPT-2's own buffers."""
    from mergesmith.toy import model_class

    models = zoo(arch)
    spec = recipe(models, "task_arithmetic", {"lambda": 0.9})
    module, _ = CandidateMerger(spec).merge(spec)
    loaded = model_class(arch).from_pretrained(mergesmith.merge(spec, tmp_path / "out"),
                                               dtype=torch.float32).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(module(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("method", sorted(DATA_FREE))
def test_every_data_free_method_merges_in_memory_as_on_disk(tmp_path, zoo, method):
    """Also: no method writes into the inputs it is handed (the merger's kept tensors)."""
    models = zoo("llama")
    spec = recipe(models, method, DATA_FREE[method], experts=("e1",) if method == "slerp" else ("e1", "e2"))
    path = write_recipe(tmp_path / "r.yaml", spec)
    merger = CandidateMerger(path, chunk_bytes=CHUNK)
    if method == "emr":  # its masks and rescalers go beside the weights
        with pytest.raises(MergesmithError, match="writes outputs beside the merged weights"):
            merger.tensors(path)
        return
    written = read_tensors(mergesmith.merge(path, tmp_path / "out", chunk_size=CHUNK))
    assert_same(merger.tensors(path), written)
    assert_same(merger.tensors(path), written)  # a second candidate sees unchanged inputs


def test_a_data_aware_candidate_equals_its_merged_folder(tmp_path, zoo):
    """Fisher's statistics are collected once (the pipeline's cache) and kept with the inputs."""
    models = zoo("llama")
    texts = tmp_path / "data.txt"
    texts.write_text("".join(f"w{i} w{i + 1} w{i + 3} w{i + 7}\n" for i in range(2, 30)))
    spec = {**recipe(models, "fisher", {}), "dtype": "float32",
            "calibration": {"data": str(texts), "samples": 8, "max_length": 16,
                            "cache": str(tmp_path / "cache")}}
    del spec["parameters"]
    path = write_recipe(tmp_path / "fisher.yaml", spec)
    written = read_tensors(mergesmith.merge(path, tmp_path / "out"))
    merger = CandidateMerger(path)
    assert_same(merger.tensors(path), written)
    kept = merger.inputs.reads
    assert_same(merger.tensors(path), written)
    assert merger.inputs.reads == kept  # the statistics too were read once
    assert any("fisher" in key[0] or "::fisher" in key[2] for key in merger.inputs.tensors)


# -- fitness ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base BERT, two fine-tunes, and a classification task (40 validation rows) with a head."""
    root = tmp_path_factory.mktemp("fitness")
    base = build_model(root / "base", "bert", seed=0)
    e1 = build_model(root / "e1", "bert", seed=1, base=base, delta=0.3)
    e2 = build_model(root / "e2", "bert", seed=2, base=base, delta=0.3)
    rnd = random.Random(0)
    texts = [" ".join(f"w{rnd.randrange(90)}" for _ in range(rnd.randint(3, 8))) for _ in range(60)]
    task = root / "task"
    task.mkdir()
    save_file({"weight": torch.randn(2, 32, generator=torch.Generator().manual_seed(0)),
               "bias": torch.zeros(2)}, task / "head.safetensors")
    for split, part in (("validation", slice(0, 40)), ("test", slice(40, 60))):
        rows = [{"text": t, "label": rnd.choice("ab")} for t in texts[part]]
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task / "task.yaml").write_text(
        "name: t\nkind: classification\ndata: {validation: validation.jsonl, test: test.jsonl}\n"
        "labels: [a, b]\nhead: head.safetensors\n")
    (root / "text.txt").write_text("".join(f"{t}\n" for t in texts[:12]))
    spec = {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(e1), "parameters": {"weight": 0.5}},
                       {"model": str(e2), "parameters": {"weight": 0.5}}]}
    return {"root": root, "base": base, "e1": e1, "e2": e2, "task": task, "recipe": spec}


def test_fidelity_scores_a_fixed_seeded_nested_subsample(world):
    fitness = load_fitness({"tasks": ["task"], "seed": 3}, world["root"])
    merger = CandidateMerger(world["recipe"])
    model, tokenizer = merger.merge(world["recipe"])
    task = load_task(world["task"])
    quarter = fitness.parts[0].subset(0.25)
    rows = quarter.examples("validation")
    assert len(rows) == 10 and fitness.parts[0].subset(0.25) is quarter  # the same every call
    picked = sorted(subsample(40, 10, 3, "t"))
    assert rows == [task.examples("validation")[i] for i in picked]
    assert set(picked) < set(subsample(40, 20, 3, "t"))  # a higher fidelity scores these too
    assert picked != sorted(subsample(40, 10, 4, "t"))  # another seed, other examples
    whole = evaluate_model((model, tokenizer), task, "validation")
    result = fitness(model, tokenizer, fidelity=0.25)
    assert result.per_example == [whole.per_example[i].item() for i in picked]
    assert result.scores == [pytest.approx(sum(result.per_example) / 10)]
    assert fitness(model, tokenizer).scores == [pytest.approx(whole.score)]
    assert fitness(model, tokenizer, fidelity=0.25).scores == result.scores


def test_fitness_objectives_perplexity_and_callables(world, tmp_path):
    merger = CandidateMerger(world["recipe"])
    model, tokenizer = merger.merge(world["recipe"])
    tensors = merger.tensors(world["recipe"])
    (tmp_path / "score.py").write_text(
        "def norms(tensors, fidelity):\n"
        "    return [float(tensors['bert.embeddings.word_embeddings.weight'].norm()), fidelity]\n")
    spec = {"tasks": [str(world["task"])], "callable": "score.py:norms", "names": ["norm", "f"],
            "objectives": "each"}
    fitness = load_fitness(spec, tmp_path)
    assert fitness.objectives == ["t", "norm", "f"] and fitness.wants_model and fitness.wants_tensors
    accuracy = evaluate_model((model, tokenizer), load_task(world["task"]), "validation").score
    norm = float(tensors["bert.embeddings.word_embeddings.weight"].norm())
    got = fitness(model, tokenizer, fidelity=0.5, tensors=tensors).scores
    assert got[1:] == [pytest.approx(norm), 0.5]
    mean = load_fitness({**spec, "objectives": "mean"}, tmp_path)
    assert mean(model, tokenizer, tensors=tensors).scores == [pytest.approx((accuracy + norm + 1) / 3)]
    # perplexity: − mean token loss over the file's tokens, as evaluate's perplexity has it
    from transformers import BertForMaskedLM  # a language-model head on the merged encoder

    lm = BertForMaskedLM.from_pretrained(world["e1"]).eval()
    ppl = load_fitness({"perplexity": "text.txt"}, world["root"])
    assert ppl.objectives == ["mean(perplexity:text)"] and not ppl.wants_tensors
    loss = -ppl(lm, tokenizer).scores[0]
    from mergesmith.evaluate.metrics import perplexity
    reference = ppl.parts[0]
    result = evaluate_model((lm, tokenizer), reference.task, "validation")
    assert math.exp(loss) == pytest.approx(result.score, rel=1e-6)
    assert result.score == pytest.approx(perplexity(result.per_example.double().numpy(),
                                                    result.tokens.numpy()))
    only = load_fitness(lambda tensors: 1.0)
    assert not only.wants_model and only(None, None, tensors={}).scores == [1.0]


def test_fitness_refuses_the_test_split_and_bad_sections(world, tmp_path):
    with pytest.raises(RecipeError, match="never scores on the test split"):
        load_fitness({"tasks": ["task"], "split": "test"}, world["root"])
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test.jsonl").write_text('{"text": "w1", "label": "a"}\n')
    (tmp_path / "t" / "task.yaml").write_text(
        "name: t\nkind: classification\ndata: {test: test.jsonl}\nlabels: [a, b]\n")
    with pytest.raises(MergesmithError, match="has no validation split"):
        load_fitness({"tasks": ["t"]}, tmp_path)
    with pytest.raises(RecipeError, match="scores its test split"):
        load_fitness({"lm_eval": [{"task": "x", "dataset_path": "json", "test_split": "test"}]})
    with pytest.raises(RecipeError, match="neither a task file or folder nor a demo task"):
        load_fitness({"tasks": ["nothing"]}, tmp_path)
    with pytest.raises(RecipeError, match="says nothing to score"):
        load_fitness({"objectives": "each"})
    with pytest.raises(RecipeError, match="unknown key"):
        load_fitness({"tasks": ["t"], "budget": 3}, tmp_path)
    with pytest.raises(RecipeError, match="has no function 'nope'"):
        load_fitness({"callable": "math:nope"})


# -- the worker ------------------------------------------------------------------------------


def problem(world, fitness) -> dict:
    return {**world["recipe"], "search": {"parameters": {"lambda": {"low": 0.1, "high": 1.0}},
                                          "fitness": fitness}}


def nan_fitness(tensors):
    return float("nan")


def raising_fitness(tensors):
    raise ZeroDivisionError("division by zero")


def test_worker_scores_candidates_and_fails_nan_or_raising_fitness(world):
    target = read_tensors(world["e1"])

    def closeness(tensors):  # − squared distance to e1: maximal at λ = 1 with weight 0.5, 0.5
        return -sum(float((tensors[k].double() - target[k].double()).square().sum()) for k in target)

    worker = SearchWorker(problem(world, {"callable": closeness}))
    first, second = worker(Candidate(0, [0.0])), worker(Candidate(1, [1.0]))
    assert first.error is None and first.id == 0 and first.seconds > 0
    assert first.scores[0] < second.scores[0] < 0  # λ = 1 is nearer to each expert than λ = 0.1
    tensors = mergesmith.merge(worker.space.recipe([1.0]), world["root"] / "best")
    assert second.scores[0] == pytest.approx(closeness(read_tensors(tensors)), rel=1e-12)
    for fn, error in ((nan_fitness, "fitness returned nan"),
                      (raising_fitness, "fitness raised ZeroDivisionError: division by zero")):
        failed = SearchWorker(problem(world, {"callable": fn}))(Candidate(5, [0.5], fidelity=0.5))
        assert failed.scores is None and failed.id == 5 and failed.fidelity == 0.5
        assert failed.error.startswith(error)


def test_demo_task_names_are_the_demos_tasks_with_their_heads(tmp_path, monkeypatch):
    from mergesmith.embedded import world as run

    fitness = load_fitness({"tasks": ["sentiment"], "demo": {"fast": True, "cache": str(tmp_path)}})
    monkeypatch.setattr(run, "prepare_expert", lambda *args: None)  # the tasks alone, not trained
    demo = run.prepare_demo(fast=True, cache=tmp_path, progress=False)
    assert fitness.parts[0].task.path == demo.tasks["sentiment"]
    assert fitness.parts[0].task.head is not None


def test_lm_eval_fitness_on_a_local_task_scores_its_validation_split(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="the optional extra [eval] (lm-eval) is not installed")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = lm_eval_ready_llama(tmp_path / "llama")
    texts = ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11", "w12 w13", "w14 w15 w16", "w17"]
    rows = [{"context": texts[i], "choices": [texts[(i + 1) % 6], texts[(i + 3) % 6]], "label": i % 2}
            for i in range(6)]
    (tmp_path / "mc").mkdir()
    (tmp_path / "mc" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc" / "task.yaml").write_text(
        "name: mc\nkind: multiple_choice\ndata: {validation: validation.jsonl}\n")
    harness = tmp_path / "harness"
    harness.mkdir()
    body = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: "
            f"{tmp_path / 'mc' / 'validation.jsonl'}\noutput_type: multiple_choice\n"
            'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (harness / "toy_mc.yaml").write_text("task: toy_mc\nvalidation_split: validation\n" + body)
    (harness / "toy_test.yaml").write_text("task: toy_test\ntest_split: validation\n" + body)
    options = {"include_path": "harness", "include_defaults": False, "batch_size": 4}
    with pytest.raises(RecipeError, match="'toy_test' scores its test split"):
        load_fitness({"lm_eval": ["toy_test"], "lm_eval_options": options}, tmp_path)
    fitness = load_fitness({"lm_eval": ["toy_mc"], "lm_eval_options": options, "objectives": "each"},
                           tmp_path)
    model, tokenizer = CandidateMerger({"merge_method": "linear", "models": [{"model": str(folder)}]}).merge(
        {"merge_method": "linear", "models": [{"model": str(folder), "parameters": {"weight": 1.0}}]})
    ours = evaluate_model((model, tokenizer), load_task(tmp_path / "mc"), "validation")
    result = fitness(model, tokenizer)
    assert fitness.objectives == ["toy_mc"] and result.scores == [pytest.approx(ours.score)]
    assert result.per_example == ours.per_example.tolist()
    half = fitness(model, tokenizer, fidelity=0.5)  # lm-eval's limit: the first documents
    assert half.per_example == ours.per_example.tolist()[:3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk", [FINE, 8 << 20])
def test_cuda_candidates_equal_the_cuda_merge(tmp_path, zoo, chunk):
    models = zoo("llama")
    merger = CandidateMerger(recipe(models, "task_arithmetic", {}), "cuda", chunk_bytes=chunk)
    for name, spec in cases(models).items():
        path = write_recipe(tmp_path / f"{name}.yaml", spec)
        folder = mergesmith.merge(path, tmp_path / name, chunk_size=chunk, device="cuda")
        assert_same(merger.tensors(path), read_tensors(folder))
        module, _ = merger.merge(path)
        assert all(p.device.type == "cuda" for p in module.parameters())
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert_same({k: v.cpu() for k, v in module.state_dict().items()}, loaded.state_dict())
