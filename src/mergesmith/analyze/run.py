"""`mergesmith analyze`: the figures of analyze/stats.py for every tensor a recipe would merge,
streamed as a merge is, without merging anything.

The recipe is planned by the engine (engine/plan.py: every error before any read: models,
names, shapes, vocabularies), and each planned tensor's inputs are read by the engine's own
reader (engine/run.py's `read_unit`, which also aligns vocabularies), one tensor at a time, in
blocks of rows as a streamed merge reads them, once per pass of stats.TensorSums (3, or 6 for
a matrix whose spectrum is sketched): memory holds one block of one tensor's inputs and task
vectors, whatever the model's size. Each tensor's sums go to OUT/tensors.jsonl as it is done;
the layers' and the model's figures are those of the sums added up, in OUT/summary.json;
analyze/report.py draws the plots and writes OUT/report.md and OUT/report.html.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from mergesmith.analyze.stats import (
    DEFAULT_DENSITY, DEFAULT_MAX_RANK, OVERSAMPLE, TensorSums, add_sums, figures,
)
from mergesmith.io import tensor_names as L
from mergesmith.engine.api import ProgressBar, parse_size
from mergesmith.engine.plan import Plan, TensorJob, build_plan
from mergesmith.engine.run import DEFAULT_CHUNK_BYTES, Unit, read_unit
from mergesmith.errors import MergesmithError, OutputError, PlanError
from mergesmith.io import Checkpoint, resolve_model
from mergesmith.io.output import refuse_overlap
from mergesmith.methods import get_method
from mergesmith.recipe import Recipe, load_recipe

# Whose parameters (densities, weights) a recipe is planned with when its own method cannot
# be planned for analysis: one that takes no base, learns from data or reads statistics.
STAND_IN = "task_arithmetic"
DELLA_METHODS = ("della", "della_linear")  # recipes whose analysis shows DELLA's drops
SPECTRA_SHOWN = 8  # tensors whose whole spectra the summary keeps (those of the middle layer)


def analyze(recipe: Recipe | str | Path | dict, out: str | Path, *,
            merged: str | Path | None = None, density: float | None = None,
            max_rank: int = DEFAULT_MAX_RANK, seed: int | None = None,
            allow_crimes: bool = False, overwrite: bool = False, progress: bool = False,
            plots: bool = True, chunk_size: str | int = DEFAULT_CHUNK_BYTES) -> Path:
    """Write OUT/summary.json, OUT/tensors.jsonl, the plots, OUT/report.md and report.html;
    return OUT.

    `merged`: a merge of this recipe (or any model of the same tensors) to measure against the
    task vectors. `density` overrides the recipe's for the masks and drops (default: the
    recipe's, else 0.2). `max_rank` caps the spectra of larger matrices. `chunk_size`: the
    blocks of rows read at once, in float32 bytes per input (as `merge --chunk-size`)."""
    started = time.perf_counter()
    plan = analysis_plan(recipe, seed=seed, allow_crimes=allow_crimes)
    jobs = [job for job in plan.jobs if not job.copy]
    merged_ck = open_merged(merged, jobs) if merged is not None else None
    if density is not None and not 0 <= density <= 1:
        raise MergesmithError(f"--density {density}: not in [0, 1]")
    inputs = [p for ck in plan.models.values() for p in ck.sources]
    out = _output(Path(out), overwrite, inputs + ([Path(merged)] if merged is not None else []))
    bar = _bar(plan, jobs) if progress else None
    advance = (lambda nbytes: bar.advance(int(nbytes), 0)) if bar else None
    chunk_bytes = parse_size(chunk_size)
    total, groups, spectra = None, {}, {}
    middle = L.num_layers([job.out.name for job in jobs]) // 2
    try:
        with open(out / "tensors.jsonl", "w") as lines:
            for job in jobs:
                with _one_thread() as threads:
                    sums = job_sums(plan, job, merged_ck, density, max_rank, threads, chunk_bytes,
                                    advance)
                record = {"name": job.out.name, "layer": job.ctx.layer,
                          "shape": list(job.out.shape), **figures(sums, len(job.inputs) - 1),
                          "sums": sums}
                lines.write(json.dumps(record) + "\n")
                total = add_sums(total, sums)
                key = group_of(job.out.name)
                groups[key] = _add_group(groups.get(key), sums)
                if "spectra" in sums and job.ctx.layer == middle and len(spectra) < SPECTRA_SHOWN:
                    spectra[job.out.name] = [s["sigma"] for s in sums["spectra"]]
                if bar:
                    bar.advance(0, 1, job.out.name)
    finally:
        if bar:
            bar.stop()
    experts = len(jobs[0].inputs) - 1
    summary = {
        "recipe": str(plan.recipe.source), "merge_method": plan.recipe.merge_method,
        "parameters_of": plan.method.name, "base": jobs[0].inputs[0][0].label,
        "experts": [ck.label for ck, _ in jobs[0].inputs[1:]],
        "merged": merged_ck.label if merged_ck else None,
        "densities": _densities(jobs[0], density), "max_rank": max_rank, "seed": plan.seed,
        "tensors": len(jobs), "elements": total["numel"],
        "model": {**figures(total, experts), **_mean_ranks(groups.values())},
        "layers": {key: {**figures(g["sums"], experts), **_mean_ranks([g])}
                   for key, g in sorted(groups.items(), key=lambda kv: _order(kv[0]))},
        "spectra": spectra, "warnings": plan.warnings,
    }
    summary["seconds"] = round(time.perf_counter() - started, 3)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if plots:
        from mergesmith.analyze.report import write_report

        write_report(summary, out)
    return out


def analysis_plan(recipe: Recipe | str | Path | dict, *, seed: int | None = None,
                  allow_crimes: bool = False) -> Plan:
    """The recipe's merge plan, with its own method's parameters where that method can be
    planned on its own, else planned as task arithmetic (`STAND_IN`); every job has θ0 first."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if not recipe.base_model and not any(s.base_model for s in recipe.slices or ()):
        raise PlanError(f"{recipe.where('merge_method')}: the recipe has no base_model; the "
                        "analysis measures task vectors τi = θi − θ0",
                        hint="add base_model: <the model the experts were tuned from>")
    try:
        method = get_method(recipe.merge_method)
        own = (method.uses_base and method.output == "tensor" and method.learn is None
               and not method.statistics)
    except MergesmithError:
        own = False  # the stand-in's plan names no unknown method; analysis needs none
    if not own:  # each model weighs 1 unless the recipe weighs it
        parameters = {"weight": 1.0, **(recipe.parameters or {})}
        recipe = recipe.model_copy(update={"merge_method": STAND_IN, "parameters": parameters})
    plan = build_plan(recipe, seed=seed, allow_crimes=allow_crimes)
    for job in plan.jobs:
        if not job.copy and not job.has_base:
            raise PlanError(f"{recipe.where('base_model')}: tensor {job.out.name!r} has no base "
                            "model among its sources", hint="give base_model for every slice")
    return plan


def open_merged(merged: str | Path, jobs: list[TensorJob]) -> Checkpoint:
    """The merged model, checked before anything is read: every planned tensor, same shape."""
    ck = Checkpoint(resolve_model(str(merged)), label=str(merged))
    for job in jobs:
        info = ck.tensors.get(job.out.name)
        if info is None:
            raise PlanError(f"{ck.label}: has no tensor {job.out.name!r}, which the recipe "
                            "merges", hint="pass the folder this recipe was merged into")
        if tuple(info.shape) != tuple(job.out.shape):
            raise PlanError(f"shapes differ for {job.out.name!r}: the recipe makes "
                            f"{list(job.out.shape)}, {ck.label} has {list(info.shape)}",
                            hint="pass the folder this recipe was merged into")
    return ck


def job_sums(plan: Plan, job: TensorJob, merged: Checkpoint | None, density: float | None,
             max_rank: int, threads: int = 1, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
             advance=None) -> dict:
    """One tensor's sums (stats.TensorSums): its inputs read as a streamed merge reads them
    (engine/run.py's read_unit, blocks of rows of `chunk_bytes` in float32 per input), once per
    pass, and cast to float32 (the recipe's dtype first, as a merge casts them). A tensor that
    is one block is read once. `advance(nbytes)`: progress, the tensor's bytes over its passes."""
    params = job.params
    n = len(job.inputs) - 1
    densities = ([density] * n if density is not None
                 else params.get("densities") or [DEFAULT_DENSITY] * n)
    sums = TensorSums(job.out.shape, n, merged=merged is not None, densities=list(densities),
                      weights=params.get("weights"), gammas=params.get("gammas"),
                      epsilons=params.get("epsilons"), ctx=job.ctx, max_rank=max_rank,
                      della=plan.method.name in DELLA_METHODS, threads=threads)
    blocks = row_blocks(job, chunk_bytes, max_rank)
    held = None
    for _ in range(sums.passes):
        for rows in blocks:
            vectors = held or task_vectors(plan, job, rows, merged)
            held = vectors if len(blocks) == 1 else None
            sums.add(rows[0] if rows else 0, vectors[:n], vectors[n] if merged else None)
            del vectors
            if advance:
                share = (rows[1] - rows[0]) / job.out.shape[0] if rows else 1.0
                advance(job.out.nbytes * share / sums.passes)
        sums.end_pass()
    return sums.result()


def row_blocks(job: TensorJob, chunk_bytes: int, max_rank: int) -> list[tuple[int, int] | None]:
    """The blocks of rows a tensor is read in: `chunk_bytes` of float32 per input, or the whole
    tensor (None) when it is that small, a vector, aligned to a joint vocabulary (read whole,
    as a merge reads it), or a wide matrix whose exact spectrum couples all its rows."""
    shape = job.out.shape
    if len(shape) < 2 or job.vocab_axis or 4 * math.prod(shape) <= chunk_bytes:
        return [None]
    if len(shape) == 2 and shape[0] < shape[1] and shape[0] <= max_rank + OVERSAMPLE:
        return [None]
    step = max(1, chunk_bytes // (4 * math.prod(shape[1:])))
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def task_vectors(plan: Plan, job: TensorJob, rows: tuple[int, int] | None,
                 merged: Checkpoint | None) -> list[torch.Tensor]:
    """τi = θi − θ0 for these rows of the job's tensor, and δ = θ* − θ0 last with `merged`."""
    tensors = read_unit(plan, Unit(job, rows, "merge"))
    cast = (lambda t: t.to(plan.load_dtype).float()) if plan.load_dtype else (lambda t: t.float())
    base = cast(tensors[0])
    vectors = []
    for i in range(1, len(tensors)):
        vectors.append(cast(tensors[i]).sub_(base))
        tensors[i] = None  # the stored copy goes as soon as its task vector exists
    if merged is not None:
        vectors.append(cast(merged.read(job.out.name, rows)).sub_(base))
    return vectors


@contextmanager
def _one_thread():
    """The analysis runs on one of torch's threads, as a merge's element-wise work does
    (engine/run.py's merge_threads): its operations are small (blocks of rows, sketches of 42
    columns), and splitting each among threads cost 3x (element-wise) to 9x (spectra) more on a
    busy 2-core machine (measured on a 2048×768 tensor). The element-wise sums share their
    blocks out among that many threads instead (yields the count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def group_of(name: str) -> str:
    """The layer a tensor belongs to ("3"), else "embeddings" (before the layers) or "head"."""
    layer = L.layer_of(name)
    return str(layer) if layer is not None else "embeddings" if L.is_before_layers(name) else "head"


def _order(key: str) -> tuple:
    return (0, 0) if key == "embeddings" else (2, 0) if key == "head" else (1, int(key))


def _add_group(group: dict | None, sums: dict) -> dict:
    group = group or {"sums": None, "ranks": [], "stable": []}
    group["sums"] = add_sums(group["sums"], sums)
    if "spectra" in sums:
        group["ranks"].append([s["effective_rank"] for s in sums["spectra"]])
        group["stable"].append([s["stable_rank"] for s in sums["spectra"]])
    return group


def _mean_ranks(groups) -> dict:
    """The mean effective and stable ranks of the 2-D tensors, per task vector (and δ)."""
    ranks = [r for g in groups for r in g["ranks"]]
    stable = [r for g in groups for r in g["stable"]]
    if not ranks:
        return {}
    return {"mean_effective_rank": torch.tensor(ranks).mean(0).tolist(),
            "mean_stable_rank": torch.tensor(stable).mean(0).tolist()}


def _densities(job: TensorJob, density: float | None) -> str:
    if density is not None:
        return f"{density} (--density)"
    given = job.params.get("densities")
    return f"the recipe's ({given} on {job.out.name})" if given else f"{DEFAULT_DENSITY} (default)"


def _output(out: Path, overwrite: bool, inputs: list[Path]) -> Path:
    refuse_overlap(out, inputs, what="the analysis")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file", hint="name a folder for OUT")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out} exists and is not empty", hint="pass --overwrite, or another OUT")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _bar(plan: Plan, jobs: list[TensorJob]) -> ProgressBar:
    bar = ProgressBar(plan, title=f"analyzing ({len(jobs[0].inputs) - 1} task vectors)")
    bar.total_tensors = len(jobs)
    bar.progress.update(bar.task, total=sum(job.out.nbytes for job in jobs))
    bar.start()
    return bar
