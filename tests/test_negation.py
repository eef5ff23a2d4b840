"""Task negation (Ilharco et al. 2023): θ_target − λτ_f as a recipe, λ chosen by the control floor,
and `mergesmith negate`'s forgetting report."""

import json

import pytest
import torch
import transformers
import yaml

import mergesmith
from conftest import read_tensors, run_cli, write_recipe
from mergesmith.errors import MergesmithError, OutputError
from mergesmith.evaluate import evaluate_model, load_task
from mergesmith.methods.negation import negated
from mergesmith.search.negation import NegationPoint, choose_lambda, negate, negation_recipe
from mergesmith.toy import build_model

# two "skills": counting up through w0..w29 (to forget) and a pattern over w50..w89 (to keep)
FORGET = [" ".join(f"w{(s + i) % 30}" for i in range(12)) for s in range(16)]
CONTROL = [" ".join(f"w{50 + (s + 3 * i) % 40}" for i in range(12)) for s in range(16)]


def _task(folder, name, texts):
    folder.mkdir(parents=True)
    for split, rows in (("validation", texts[:8]), ("test", texts[8:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    (folder / "task.yaml").write_text(f"name: {name}\nkind: perplexity\n"
                                      "data: {validation: validation.jsonl, test: test.jsonl}\n")
    return folder


def _fine_tune(base, out, texts, steps, lr):
    """θ0 trained a few steps on `texts` (next-token loss): the model whose skill is negated."""
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.tensor([tokenizer(t)["input_ids"] for t in texts])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs cost more than the work (conftest)
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("negation")
    # negation needs a base that already models the data (a random one is far from the regime
    # where θ0 − τ undoes θ0 + τ): a short pre-training on both skills, then a fine-tune on one
    raw = build_model(root / "raw", "llama", seed=0, layers=2)
    base = _fine_tune(raw, root / "base", FORGET[:8] + CONTROL[:8], steps=12, lr=1e-2)
    return {"base": base, "root": root,
            "forget": _fine_tune(base, root / "forget", FORGET[:8], steps=10, lr=3e-3),
            "other": build_model(root / "other", "llama", seed=3, base=base, layers=2, delta=0.01),
            "forget_task": _task(root / "tasks" / "count", "count", FORGET),
            "control_task": _task(root / "tasks" / "pattern", "pattern", CONTROL)}


def _merged(recipe, out):
    return read_tensors(mergesmith.merge(recipe, out))


def test_lambda_zero_is_the_identity_and_add_then_negate_returns_the_model(world, tmp_path):
    base, forget, other = (str(world[k]) for k in ("base", "forget", "other"))
    want = read_tensors(world["other"])
    # λ = 0 on the base is the base exactly; on another model, that model to fp32 rounding
    # (θ0 + (θ − θ0) is not bitwise θ)
    for name, tensor in _merged(negation_recipe(base, forget, 0.0), tmp_path / "zero").items():
        assert torch.equal(tensor, read_tensors(world["base"])[name])
    for name, tensor in _merged(negation_recipe(base, forget, 0.0, other), tmp_path / "zero2").items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-6, atol=1e-7)
    added = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
             "models": [{"model": other, "parameters": {"weight": 1.0}},
                        {"model": forget, "parameters": {"weight": 1.0}}]}
    plus = mergesmith.merge(write_recipe(tmp_path / "add.yaml", added), tmp_path / "plus")
    back = _merged(negation_recipe(base, forget, 1.0, str(plus)), tmp_path / "back")
    moved = 0
    for name, tensor in back.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6)
        moved += not torch.allclose(read_tensors(plus)[name], want[name], atol=1e-4)
    assert moved > 10  # adding τ_f really moved them
    # θ − λτ_f by hand, half way
    half = _merged(negation_recipe(base, forget, 0.5, other), tmp_path / "half")
    f, b = read_tensors(world["forget"]), read_tensors(world["base"])
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(half[name], negated(want[name], b[name], f[name], 0.5), rtol=1e-5, atol=1e-6)
    assert torch.equal(negated(want[name], b[name], f[name], 0.5), want[name] - 0.5 * (f[name] - b[name]))


def test_the_largest_lambda_that_keeps_every_control_task_is_chosen():
    def point(lam, a, b):
        return NegationPoint(lam, {}, {"forget": 0.5, "a": a, "b": b})

    points = [point(0.0, 1.0, 1.0), point(0.2, 0.99, 0.97), point(0.4, 0.96, 0.94),
              point(0.6, 0.95, 0.951), point(0.8, 0.9, 0.99)]
    assert choose_lambda(points, ["a", "b"], 0.95).lam == 0.6  # 0.4 fails b, 0.6 passes again
    assert choose_lambda(points, ["a"], 0.95).lam == 0.6
    assert choose_lambda(points, ["b"], 0.95).lam == 0.8
    assert choose_lambda(points, ["a", "b"], 0.999).lam == 0.0


def test_negate_forgets_the_skill_and_keeps_the_control(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, "negate", world["forget"], out, "--base", world["base"],
                                "--forget-task", world["forget_task"], "--control-task",
                                world["control_task"], "--lambdas", "0.25,0.5,1,2", "--floor", "0.95")
    assert code == 0, err
    report = json.loads((out / "negation.json").read_text())
    points = {p["lambda"]: p for p in report["points"]}
    assert sorted(points) == [0.0, 0.25, 0.5, 1.0, 2.0]
    # λ = 0 is the base: its scores are the base's own, computed directly
    tasks = {n: load_task(world[f"{n}_task"]) for n in ("forget", "control")}
    for role, task in tasks.items():
        direct = evaluate_model(world["base"], task, "validation").score
        assert points[0.0]["scores"][task.name] == pytest.approx(direct, rel=1e-5)
    # the rule, recomputed from the recorded scores: the largest λ with pattern's perplexity
    # at most original / 0.95
    ok = [lam for lam, p in points.items()
          if points[0.0]["scores"]["pattern"] / p["scores"]["pattern"] >= 0.95]
    assert report["lambda"] == max(ok) > 0
    chosen = points[report["lambda"]]
    assert chosen["scores"]["count"] > 1.3 * points[0.0]["scores"]["count"]  # the skill is lost
    assert chosen["normalized"]["count"] < 0.8 and chosen["normalized"]["pattern"] >= 0.95
    kept = report["report"]["normalized"]  # the chosen λ on the test split
    assert kept["count"] < 0.95 and kept["pattern"] > 0.9
    assert "count (forget)" in stdout and "pattern (control)" in stdout
    assert (out / "negation.md").is_file() and (out / "negated.yaml").is_file()
    models = yaml.safe_load((out / "negated.yaml").read_text())["models"]
    assert [m["parameters"]["weight"] for m in models] == [-report["lambda"]]
    recipe = negation_recipe(str(world["base"]), str(world["forget"]), report["lambda"])
    want = _merged(recipe, tmp_path / "m")
    for name, tensor in read_tensors(out / "model").items():
        assert torch.equal(tensor, want[name])


def test_negate_refuses_bad_settings_before_merging(world, tmp_path):
    common = dict(base=str(world["base"]), out=tmp_path / "out")
    with pytest.raises(MergesmithError, match="no control task"):
        negate(str(world["forget"]), forget_tasks=[world["forget_task"]], control_tasks=[],
               lambdas=[1.0], **common)
    with pytest.raises(MergesmithError, match="given twice"):
        negate(str(world["forget"]), forget_tasks=[world["forget_task"]],
               control_tasks=[world["forget_task"]], lambdas=[1.0], **common)
    with pytest.raises(MergesmithError, match="floor"):
        negate(str(world["forget"]), forget_tasks=[world["forget_task"]],
               control_tasks=[world["control_task"]], lambdas=[1.0], floor=1.5, **common)
    assert not (tmp_path / "out").exists()
    with pytest.raises(OutputError, match="the input"):  # the report would land in the base's folder
        negate(str(world["forget"]), forget_tasks=[world["forget_task"]],
               control_tasks=[world["control_task"]], lambdas=[1.0], base=str(world["base"]),
               out=world["base"] / "negation")
    assert not (world["base"] / "negation").exists()


def test_negating_a_lora_adapter_subtracts_lambda_s_b_a(world, tmp_path):
    """An adapter as the forget model (`BASE+ADAPTER`): ΔW = −λ·s·B·A on every adapted module,
    s = alpha / r, and nothing else moves."""
    from safetensors.torch import load_file
    from test_adapter_io import make_adapter

    adapter = make_adapter(world["base"], tmp_path / "lora", "llama", r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    got = _merged(negation_recipe(str(world["base"]), f"{world['base']}+{adapter}", 0.5), tmp_path / "neg")
    lora, base = load_file(str(adapter / "adapter_model.safetensors")), read_tensors(world["base"])
    adapted = 0
    for name, tensor in base.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" in lora:
            delta = -0.5 * (8 / 4) * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
            torch.testing.assert_close(got[name], tensor + delta, rtol=1e-6, atol=1e-6)
            adapted += 1
        else:
            assert torch.equal(got[name], tensor)
    assert adapted == 2 * 2  # q and v of both layers


def test_on_disk_sweep_scores_like_the_in_memory_one(world, tmp_path):
    tasks = dict(forget_tasks=[world["forget_task"]], control_tasks=[world["control_task"]], lambdas=[0.5])
    runs = [negate(str(world["forget"]), base=str(world["base"]), out=tmp_path / name, in_memory=memory,
                   write_model=False, **tasks) for name, memory in (("memory", True), ("disk", False))]
    assert sorted(p.name for p in (tmp_path / "disk" / "merges").iterdir()) == ["lambda-0", "lambda-0.5"]
    assert not (tmp_path / "memory" / "merges").exists() and not (tmp_path / "memory" / "model").exists()
    for a, b in zip(*(run.points for run in runs)):
        assert a.lam == b.lam and a.scores == pytest.approx(b.scores, rel=1e-6)
