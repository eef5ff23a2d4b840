"""`evaluate`, `sweep`, `soup`, `search`, `negate`, `analyze` and `demo`: scoring and choosing merges."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from mergesmith.cli.common import EXPERT_HELP, TASKS_HELP, _pairs, _write_report, app, err, out
from mergesmith.errors import MergesmithError


@app.command()
def evaluate(
    models: list[str] = typer.Argument(..., help="Model folders to score."),
    tasks: list[Path] = typer.Option(..., "--tasks", "-t", help=TASKS_HELP),
    experts: list[str] = typer.Option([], "--experts", "--expert", help=EXPERT_HELP),
    base: Optional[str] = typer.Option(None, help="The base model, to measure forgetting against."),
    split: str = typer.Option("test", help="Which split of each task to score."),
    batch_size: int = typer.Option(32, help="Examples per forward pass."),
    device: str = typer.Option("cpu", help="Where to run the models: cpu, cuda, cuda:1."),
    max_examples: Optional[int] = typer.Option(None, help="Score only the first N examples."),
    seed: int = typer.Option(0, help="Seed of the bootstrap resamples."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    markdown: Optional[Path] = typer.Option(None, help="Write the report as a Markdown table."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of average normalized scores."),
) -> None:
    """Score MODELS on tasks: scores, normalized scores with 95% intervals, forgetting."""
    from mergesmith.evaluate import evaluate_models, load_task, plot_normalized, summarize

    loaded = [load_task(t) for t in tasks]
    expert_of = _pairs(experts, "--experts")
    names = list(dict.fromkeys([*models, *expert_of.values(), *([base] if base else [])]))
    results = evaluate_models({name: name for name in names}, loaded, split, batch_size=batch_size,
                              device=device, max_examples=max_examples)
    report = summarize(results, expert_of, base, seed=seed)
    out.print(report.table(title=f"evaluation ({split} split)"))
    _write_report(report, json_path, markdown)
    if plot:
        err.print(f"wrote {plot_normalized(report, plot)}", highlight=False)


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., help="Recipe YAML whose global parameters are swept."),
    grid: list[str] = typer.Option(..., "--grid", help="NAME=START:STOP:STEP or NAME=V1,V2,...; repeat."),
    tasks: list[Path] = typer.Option(..., "--tasks", "-t", help=TASKS_HELP),
    experts: list[str] = typer.Option([], "--expert", "--experts", help=EXPERT_HELP),
    base: Optional[str] = typer.Option(None, help="The base model, to measure forgetting against."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for merges, scores, sweep.json/.md/.png."),
    in_memory: bool = typer.Option(False, help="Merge in memory (small models); no folder per point."),
    batch_size: int = typer.Option(32, help="Examples per forward pass."),
    device: str = typer.Option("cpu", help="Where to merge and evaluate."),
    max_examples: Optional[int] = typer.Option(None, help="Score only the first N examples of a split."),
    seed: Optional[int] = typer.Option(None, help="Seed for randomized methods."),
) -> None:
    """Merge at every grid point, pick the best on validation, report it on test."""
    from mergesmith.search import parse_grid, sweep as run_sweep

    result = run_sweep(recipe, dict(parse_grid(g) for g in grid), tasks, out_dir,
                       experts=_pairs(experts, "--expert"), base=base, in_memory=in_memory,
                       device=device, batch_size=batch_size, max_examples=max_examples, seed=seed,
                       progress=lambda line: err.print(line, highlight=False))
    out.print(result.validation.table(title="sweep (validation split)"))
    out.print(result.test.table(title=f"best: {result.best.label} (test split)"))
    err.print(f"merged {result.merged} point(s), reused the rest; wrote "
              f"{', '.join(str(f) for f in result.files.values())}", highlight=False)


@app.command()
def soup(
    models: list[str] = typer.Argument(..., help="Fine-tuned models of one architecture (the ingredients)."),
    tasks: list[Path] = typer.Option(..., "--tasks", "-t", help=TASKS_HELP),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the soup, scores, soup.json/.md/.yaml."),
    uniform: bool = typer.Option(False, help="Average every model instead of the greedy soup."),
    experts: list[str] = typer.Option([], "--expert", "--experts", help=EXPERT_HELP),
    base: Optional[str] = typer.Option(None, help="The base model, to measure forgetting against."),
    in_memory: bool = typer.Option(False, help="Merge candidates in memory (small models)."),
    batch_size: int = typer.Option(32, help="Examples per forward pass."),
    device: str = typer.Option("cpu", help="Where to merge and evaluate."),
    max_examples: Optional[int] = typer.Option(None, help="Score only the first N examples of a split."),
) -> None:
    """Greedy (default) or uniform model soup, chosen on validation, reported on test."""
    from mergesmith.search import soup as make_soup

    result = make_soup(models, tasks, out_dir, greedy=not uniform, experts=_pairs(experts, "--expert"),
                       base=base, in_memory=in_memory, device=device, batch_size=batch_size,
                       max_examples=max_examples, progress=lambda line: err.print(line, highlight=False))
    out.print(result.test.table(title=f"soup of {len(result.kept)} (test split)"))
    err.print(f"soup: {', '.join(result.kept)}\nwrote {result.folder} and "
              f"{', '.join(str(f) for f in result.files.values())}", highlight=False)


@app.command("search")
def search_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML with a search: section."),
    output: Path = typer.Argument(..., help="Folder for the log, checkpoint, best.yaml, plots."),
    workers: int = typer.Option(1, "--workers", min=1, help="Evaluate candidates on N Ray "
                                "workers (a local Ray runtime unless --ray-address)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="Join this Ray cluster for the workers."),
    resume: bool = typer.Option(False, help="Continue the search stopped in OUTPUT (starts it "
                                "if there is nothing to continue)."),
    evaluations: Optional[int] = typer.Option(None, min=1, help="Budget in candidates "
                                              "(overrides search.evaluations)."),
    seconds: Optional[float] = typer.Option(None, min=0.0, help="Budget in wall-clock seconds "
                                            "(overrides search.seconds)."),
    seed: Optional[int] = typer.Option(None, help="Search seed (overrides search.seed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="Show the search space and settings first."),
) -> None:
    """Search RECIPE's search: space for the best merge; write best.yaml and the log into OUTPUT."""
    from mergesmith.search.driver import search as run_search
    from mergesmith.search.space import load_search

    problem = load_search(recipe)
    for name, value in (("evaluations", evaluations), ("seconds", seconds), ("seed", seed)):
        if value is not None:
            setattr(problem.settings, name, value)
    settings = problem.settings
    if verbose:
        err.print(f"{settings.optimizer}: {len(problem.space)} dimension(s), seed {settings.seed}, "
                  f"budget {settings.evaluations or '-'} candidate(s) / "
                  f"{settings.seconds or '-'} s", highlight=False)
        for dim in problem.space.dimensions:
            values = dim.choices or f"{dim.low:g}..{dim.high:g} {dim.scale}"
            err.print(f"  {dim.name}: {values}", highlight=False, markup=False)
    result = run_search(problem, output, workers=workers, ray_address=ray_address, resume=resume,
                        progress=not quiet)
    if result.best is None:
        raise MergesmithError(f"every candidate failed; see {output / 'candidates.jsonl'}",
                              hint="the log's error field says why for each")
    scores = ", ".join(f"{s:.4g}" for s in result.best["scores"])
    err.print(f"best: candidate {result.best['id']} ({scores}) of {result.candidates}, "
              f"{60 * result.candidates / max(result.seconds, 1e-9):.1f} candidates/min; "
              f"stopped on {result.stopped}", highlight=False)
    err.print("wrote " + ", ".join(str(f) for f in result.files.values()), highlight=False)


@app.command("analyze")
def analyze_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML whose models to analyse (nothing is merged)."),
    output: Path = typer.Argument(..., help="Folder for summary.json, tensors.jsonl, plots, "
                                  "report.md and report.html."),
    merged: Optional[Path] = typer.Option(None, help="A merge of the recipe: measure it against "
                                          "the task vectors too."),
    density: Optional[float] = typer.Option(None, help="Density of the top-k masks and of the "
                                            "drops (default: the recipe's, else 0.2)."),
    rank: int = typer.Option(32, "--rank", min=1, help="Singular values kept of larger matrices "
                             "(a randomized SVD); smaller ones get their whole spectrum."),
    seed: Optional[int] = typer.Option(None, help="Seed of DARE's and DELLA's draws (default: "
                                       "the recipe's, else 0)."),
    allow_crimes: bool = typer.Option(False, "--allow-crimes/--no-allow-crimes",
                                      help="As for merge."),
    overwrite: bool = typer.Option(False, help="Write into OUTPUT even if it is not empty."),
    chunk_size: str = typer.Option("8MiB", help="Rows read at once, in fp32 bytes per input "
                                   "(as for merge)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Task-vector statistics of a recipe's models: norms, cosines, sign conflicts, top-k
    overlap, spectra, what each sparsifying method would drop; per tensor, layer and model."""
    from mergesmith.analyze import analyze

    path = analyze(recipe, output, merged=merged, density=density, max_rank=rank, seed=seed,
                   allow_crimes=allow_crimes, overwrite=overwrite, progress=not quiet,
                   chunk_size=chunk_size)
    if not quiet:
        err.print(f"report: {path / 'report.html'} (and report.md)  figures: "
                  f"{path / 'summary.json'}", highlight=False)


@app.command("negate")
def negate_command(
    forget: str = typer.Argument(..., help="The base fine-tuned on what to remove (θ_forget)."),
    output: Path = typer.Argument(..., help="Folder for negation.json/.md, negated.yaml, model/."),
    base: str = typer.Option(..., help="The base model θ0 (τ_f = θ_forget − θ0)."),
    target: Optional[str] = typer.Option(None, help="The model to remove it from (default: the base)."),
    forget_tasks: list[Path] = typer.Option(..., "--forget-task", help="A task the negation should "
                                            "lose; repeat for more."),
    control_tasks: list[Path] = typer.Option(..., "--control-task", help="A task it must keep; λ is "
                                             "chosen by these. Repeat for more."),
    lambdas: str = typer.Option("0.1:1:0.1", help="λ values: START:STOP:STEP or V1,V2,... (0 is added)."),
    floor: float = typer.Option(0.95, help="Share of the original's control score to keep (paper: 0.95)."),
    split: str = typer.Option("validation", help="The split λ is chosen on."),
    report_split: str = typer.Option("test", help="The split the chosen λ is reported on."),
    in_memory: bool = typer.Option(True, help="Merge each λ in memory (no folder per λ)."),
    model: bool = typer.Option(True, help="Write the negated model at the chosen λ to OUTPUT/model."),
    batch_size: int = typer.Option(32, help="Examples per forward pass."),
    device: str = typer.Option("cpu", help="Where to merge and evaluate."),
    max_examples: Optional[int] = typer.Option(None, help="Score only the first N examples of a split."),
) -> None:
    """Forget by task-vector negation: θ_target − λ(θ_forget − θ0) for each λ; the largest λ that
    keeps every control task above the floor is chosen; a forgetting report says what the
    forget tasks lose and what the control tasks keep."""
    from mergesmith.search import parse_grid
    from mergesmith.search.negation import negate

    result = negate(forget, base=base, target=target, forget_tasks=forget_tasks,
                    control_tasks=control_tasks, lambdas=parse_grid(f"lambda={lambdas}")[1],
                    out=output, floor=floor, select_split=split, report_split=report_split,
                    in_memory=in_memory, device=device, batch_size=batch_size,
                    max_examples=max_examples, write_model=model,
                    progress=lambda line: err.print(line, highlight=False))
    out.print(result.to_markdown(), highlight=False)
    err.print("wrote " + ", ".join(str(f) for f in result.files.values()), highlight=False)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("mergesmith-demo"), "--out", help="Folder for the report and plots."),
    fast: bool = typer.Option(False, help="Tiny random model, two tasks, a few steps (seconds)."),
    seed: int = typer.Option(0, help="Seed for training, merging and the bootstrap."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default $MERGESMITH_CACHE, "
                                         "else ~/.cache/mergesmith)."),
    method: Optional[list[str]] = typer.Option(None, help="Only these methods (repeatable); "
                                               "`search` adds a time-bounded CMA-ES search row."),
    every: bool = typer.Option(False, "--all", help="Every method (default: a representative ten)."),
    adapters: bool = typer.Option(False, "--adapters", help="The experts as LoRA adapters: merged by "
                                  "the adapter methods and, as base+adapter, by the others."),
) -> None:
    """Fine-tune an expert per task from a real pretrained model, merge them with ten
    representative methods (--all: every method), and print the leaderboard (no download: model
    and data ship with the package)."""
    import time

    from mergesmith.demo import search_row
    from mergesmith.embedded.assets import cache_dir
    from mergesmith.demo.leaderboard import demo_methods, rich_table, run_leaderboard
    from mergesmith.embedded.world import prepare_demo

    start = time.perf_counter()

    def say(message: str) -> None:
        err.print(message, highlight=False, markup=False)

    if adapters:
        from mergesmith.demo.adapters import DEFAULT_ADAPTER_METHODS, run_adapter_leaderboard

        methods = demo_methods(method, every, DEFAULT_ADAPTER_METHODS)
        board = run_adapter_leaderboard(out_dir, fast=fast, seed=seed, cache=cache, methods=methods, say=say)
    else:
        methods = demo_methods(method, every)
        setup = prepare_demo(fast=fast, seed=seed, cache=cache)
        root = cache_dir(cache) / ("leaderboard-fast" if fast else "leaderboard")
        board = run_leaderboard(setup.base, setup.experts, setup.tasks, out_dir, cache=root, seed=seed,
                                methods=methods, say=say,
                                search_seconds=search_row.FAST_SECONDS if fast else search_row.SECONDS)
    Console(width=max(out.width, 170)).print(rich_table(board))
    err.print(f"report: {board.files['markdown']}  plots: {board.files['plot']}"
              f"{'  ' + str(board.files['sweep']) if 'sweep' in board.files else ''}  "
              f"({time.perf_counter() - start:.0f} s)", highlight=False)
