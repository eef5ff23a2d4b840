"""PNG charts of a report and of a sweep (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mergesmith.errors import MergesmithError
from mergesmith.evaluate.report import Report

Point = tuple[float, float, float | None, float | None]  # (parameter value, score, lo, hi)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_normalized(report: Report, path: str | Path, title: str = "average normalized score") -> Path:
    """One bar per model: its average normalized score, with the 95% bootstrap interval."""
    plt = _pyplot()
    averages = [a for a in report.averages.values() if a.normalized is not None]
    if not averages:
        raise MergesmithError("the report has no normalized scores to plot",
                              hint="name each task's expert (--experts task=model)")
    averages.sort(key=lambda a: a.normalized)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(averages) + 1.5))
    values = [a.normalized for a in averages]
    errors = [[a.normalized - a.lo for a in averages], [a.hi - a.normalized for a in averages]]
    ax.barh([a.model for a in averages], values, xerr=errors, color="#4c72b0", capsize=3)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("normalized score (1 = the task's expert), 95% interval")
    ax.set_title(title)
    ax.set_xlim(left=min(0.0, min(a.lo for a in averages)))
    return _save(fig, plt, path)


def plot_sweep(points: Sequence[Point] | dict[str, Sequence[Point]], path: str | Path, *,
               xlabel: str = "parameter", ylabel: str = "average normalized score",
               title: str | None = None) -> Path:
    """Score against a swept parameter, with the interval shaded where given.

    `points` is one line's (value, score, lo, hi) list, or a dict of labelled lines (one per
    value of a second swept parameter).
    """
    plt = _pyplot()
    lines = points if isinstance(points, dict) else {"": points}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, line in lines.items():
        line = sorted(line, key=lambda p: p[0])
        xs, ys = [p[0] for p in line], [p[1] for p in line]
        drawn = ax.plot(xs, ys, marker="o", label=label or None)[0]
        if all(p[2] is not None and p[3] is not None for p in line):
            ax.fill_between(xs, [p[2] for p in line], [p[3] for p in line],
                            color=drawn.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if any(lines):
        ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
