"""The `mergesmith` command: each subcommand is a thin call into the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mergesmith import __version__
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
    chunk_size: str = typer.Option("16MiB", help="Rows merged at once, in fp32 bytes per input."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge the models of RECIPE into OUTPUT."""
    from mergesmith.engine.api import merge as run_merge, plan

    the_plan = plan(recipe, seed=seed, shard_size=shard_size)
    for warning in the_plan.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    path = run_merge(the_plan.recipe, output, shard_size=shard_size, device=device, seed=seed,
                     resume=resume, overwrite=overwrite, chunk_size=chunk_size,
                     progress=not quiet)
    if not quiet:
        err.print(f"wrote {path}", highlight=False)


@app.command()
def check(
    recipe: Path = typer.Argument(..., help="Recipe YAML to validate."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, as for merge."),
    chunk_size: str = typer.Option("16MiB", help="As for merge; sets the memory estimate."),
) -> None:
    """Validate RECIPE against the models' headers and show the plan; writes nothing."""
    from mergesmith.engine.api import parse_size, plan

    the_plan = plan(recipe, shard_size=shard_size)
    table = Table(show_header=False, box=None)
    table.add_row("method", f"{the_plan.method.name} — {the_plan.method.summary}")
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
            f"{models} model(s)"
        params = "\n".join(
            f"{p.name}{' (per model)' if p.per_model else ''}"
            f"{'' if p.required else f' = {p.default}'}" for p in spec.params
        )
        table.add_row(spec.name, needs, params or "-", f"{spec.summary}\n[dim]{spec.paper}[/]")
    out.print(table)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


def main() -> None:
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
