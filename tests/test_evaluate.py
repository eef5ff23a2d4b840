"""evaluate/: metrics against hand computations, tasks end to end on tiny models, bad task files,
reports, the CLI, and the lm-eval adapter."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, lm_eval_ready_llama, run_cli
from safetensors.torch import save_file

from mergesmith.errors import MergesmithError, TaskError
from mergesmith.evaluate import (
    TaskResult,
    bootstrap_indices,
    evaluate_model,
    forgetting,
    load_task,
    macro_f1,
    normalized_score,
    perplexity,
    plot_normalized,
    plot_sweep,
    summarize,
)

pytestmark = pytest.mark.usefixtures("one_thread")



def write_task(folder: Path, spec: str, splits: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ", ".join(f"{s}: {s}.jsonl" for s in splits)
    (folder / "task.yaml").write_text(spec.format(data="{" + data + "}"))
    return folder / "task.yaml"


def accuracy_result(task: str, correct: list[int]) -> TaskResult:
    values = torch.tensor(correct, dtype=torch.float32)
    return TaskResult(task, "accuracy", float(values.mean()), values, len(correct), True)


# -- metrics ---------------------------------------------------------------------------------

def test_macro_f1_hand_computed():
    # F1_c = 2TP/(2TP+FP+FN): class 0 -> TP 3, FP 1, FN 1 -> 6/8; classes 1 and 2 -> TP 2, FP 1,
    # FN 1 -> 4/6 each; macro = mean of the three
    pred = [0, 0, 1, 1, 2, 2, 0, 1, 2, 0]
    true = [0, 1, 1, 1, 2, 0, 0, 2, 2, 0]
    assert macro_f1(pred, true) == pytest.approx((6 / 8 + 4 / 6 + 4 / 6) / 3)
    # a class that is neither predicted nor true does not count (scikit-learn's average="macro")
    assert macro_f1([0, 2, 2, 0], [0, 2, 0, 0]) == pytest.approx((2 * 2 / (4 + 0 + 1) + 2 / 3) / 2)
    # rows of resamples at once give each row's own score
    both = macro_f1(np.array([pred, pred[::-1]]), np.array([true, true[::-1]]))
    assert both == pytest.approx([macro_f1(pred, true)] * 2)


def test_normalized_score_forgetting_perplexity_hand_computed():
    model = accuracy_result("t", [1, 1, 1, 0, 1, 0, 1, 1, 0, 1])    # 0.7
    expert = accuracy_result("t", [1, 1, 1, 1, 1, 0, 1, 1, 1, 1])   # 0.9
    base = accuracy_result("t", [1, 0, 1, 0, 1, 0, 1, 0, 0, 1])     # 0.5
    report = summarize({"m": {"t": model}, "e": {"t": expert}, "b": {"t": base}},
                       experts={"t": "e"}, base="b")
    cell = report.cell("m", "t")
    assert cell.normalized == pytest.approx(0.7 / 0.9)
    assert cell.forgetting == pytest.approx(0.5 - 0.7)
    expert_cell = report.cell("e", "t")
    assert (expert_cell.normalized, expert_cell.lo, expert_cell.hi) == (1.0, 1.0, 1.0)
    assert report.averages["m"].normalized == pytest.approx(0.7 / 0.9)
    # perplexity: exp(Σ loss·tokens / Σ tokens); lower is better, so normalized = expert / model
    assert perplexity([1.0, 2.0], [3, 1]) == pytest.approx(math.exp(5 / 4))
    assert normalized_score(8.0, 4.0, higher_is_better=False) == 0.5
    assert forgetting(8.0, 4.0, higher_is_better=False) == 4.0


def test_bootstrap_interval_matches_an_independent_numpy_computation():
    model = [1, 1, 1, 0, 1, 0, 1, 1, 0, 1]
    expert = [1, 1, 1, 1, 1, 0, 1, 1, 1, 1]
    other = [1, 0, 1, 0, 1, 0, 1, 1, 0, 0]
    report = summarize({"m": {"t": accuracy_result("t", model)}, "o": {"t": accuracy_result("t", other)},
                        "e": {"t": accuracy_result("t", expert)}}, experts={"t": "e"}, seed=7)
    # the same resamples for model and expert (paired), numpy's PCG64 seeded by (seed, crc32(task))
    idx = np.random.default_rng([7, zlib.crc32(b"t")]).integers(0, 10, size=(1000, 10))
    resampled = np.array(model)[idx].mean(1) / np.array(expert)[idx].mean(1)
    lo, hi = np.percentile(resampled, [2.5, 97.5])
    cell = report.cell("m", "t")
    assert (cell.lo, cell.hi) == pytest.approx((lo, hi))
    assert cell.lo < cell.normalized < cell.hi
    diff = resampled - np.array(other)[idx].mean(1) / np.array(expert)[idx].mean(1)
    comparison = report.compare("m", "o")
    assert (comparison.lo, comparison.hi) == pytest.approx(tuple(np.percentile(diff, [2.5, 97.5])))
    assert comparison.difference == pytest.approx(0.7 / 0.9 - 0.5 / 0.9)
    same = report.compare("m", "m")
    assert (same.lo, same.hi) == (0.0, 0.0) and not same.beyond_noise


def test_average_interval_resamples_within_each_task():
    a, b = [1, 0, 1, 1, 0, 1], [1, 1, 0, 1]
    results = {"m": {"a": accuracy_result("a", a), "b": accuracy_result("b", b)},
               "e": {"a": accuracy_result("a", [1] * 6), "b": accuracy_result("b", [1] * 4)}}
    report = summarize(results, experts={"a": "e", "b": "e"}, seed=3, n_bootstrap=500)
    samples = np.mean([np.array(a)[bootstrap_indices(6, 500, 3, "a")].mean(1),
                       np.array(b)[bootstrap_indices(4, 500, 3, "b")].mean(1)], axis=0)
    avg = report.averages["m"]
    assert avg.normalized == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert (avg.lo, avg.hi) == pytest.approx(tuple(np.percentile(samples, [2.5, 97.5])))


def test_bootstrap_interval_covers_the_true_ratio_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        model = (rng.random(300) < 0.6).astype(int).tolist()
        expert = (rng.random(300) < 0.8).astype(int).tolist()
        cell = summarize({"m": {"t": accuracy_result("t", model)}, "e": {"t": accuracy_result("t", expert)}},
                         experts={"t": "e"}, seed=trial, n_bootstrap=400).cell("m", "t")
        covered += cell.lo <= 0.6 / 0.8 <= cell.hi
    assert 0.88 <= covered / 200 <= 0.99


def test_unpaired_results_are_refused():
    with pytest.raises(MergesmithError, match="different numbers of examples"):
        summarize({"m": {"t": accuracy_result("t", [1, 0])}, "e": {"t": accuracy_result("t", [1, 1, 1])}},
                  experts={"t": "e"})


# -- tasks end to end ------------------------------------------------------------------------

TEXTS = ["w3 w4 w5", "w10 w11", "w7 w8 w9 w20 w21 w22", "w30", "w40 w41 w42 w43",
         "w50 w51 w52 w53 w54 w55 w56"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("bert") / "bert", "bert", seed=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("llama") / "llama", "llama", seed=0)


def test_classification_with_a_head_file_matches_a_direct_computation(tmp_path, bert):
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    head = {"weight": torch.randn(3, 32), "bias": torch.tensor([0.1, -0.2, 0.0])}
    (tmp_path / "t").mkdir()
    save_file(head, tmp_path / "t" / "head.safetensors")
    labels = ["a", "b", "c"]
    # prediction = argmax(W · mean of the unpadded last hidden states + b), one text at a time
    encoder = AutoModel.from_pretrained(bert).eval()
    tokenizer = AutoTokenizer.from_pretrained(bert)
    with torch.no_grad():
        expected = [int((encoder(torch.tensor([tokenizer(text)["input_ids"]])).last_hidden_state[0]
                         .mean(0) @ head["weight"].T + head["bias"]).argmax()) for text in TEXTS]
    # every other label is wrong, so the score is known
    rows = [{"text": t, "label": labels[p if i % 2 == 0 else (p + 1) % 3]}
            for i, (t, p) in enumerate(zip(TEXTS, expected))]
    spec = "name: t\nkind: classification\ndata: {data}\nlabels: [a, b, c]\nhead: head.safetensors\n"
    task = load_task(write_task(tmp_path / "t", spec, {"test": rows}))
    result = evaluate_model(bert, task, "test", batch_size=4)  # batches mix lengths: padding must not matter
    assert result.predictions.tolist() == expected
    truth = [labels.index(r["label"]) for r in rows]
    assert result.per_example.tolist() == [float(p == t) for p, t in zip(expected, truth)]
    assert result.score == 0.5
    assert result.n == 6 and result.higher_is_better


def test_classification_with_the_models_own_head(tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from mergesmith.toy import save_tokenizer, default_tokens, tiny_config

    torch.manual_seed(1)
    config = tiny_config("bert")
    config.num_labels = 2
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "clf")
    save_tokenizer(tmp_path / "clf", default_tokens())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "clf")
    with torch.no_grad():
        expected = [int(model(torch.tensor([tokenizer(t)["input_ids"]])).logits.argmax()) for t in TEXTS]
    spec = "name: t\nkind: classification\ndata: {data}\nlabels: ['no', 'yes']\nmetric: macro_f1\n"
    rows = [{"text": t, "label": "yes"} for t in TEXTS]
    task = load_task(write_task(tmp_path / "t", spec, {"test": rows}))
    result = evaluate_model(tmp_path / "clf", task, "test", batch_size=4)
    assert result.predictions.tolist() == expected
    assert result.score == pytest.approx(macro_f1(expected, [1] * 6))


def test_classification_without_a_head_needs_a_classifier(tmp_path, bert):
    spec = "name: t\nkind: classification\ndata: {data}\nlabels: [a, b]\n"
    task = load_task(write_task(tmp_path / "t", spec, {"test": [{"text": "w1", "label": "a"}]}))
    # a masked-LM folder has no classifier: transformers would add a random one and score noise
    with pytest.raises(TaskError, match="has no `head` file and .* has no sequence-classification head"):
        evaluate_model(bert, task, "test")


def test_multiple_choice_and_perplexity_match_a_direct_computation(tmp_path, llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama)

    def logprob(ids: list[int], start: int) -> float:
        """Σ_{t >= start} log p(ids[t] | ids[:t]), one sequence, no padding."""
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))

    rows = [{"q": TEXTS[i], "options": [TEXTS[(i + 1) % 6], TEXTS[(i + 2) % 6], "w60"], "answer": i % 3}
            for i in range(6)]
    expected = []
    for row in rows:
        n_context = len(tokenizer(row["q"])["input_ids"])
        scores = [logprob(tokenizer(f"{row['q']} {c}")["input_ids"], n_context) for c in row["options"]]
        expected.append(int(np.argmax(scores)))
    spec = ("name: mc\nkind: multiple_choice\ndata: {data}\ncontext_field: q\nchoices_field: options\n"
            "label_field: answer\n")
    result = evaluate_model((model, tokenizer), load_task(write_task(tmp_path / "mc", spec, {"test": rows})),
                            "test", batch_size=4)
    assert result.predictions.tolist() == expected
    assert result.score == pytest.approx(np.mean([p == r["answer"] for p, r in zip(expected, rows)]))

    # perplexity = exp(Σ over texts and tokens t>=1 of -log p / number of such tokens)
    spec = "name: ppl\nkind: perplexity\ndata: {data}\n"
    task = load_task(write_task(tmp_path / "ppl", spec, {"test": [{"text": t} for t in TEXTS]}))
    result = evaluate_model(llama, task, "test", batch_size=4)
    total = sum(-logprob(tokenizer(t)["input_ids"], 1) for t in TEXTS)
    count = sum(len(tokenizer(t)["input_ids"]) - 1 for t in TEXTS)
    assert result.score == pytest.approx(math.exp(total / count), rel=1e-5)
    assert not result.higher_is_better and result.tokens.tolist() == [len(t.split()) - 1 for t in TEXTS]


def test_evaluation_leaves_an_in_memory_model_as_it_was(tmp_path, llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama)
    model.train()
    spec = "name: ppl\nkind: perplexity\ndata: {data}\n"
    task = load_task(write_task(tmp_path / "ppl", spec, {"test": [{"text": t} for t in TEXTS]}))
    first = evaluate_model((model, AutoTokenizer.from_pretrained(llama)), task, "test")
    assert model.training
    assert evaluate_model(model, task, "test").score == first.score  # tokenizer found from the folder


# -- bad task files --------------------------------------------------------------------------

CLS = "name: t\nkind: classification\ndata: {data}\nlabels: [neg, pos]\n"


@pytest.mark.parametrize("case, pattern", [
    ("missing column", r"test\.jsonl:2: missing column 'label'"),
    ("unknown label", r"test\.jsonl:1: unknown label 'neutral' in column 'label'"),
    ("empty split", r"test\.jsonl: split 'test' of task 't' is empty"),
    ("missing file", r"task\.yaml:4: data\.validation: data file not found: .*nothere\.jsonl"),
    ("bad kind", r"task\.yaml:2: kind: unknown kind 'regression'"),
    ("unknown field", r"task\.yaml:5: lables: unknown field .*did you mean 'labels'"),
    ("label index out of range", r"test\.jsonl:1: unknown label 5"),
    ("bad choices", r"test\.jsonl:1: column 'choices' must be a list"),
    ("unquoted yes/no", r"task\.yaml:4: labels: YAML reads yes/no.* as booleans"),
])
def test_bad_task_files_name_the_file_line_and_field(tmp_path, case, pattern):
    rows = [{"text": "w1", "label": "neg"}, {"text": "w2", "label": "pos"}]
    spec = CLS
    if case == "missing column":
        rows[1] = {"text": "w2", "lable": "pos"}
    elif case == "unknown label":
        rows[0]["label"] = "neutral"
    elif case == "empty split":
        rows = []
    elif case == "missing file":
        spec = "name: t\nkind: classification\ndata:\n  validation: nothere.jsonl\nlabels: [neg, pos]\n"
    elif case == "bad kind":
        spec = CLS.replace("classification", "regression")
    elif case == "unknown field":
        spec = CLS + "lables: [x]\n"
    elif case == "label index out of range":
        rows[0]["label"] = 5
    elif case == "bad choices":
        spec = "name: t\nkind: multiple_choice\ndata: {data}\n"
        rows = [{"context": "w1", "choices": "w2", "label": 0}]
    elif case == "unquoted yes/no":
        spec = CLS.replace("[neg, pos]", "[no, yes]")
    path = write_task(tmp_path / "t", spec, {"test": rows})
    with pytest.raises(TaskError, match=pattern) as info:
        load_task(path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_csv_tasks_and_label_indices(tmp_path):
    (tmp_path / "test.csv").write_text('text,label\n"w1 w2",pos\nw3,0\n')
    (tmp_path / "task.yaml").write_text(
        "name: t\nkind: classification\ndata: {test: test.csv}\nlabels: [neg, pos]\n")
    task = load_task(tmp_path)
    assert task.label_ids("test") == [1, 0] and task.examples("test")[0]["text"] == "w1 w2"
    with pytest.raises(TaskError, match="has no split 'validation'"):
        task.examples("validation")


# -- reports, plots, CLI ---------------------------------------------------------------------

def test_report_outputs_and_plots(tmp_path):
    results = {name: {"a": accuracy_result("a", c), "b": accuracy_result("b", c[::-1])}
               for name, c in (("merged", [1, 0, 1, 1]), ("ea", [1, 1, 1, 1]), ("eb", [1, 1, 1, 0]),
                               ("base", [0, 0, 1, 0]))}
    report = summarize(results, experts={"a": "ea", "b": "eb"}, base="base")
    data = report.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(data))
    markdown = report.to_markdown()
    assert markdown.startswith(
        "| model | a (accuracy) | b (accuracy) | avg normalized [95% CI] | avg forgetting |")
    assert "| merged | 0.750 (0.750 [" in markdown
    assert report.best() in ("ea", "eb")
    assert len(report.table().rows) == 4
    for path in (plot_normalized(report, tmp_path / "n.png"),
                 plot_sweep([(0.1, 0.5, 0.4, 0.6), (0.2, 0.7, 0.6, 0.8)], tmp_path / "s.png",
                            xlabel="lambda")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_evaluate(tmp_path, monkeypatch, capsys, llama):
    spec = "name: ppl\nkind: perplexity\ndata: {data}\n"
    task = write_task(tmp_path / "ppl", spec, {"test": [{"text": t} for t in TEXTS]})
    other = build_model(tmp_path / "other", "llama", seed=1, base=llama)
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", other, "--tasks", task,
                             "--experts", f"ppl={llama}", "--base", llama, "--json", tmp_path / "r.json",
                             "--markdown", tmp_path / "r.md", "--plot", tmp_path / "r.png")
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert [c["model"] for c in data["cells"]] == [str(other), str(llama)]
    assert (tmp_path / "r.png").is_file() and "ppl (perplexity)" in (tmp_path / "r.md").read_text()
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", llama, "--tasks", tmp_path / "nothing")
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[0] == f"error: {tmp_path / 'nothing'}: task file not found"


# -- lm-eval-harness -------------------------------------------------------------------------

def test_lm_eval_adapter_on_a_local_task_agrees_with_our_multiple_choice(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="the optional extra [eval] (lm-eval) is not installed")
    from mergesmith.evaluate.lm_eval import run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = lm_eval_ready_llama(tmp_path / "llama")
    rows = [{"context": TEXTS[i], "choices": [TEXTS[(i + 1) % 6], TEXTS[(i + 3) % 6]], "label": i % 2}
            for i in range(6)]
    ours = write_task(tmp_path / "ours", "name: mc\nkind: multiple_choice\ndata: {data}\n", {"test": rows})
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "toy_mc.yaml").write_text(
        "task: toy_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'ours' / 'test.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    results = run_lm_eval(folder, ["toy_mc"], include_path=tmp_path / "harness",
                          include_defaults=False, batch_size=4)
    harness = results["toy_mc"]
    assert harness.metric == "acc" and harness.n == 6 and harness.higher_is_better
    # both score a choice by Σ log p(choice tokens | context): the same answers, document by document
    mine = evaluate_model(folder, load_task(ours), "test")
    assert harness.per_example.tolist() == mine.per_example.tolist()
    assert summarize({"m": results}, {}).cell("m", "toy_mc").score == mine.score
