"""Multi-stage recipes (mergekit-multi's form): several recipes in one YAML file, `---` between.

Each document but the final one has a `name:`; a later stage uses an earlier one by naming it as
a model. The final document is the one without a name (mergekit-multi writes it to --out-path),
else the last one; it goes to OUT, every other stage to `<intermediate dir>/<name>` (default: a
folder `<OUT>-stages` beside OUT). Stages run in dependency order; each is an ordinary merge, so
each is atomic (built in its .partial folder, renamed when complete) and resumable. A stage whose
folder is complete is skipped on a rerun, as mergekit-multi does; unlike it, a stage whose recipe
(or an input stage) changed since is refused rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mergesmith.errors import OutputError, RecipeError
from mergesmith.recipe import Recipe, load_stages

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # mergekit-multi's test of a finished stage
REF_KEYS = ("model", "base_model", "tokenizer_source", "source")  # fields that name a model


@dataclass
class Stage:
    name: str | None  # None: the final, unnamed document
    recipe: Recipe    # with the stages it uses replaced by their folders
    uses: list[str]
    target: Path
    key: str = ""     # the recipe's fingerprint and those of the stages it uses


def is_multi_stage(recipe: Any) -> bool:
    """Whether `recipe` is a file or YAML string holding more than one recipe document."""
    if isinstance(recipe, (Recipe, dict)):
        return False
    return len(load_stages(recipe)) > 1


def plan_stages(recipe: str | Path, out: str | Path,
                intermediate_dir: str | Path | None = None) -> list[Stage]:
    """The stages in the order they run, the final one last; every recipe and name checked."""
    docs = load_stages(recipe)
    out = Path(out).absolute()
    folder = Path(intermediate_dir).absolute() if intermediate_dir else out.with_name(f"{out.name}-stages")
    unnamed = [doc for doc in docs if not doc.name]
    if len(unnamed) > 1:
        raise RecipeError(f"{unnamed[1].where()}: a second recipe without a name; in a multi-stage "
                          "recipe only the final one may go without",
                          hint="give each intermediate stage a name: that later stages use as a model")
    final = unnamed[0] if unnamed else docs[-1]
    names: dict[str, Recipe] = {}
    for doc in docs:
        if doc.name in names:
            raise RecipeError(f"{doc.where('name')}: stage name {doc.name!r} is used twice")
        if doc.name:
            names[doc.name] = doc
    stages: dict[str | None, Stage] = {}
    for doc in docs:
        uses = [ref for ref in doc.model_refs() if ref in names]
        if doc.name in uses:
            raise RecipeError(f"{doc.where('name')}: stage {doc.name!r} uses itself as a model")
        if final.name in uses and doc is not final:
            raise RecipeError(f"{doc.where('name')}: stage {doc.name!r} uses {final.name!r}, the "
                              "final stage, which is written to OUT",
                              hint="the final stage is the one without a name, else the last one")
        target = out if doc is final else folder / doc.name
        stages[doc.name] = Stage(doc.name, _with_folders(doc, {n: folder / n for n in uses}),
                                 uses, target)
    order = _in_order(stages, docs)
    order.remove(stages[final.name])  # no stage uses it, so it may run last
    return order + [stages[final.name]]


def _with_folders(doc: Recipe, folders: dict[str, Path]) -> Recipe:
    """The recipe with each stage it uses replaced by that stage's folder."""
    if not folders:
        return doc

    def walk(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if key in REF_KEYS and isinstance(value, str) and value in folders:
            return str(folders[value])
        return value

    patched = Recipe.model_validate(walk(doc.model_dump(mode="json", exclude_unset=True)))
    patched._source, patched._lines = doc._source, doc._lines
    return patched


def _in_order(stages: dict[str | None, Stage], docs: list[Recipe]) -> list[Stage]:
    """Dependencies first, otherwise in the file's order; a cycle is an error."""
    done: list[Stage] = []
    placed: set = set()
    pending = [doc.name for doc in docs]
    while pending:
        ready = next((n for n in pending if all(u in placed for u in stages[n].uses)), ...)
        if ready is ...:  # (None names the final stage)
            stuck = stages[pending[0]]
            raise RecipeError(f"{stuck.recipe.where('name')}: stages {', '.join(map(repr, pending))} "
                              "use each other in a cycle")
        stage = stages[ready]
        inputs = [stages[u].key for u in stage.uses]
        stage.key = hashlib.sha256(json.dumps([stage.recipe.fingerprint(), inputs]).encode()).hexdigest()
        done.append(stage)
        placed.add(ready)
        pending.remove(ready)
    return done


def check_stages(recipe: str | Path, **options: Any) -> list[str]:
    """Every stage's recipe checked, and planned against its models where they exist already
    (a stage that uses another is planned when that one is merged): one line per stage."""
    from mergesmith import pipeline

    lines = []
    for stage in plan_stages(recipe, Path("OUT")):
        label = f"stage {stage.name!r}" if stage.name else "final stage"
        if stage.uses:
            lines.append(f"{label}: valid; uses {', '.join(map(repr, stage.uses))}, so its models "
                         "are checked when that is merged")
            continue
        the_plan = pipeline.plan(stage.recipe, **options)
        lines.append(f"{label}: {the_plan.method.name}, {len(the_plan.models)} model(s), "
                     f"{len(the_plan.jobs)} tensors: the models fit together")
    return lines


def _marker(stage: Stage) -> Path:
    return stage.target.with_name(f".{stage.target.name}.stage.json")


def _finished(stage: Stage) -> bool:
    folder = stage.target
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in WEIGHT_FILES)


def run_stages(recipe: str | Path, out: str | Path, *, intermediate_dir: str | Path | None = None,
               resume: bool = False, overwrite: bool = False,
               log: Callable[[str], None] | None = None, **options: Any) -> Path:
    """Run every stage of a multi-stage recipe (options as for `mergesmith.merge`); the final
    stage's folder is OUT, which is returned."""
    from mergesmith import pipeline

    stages = plan_stages(recipe, out, intermediate_dir)
    plan_options = {k: options[k] for k in ("seed", "shard_size", "compat", "allow_crimes") if k in options}
    # every stage that does not wait for another is checked before anything is merged
    for stage in stages:
        if not stage.uses and not (_finished(stage) and not overwrite):
            pipeline.plan(stage.recipe, **plan_options)
    for stage in stages:
        label = f"stage {stage.name!r}" if stage.name else "final stage"
        final = stage is stages[-1]
        if not final and not overwrite and _finished(stage):
            recorded = _read_marker(stage)
            if recorded is not None and recorded != stage.key:
                raise OutputError(f"{label}: {stage.target} was merged from another recipe (or "
                                  "from other inputs) than this one",
                                  hint="delete that folder, or pass --overwrite to merge every stage again")
            if log:
                log(f"{label}: already merged in {stage.target}, skipped")
            continue
        if log:
            log(f"{label}: merging into {stage.target}")
        partial = stage.target.with_name(f".{stage.target.name}.partial")
        pipeline.merge(stage.recipe, stage.target, resume=resume and partial.exists(),
                       overwrite=overwrite, **options)
        if not final:
            _write_marker(stage)
    return stages[-1].target


def _read_marker(stage: Stage) -> str | None:
    try:
        return json.loads(_marker(stage).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None  # merged by mergekit-multi, or by hand: taken as it is, as mergekit does


def _write_marker(stage: Stage) -> None:
    path = _marker(stage)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": stage.key}) + "\n")
    os.replace(tmp, path)
