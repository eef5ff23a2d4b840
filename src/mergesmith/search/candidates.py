"""Cheap candidates: a search's models read once, each candidate merged into one model in place.

A search merges hundreds of recipes over the same few models. `CandidateMerger` reads every input
tensor once and keeps it (in its stored dtype: the models' size on disk, in memory), builds the
model once, and merges each candidate into that model's own parameters: no folder is written, no
file read again. The merge is the engine's, unit by unit (engine/memory.py), so a candidate's
weights are those `mergesmith merge` writes for its recipe, bit for bit.

`SearchWorker` is what one process (or Ray actor) holds: the merger and the fitness, built once
from the search problem; it turns a Candidate (a point of the space) into an Evaluation.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.engine.memory import model_targets, merge_tensors
from mergesmith.engine.plan import Plan
from mergesmith.engine.run import DEFAULT_CHUNK_BYTES
from mergesmith.errors import MergesmithError
from mergesmith.io import Checkpoint
from mergesmith.io.adapted import open_input
from mergesmith.recipe import Recipe, load_recipe


class InputCache:
    """Input tensors by where they live (file and offset), each read from its file once and
    kept in its stored dtype. Called as an engine tensor source (engine/memory.py)."""

    def __init__(self):
        self.tensors: dict[tuple, torch.Tensor] = {}
        self.reads = 0  # tensors read from files

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __call__(self, ck: Checkpoint, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        info = ck.tensors[name]
        # a `base+adapter` input shares its base's files: the adapter is part of where it lives
        adapter = getattr(ck, "adapter", None)
        key = (str(info.file), info.offset, name, str(adapter.path) if adapter else None)
        tensor = self.tensors.get(key)
        if tensor is None:
            tensor = self.tensors[key] = ck.read(name)
            self.reads += 1
        return tensor if rows is None else tensor[rows[0]:rows[1]]

    def read_all(self, ck: Checkpoint) -> None:
        for name in ck.tensors:
            self(ck, name, None)


class CandidateMerger:
    """Merges candidate recipes over one pool of models into one model, in place.

    `recipe` names the pool (its base and models, or slices' sources), whose tensors are all read
    now. A candidate may use any of them, with any method, parameters, slices or dtype; a model
    outside the pool is read on first use and kept too. `chunk_bytes` must be the `--chunk-size`
    of the `mergesmith merge` the candidates are compared with (its default by default); `seed`
    overrides the recipes' own, as `--seed` does.
    """

    def __init__(self, recipe: Recipe | str | Path | dict, device: str = "cpu", *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, seed: int | None = None):
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        self.device, self.chunk_bytes, self.seed = device, chunk_bytes, seed
        self.inputs = InputCache()
        self._model: tuple[str, Any, Any, dict] | None = None  # (config key, module, tokenizer, targets)
        opened: dict = {}
        for ref in pool(recipe):
            self.inputs.read_all(open_input(ref, opened, recipe.base_model))

    def plan(self, recipe: Recipe | str | Path | dict) -> Plan:
        """The candidate's plan (headers only), with a data-aware method's statistics in place
        (collected once, then cached on disk by the pipeline)."""
        from mergesmith.pipeline import merge_plan

        return merge_plan(recipe, device=self.device, seed=self.seed)

    def tensors(self, recipe: Recipe | str | Path | dict) -> dict[str, torch.Tensor]:
        """The merged state dict (output names, output dtype, on the CPU): the folder's tensors."""
        return merge_tensors(self.plan(recipe), device=self.device, source=self.inputs,
                             chunk_bytes=self.chunk_bytes)

    def merge(self, recipe: Recipe | str | Path | dict):
        """(module, tokenizer): the model built once, its weights overwritten with the merge.
        The module is in float32, as evaluate loads a merged folder; the next merge overwrites
        it again."""
        the_plan = self.plan(recipe)
        module, tokenizer, targets = self._skeleton(the_plan)
        merge_tensors(the_plan, device=self.device, source=self.inputs,
                      chunk_bytes=self.chunk_bytes, into=targets)
        return module, tokenizer

    def _skeleton(self, the_plan: Plan):
        """A model built from the merged config, reused while the config stays the same (a
        layer-stacking search builds one per depth it tries)."""
        config_key = json.dumps(the_plan.config, sort_keys=True)
        if self._model is None or self._model[0] != config_key:
            self._model = None  # let the old model go before the new one is built
            module, tokenizer = build_model(the_plan, self.device)
            targets = model_targets(module, [job.out.name for job in the_plan.jobs])
            self._model = (config_key, module, tokenizer, targets)
        return self._model[1:]


def pool(recipe: Recipe) -> list[str]:
    """The models whose weights a recipe merges: its base and every model or slice source."""
    refs = [recipe.base_model] if recipe.base_model else []
    for section in [recipe, *(recipe.modules or {}).values()]:
        refs += [m.model for m in section.models or []]
        for piece in section.slices or []:
            refs += [s.model for s in piece.sources] + [piece.base_model]
    return [ref for ref in dict.fromkeys(refs) if ref]


def build_model(the_plan: Plan, device: str = "cpu"):
    """(module, tokenizer): an untrained model of the plan's output config, in float32, in
    eval mode, with the tokenizer of the model the config comes from."""
    import transformers as tf
    from transformers.initialization import no_init_weights

    from mergesmith.evaluate.run import quiet_transformers

    if the_plan.vocab is not None:
        raise MergesmithError("in-memory merging keeps the first model's tokenizer; this recipe "
                              "changes the vocabulary", hint="merge it to a folder (drop --in-memory)")
    config = the_plan.config
    arch = (config.get("architectures") or [""])[0]
    cls = getattr(tf, arch, None)
    if cls is None:
        raise MergesmithError(f"{the_plan.config_source.label}: config.json names no known "
                              "architecture, which in-memory merging needs to build the model",
                              hint="merge it to a folder (drop --in-memory)")
    # every parameter is overwritten by the merge (model_targets checks it): no random init,
    # which costs more than the merge when a layer-stacking search builds a model per depth
    with quiet_transformers():
        with no_init_weights():
            module = cls(cls.config_class.from_dict(config))
        module.tie_weights()  # an output head that is the input embedding (skipped with the init)
        module = module.to(device)
    tokenizer = tf.AutoTokenizer.from_pretrained(the_plan.config_source.path)
    return module.eval(), tokenizer


# --- the search's unit of work ----------------------------------------------------------------


@dataclass
class Candidate:
    id: int
    x: list[float]  # the point in [0, 1]^d
    fidelity: float = 1.0  # the share of the validation examples to score on
    seed: int = 0  # handed to the fitness (the merge takes the recipe's own seed)


@dataclass
class Evaluation:
    id: int
    scores: list[float] | None  # one per objective, higher is better; None: failed
    error: str | None = None
    per_example: list[float] | None = None
    fidelity: float = 1.0
    seconds: float = 0.0


class SearchWorker:
    """The models and the fitness of one search, loaded once; evaluates candidates.

    `problem` is SearchProblem.to_dict() (search/space.py). A fitness that raises or gives a
    score that is not finite, and a candidate recipe the engine refuses (values beyond float16,
    say), give a failed Evaluation with the reason; the search goes on.
    """

    def __init__(self, problem: dict, device: str = "cpu"):
        from mergesmith.search.fitness import load_fitness
        from mergesmith.search.space import load_search

        self.problem = load_search(problem)
        self.space = self.problem.space
        base = Path(self.problem.source).parent if self.problem.source else None
        self.fitness = load_fitness(self.problem.settings.fitness, base)
        self.merger = CandidateMerger(self.problem.recipe, device)

    def __call__(self, candidate: Candidate) -> Evaluation:
        started = time.perf_counter()

        def failed(error: str) -> Evaluation:
            return Evaluation(candidate.id, None, error, fidelity=candidate.fidelity,
                              seconds=time.perf_counter() - started)

        try:
            model, tokenizer, tensors = self._build(self.space.recipe(candidate.x))
        except MergesmithError as exc:
            return failed(f"merge: {exc}")
        try:
            result = self.fitness(model, tokenizer, fidelity=candidate.fidelity,
                                  seed=candidate.seed, tensors=tensors)
        except Exception as exc:  # a user's fitness may raise anything; the search goes on
            where = traceback.extract_tb(exc.__traceback__)[-1]
            return failed(f"fitness raised {type(exc).__name__}: {exc} "
                          f"({Path(where.filename).name}:{where.lineno})")
        bad = [s for s in result.scores if not math.isfinite(s)]
        if bad or not result.scores:
            return failed(f"fitness returned {bad[0] if bad else 'no scores'} "
                          f"(scores {result.scores})")
        return Evaluation(candidate.id, [float(s) for s in result.scores], None,
                          result.per_example, candidate.fidelity, time.perf_counter() - started)

    def _build(self, recipe: Recipe):
        """(model, tokenizer, tensors): what the fitness reads, and only that."""
        model = tokenizer = tensors = None
        if getattr(self.fitness, "wants_model", True):
            model, tokenizer = self.merger.merge(recipe)
        if getattr(self.fitness, "wants_tensors", False):
            tensors = self.merger.tensors(recipe)
        return model, tokenizer, tensors

