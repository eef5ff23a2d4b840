"""What a finished (or stopped) search leaves in OUT, computed from its log of candidates.

- best.yaml: the best candidate's plain recipe (space.recipe(x)); `mergesmith merge` reproduces
  the model the search scored. With several objectives "best" is the highest mean score.
- pareto.json and front.png (several objectives): the candidates no other candidate dominates.
- convergence.png: every candidate's score and the best so far, by candidate id.
- summary.json: candidates, evaluations, failures, seconds, candidates per minute, best scores.
- result.yaml, and `result` in summary.json: the answer of an optimizer that has its own
  (`outcome()`: nested MAP's last merge of its tree, with the tree).

Only full-fidelity scores compete; ties go to the earlier candidate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mergesmith.search.optimizers import non_dominated


def write_outputs(problem, out: Path, records: list[dict], *, seconds: float, stopped: str,
                  generations: int, outcome: tuple[np.ndarray, dict] | None = None):
    from mergesmith.search.driver import SearchResult

    full = [r for r in records if r["fidelity"] == 1.0 and r["scores"] is not None]
    candidates = len({r["id"] for r in records})
    files: dict[str, Path] = {}
    best, pareto = None, []
    if full:
        values = np.array([r["scores"] for r in full], dtype=float)
        means = values.mean(axis=1)
        best = _entry(full[int(np.argmax(means))])  # argmax: the first of equal scores
        files["best"] = out / "best.yaml"
        files["best"].write_text(problem.space.recipe(np.array(best["x"])).to_yaml())
        if values.shape[1] > 1:
            pareto = [_entry(full[i]) for i in non_dominated(values)]
            files["pareto"] = _json(out / "pareto.json", pareto)
            files["front"] = plot_front(values, np.array([e["scores"] for e in pareto]),
                                        out / "front.png")
        files["convergence"] = plot_convergence([r["id"] for r in full], means,
                                                out / "convergence.png", values.shape[1])
    summary = {
        "optimizer": problem.settings.optimizer, "seed": problem.settings.seed,
        "stopped": stopped, "generations": generations, "candidates": candidates,
        "evaluations": len(records), "failed": sum(r["scores"] is None for r in records),
        "seconds": round(seconds, 3),
        "candidates_per_minute": round(60 * candidates / seconds, 3) if seconds > 0 else None,
        "best": best and {"id": best["id"], "scores": best["scores"], "params": best["params"]},
        "pareto": len(pareto) or None,
    }
    if outcome is not None:
        point, summary["result"] = outcome
        files["result"] = out / "result.yaml"
        files["result"].write_text(problem.space.recipe(point).to_yaml())
    files["summary"] = _json(out / "summary.json", summary)
    return SearchResult(out=out, best=best, pareto=pareto, candidates=candidates,
                        evaluations=len(records), seconds=seconds, stopped=stopped, files=files)


def _entry(record: dict) -> dict:
    return {key: record[key] for key in ("id", "x", "params", "scores")}


def _json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def plot_convergence(ids: list[int], scores: np.ndarray, path: Path, objectives: int = 1) -> Path:
    from mergesmith.evaluate.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(ids, scores, s=10, color="#9aa9c2", label="candidate")
    ax.step(ids, np.maximum.accumulate(scores), where="post", color="#4c72b0",
            label="best so far")
    ax.set_xlabel("candidate")
    ax.set_ylabel(f"score (mean of {objectives} objectives)" if objectives > 1 else "score")
    ax.set_title("search convergence")
    ax.legend(loc="lower right")
    return _save(fig, plt, path)


def plot_front(values: np.ndarray, front: np.ndarray, path: Path) -> Path:
    """The first two objectives: every candidate, and the Pareto set highlighted."""
    from mergesmith.evaluate.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(values[:, 0], values[:, 1], s=10, color="#9aa9c2", label="candidate")
    order = np.argsort(front[:, 0])
    ax.plot(front[order, 0], front[order, 1], "o-", color="#c44e52", label="Pareto set")
    ax.set_xlabel("objective 1")
    ax.set_ylabel("objective 2")
    more = f" (of {values.shape[1]})" if values.shape[1] > 2 else ""
    ax.set_title(f"Pareto front, objectives 1 and 2{more}")
    ax.legend(loc="lower left")
    return _save(fig, plt, path)
