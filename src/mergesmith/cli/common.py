"""What every command module shares: the app, the consoles, and small helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from mergesmith.errors import MergesmithError


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge fine-tuned Hugging Face models with any method, tensor by tensor.")


out = Console()


err = Console(stderr=True)


_state = {"debug": False}


COMPAT_HELP = ("mergekit: reproduce mergekit 0.1.5's arithmetic (its compute dtype, sign ties, "
               "rescale, selections); none: the papers' definitions (default: the recipe's compat:).")


def _ray_options(ray: bool, workers: int | None, address: str | None) -> dict:
    """merge's keywords for --ray, --workers and --ray-address (none without them)."""
    import os

    if not ray and address is None:
        if workers is not None:
            raise MergesmithError("--workers sets the number of Ray workers: it goes with --ray",
                                  hint="add --ray, or drop --workers (-j sets torch's threads)")
        return {}
    return {"workers": workers or os.cpu_count() or 1, "ray_address": address}


TASKS_HELP = "A task.yaml (or its folder); repeat for more tasks."


EXPERT_HELP = "TASK=MODEL: the task's expert, to normalize scores by; repeat for each task."


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


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"
