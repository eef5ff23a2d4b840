"""Continual merging through the engine: a recipe whose merge_method is a continual rule
(methods/continual.py) merges its models one at a time from the base, or, with `--onto MERGED`
(`continual: {onto: MERGED}`), adds them to an earlier continual merge; either way the output
is a model folder plus its state (engine/side_outputs/continual.py), so the next model can
come later.

Every error comes before compute: the recipe's models are planned against each other and the
earlier merge like any task-arithmetic recipe (names, shapes, configs), and the earlier
merge's state against its weights, base and rule. Then each output tensor is computed from
the base's, the earlier merge's and the new models' tensors alone, as an engine program
(engine/program.py) streams it: one tensor in memory at a time, whatever the number of models.
OPCM's division by λ_t needs ‖S_t‖ over the whole model, so it reads everything once before
(each projected matrix's SVD twice; the norms pass keeps nothing but scalars).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from mergesmith.io import tensor_names as L
from mergesmith.engine.plan import TensorJob, build_plan
from mergesmith.engine.program import Output, Program, program_plan
from mergesmith.engine.side_outputs import continual as state_file
from mergesmith.errors import MergesmithError, RecipeError
from mergesmith.io.views import Entry, View
from mergesmith.io.checkpoint import TensorInfo
from mergesmith.methods import continual as rules
from mergesmith.recipe import Recipe, load_recipe


def is_continual(recipe: Recipe | str | Path | dict) -> bool:
    """Whether the recipe's merge_method is a continual rule (or it has a `continual:` section)."""
    try:
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    except MergesmithError:
        return False  # the ordinary path reports the recipe's errors
    return recipe.merge_method in rules.RULES or recipe.continual is not None


@dataclass
class Chain:
    """The models to fold, onto what, with which rule, and the state so far."""

    recipe: Recipe
    rule: str
    params: dict
    base: object  # Checkpoint
    experts: list  # [(reference, Checkpoint)]
    onto: object | None = None  # Checkpoint of the earlier merge
    state: dict = field(default_factory=dict)  # the earlier merge's state ({} for a new chain)
    jobs: list[TensorJob] = field(default_factory=list)
    scale: float = 1.0  # OPCM's 1/λ_t, found by the norms pass
    norms: list[float] = field(default_factory=list)  # ‖τ_i‖ of the new models
    projections: dict = field(default_factory=dict)
    checked: object = None  # the plan of the models' task arithmetic: names, shapes, config
    device: torch.device = torch.device("cpu")  # where the rules compute (SVDs, DOP's Adam)

    @property
    def count(self) -> int:
        return self.state.get("count", 0)

    def projected(self, name: str, shape) -> bool:
        """OPCM projects, DOP optimises, linear layers' weights: matrices but the embeddings."""
        return len(shape) == 2 and not L.is_before_layers(name)


def continual_chain(recipe: Recipe | str | Path | dict, onto: str | Path | None = None, *,
                    shard_size: str | int = "5GB", allow_crimes: bool = False) -> Chain:
    """Check everything, read no tensor data: the rule and its parameters, the earlier merge's
    state (its base, rule and weights), and the models' tensors against each other."""
    from mergesmith.engine.api import parse_size

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    rule = recipe.merge_method
    if rule not in rules.RULES:
        raise RecipeError(f"{recipe.where('merge_method')}: {rule!r} is not a continual rule "
                          "(continual: and --onto take one)",
                          hint=f"use one of {', '.join(rules.RULES)}")
    if not recipe.base_model:
        raise RecipeError(f"{recipe.where('base_model')}: continual merging needs a base_model",
                          hint="task vectors are differences from it")
    if not recipe.models:
        raise RecipeError(f"{recipe.where('models')}: give the models to add, in order, under models:")
    for i, model in enumerate(recipe.models):
        if model.parameters:
            raise RecipeError(f"{recipe.where('models', i, 'parameters')}: a continual rule "
                              "takes no per-model parameters", hint="give them once, under "
                              "the recipe's parameters:")
    onto = onto if onto is not None else (recipe.continual.onto if recipe.continual else None)
    params = _params(recipe, rule)
    state = {}
    if onto is not None:
        state = state_file.read_state(Path(onto))
        if state["rule"] != rule:
            raise RecipeError(f"{recipe.where('merge_method')}: --onto {onto} was merged with "
                              f"{state['rule']}, this recipe says {rule}",
                              hint=f"add to it with merge_method: {state['rule']}")
    refs = [m.model for m in recipe.models]
    data = {"merge_method": "task_arithmetic", "base_model": recipe.base_model,
            "models": [{"model": m, "parameters": {"weight": 1.0}}
                       for m in [str(onto)] * (onto is not None) + refs]}
    data.update({k: v for k, v in (("dtype", recipe.dtype), ("out_dtype", recipe.out_dtype),
                                   ("tokenizer_source", recipe.tokenizer_source)) if v})
    checked = build_plan(data, shard_bytes=parse_size(shard_size), allow_crimes=allow_crimes)
    base = checked.models[recipe.base_model]
    if onto is not None:
        _check_base(Path(onto), state, base, recipe)
    return Chain(recipe, rule, params, base, [(r, checked.models[r]) for r in refs],
                 checked.models[str(onto)] if onto is not None else None, state, checked.jobs,
                 checked=checked)


def _params(recipe: Recipe, rule: str) -> dict:
    defaults = rules.RULES[rule][0]
    given = dict(recipe.parameters or {})
    for name, value in given.items():
        if name not in defaults:
            raise RecipeError(f"{recipe.where('parameters', name)}: {rule} takes no parameter "
                              f"{name!r}", hint=f"its parameters: {', '.join(defaults) or 'none'}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecipeError(f"{recipe.where('parameters', name)}: must be one number, got "
                              f"{value!r}", hint="continual rules take global scalars")
    params = {**defaults, **{k: float(v) for k, v in given.items()}}
    if rule == "opcm" and not 0 <= params["alpha"] < 1:
        raise RecipeError(f"{recipe.where('parameters', 'alpha')}: must be in [0, 1), got "
                          f"{params['alpha']}", hint="FB's default is 0.5")
    for name in ("alpha", "ema_beta", "epsilon") if rule == "dop" else ():
        if not 0 <= params[name] <= 1:
            raise RecipeError(f"{recipe.where('parameters', name)}: must be in [0, 1], got "
                              f"{params[name]}")
    if rule == "dop" and (params["steps"] < 0 or params["steps"] != int(params["steps"])
                          or params["lr"] <= 0):
        raise RecipeError(f"{recipe.where('parameters')}: dop needs a whole number of steps "
                          f"≥ 0 and lr > 0, got steps {params['steps']}, lr {params['lr']}")
    if "density" in params and not 0 < params["density"] <= 1:
        raise RecipeError(f"{recipe.where('parameters', 'density')}: must be in (0, 1], got "
                          f"{params['density']}")
    if rule == "continual_magmax" and params["lambda"] == 0:
        raise RecipeError(f"{recipe.where('parameters', 'lambda')}: must not be 0 (the next "
                          "step divides the merge by it)")
    return params


def _check_base(onto: Path, state: dict, base, recipe: Recipe) -> None:
    digest = _base_digest(base)
    if state["base"]["digest"] != digest:
        raise MergesmithError(f"--onto {onto}: it was merged onto base {state['base']['path']}, "
                              f"but {recipe.where('base_model')} is {recipe.base_model}, whose "
                              "weights differ", hint="give the base the earlier merge was made "
                              "with, or start a new chain without --onto")


def _base_digest(base) -> str:
    return "/".join(state_file.weights_digest(folder) for folder in base.sources)


# ------------------------------------------------------------------------------------------
# per tensor


def _inputs(chain: Chain, job: TensorJob) -> tuple[torch.Tensor, torch.Tensor | None, Iterator]:
    """θ0, the earlier merge (or None) and the new models of one tensor, in fp32; the models
    are read one at a time as they are folded in, so a recipe of many holds two at once."""
    def read(ck, name):
        return ck.read(name).to(chain.device, torch.float32)

    (base_ck, name), *rest = job.inputs
    merged = read(*rest.pop(0)) if chain.onto is not None else None
    return read(base_ck, name), merged, (read(ck, n) for ck, n in rest)


def fold(chain: Chain, job: TensorJob, *, opcm_scale: float = 1.0) -> tuple[torch.Tensor, dict]:
    """One output tensor of the chain in fp32 and, for OPCM, ‖S_t‖² on it and the last
    projection's ranks (the merge is θ0 + S_t·`opcm_scale`)."""
    base, merged, models = _inputs(chain, job)
    p, rule, info = chain.params, chain.rule, {}
    if rule == "opcm":
        return _opcm_fold(chain, job, base, merged, models, opcm_scale)
    if rule == "continual_average":
        count, out = chain.count, merged
        for model in models:
            count += 1
            out = model.clone() if out is None else rules.average_add(out, model, count)
        return out, info
    if rule == "dop":  # on the models themselves: θ̄_1 = θ_1, then two at a time
        out, project = merged, chain.projected(job.out.name, job.out.shape)
        for model in models:
            if out is None:
                out = model.clone()
            elif project:
                out = rules.dop_merge(base, out, model, alpha=p["alpha"], lr=p["lr"],
                                      steps=int(p["steps"]), ema_beta=p["ema_beta"],
                                      epsilon=p["epsilon"])
            else:
                out = (out + model) / 2
        return out, info
    prior = merged - base if merged is not None else None
    previous = chain.state.get("scale", p["lambda"])  # MagMax's λ of the earlier merge
    for tau in (model - base for model in models):
        if rule == "continual_task_arithmetic":
            prior = rules.ta_add(prior if prior is not None else torch.zeros_like(tau), tau,
                                 p["lambda"])
        elif rule == "continual_ties":
            prior = rules.ties_add(prior, tau, p["lambda"], p["density"])
        else:  # continual_magmax
            prior = rules.magmax_add(prior, tau, p["lambda"], previous)
            previous = p["lambda"]
    return base + prior, info


def _opcm_fold(chain: Chain, job: TensorJob, base, merged, models, scale: float):
    """θ0 + S_t·scale, with ‖S_t‖², the new models' ‖τ‖² and the last projection's ranks."""
    running = (merged - base) * chain.state["scale"] if merged is not None else None
    project = chain.projected(job.out.name, job.out.shape)
    info = {"squares": []}
    for tau in (model - base for model in models):
        info["squares"].append(float(tau.double().square().sum()))
        if project and running is not None:
            tau, info["projection"] = rules.opcm_project(running, tau, chain.params["alpha"])
        running = tau if running is None else running + tau
    info["sum_squares"] = float(running.double().square().sum())
    return base + running * scale, info


def _merged(chain: Chain) -> list[TensorJob]:
    return [job for job in chain.jobs if not job.copy and job.out.dtype.is_floating_point]


def norms_pass(chain: Chain) -> None:
    """The new models' whole-model norms ‖τ_i‖ and, for OPCM, 1/λ_t = n̄_t/‖S_t‖ and each
    projection's ranks: every tensor read once, scalars kept."""
    squares = [0.0] * len(chain.experts)
    total = 0.0
    for job in _merged(chain):
        if chain.rule == "opcm":
            _, info = fold(chain, job)
            total += info["sum_squares"]
            if "projection" in info:
                chain.projections[job.out.name] = [info["projection"]["rank"],
                                                   info["projection"]["split_rank"]]
            tensor_squares = info["squares"]
        else:
            base, _, models = _inputs(chain, job)
            tensor_squares = [float((m - base).double().square().sum()) for m in models]
        squares = [a + b for a, b in zip(squares, tensor_squares)]
    chain.norms = [math.sqrt(s) for s in squares]
    if chain.rule == "opcm":
        chain.scale = rules.opcm_scale(total, [*chain.state.get("norms", []), *chain.norms])


class ChainView(View):
    """The chain's output tensors, each computed on its first read and kept until the next
    tensor is read (the engine reads one tensor's row blocks in order)."""

    def __init__(self, chain: Chain, label: str):
        self.chain = chain
        self.jobs = {job.out.name: job for job in _merged(chain)}
        self._held: tuple[str, torch.Tensor] | None = None
        entries = {name: Entry(TensorInfo(name, job.out.dtype, tuple(job.out.shape),
                                          Path("<continual>"), None), self._reader(name))
                   for name, job in self.jobs.items()}
        super().__init__(label, chain.checked.config, entries,
                         [ck for _, ck in chain.experts] + [chain.base]
                         + ([chain.onto] if chain.onto is not None else []))

    def _reader(self, name: str):
        def read(rows):
            if self._held is None or self._held[0] != name:
                self._held = None  # let go of the last tensor before computing the next
                job = self.jobs[name]
                tensor, _ = fold(self.chain, job, opcm_scale=self.chain.scale)
                tensor = tensor.to("cpu", job.out.dtype).contiguous()
                if rows is None:
                    return tensor
                self._held = (name, tensor)
            tensor = self._held[1]
            return tensor if rows is None else tensor[rows[0]:rows[1]]
        return read


def continual_program(chain: Chain) -> Program:
    steps = [ref for ref, _ in chain.experts]
    key = json.dumps([chain.rule, chain.params, chain.state.get("weights"), steps, chain.scale])
    view = ChainView(chain, f"continual {key}")
    outputs = []
    for job in chain.jobs:
        name = job.out.name
        if name in view.jobs:
            outputs.append(Output(name, [(view, name)], None, job.ctx.layer))
        else:  # integer buffers: the base's
            outputs.append(Output(name, [job.inputs[0]], None, job.ctx.layer))
    total = chain.count + len(steps)
    onto = f" onto the merge in `{chain.onto.path}` ({chain.count} model(s))" if chain.onto else ""
    models = {chain.recipe.base_model: chain.base, **dict(chain.experts)}
    if chain.onto is not None:
        models[str(chain.onto.path)] = chain.onto
    return Program(outputs, chain.checked.config, chain.checked.config_source,
                   title=f"Continual merge ({chain.rule}, {total} models)",
                   summary=f"{', '.join(steps)} added one at a time with {chain.rule} "
                   f"({rules.RULES[chain.rule][2]}){onto}; the state for the next "
                   f"`mergesmith merge --onto` is in `{state_file.SIDE_FOLDER}/{state_file.STATE}`.",
                   record=("continual_recipe.yml", chain.recipe._text or chain.recipe.to_yaml()),
                   dtype=None, models=models)


def next_state(chain: Chain) -> dict:
    order = [*chain.state.get("order", []), *(ref for ref, _ in chain.experts)]
    norms = [*chain.state.get("norms", []), *chain.norms]
    scale = {"opcm": 1 / chain.scale if chain.scale else 1.0,
             "continual_magmax": chain.params.get("lambda", 1.0)}.get(chain.rule, 1.0)
    state = {"rule": chain.rule, "params": chain.params, "count": len(order), "order": order,
             "norms": norms, "scale": scale,
             "base": {"path": str(chain.base.path), "digest": _base_digest(chain.base)}}
    if chain.rule == "opcm":
        state["projections"] = chain.projections
    return state


def continual_merge(recipe: Recipe | str | Path | dict, out: str | Path, *,
                    onto: str | Path | None = None, shard_size: str | int = "5GB",
                    device: str = "cpu", resume: bool = False, overwrite: bool = False,
                    progress: bool = False, allow_crimes: bool = False, **_: object) -> Path:
    """Add the recipe's models, in order, to the merge in `onto` (or to the base) and write
    the result with its state at `out`."""
    from mergesmith.engine.api import _device, parse_size, write_plan  # _device: --device checked

    chain = continual_chain(recipe, onto, shard_size=shard_size, allow_crimes=allow_crimes)
    chain.device = _device(device)
    norms_pass(chain)
    program = continual_program(chain)
    state = next_state(chain)

    def finish(folder: Path) -> None:
        state_file.write_state(folder, state)

    return write_plan(program_plan(program, parse_size(shard_size)), out, device=device,
                      resume=resume, overwrite=overwrite, progress=progress, finish=finish)


def continual_summary(recipe: Recipe) -> str:
    """One line for `mergesmith check`: the rule and what --onto adds to."""
    _, summary, paper = rules.RULES[recipe.merge_method]
    onto = recipe.continual.onto if recipe.continual else None
    where = f", onto the continual merge in {onto}" if onto else ", one at a time from the base"
    return f"{recipe.merge_method} — continual: {summary} ({paper}){where}"
