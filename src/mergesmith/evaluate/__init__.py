"""Score models on tasks and summarize: normalized score, forgetting, paired bootstrap intervals.

    from mergesmith.evaluate import load_task, evaluate_model, summarize
    task = load_task("tasks/sentiment/task.yaml")
    result = evaluate_model("merged/", task, split="test")
"""

from mergesmith.evaluate.metrics import (
    TaskResult,
    accuracy,
    bootstrap_indices,
    forgetting,
    macro_f1,
    normalized_score,
    percentile_interval,
    perplexity,
)
from mergesmith.evaluate.plots import plot_normalized, plot_sweep
from mergesmith.evaluate.report import Average, Cell, Comparison, Report, summarize
from mergesmith.evaluate.run import evaluate_model, evaluate_models, load_model
from mergesmith.evaluate.tasks import Task, load_task

__all__ = [
    "Average", "Cell", "Comparison", "Report", "Task", "TaskResult", "accuracy", "bootstrap_indices",
    "evaluate_model", "evaluate_models", "forgetting", "load_model", "load_task", "macro_f1",
    "normalized_score", "percentile_interval", "perplexity", "plot_normalized", "plot_sweep",
    "summarize",
]
