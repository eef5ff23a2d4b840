"""The demo end to end in its reduced mode: tiny model, two tasks, a few steps, a few methods."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from mergesmith.demo import leaderboard
from mergesmith.embedded import world as run
from mergesmith.demo.leaderboard import (DEFAULT_METHODS, demo_methods, leaderboard_rows, run_leaderboard,
                                         skip_reason)
from mergesmith.embedded.world import prepare_demo
from mergesmith.errors import MergesmithError
from mergesmith.evaluate import evaluate_model, load_task
from mergesmith.methods import all_methods, get_method

METHODS = ["linear", "task_arithmetic", "ties", "emr"]

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return prepare_demo(fast=True, seed=0, cache=tmp_path_factory.mktemp("cache"), progress=False)


def _board(setup, out, cache):
    return run_leaderboard(setup.base, setup.experts, setup.tasks, out, cache=cache, seed=0,
                           methods=METHODS + ["passthrough"], say=lambda m: None, n_bootstrap=200)


def test_reduced_demo_end_to_end(setup, tmp_path):
    board = _board(setup, tmp_path / "out", tmp_path / "cache")
    assert [e.method for e in board.entries] == METHODS
    # each method's chosen point is one of its grid's points, picked by validation score
    ta = next(e for e in board.entries if e.method == "task_arithmetic")
    assert len(ta.points) == 4
    assert ta.validation == max(score for _, score, _, _ in ta.points)
    # an expert's normalized score on its own task is exactly 1 (its own score over itself)
    for task in setup.tasks:
        assert board.test.cell(f"expert: {task}", task).normalized == pytest.approx(1.0)
    # the leaderboard's numbers are the evaluation's: re-score the base directly
    for task, path in setup.tasks.items():
        direct = evaluate_model(setup.base, load_task(path), split="test")
        assert board.test.cell("base (pretrained + task heads)", task).score == pytest.approx(direct.score)
    header, rows = leaderboard_rows(board)
    assert {row[1] for row in rows} >= set(METHODS)
    for name in ("report.md", "leaderboard.json", "normalized.png", "task_arithmetic_lambda.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "beyond noise" in report and "`passthrough` (copies layers" in report  # what was not run, why
    assert all(e.merge_seconds > 0 and e.merge_peak_mb > 50 for e in board.entries)


def test_rerun_from_cache_merges_nothing_and_gives_the_same_numbers(setup, tmp_path):
    first = _board(setup, tmp_path / "a", tmp_path / "cache")
    again = _board(setup, tmp_path / "b", tmp_path / "cache")
    assert json.loads((tmp_path / "a" / "leaderboard.json").read_text())["test"] == \
        json.loads((tmp_path / "b" / "leaderboard.json").read_text())["test"]
    assert [e.values for e in first.entries] == [e.values for e in again.entries]


def test_methods_that_do_not_apply_say_why():
    assert "per-layer" in skip_reason(get_method("layer_swap"), 4)
    assert "at most 1" in skip_reason(get_method("slerp"), 4)
    assert skip_reason(get_method("ties"), 4) is None


def test_cli_demo_fast(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mergesmith.cli", "demo", "--fast", "--method", "linear",
                           "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "linear" in done.stdout and "avg normalized" in done.stdout
    assert (tmp_path / "out" / "report.md").is_file()


def test_data_aware_methods_calibrate_on_the_train_split_only(setup, tmp_path):
    """Statistics and learning read each expert's own task's train split, never validation or
    test; the methods then rank on the same test resamples as the rest."""
    methods = ["task_arithmetic", "regmean", "ota", "adamerging"]
    board = run_leaderboard(setup.base, setup.experts, setup.tasks, tmp_path / "out",
                            cache=tmp_path / "cache", seed=0, methods=methods, say=lambda m: None,
                            n_bootstrap=200)
    assert [e.method for e in board.entries] == methods, board.skipped
    for entry in board.entries:
        if entry.method in ("regmean", "adamerging"):
            used = [m.calibration.data for m in entry.recipe.models]
            assert used == [str(load_task(setup.tasks[t]).data["train"]) for t in setup.experts]
            assert entry.data_seconds is not None and entry.data_seconds > 0
        assert board.test.averages[entry.method].normalized is not None


def test_default_set_is_the_documented_one_and_all_selects_every_method(monkeypatch, capsys):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    documented = re.search(r"default set[^:]*:((?:\s*`\w+`,?)+)", readme)
    assert documented, "README's demo section lists the default set as: default set ...: `a`, `b`, ..."
    assert tuple(re.findall(r"`(\w+)`", documented.group(1))) == DEFAULT_METHODS
    assert DEFAULT_METHODS[-1] == "search"  # the search row, not a registered method
    assert all(skip_reason(get_method(m), len(run.TASKS)) is None for m in DEFAULT_METHODS[:-1])
    every = [spec.name for spec in all_methods()] + ["search"]
    assert demo_methods() == list(DEFAULT_METHODS)
    assert demo_methods(every=True) == every
    assert demo_methods(["ties"]) == ["ties"]
    with pytest.raises(MergesmithError, match="--all"):
        demo_methods(["ties"], every=True)

    chosen = []

    def fake_leaderboard(*args, methods, **kwargs):
        chosen.append(methods)
        raise MergesmithError("stop here")

    monkeypatch.setattr(run, "prepare_demo", lambda **kwargs: run.DemoSetup(Path("b"), {}, {}, None))
    monkeypatch.setattr(leaderboard, "run_leaderboard", fake_leaderboard)
    for flags in ([], ["--all"], ["--method", "ties"]):
        code, _, err = run_cli(monkeypatch, capsys, "demo", *flags)
        assert code == 1 and "stop here" in err
    assert chosen == [list(DEFAULT_METHODS), every, ["ties"]]
