"""`emr`, `twin` and `rmm`: rebuild or route from what a merge wrote beside its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mergesmith.cli.common import app, err
from mergesmith.errors import MergesmithError


"""The `mergesmith` command: each subcommand is a thin call into the library."""


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
    from mergesmith.engine.side_outputs.emr import apply_emr

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
    from mergesmith.engine.side_outputs.twin import apply_twin

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
    from mergesmith.engine.side_outputs.twin import read_index

    tasks = read_index(merged)["tasks"]
    weights = route_texts(merged, texts, device=device)
    for text, row in zip(texts, weights.tolist()):
        mix = "  ".join(f"{task}={w:.3f}" for task, w in zip(tasks, row))
        print(f"{mix}  {text[:60]!r}")


rmm_app = typer.Typer(no_args_is_help=True,
                      help="Reversible Model Merging: rebuild a task's adapter from an rmm merge.")


app.add_typer(rmm_app, name="rmm")


@rmm_app.command("apply")
def rmm_apply(
    merged: Path = typer.Argument(..., help="Adapter folder written by a merge with merge_method: rmm."),
    task: str = typer.Argument(..., help="The task's adapter as the recipe names it, or its index."),
    output: Path = typer.Argument(..., help="Folder to write; appears only when complete."),
    model: Optional[Path] = typer.Option(None, help="A base model folder: write the full model with "
                                         "the rebuilt adapter applied, not the adapter."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Write TASK's LoRA adapter, rebuilt from the RMM basis and coefficients in MERGED, to OUTPUT."""
    from mergesmith.engine.side_outputs.rmm import apply_rmm

    path = apply_rmm(merged, task, output, model=model, overwrite=overwrite)
    if not quiet:
        err.print(f"wrote {path}", highlight=False)
