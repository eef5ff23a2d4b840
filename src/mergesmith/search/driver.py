"""The search loop: ask a generation, evaluate its candidates on the workers, tell, checkpoint.

OUT holds search.yaml (the problem), candidates.jsonl (every evaluation, appended as it
finishes), state.pkl (the optimizer and counters, replaced atomically after each generation)
and, at the end, best.yaml, pareto.json + front.png (several objectives), convergence.png and
summary.json (see search/outputs.py).

Resume: state.pkl holds the optimizer as it was after its last complete generation; asked
again it proposes the same points, and evaluations that candidates.jsonl already holds for
them (a generation cut short by a crash or a budget) are reused, not run again (and stay in
the log where they are). So a resumed search ends where the uninterrupted one ends, and a
resume with a larger budget continues it.

Budgets: `evaluations` counts candidates (a re-score at full fidelity is not a new candidate),
and is never exceeded: the last generation is cut to what is left. `seconds` is checked before
each task batch. A generation that is cut short is not told to the optimizer (the search ends).

Multi-fidelity (settings.fidelity = {start: f, keep: q}): every candidate of a generation is
scored at fidelity f, the best ceil(q·n) by mean score are scored again at fidelity 1. The
optimizer is told the full-fidelity scores of those, and the low-fidelity scores of the others
capped (per objective) at the lowest full-fidelity score among the kept ones, so that every
candidate cut ranks below every candidate kept, as successive halving decided. Only
full-fidelity scores compete for the best recipe and the Pareto set.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mergesmith.errors import MergesmithError, OutputError
from mergesmith.search.optimizers import (FAILED_SCORE, get_optimizer, optimizer_objectives,
                                          told_scores)

STATE, LOG, PROBLEM = "state.pkl", "candidates.jsonl", "search.yaml"
# search: settings that may change between a search and its resume: the budgets, and where
# the recipe file was read from
RESUMABLE = ("evaluations", "seconds", "source")


@dataclass
class SearchResult:
    out: Path
    best: dict | None                 # {"id", "x", "params", "scores"} of the best candidate
    pareto: list[dict]                # the non-dominated candidates (several objectives)
    candidates: int
    evaluations: int                  # scorings, re-scores at full fidelity included
    seconds: float
    stopped: str                      # why the search ended
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class _State:
    optimizer: Any
    generation: int = 0
    next_id: int = 0
    seconds: float = 0.0
    objectives: int | None = None


def candidate_seed(seed: int, ident: int) -> int:
    """A candidate's seed from (search seed, candidate id): the same for any number of workers."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, ident]).generate_state(1)[0])


def search(problem, out: str | Path, *, workers: int = 1, ray_address: str | None = None,
           resume: bool = False, progress: bool = True, executor=None) -> SearchResult:
    """Run the search `problem` (a SearchProblem, or a recipe with a `search:` section as a path
    or dict) and write its results into `out`; `resume=True` continues a search stopped there.
    `executor` (anything with run(tasks, on_result) and close()) replaces the workers."""
    from mergesmith.search.outputs import write_outputs

    problem = _problem(problem)
    settings = problem.settings
    if settings.evaluations is None and settings.seconds is None:
        raise MergesmithError("search: no budget", hint="set search.evaluations or search."
                              "seconds in the recipe (or --evaluations / --seconds)")
    _fidelity(settings)  # every settings error before OUT is touched
    out = Path(out)
    state, pending = _open(problem, out, resume)
    own = executor is None
    if own:
        from mergesmith.parallel import make_executor
        from mergesmith.search.candidates import SearchWorker

        executor = make_executor(functools.partial(SearchWorker, problem.to_dict()), workers,
                                 ray_address)
    loop = _Loop(problem, out, state, pending, executor, progress)
    try:
        stopped = loop.run()
    finally:
        loop.close()
        if own:
            executor.close()
    records = read_log(out / LOG)
    if loop.pending:  # logged by a longer run than this one (its budget was cut on resume)
        records = [r for r in records if (r["id"], r["fidelity"]) not in loop.pending]
        _atomic_write(out / LOG, "".join(json.dumps(r) + "\n" for r in records).encode())
    outcome = getattr(loop.state.optimizer, "outcome", None)
    return write_outputs(problem, out, records, seconds=loop.elapsed(), stopped=stopped,
                         generations=state.generation, outcome=outcome and outcome())


def _problem(problem):
    if hasattr(problem, "space") and hasattr(problem, "settings"):
        return problem
    from mergesmith.search.space import load_search

    return load_search(problem)


class _Loop:
    def __init__(self, problem, out: Path, state: _State, pending: dict, executor, progress: bool):
        self.problem, self.settings, self.out = problem, problem.settings, out
        self.state, self.pending, self.executor = state, pending, executor
        self.kind = optimizer_objectives(self.settings.optimizer)
        self.started = time.monotonic()
        self.log = open(out / LOG, "a")
        self.bar = _Progress(self.settings, state.next_id) if progress else None

    def elapsed(self) -> float:
        return self.state.seconds + time.monotonic() - self.started

    def close(self) -> None:
        self.log.close()
        if self.bar:
            self.bar.stop()

    def run(self) -> str:
        budget = self.settings.evaluations
        while True:
            if budget is not None and self.state.next_id >= budget:
                return "evaluations"
            if self._out_of_time():
                return "seconds"
            if self.state.optimizer.done():
                return "optimizer"
            xs = [np.asarray(x, dtype=float) for x in self.state.optimizer.ask()]
            if not xs:
                return "optimizer"
            cut = budget is not None and self.state.next_id + len(xs) > budget
            if cut:
                xs = xs[:budget - self.state.next_id]
            told = self._generation(xs)
            if told is None or cut:  # the budget ran out inside it: told to no one
                return "seconds" if told is None else "evaluations"
            self._check_objectives(told)
            self.state.optimizer.tell(xs, told)
            self.state.generation += 1
            self.state.next_id += len(xs)
            self.state.seconds = self.elapsed()
            self.started = time.monotonic()
            _save_state(self.out, self.state)

    def _out_of_time(self) -> bool:
        return self.settings.seconds is not None and self.elapsed() >= self.settings.seconds

    def _generation(self, xs: list[np.ndarray]) -> list | None:
        """The evaluations to tell, one per point, or None if time ran out inside it."""
        from mergesmith.search.candidates import Candidate

        first, seed = self.state.next_id, self.settings.seed
        fidelity = _fidelity(self.settings)
        low = fidelity[0] if fidelity else 1.0
        candidates = [Candidate(id=first + i, x=[float(v) for v in x], fidelity=low,
                                seed=candidate_seed(seed, first + i)) for i, x in enumerate(xs)]
        scored = self._evaluate(candidates)
        if scored is None or not fidelity:
            return scored
        order = np.argsort(-told_scores(scored).mean(axis=1), kind="stable")
        kept = sorted(order[:math.ceil(fidelity[1] * len(xs))].tolist())
        again = [Candidate(id=candidates[i].id, x=candidates[i].x, fidelity=1.0,
                           seed=candidates[i].seed) for i in kept]
        full = self._evaluate(again)
        return None if full is None else _halving(scored, dict(zip(kept, full)))

    def _evaluate(self, candidates: list) -> list | None:
        results: dict[int, Any] = {}
        todo = []
        for i, c in enumerate(candidates):
            reused = self._reuse(c)
            if reused is None:
                todo.append(i)
            else:  # already in the log
                results[i] = reused
                if self.bar:
                    self.bar.add(reused.scores if c.fidelity == 1.0 else None, c.id + 1)
        if todo and self._out_of_time():
            return None

        def done(index: int, evaluation) -> None:
            results[todo[index]] = evaluation
            self._record(candidates[todo[index]], evaluation)

        if todo:
            self.executor.run([candidates[i] for i in todo], on_result=done)
        return [results[i] for i in range(len(candidates))]

    def _reuse(self, candidate):
        from mergesmith.search.candidates import Evaluation

        record = self.pending.pop((candidate.id, candidate.fidelity), None)
        if record is None:
            return None
        if record["x"] != candidate.x:
            raise OutputError(f"{self.out / LOG}: candidate {candidate.id} is not the point the "
                              "resumed search proposes", hint="the log belongs to another search; "
                              "resume with the same recipe and seed, or use a new OUT")
        return Evaluation(id=record["id"], scores=record["scores"], error=record["error"],
                          per_example=record.get("per_example"), fidelity=record["fidelity"],
                          seconds=record["seconds"])

    def _record(self, candidate, evaluation) -> None:
        if evaluation.id != candidate.id:
            raise MergesmithError(f"the executor returned candidate {evaluation.id} for "
                                  f"candidate {candidate.id}")
        scores, error = evaluation.scores, evaluation.error
        if scores is not None and not all(math.isfinite(s) for s in scores):
            scores = None  # NaN is a failure; the log stays valid JSON
            error = error or f"the fitness returned {list(evaluation.scores)}"
        record = {"id": candidate.id, "generation": self.state.generation,
                  "fidelity": candidate.fidelity, "seed": candidate.seed, "x": candidate.x,
                  "params": _plain(self.problem.space.decode(np.array(candidate.x))),
                  "scores": None if scores is None else [float(s) for s in scores],
                  "error": error,
                  "seconds": float(evaluation.seconds),
                  "per_example": evaluation.per_example}
        self.log.write(json.dumps(record, default=float) + "\n")  # numpy numbers as floats
        self.log.flush()
        os.fsync(self.log.fileno())
        if self.bar:
            self.bar.add(record["scores"] if candidate.fidelity == 1.0 else None,
                         candidate.id + 1)

    def _check_objectives(self, told: list) -> None:
        counts = {len(e.scores) for e in told if e.scores is not None}
        if self.state.objectives is not None:
            counts.add(self.state.objectives)
        if len(counts) > 1:
            raise MergesmithError(f"the fitness gave {sorted(counts)} objectives to different "
                                  "candidates", hint="a fitness returns the same number of "
                                  "scores for every candidate")
        if counts:
            self.state.objectives = counts.pop()
        if self.kind == "single" and (self.state.objectives or 1) > 1:
            raise MergesmithError(
                f"search.optimizer {self.settings.optimizer!r} optimizes one objective, and the "
                f"fitness gives {self.state.objectives}",
                hint="set fitness objectives: mean, or choose a multi-objective optimizer (nsga2)")


def _halving(low: list, full: dict[int, Any]) -> list:
    """Successive halving's result for the optimizer: the kept candidates' full-fidelity
    evaluations, and the others' low-fidelity ones capped below the kept ones."""
    floors = told_scores([e for e in full.values()])
    floors = floors[floors.max(axis=1) > FAILED_SCORE]
    told = []
    for i, evaluation in enumerate(low):
        if i in full:
            told.append(full[i])
        elif evaluation.scores is None or not len(floors):
            told.append(evaluation)
        else:
            capped = np.minimum(told_scores([evaluation])[0], floors.min(axis=0))
            told.append(_replace(evaluation, scores=[float(s) for s in capped]))
    return told


def _replace(evaluation, **changes):
    import dataclasses

    return dataclasses.replace(evaluation, **changes)


def _fidelity(settings) -> tuple[float, float] | None:
    spec = getattr(settings, "fidelity", None)
    if not spec:
        return None
    start, keep = spec.get("start", 1.0), spec.get("keep", 0.5)
    if not (0 < start <= 1) or not (0 < keep <= 1):
        raise MergesmithError(f"search.fidelity: start {start} and keep {keep} must lie in (0, 1]",
                              hint="e.g. fidelity: {start: 0.25, keep: 0.5}")
    return None if start == 1 else (float(start), float(keep))


def _plain(value):
    """Decoded values as JSON: numpy scalars and tuples to plain numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open(problem, out: Path, resume: bool) -> tuple[_State, dict]:
    """A fresh state, or the checkpoint and the evaluations logged after it (to reuse)."""
    spec = problem.to_dict()
    if (out / STATE).exists() or (out / LOG).exists():
        if not resume:
            raise OutputError(f"{out} already holds a search", hint="pass --resume to continue "
                              "it, or choose another OUT")
        if (out / STATE).exists():
            return _resume(problem, out, spec)
    settings = problem.settings
    optimizer = get_optimizer(settings.optimizer)(problem.space, settings, settings.seed)
    state = _State(optimizer)
    out.mkdir(parents=True, exist_ok=True)
    (out / PROBLEM).write_text(yaml.safe_dump(spec, sort_keys=False))
    (out / LOG).write_text("")
    _save_state(out, state)
    return state, {}


def _resume(problem, out: Path, spec: dict) -> tuple[_State, dict]:
    saved = yaml.safe_load((out / PROBLEM).read_text()) if (out / PROBLEM).exists() else None
    if _without_budgets(saved) != _without_budgets(spec):
        raise OutputError(f"{out / PROBLEM}: the search there differs from this one",
                          hint="resume with the same recipe and search settings (only the "
                          "budgets may change), or use a new OUT")
    (out / PROBLEM).write_text(yaml.safe_dump(spec, sort_keys=False))
    try:
        with open(out / STATE, "rb") as f:
            state = pickle.load(f)
    except Exception as exc:
        raise OutputError(f"{out / STATE}: unreadable checkpoint ({type(exc).__name__})",
                          hint="start the search again in a new OUT") from None
    budget = problem.settings.evaluations
    if budget is not None and budget < state.next_id:
        raise OutputError(f"{out}: the search there has evaluated {state.next_id} candidates, "
                          f"more than {budget}", hint=f"resume with at least {state.next_id} "
                          "evaluations, or start a new search in another OUT")
    text = (out / LOG).read_text() if (out / LOG).exists() else ""
    if not text.endswith("\n"):  # a line cut by the crash: new records start on a line of their own
        _atomic_write(out / LOG, text[:text.rfind("\n") + 1].encode())
    pending = {}
    for r in read_log(out / LOG):
        if r["id"] >= state.next_id:
            pending.setdefault((r["id"], r["fidelity"]), r)
    return state, pending


def _without_budgets(spec):
    if not isinstance(spec, dict) or not isinstance(spec.get("search"), dict):
        return spec
    search = {k: v for k, v in spec["search"].items() if k not in RESUMABLE}
    return {**spec, "search": search}


def read_log(path: Path) -> list[dict]:
    """Every record of candidates.jsonl; a last line cut by a crash is left out."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _save_state(out: Path, state: _State) -> None:
    _atomic_write(out / STATE, pickle.dumps(state))


def _atomic_write(path: Path, data: bytes) -> None:
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


class _Progress:
    """Candidates (or seconds) against the budget, the best score so far and the time left."""

    def __init__(self, settings, done: int):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.by_count = settings.evaluations is not None
        total = settings.evaluations if self.by_count else settings.seconds
        unit = "{task.completed:.0f}/{task.total:.0f} " + ("candidates" if self.by_count else "s")
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn(unit), TextColumn("best {task.fields[best]}"),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=False)
        self.best, self.done = -math.inf, done
        self.started = time.monotonic()
        self.task = self.progress.add_task(f"search ({settings.optimizer})", total=total,
                                           completed=done if self.by_count else 0, best="-")
        self.progress.start()

    def add(self, scores: list[float] | None, done: int) -> None:
        if scores is not None:
            self.best = max(self.best, float(np.mean(scores)))
        self.done = max(self.done, done)
        completed = self.done if self.by_count else time.monotonic() - self.started
        best = "-" if self.best == -math.inf else f"{self.best:.4g}"
        self.progress.update(self.task, completed=completed, best=best)

    def stop(self) -> None:
        self.progress.stop()
