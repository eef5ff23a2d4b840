"""Run lm-evaluation-harness tasks on a model and get TaskResults back.

lm-eval is an optional extra (`pip install mergesmith[eval]`). Tasks are lm-eval's own (named,
from its registry or from YAML files under `include_path`, or given as config dicts). A local
data set needs no download: `dataset_path: json` with `dataset_kwargs: {data_files: ...}`.

Each result keeps every document's value of the chosen metric (lm-eval's `log_samples`), so
summarize() can give lm-eval scores paired-bootstrap intervals like the built-in tasks'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import MergesmithError
from mergesmith.evaluate.metrics import TaskResult


def run_lm_eval(model: Any, tasks: list[str | dict], *, include_path: str | Path | None = None,
                include_defaults: bool = True, metric: str = "acc", batch_size: int = 8, device: str = "cpu",
                limit: int | float | None = None, num_fewshot: int | None = None,
                seed: int = 0) -> dict[str, TaskResult]:
    """Score `model` (a folder, a transformers module, or a (module, tokenizer) pair) on lm-eval
    tasks; task name -> TaskResult whose per_example holds each document's `metric`.

    `metric` must be one lm-eval averages over documents (acc, acc_norm, exact_match, ...).
    `include_defaults=False` skips indexing lm-eval's own few thousand task files (seconds) when
    only tasks under `include_path` are wanted.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MergesmithError("lm-eval is not installed",
                              hint="pip install 'mergesmith[eval]' (or lm-eval)") from None

    if isinstance(model, (str, Path)):
        lm = HFLM(pretrained=str(model), dtype="float32", device=device, batch_size=batch_size)
    else:
        module, tokenizer = model if isinstance(model, tuple) else (model, None)
        lm = HFLM(pretrained=module, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=include_defaults)
    try:
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            bootstrap_iters=0, log_samples=True, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise MergesmithError(f"lm-eval could not run {', '.join(map(str, tasks))}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                              hint="check the task names and include_path") from None
    return {name: _result(name, output, metric) for name in output["samples"]}


def _result(name: str, output: dict, metric: str) -> TaskResult:
    samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
    if not samples or metric not in samples[0]:
        have = sorted({key.split(",")[0] for key in output["results"][name]
                       if "," in key and "_stderr" not in key})
        raise MergesmithError(f"lm-eval task {name!r} has no per-document metric {metric!r}",
                              hint=f"its metrics: {', '.join(have) or 'none'}")
    values = torch.tensor([float(s[metric]) for s in samples])
    better = output.get("higher_is_better", {}).get(name, {}).get(metric, True)
    return TaskResult(name, metric, float(values.mean()), values, len(samples), bool(better))
