"""The demo's leaderboard: every method that applies, tuned on validation, scored on test.

Each method merges the same experts; its parameters are chosen from a small grid by the average
normalized score on the validation split, and only the chosen point is scored on the test split.
All test results go into one paired-bootstrap summary, so any two methods can be compared on the
same resamples, and the report says which differences are beyond noise.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mergesmith.errors import MergesmithError
from mergesmith.evaluate import Report, Task, load_task, plot_normalized, plot_sweep, summarize
from mergesmith.pipeline import needs_calibration, prepare
from mergesmith.methods import MethodSpec, all_methods, get_method
from mergesmith.demo import search_row
from mergesmith.recipe import Recipe, load_recipe
from mergesmith.search.scoring import Scorer, recipe_key
from mergesmith.search.sweep import with_parameters

# What `mergesmith demo` runs without --all: plain averaging and task arithmetic (the baselines),
# the sparsifying family (TIES, DARE-TIES, breadcrumbs), the spectral methods (TSV-M, Iso-C), EMR
# (one model per task), one statistics-based (RegMean) and one learned (AdaMerging) merge, and
# a time-bounded search (demo/search_row.py). Chosen for the story at the smallest cost: each
# method runs 1-3 grid points.
DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "tsv_m", "iso_c",
                   "emr", "regmean", "adamerging", search_row.NAME)
# The grid each method is tuned over (its other parameters keep their defaults). A method that is
# not listed runs once, with its defaults. The default set's grids keep the points that won on
# the full grids (README's --all run) and one neighbour to show the choice is made on validation.
GRIDS: dict[str, dict[str, list]] = {
    "task_arithmetic": {"lambda": [0.3, 0.5, 0.7, 1.0]},
    "ties": {"density": [0.2, 0.5], "lambda": [1.0]},
    "dare_ties": {"density": [0.6], "lambda": [0.7, 1.0]},
    "dare_linear": {"density": [0.3, 0.6], "lambda": [0.5, 1.0]},
    "breadcrumbs": {"density": [0.3, 0.6], "lambda": [1.0]},
    "breadcrumbs_ties": {"density": [0.3, 0.6], "lambda": [0.7, 1.0]},
    "della": {"density": [0.3, 0.6], "lambda": [0.7, 1.0]},
    "della_linear": {"density": [0.3, 0.6], "lambda": [0.5, 1.0]},
    "consensus_ta": {"lambda": [0.5, 1.0]},
    "consensus_ties": {"lambda": [0.7, 1.0]},
    "magmax": {"lambda": [0.5, 1.0]},
    "tsv_m": {"lambda": [0.5, 1.0]},
    "iso_c": {"lambda": [1.0, 1.5]},
    "iso_cts": {"lambda": [0.5, 1.0, 1.5]},
    "pcb": {"lambda": [0.5, 1.0]},
    # data-aware: statistics are collected once per expert, so their grids cost only merges
    "fisher": {"normalize": [False, True]},
    "regmean": {"alpha": [0.5, 0.9]},
    "regmean_plusplus": {"alpha": [0.9]},
    "ota": {"density": [0.1, 0.5]},
    "stitch": {"density": [0.05, 0.2]},
    # learned: each point learns anew, so one point each, with few steps (the papers run
    # hundreds; the demo's models and data are small)
    "adamerging": {"granularity": ["layer"], "steps": [20], "lr": [0.02]},
    "expert_merging": {"steps": [20]},
    # the mask learners: one logit per weight, ~2 s per step here; a larger learning rate lets
    # 20 steps move the logits past their start (Localize's ±3 around the top-|τ| mask)
    "concrete_ta": {"steps": [20], "lr": [0.05]},
    "localize_stitch": {"steps": [20], "density": [0.05], "lr": [0.5]},
    # routed: each point merges, trains its router and scores every input on its own weights
    "twin": {"lambda": [0.5], "rank_ratio": [0.1, 0.3]},
    # adapter methods (demo --adapters): each point merges the adapters into one adapter
    "lora_combine": {"combination_type": ["cat", "svd", "ties"], "density": [0.5]},
    "knots": {"merge": ["ties"], "density": [0.2, 0.5]},
}
# Methods that never apply to "merge these experts into one model".
NOT_A_MERGE_OF_EXPERTS = {
    "passthrough": "copies layers from one model (frankenmerges)",
    "layer_swap": "needs a per-layer choice of model",
    "dam_fold": "applies the coefficients that dam learns (dam is on the board)",
    "rcp_merging": "merges a domain model into a reasoning model: two roles, not peer experts",
}
# Adapter methods that do not apply to the demo's LoRA experts.
NOT_A_MERGE_OF_ADAPTERS = {
    "orthogonal_lora_sum": "needs adapters trained with frozen orthogonal A's; on these it is "
                           "task arithmetic",
}
# Methods whose merge is one shared model plus a per-task part: each task is scored with its own
# rebuilt model (`mergesmith emr apply`, `mergesmith rmm apply`).
PER_TASK_MODELS = {"emr", "rmm"}
# Validation examples per task used to pick each method's parameters (the test split is scored
# whole): enough to rank grid points, and it halves the demo's tuning time.
TUNING_EXAMPLES = 100
# What data-aware methods see of each task's train split: as many examples as the tuning uses
# of validation, at the length the experts were trained with.
CALIBRATION = {"samples": TUNING_EXAMPLES, "max_length": 64, "batch_size": 16, "seed": 0}
# Parameters a recipe sets per model; the demo weights every expert equally.
PER_MODEL_DEFAULTS = {"weight": 1.0}


@dataclass
class Entry:
    """One method on the leaderboard."""

    method: str
    values: dict[str, Any]
    recipe: Recipe
    validation: float
    points: list[tuple[dict[str, Any], float, float | None, float | None]] = field(default_factory=list)
    merge_seconds: float | None = None
    merge_peak_mb: float | None = None
    data_seconds: float | None = None  # collecting statistics or learning, for data-aware methods


@dataclass
class Leaderboard:
    entries: list[Entry]
    skipped: dict[str, str]
    test: Report
    names: dict[str, str]  # leaderboard label -> scorer name (a method, or a reference folder)
    files: dict[str, Path] = field(default_factory=dict)


def demo_methods(methods: list[str] | None = None, every: bool = False,
                 default: tuple[str, ...] = DEFAULT_METHODS) -> list[str]:
    """The methods a demo run tries: those named, else every registered one with `every`
    (--all), else the default set."""
    if methods and every:
        raise MergesmithError("demo: --method and --all both choose the methods",
                              hint="give one of them")
    if methods:
        return list(methods)
    return [spec.name for spec in all_methods()] + [search_row.NAME] if every else list(default)


def skip_reason(spec: MethodSpec, experts: int, adapters: bool = False) -> str | None:
    """Why a method cannot merge `experts` experts of one base (LoRA adapters with `adapters`),
    or None if it can."""
    if spec.name in NOT_A_MERGE_OF_EXPERTS:
        return NOT_A_MERGE_OF_EXPERTS[spec.name]
    if spec.output != "tensor" and not adapters:
        return "merges LoRA adapters into an adapter, not full checkpoints"
    if spec.name in NOT_A_MERGE_OF_ADAPTERS and adapters:
        return NOT_A_MERGE_OF_ADAPTERS[spec.name]
    if spec.max_models is not None and experts > spec.max_models:
        return f"merges at most {spec.max_models} model(s) besides the base"
    if experts < spec.min_models:
        return f"needs at least {spec.min_models} models"
    grid = GRIDS.get(spec.name, {})
    required = [p.name for p in spec.params
                if p.required and p.name not in grid and p.name not in PER_MODEL_DEFAULTS]
    if required:
        return f"needs {', '.join(required)} chosen by hand"
    return None


def method_recipe(spec: MethodSpec, base: Path, experts: list[Path],
                  tasks: list[Task] | None = None, cache: Path | None = None) -> Recipe:
    """The recipe merging the experts with the method's defaults; a method that needs data
    calibrates each expert on its own task's train split (never validation or test), read
    through that task's frozen head."""
    per_model = {name: value for name, value in PER_MODEL_DEFAULTS.items()
                 if (p := spec.param(name)) is not None and p.per_model}
    data: dict[str, Any] = {
        "merge_method": spec.name,
        "models": [{"model": str(e), **({"parameters": dict(per_model)} if per_model else {})}
                   for e in experts],
        "dtype": "float32",
    }
    if spec.uses_base or spec.learn is not None:
        data["base_model"] = str(base)
    if needs_calibration(spec):
        if tasks is None:
            raise MergesmithError(f"{spec.name} needs each expert's task for its calibration data")
        data["calibration"] = dict(CALIBRATION, cache=str(cache / "statistics") if cache else None)
        for model, task in zip(data["models"], tasks):
            model["calibration"] = {
                "data": str(task.data["train"]), "text_field": task.text_field,
                "label_field": task.label_field, "labels": list(task.labels),
                **({"head": str(task.head)} if task.head else {})}
    return load_recipe({k: v for k, v in data.items() if v is not None})


def run_leaderboard(base: Path, experts: dict[str, Path], tasks: dict[str, Path], out: Path, *,
                    cache: Path, seed: int = 0, methods: list[str] | None = None,
                    say: Callable[[str], None] = print, n_bootstrap: int = 1000,
                    search_seconds: float = search_row.SECONDS,
                    adapters: dict[str, Path] | None = None) -> Leaderboard:
    """Tune every applicable method on validation, score the chosen points and the references
    on test, and write report.md, leaderboard.json and the plots into `out`. `methods` may
    name `search`: a time-bounded CMA-ES search (demo/search_row.py) becomes a row too.
    With `adapters` (task -> LoRA adapter folder; `experts` are then those adapters applied,
    the references), the adapter methods merge the adapters into one adapter, scored as the
    base plus it, and the full-weight methods merge `base+adapter` inputs."""
    loaded: list[Task] = [load_task(tasks[name]) for name in experts]
    references = dict(experts={t: str(p) for t, p in experts.items()}, base=str(base),
                      in_memory=True, seed=seed, n_bootstrap=n_bootstrap)
    scorer = Scorer(loaded, cache, **references)
    tuner = Scorer(loaded, cache, max_examples=TUNING_EXAMPLES, **references)
    expert_paths = list(experts.values()) if adapters is None else \
        [f"{base}+{adapters[task]}" for task in experts]
    entries, skipped = [], {}
    for spec in all_methods():
        if methods is not None and spec.name not in methods:
            continue
        reason = skip_reason(spec, len(expert_paths), adapters is not None)
        if reason is not None:
            skipped[spec.name] = reason
            continue
        say(f"[{spec.name}] tuning on validation")
        inputs = [adapters[t] for t in experts] if spec.output == "adapter" else expert_paths
        try:
            recipe = method_recipe(spec, base, inputs, loaded, cache)
            entries.append(_tune(spec, recipe, tuner))
        except MergesmithError as exc:  # reported in the table's notes; the other methods go on
            skipped[spec.name] = f"failed: {exc}"
            say(f"[{spec.name}] failed: {exc}")
    if methods is not None and search_row.NAME in methods:
        say(f"[{search_row.NAME}] CMA-ES over the experts' weights on validation "
            f"({search_seconds:g} s)")
        try:
            entries.append(search_row.search_entry(base, expert_paths, loaded, cache, seed,
                                                   search_seconds, tuner))
        except MergesmithError as exc:
            skipped[search_row.NAME] = f"failed: {exc}"
            say(f"[{search_row.NAME}] failed: {exc}")

    say("scoring the chosen points on test")
    candidates = {e.method: scorer.score_recipe(e.recipe, "test") for e in entries
                  if e.method not in PER_TASK_MODELS}
    for entry in entries:
        if entry.method in PER_TASK_MODELS:
            candidates[entry.method] = _score_per_task(entry.recipe, scorer, loaded, base, "test")
    references = scorer.references("test")
    names = {e.method: e.method for e in entries}
    names["base (pretrained + task heads)"] = str(base)
    names.update({f"expert: {task}": str(path) for task, path in experts.items()})
    results = {label: (candidates | references)[name] for label, name in names.items()}
    label_of = {name: label for label, name in names.items()}
    test = summarize(results, {t: label_of[str(p)] for t, p in experts.items()},
                     label_of[str(base)], seed=seed, n_bootstrap=n_bootstrap)

    for entry in entries:
        say(f"[{entry.method}] timing one streaming merge")
        entry.merge_seconds, entry.merge_peak_mb = _timed_merge(entry.recipe, cache, seed)
        spec = get_method(entry.recipe.merge_method)
        if spec.router:  # the router's training, recorded in the merge it was trained for
            index = scorer.merge_folder(entry.recipe) / "twin" / "twin.json"
            entry.data_seconds = json.loads(index.read_text())["router"]["seconds"]
        elif spec.needs_data:
            entry.data_seconds = prepare(entry.recipe).seconds  # cached: the time recorded then
    board = Leaderboard(entries, skipped, test, names)
    _write(board, out)
    return board


def _score_per_task(recipe: Recipe, scorer: Scorer, tasks: list[Task], base: Path,
                    split: str) -> dict:
    """Each task scored by its own model, rebuilt from the shared merge: EMR's masks and scales,
    or RMM's basis and the task's coefficients (an adapter, applied to the base)."""
    from mergesmith.engine.side_outputs.emr import apply_emr
    from mergesmith.engine.side_outputs.rmm import apply_rmm

    rmm = recipe.merge_method == "rmm"
    merged = scorer.adapter_folder(recipe) if rmm else scorer.merge_folder(recipe)
    results = {}
    for index, task in enumerate(tasks):
        rebuilt = merged.parent / f"{merged.name}-{task.name}"
        if not (rebuilt / "config.json").is_file():
            if rmm:
                apply_rmm(merged, index, rebuilt, model=base, overwrite=rebuilt.exists())
            else:
                apply_emr(merged, index, rebuilt, overwrite=rebuilt.exists())
        single = Scorer([task], scorer.dir, device=scorer.device, batch_size=scorer.batch_size,
                        max_examples=scorer.max_examples, seed=scorer.seed)
        results[task.name] = single.score_folder(rebuilt, split)[task.name]
    return results


def _tune(spec: MethodSpec, recipe: Recipe, scorer: Scorer) -> Entry:
    if spec.name in PER_TASK_MODELS:  # tuning-free; its models are scored on test only
        return Entry(spec.name, {}, recipe, math.nan)
    grid = GRIDS.get(spec.name, {})
    combos = [dict(zip(grid, c)) for c in itertools.product(*grid.values())] or [{}]
    recipes = {json.dumps(values): with_parameters(recipe, values) if values else recipe
               for values in combos}
    scores = {label: scorer.score_recipe(r, "validation") for label, r in recipes.items()}
    report = scorer.report(scores, "validation")
    points = [(json.loads(label), report.averages[label].normalized, report.averages[label].lo,
               report.averages[label].hi) for label in recipes]
    best = max(recipes, key=lambda label: scorer.objective(report, label))
    return Entry(spec.name, json.loads(best), recipes[best], report.averages[best].normalized, points)


def _timed_merge(recipe: Recipe, cache: Path, seed: int) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB) of `mergesmith merge` run as its own process,
    so the memory is the merge's alone; measured once per recipe and kept in the cache."""
    key = recipe_key(recipe, seed)
    record = cache / "costs" / f"{key}.json"
    if record.is_file():
        data = json.loads(record.read_text())
        return data["seconds"], data["peak_mb"]
    work = Path(tempfile.mkdtemp(dir=cache, prefix="timed-"))
    try:
        method = get_method(recipe.merge_method)
        if method.needs_data and method.learn is None:
            # an empty statistics cache: the cost includes collecting the statistics (a learned
            # merge reuses what it learned; its learning time is `data s`)
            data = recipe.model_dump(exclude_none=True)
            data["calibration"] = dict(data.get("calibration") or {}, cache=str(work / "statistics"))
            recipe = load_recipe(data)
        (work / "recipe.yaml").write_text(recipe.to_yaml())
        command = [sys.executable, "-m", "mergesmith.cli", "merge", str(work / "recipe.yaml"),
                   str(work / "merged"), "--quiet", "--seed", str(seed)]
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peak_kb = 0
        while child.poll() is None:  # VmHWM is the child's own high-water mark, never the parent's
            peak_kb = max(peak_kb, _status_kb(child.pid, "VmHWM"))
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            raise MergesmithError(f"timing the {recipe.merge_method} merge failed: "
                                  f"{child.stderr.read().decode(errors='replace').strip()[-300:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak_mb = peak_kb / 1024
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))
    return seconds, peak_mb


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass  # the process has just exited
    return 0


# -- output ---------------------------------------------------------------------------------------

def leaderboard_rows(board: Leaderboard, reference: str = "task_arithmetic") -> tuple[list[str], list[list[str]]]:
    """Methods ranked by test average normalized score, then the references."""
    test = board.test
    header = ["rank", "model", "chosen on validation", "avg normalized [95% CI]",
              *[f"{t}" for t in test.tasks], f"vs {reference}", "data s", "merge s", "peak MB"]
    by_method = {e.method: e for e in board.entries}
    ranked = sorted(by_method, key=lambda m: -(test.averages[m].normalized or -math.inf))
    rows = []
    for rank, label in enumerate(ranked + [n for n in board.names if n not in by_method], start=1):
        entry = by_method.get(label)
        avg = test.averages[label]
        versus = ""
        if entry is not None and reference in by_method and label != reference:
            c = test.compare(label, reference)
            versus = f"{c.difference:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}]" + (" *" if c.beyond_noise else "")
        rows.append([
            str(rank) if entry else "",
            label,
            ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in entry.values.items()) if entry else "",
            f"{avg.normalized:.3f} [{avg.lo:.3f}, {avg.hi:.3f}]" if avg.normalized is not None else "-",
            *[f"{test.cell(label, t).normalized:.3f}" if test.cell(label, t).normalized is not None
              else "-" for t in test.tasks],
            versus,
            f"{entry.data_seconds:.1f}" if entry and entry.data_seconds is not None else "",
            f"{entry.merge_seconds:.2f}" if entry and entry.merge_seconds is not None else "",
            f"{entry.merge_peak_mb:.0f}" if entry and entry.merge_peak_mb is not None else "",
        ])
    return header, rows


def rich_table(board: Leaderboard):
    from rich.table import Table

    header, rows = leaderboard_rows(board)
    table = Table(title="mergesmith demo: normalized score on the test split (expert = 1.0)")
    for name in header:
        table.add_column(name, justify="left" if name in ("model", "chosen on validation") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _markdown(board: Leaderboard) -> str:
    header, rows = leaderboard_rows(board)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    by_method = {e.method: e for e in board.entries}
    notes = [
        "",
        "Normalized score = the model's accuracy on a task / that task's expert's accuracy, "
        "averaged over the tasks; 95% paired-bootstrap intervals (the same resampled test examples "
        "for every model). `vs task_arithmetic`: difference of average normalized score with its "
        "paired interval; `*` marks a difference whose interval excludes 0 (beyond noise). "
        f"Parameters were chosen on the validation split only (its first {TUNING_EXAMPLES} "
        "examples per task). `merge s` and `peak MB`: one "
        "`mergesmith merge` of the chosen recipe to disk, run as its own process: wall time "
        "(including ~2 s of start-up) and peak resident memory (VmHWM); for the methods that "
        "read statistics, that run starts from an empty statistics cache, so it includes "
        "collecting them, and `data s` is that part of it; for the learned merges, `data s` is "
        "the learning and `merge s` the merge of what was learned. Calibration reads each "
        "task's train split only.",
    ]
    if board.skipped:
        notes += ["", "Not run: " + "; ".join(f"`{m}` ({why})" for m, why in board.skipped.items()) + "."]
    notes += ["", "## Validation grids", ""]
    for method, entry in by_method.items():
        if len(entry.points) > 1:
            cells = ", ".join(f"{_values(v)}: {s:.3f}" for v, s, _, _ in entry.points)
            notes.append(f"- `{method}`: {cells}")
    notes += ["", "## Per task (test split)", "", board.test.to_markdown()]
    return "# mergesmith demo leaderboard\n\n" + "\n".join(lines + notes) + "\n"


def _values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _write(board: Leaderboard, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    board.files["markdown"] = out / "report.md"
    board.files["markdown"].write_text(_markdown(board))
    board.files["json"] = out / "leaderboard.json"
    board.files["json"].write_text(json.dumps({
        "entries": [{"method": e.method, "values": e.values, "validation": e.validation,
                     "points": e.points, "merge_seconds": e.merge_seconds,
                     "data_seconds": e.data_seconds,
                     "merge_peak_mb": e.merge_peak_mb} for e in board.entries],
        "skipped": board.skipped,
        "test": board.test.to_dict(),
    }, indent=2) + "\n")
    board.files["plot"] = plot_normalized(board.test, out / "normalized.png",
                                          title="average normalized score on test (95% CI)")
    ta = next((e for e in board.entries if e.method == "task_arithmetic"), None)
    if ta is not None and len(ta.points) > 1:
        board.files["sweep"] = plot_sweep(
            {"task_arithmetic": [(v["lambda"], s, lo, hi) for v, s, lo, hi in ta.points]},
            out / "task_arithmetic_lambda.png", xlabel="lambda",
            ylabel="average normalized score (validation)", title="task arithmetic: lambda")
