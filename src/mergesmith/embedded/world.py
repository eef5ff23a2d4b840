"""Set up the demo: base model, tasks with their frozen heads, and one fine-tuned expert per task.

Everything is made on first use in the cache and found there afterwards; nothing is downloaded.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from mergesmith.embedded.assets import base_model_folder, cache_dir, tiny_base_folder
from mergesmith.embedded.finetune import FAST, Settings, prepare_expert, prepare_task

TASKS_DIR = Path(__file__).parent / "tasks"
TASKS = ("topic", "language", "sentiment", "part_of_speech")
FAST_TASKS = ("sentiment", "language")
SETTINGS = Settings()


@dataclass(frozen=True)
class DemoSetup:
    """Paths of the demo's models and tasks (task.yaml files whose `head` is the frozen head)."""

    base: Path
    experts: dict[str, Path]
    tasks: dict[str, Path]
    settings: Settings


def prepare_demo(fast: bool = False, seed: int = 0, cache: Path | None = None,
                 progress: bool = True) -> DemoSetup:
    """The base model, each task's frozen head and each task's expert, trained only if not cached.

    `fast` swaps in a tiny random BERT, two tasks and a few steps: the same path end to end, in
    seconds, for the tests."""
    root = cache_dir(cache)
    settings = (FAST if fast else SETTINGS).with_seed(seed)
    base = tiny_base_folder(root, seed) if fast else base_model_folder(root)
    log = say if progress else (lambda message: None)
    tasks, experts = {}, {}
    for name in FAST_TASKS if fast else TASKS:
        tasks[name] = prepare_task(TASKS_DIR / name / "task.yaml", base, root, settings, log)
        experts[name] = prepare_expert(tasks[name], base, root, settings, log)
    return DemoSetup(base=base, experts=experts, tasks=tasks, settings=settings)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
