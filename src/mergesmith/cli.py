"""The `mergesmith` command: each subcommand is a thin call into the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mergesmith import __version__
from mergesmith.engine.allocator import keep_freed_memory
from mergesmith.errors import MergesmithError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge fine-tuned Hugging Face models with any method, tensor by tensor.")
out = Console()
err = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"mergesmith {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show a traceback on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _state["debug"] = debug


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit's format is accepted)."),
    output: Path = typer.Argument(..., help="Folder to write; appears only when complete."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB, 250MB."),
    device: str = typer.Option("cpu", help="Where to compute: cpu, cuda, cuda:1."),
    seed: Optional[int] = typer.Option(None, help="Seed for randomized methods (default: recipe's, else 0)."),
    resume: bool = typer.Option(False, help="Continue an interrupted merge into OUTPUT."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    chunk_size: str = typer.Option("8MiB", help="Rows merged at once, in fp32 bytes per input."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge the models of RECIPE into OUTPUT (collecting data statistics first if the method needs them)."""
    from mergesmith.calibrate.pipeline import merge as run_merge, plan

    the_plan = plan(recipe, seed=seed, shard_size=shard_size)  # every error before any work
    for warning in the_plan.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    # the recipe itself: for a data-aware method the plan above stands in a plain average
    path = run_merge(recipe, output, shard_size=shard_size, device=device, seed=seed,
                     resume=resume, overwrite=overwrite, chunk_size=chunk_size,
                     progress=not quiet)
    if not quiet:
        err.print(f"wrote {path}", highlight=False)


@app.command()
def check(
    recipe: Path = typer.Argument(..., help="Recipe YAML to validate."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, as for merge."),
    chunk_size: str = typer.Option("8MiB", help="As for merge; sets the memory estimate."),
) -> None:
    """Validate RECIPE against the models' headers and show the plan; writes nothing."""
    from mergesmith.calibrate.pipeline import plan
    from mergesmith.engine.api import parse_size
    from mergesmith.methods import get_method
    from mergesmith.recipe import load_recipe

    loaded = load_recipe(recipe)
    the_plan = plan(loaded, shard_size=shard_size)
    method = get_method(loaded.merge_method)
    table = Table(show_header=False, box=None)
    table.add_row("method", f"{method.name} — {method.summary}{_data_needs(method)}")
    for ref, ck in the_plan.models.items():
        table.add_row("model", f"{ref}  ({len(ck.tensors)} tensors)")
    table.add_row("output tensors", str(len(the_plan.jobs)))
    table.add_row("output size", _bytes(the_plan.total_bytes))
    table.add_row("output shards", str(len(the_plan.shards)))
    table.add_row("est. peak memory", _bytes(the_plan.peak_memory(parse_size(chunk_size))))
    table.add_row("seed", str(the_plan.seed))
    out.print(table)
    for warning in the_plan.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    out.print("[green]ok[/]: the recipe is valid and the models fit together")


@app.command()
def methods() -> None:
    """List every merge method with what it needs and its parameters."""
    from mergesmith.methods import all_methods

    table = Table(title="merge methods", show_lines=True)
    for column in ("method", "needs", "parameters", "what it does"):
        table.add_column(column)
    for spec in all_methods():
        models = (f"{spec.min_models}" if spec.min_models == spec.max_models
                  else f"{spec.min_models}+" if spec.max_models is None
                  else f"{spec.min_models}-{spec.max_models}")
        needs = ("base + " if spec.needs_base else "\\[base] + " if spec.optional_base else "") + \
            f"{models} model(s)" + _data_needs(spec)
        params = "\n".join(
            f"{p.name}{' (per model)' if p.per_model else ''}"
            f"{'' if p.required else f' = {p.default}'}" for p in spec.params
        )
        table.add_row(spec.name, needs, params or "-", f"{spec.summary}\n[dim]{spec.paper}[/]")
    out.print(table)


def _data_needs(spec) -> str:
    if spec.learn is not None:
        return "\nneeds data (learns on it)"
    if spec.router:
        return "\nneeds data (trains a router)"
    if spec.statistics == ("second_moment",):
        return "\nneeds optimizer state"
    if spec.statistics:
        return f"\n{'data optional' if spec.optional_statistics else 'needs data'} ({', '.join(spec.statistics)})"
    return ""


TASKS_HELP = "A task.yaml (or its folder); repeat for more tasks."
EXPERT_HELP = "TASK=MODEL: the task's expert, to normalize scores by; repeat for each task."


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


def _pairs(items: list[str], option: str) -> dict[str, str]:
    """['task=model', ...] -> {task: model}."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise MergesmithError(f"{option} {item!r}: expected TASK=MODEL")
        pairs[key] = value
    return pairs


def _write_report(report, json_path: Optional[Path], markdown: Optional[Path]) -> None:
    if json_path:
        report.to_json(json_path)
        err.print(f"wrote {json_path}", highlight=False)
    if markdown:
        markdown.write_text(report.to_markdown())
        err.print(f"wrote {markdown}", highlight=False)


emr_app = typer.Typer(no_args_is_help=True,
                      help="EMR-merging: rebuild a task's model from a merge made with emr.")
app.add_typer(emr_app, name="emr")


@emr_app.command("apply")
def emr_apply(
    merged: Path = typer.Argument(..., help="Folder written by a merge with merge_method: emr."),
    task: str = typer.Argument(..., help="The task's model as the recipe names it, or its index."),
    output: Path = typer.Argument(..., help="Folder to write; appears only when complete."),
    base: Optional[Path] = typer.Option(None, help="The base model's folder, if it moved since the merge."),
    resume: bool = typer.Option(False, help="Continue an interrupted apply into OUTPUT."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Write TASK's model θ0 + λ·M ⊙ τ_uni, rebuilt from the EMR merge in MERGED, to OUTPUT."""
    from mergesmith.engine.emr import apply_emr

    path = apply_emr(merged, task, output, base=base, resume=resume, overwrite=overwrite)
    if not quiet:
        err.print(f"wrote {path}", highlight=False)


twin_app = typer.Typer(no_args_is_help=True,
                       help="Twin-Merging: route inputs, or write the model for fixed routing.")
app.add_typer(twin_app, name="twin")


@twin_app.command("apply")
def twin_apply(
    merged: Path = typer.Argument(..., help="Folder written by a merge with merge_method: twin."),
    output: Path = typer.Argument(..., help="Folder to write; appears only when complete."),
    task: Optional[str] = typer.Option(None, help="Route everything to this expert (its name "
                                       "in the recipe, or its index)."),
    weights: Optional[str] = typer.Option(None, help="Fixed routing weights, one per expert, "
                                          "comma-separated."),
    resume: bool = typer.Option(False, help="Continue an interrupted apply into OUTPUT."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Write θ* + Σ w_t v_t, for one task (--task) or fixed weights (--weights), to OUTPUT."""
    from mergesmith.engine.twin import apply_twin

    mix = None
    if weights is not None:
        try:
            mix = [float(w) for w in weights.split(",")]
        except ValueError:
            raise MergesmithError(f"--weights: not numbers: {weights!r}",
                                  hint="write them like 0.7,0.2,0.1") from None
    path = apply_twin(merged, output, task=task, weights=mix, resume=resume, overwrite=overwrite)
    if not quiet:
        err.print(f"wrote {path}", highlight=False)


@twin_app.command("route")
def twin_route(
    merged: Path = typer.Argument(..., help="Folder written by a merge with merge_method: twin."),
    texts: list[str] = typer.Argument(..., help="Inputs to route."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
) -> None:
    """Print each text's routing weights over the experts."""
    from mergesmith.calibrate.router import route_texts
    from mergesmith.engine.twin import read_index

    tasks = read_index(merged)["tasks"]
    weights = route_texts(merged, texts, device=device)
    for text, row in zip(texts, weights.tolist()):
        mix = "  ".join(f"{task}={w:.3f}" for task, w in zip(tasks, row))
        print(f"{mix}  {text[:60]!r}")


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("mergesmith-demo"), "--out", help="Folder for the report and plots."),
    fast: bool = typer.Option(False, help="Tiny random model, two tasks, a few steps (seconds)."),
    seed: int = typer.Option(0, help="Seed for training, merging and the bootstrap."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default $MERGESMITH_CACHE, "
                                         "else ~/.cache/mergesmith)."),
    method: Optional[list[str]] = typer.Option(None, help="Only these methods (repeatable)."),
) -> None:
    """Fine-tune an expert per task from a real pretrained model, merge them with every method,
    and print the leaderboard (no download: model and data ship with the package)."""
    import time

    from mergesmith.demo.assets import cache_dir
    from mergesmith.demo.leaderboard import rich_table, run_leaderboard
    from mergesmith.demo.run import prepare_demo

    start = time.perf_counter()
    setup = prepare_demo(fast=fast, seed=seed, cache=cache)
    root = cache_dir(cache) / ("leaderboard-fast" if fast else "leaderboard")
    board = run_leaderboard(setup.base, setup.experts, setup.tasks, out_dir, cache=root, seed=seed,
                            methods=method, say=lambda m: err.print(m, highlight=False, markup=False))
    Console(width=max(out.width, 170)).print(rich_table(board))
    err.print(f"report: {board.files['markdown']}  plots: {board.files['plot']}"
              f"{'  ' + str(board.files['sweep']) if 'sweep' in board.files else ''}  "
              f"({time.perf_counter() - start:.0f} s)", highlight=False)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


def main() -> None:
    keep_freed_memory()  # every command allocates and frees large tensors over and over
    argv = sys.argv[1:]
    if "--debug" in argv:  # accepted anywhere on the line, not only before the command
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    try:
        app(args=argv, prog_name="mergesmith", standalone_mode=False)
    except MergesmithError as exc:
        if _state["debug"]:
            raise
        # plain print: one line however narrow the terminal, easy to grep in logs
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; rerun the same command with --resume to continue", highlight=False)
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except Exception as exc:  # click's usage errors come through here with standalone_mode off
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
