"""MWA and `mergesmith average`: weights from the run's steps or training losses, averaged full
checkpoints and adapter checkpoints of a Trainer-layout run folder built here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_model, read_tensors, run_cli

from mergesmith.engine.checkpoints_average import average_run, logged_loss, read_run
from mergesmith.errors import MergesmithError
from mergesmith.methods.mwa import checkpoint_weights, mwa_weights

pytestmark = pytest.mark.usefixtures("one_thread")

LOSSES = [2.0, 0.5, 1.0]
STEPS = [10, 20, 30]


# -- the weights --------------------------------------------------------------------------------

def test_penalty_zero_is_uniform():
    assert mwa_weights(LOSSES, 0.0, lower_is_better=True) == pytest.approx([1 / 3] * 3)
    assert checkpoint_weights("step", 0.0, steps=STEPS) == pytest.approx([1 / 3] * 3)


def test_power_form_by_hand():
    # w_k ∝ m_k^-p: p = 1 gives (1/2, 2, 1) / 3.5
    assert mwa_weights(LOSSES, 1.0, lower_is_better=True) == pytest.approx([0.5 / 3.5, 2 / 3.5, 1 / 3.5])
    # w_k ∝ t_k^p: p = 2 gives (100, 400, 900) / 1400
    assert checkpoint_weights("step", 2.0, steps=STEPS) == pytest.approx([1 / 14, 4 / 14, 9 / 14])


def test_large_penalty_selects_the_best_checkpoint():
    assert mwa_weights(LOSSES, math.inf, lower_is_better=True) == [0.0, 1.0, 0.0]
    assert mwa_weights(LOSSES, 200.0, lower_is_better=True) == pytest.approx([0.0, 1.0, 0.0], abs=1e-12)
    assert mwa_weights(STEPS, 5000.0, lower_is_better=False) == pytest.approx([0.0, 0.0, 1.0])
    assert mwa_weights([1.0, 0.5, 0.5], math.inf, lower_is_better=True) == [0.0, 0.5, 0.5]  # a tie


def test_scaling_every_metric_leaves_the_weights_unchanged():
    for p in (0.5, 1.0, 3.0):
        assert mwa_weights([7.3 * m for m in LOSSES], p, lower_is_better=True) == \
            pytest.approx(mwa_weights(LOSSES, p, lower_is_better=True))


def test_bad_metrics_and_penalties_are_refused():
    with pytest.raises(MergesmithError, match="positive"):
        mwa_weights([1.0, 0.0], 1.0, lower_is_better=True)
    with pytest.raises(MergesmithError, match=">= 0"):
        mwa_weights([1.0], -1.0, lower_is_better=True)


def test_loss_of_a_checkpoint_is_the_last_training_loss_logged_before_it():
    history = [{"loss": 3.0, "step": 5}, {"eval_loss": 0.1, "step": 10}, {"loss": 2.0, "step": 10},
               {"loss": 1.0, "step": 15}, {"train_loss": 0.01, "step": 15}]
    assert logged_loss(history, 12) == 2.0
    assert logged_loss(history, 15) == 1.0
    assert logged_loss(history, 4) is None


# -- run folders ---------------------------------------------------------------------------------

def _state(folder: Path, step: int, losses: dict[int, float]) -> None:
    """trainer_state.json as transformers' Trainer writes it at a save."""
    history = [{"epoch": s / 100, "grad_norm": 1.0, "learning_rate": 1e-4, "loss": loss, "step": s}
               for s, loss in losses.items() if s <= step]
    (folder / "trainer_state.json").write_text(json.dumps(
        {"best_metric": None, "epoch": step / 100, "global_step": step, "log_history": history,
         "logging_steps": 10, "max_steps": 30, "save_steps": 10}))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    base = build_model(root / "base", "llama", seed=0, layers=2, hidden=16)
    run = root / "run"
    for i, step in enumerate(STEPS):
        folder = build_model(run / f"checkpoint-{step}", "llama", seed=i + 1, base=base, layers=2, hidden=16)
        (folder / "optimizer.pt").write_bytes(b"not read")  # what else the Trainer leaves there
        _state(folder, step, dict(zip(STEPS, LOSSES)))
    return run


def test_read_run_finds_steps_and_losses(full_run):
    checkpoints = read_run(full_run)
    assert [c.step for c in checkpoints] == STEPS and [c.loss for c in checkpoints] == LOSSES
    assert {c.kind for c in checkpoints} == {"full"}


def test_averaged_full_checkpoints_equal_the_weighted_sum(full_run, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "average", full_run, tmp_path / "avg", "--by", "loss",
                           "--penalty", "2", "--quiet")
    assert code == 0, err
    w = [m ** -2 for m in LOSSES]
    w = [x / sum(w) for x in w]
    inputs = [read_tensors(full_run / f"checkpoint-{s}") for s in STEPS]
    merged = read_tensors(tmp_path / "avg")
    assert set(merged) == set(inputs[0])
    for name, tensor in merged.items():
        expected = sum(wk * t[name] for wk, t in zip(w, inputs))
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)
    record = json.loads((tmp_path / "avg" / "average.json").read_text())
    assert [c["weight"] for c in record["checkpoints"]] == pytest.approx(w)


def test_infinite_penalty_copies_the_best_checkpoint(full_run, tmp_path):
    done = average_run(full_run, tmp_path / "best", by="loss", penalty=math.inf)
    assert done.weights == [0.0, 1.0, 0.0]
    assert json.loads((tmp_path / "best" / "average.json").read_text())["penalty"] == "inf"
    best = read_tensors(full_run / "checkpoint-20")
    for name, tensor in read_tensors(tmp_path / "best").items():
        assert torch.equal(tensor, best[name])


def test_bad_runs_are_refused(full_run, tmp_path):
    with pytest.raises(MergesmithError, match="no checkpoint-"):
        average_run(tmp_path, tmp_path / "out")
    with pytest.raises(MergesmithError, match="does not exist"):
        average_run(tmp_path / "missing", tmp_path / "out")
    # no loss logged yet at the first save: --by loss cannot weight it
    run = tmp_path / "early"
    for step in (5, 10):
        folder = build_model(run / f"checkpoint-{step}", "llama", seed=step, layers=2, hidden=16)
        _state(folder, step, {10: 1.0})
    with pytest.raises(MergesmithError, match="no training loss logged for checkpoint-5"):
        average_run(run, tmp_path / "out", by="loss")
    # checkpoints of different shapes
    odd = tmp_path / "odd"
    build_model(odd / "checkpoint-1", "llama", seed=1, layers=2, hidden=16)
    build_model(odd / "checkpoint-2", "llama", seed=2, layers=2, hidden=32)
    with pytest.raises(MergesmithError, match="different models: hidden_size 32 against 16"):
        average_run(odd, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- adapter checkpoints ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    """A PEFT run: LoRA checkpoints saved by PEFT itself, B made non-zero as training would."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    base = build_model(root / "base", "llama", seed=0, layers=2, hidden=16)
    run = root / "run"
    for i, step in enumerate(STEPS):
        torch.manual_seed(100 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
        model.save_pretrained(run / f"checkpoint-{step}")
        _state(run / f"checkpoint-{step}", step, dict(zip(STEPS, LOSSES)))
    return base, run


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_adapter_factors_are_averaged_separately_and_peft_loads_them(adapter_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, run = adapter_run
    done = average_run(run, tmp_path / "avg", by="step", penalty=1.0)
    assert done.kind == "adapter"
    w = [s / sum(STEPS) for s in STEPS]
    inputs = [_adapter(run / f"checkpoint-{s}") for s in STEPS]
    merged = _adapter(tmp_path / "avg")
    assert set(merged) == set(inputs[0])
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, sum(wk * t[name] for wk, t in zip(w, inputs)))
    # the paper's average is of the factors: its ΔW is not the average of the ΔW (cross terms)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "avg")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a_key = next(k for k in merged if "layers.0.self_attn.q_proj.lora_A" in k)
    b_key = a_key.replace("lora_A", "lora_B")
    assert torch.equal(layer.lora_A["default"].weight, merged[a_key])
    delta_of_average = 2.0 * merged[b_key] @ merged[a_key]
    average_of_deltas = sum(wk * 2.0 * t[b_key] @ t[a_key] for wk, t in zip(w, inputs))
    assert not torch.allclose(delta_of_average, average_of_deltas, atol=1e-3)


def test_adapter_checkpoints_that_differ_are_refused(adapter_run, tmp_path):
    import shutil

    _, run = adapter_run
    odd = tmp_path / "odd"
    shutil.copytree(run, odd)
    config = json.loads((odd / "checkpoint-20" / "adapter_config.json").read_text())
    config["r"] = 4
    (odd / "checkpoint-20" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergesmithError, match="checkpoint-20: adapter config 'r' is 4"):
        average_run(odd, tmp_path / "out")
    mixed = tmp_path / "mixed"
    shutil.copytree(run / "checkpoint-10", mixed / "checkpoint-10")
    build_model(mixed / "checkpoint-20", "llama", seed=1, layers=2, hidden=16)
    with pytest.raises(MergesmithError, match="holds an adapter but checkpoint-20 a full model"):
        average_run(mixed, tmp_path / "out")


def test_adapter_delta_mode_averages_the_updates_exactly(adapter_run, tmp_path):
    """--adapter-mode delta: ΔW = Σ w_k ΔW_k for every module (rank Σ r_k), which PEFT loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergesmith.io.adapter import read_adapter

    base, run = adapter_run
    done = average_run(run, tmp_path / "delta", by="loss", penalty=1.0, adapter_mode="delta")
    w = [1 / m for m in LOSSES]
    w = [x / sum(w) for x in w]
    inputs = [read_adapter(run / f"checkpoint-{s}") for s in STEPS]
    merged = read_adapter(done.path)
    assert set(merged.modules) == set(inputs[0].modules)
    for weight in merged.modules:
        assert merged.modules[weight].rank == 2 * len(STEPS)
        expected = sum(wk * a.delta(weight) for wk, a in zip(w, inputs))
        torch.testing.assert_close(merged.delta(weight), expected, rtol=1e-5, atol=1e-6)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), done.path)
    assert json.loads((done.path / "average.json").read_text())["adapter_mode"] == "delta"
