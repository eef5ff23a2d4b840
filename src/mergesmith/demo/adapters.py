"""The demo's adapters variant (`mergesmith demo --adapters`): the four experts are LoRA adapters
on the same base, trained with PEFT under the same frozen heads, then merged two ways on one
leaderboard: by the adapter methods into one adapter (scored as base + that adapter), and by the
full-weight methods with each expert given as `base+adapter` (the LoRA applied while streaming).

Each expert is cached as its adapter folder and, for the leaderboard's references (an expert's
own score is what normalizes its task), the same adapter merged into the base by PEFT.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mergesmith.embedded.assets import base_model_folder, building, cache_dir, tiny_base_folder
from mergesmith.embedded.finetune import (FAST, RECIPE_VERSION, Log, Settings, silent, split_features,
                                      accuracy, digest, load_encoder, train)
from mergesmith.evaluate.run import quiet_transformers
from mergesmith.evaluate.tasks import load_task

ADAPTER, MERGED = "adapter", "merged"


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA each expert trains and its step size: every Linear of the encoder's layers, not
    the pooler, which the heads never read (its B would stay zero)."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("query", "key", "value", "intermediate.dense", "output.dense")
    # LoRA moves far fewer weights than full fine-tuning; a step size 10x larger than the full
    # experts' (1e-4) is the usual choice for it
    learning_rate: float = 1e-3


LORA = LoraSettings()
FAST_LORA = LoraSettings(rank=2, alpha=4)


@dataclass(frozen=True)
class AdapterExpert:
    adapter: Path  # the PEFT adapter folder
    merged: Path  # base + adapter, merged by PEFT: the expert as a full model


def prepare_adapter_expert(task_file: Path, base: Path, cache_root: Path, settings: Settings,
                           lora: LoraSettings = LORA, log: Log = silent) -> AdapterExpert:
    """The task's expert as a LoRA adapter on `base`, trained under the task's frozen head with
    the full experts' schedule (finetune.train), cached like them."""
    task = load_task(task_file)
    key = digest("lora-expert", RECIPE_VERSION, task.fingerprint, base.name, asdict(settings), asdict(lora))
    target = cache_root / "demo" / "adapters" / f"{task.name}-{key}"
    found = AdapterExpert(target / ADAPTER, target / MERGED)
    if (found.adapter / "adapter_config.json").is_file() and (found.merged / "config.json").is_file():
        return found
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    log(f"{task.name}: training the LoRA expert (rank {lora.rank}, {settings.steps} steps; "
        "cached afterwards)")
    encoder, tokenizer = load_encoder(base)
    model = get_peft_model(encoder, LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                               target_modules=list(lora.targets), lora_dropout=0.0))
    started = time.perf_counter()
    train(model, tokenizer, task, load_file(task.head), Settings(**{**asdict(settings),
                                                                     "learning_rate": lora.learning_rate}))
    seconds = time.perf_counter() - started
    score = accuracy(*split_features(model, tokenizer, task, "validation", settings), load_file(task.head))
    log(f"{task.name}: LoRA expert trained in {seconds:.0f} s, validation accuracy {score:.3f}")
    with building(target) as folder, quiet_transformers():
        model.save_pretrained(folder / ADAPTER)
        # the adapter names the base it was trained on; PEFT records the path it was loaded from
        config_file = folder / ADAPTER / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = str(base)
        config_file.write_text(json.dumps(config, indent=2))
        model.merge_and_unload().save_pretrained(folder / MERGED)
        tokenizer.save_pretrained(folder / MERGED)
        (folder / "expert.json").write_text(json.dumps(
            {"task": task.name, "base": str(base), "settings": asdict(settings), "lora": asdict(lora),
             "train_seconds": seconds, "validation_accuracy": score}, indent=2))
    return found


@dataclass(frozen=True)
class AdapterDemo:
    base: Path
    experts: dict[str, AdapterExpert]
    tasks: dict[str, Path]
    settings: Settings
    lora: LoraSettings


def prepare_adapter_demo(fast: bool = False, seed: int = 0, cache: Path | None = None,
                         progress: bool = True) -> AdapterDemo:
    """The base model, each task's frozen head (shared with the full demo) and each task's
    LoRA expert, trained only if not cached."""
    from mergesmith.embedded.finetune import prepare_task
    from mergesmith.embedded.world import FAST_TASKS, SETTINGS, TASKS, TASKS_DIR, say

    root = cache_dir(cache)
    settings = (FAST if fast else SETTINGS).with_seed(seed)
    lora = FAST_LORA if fast else LORA
    base = tiny_base_folder(root, seed) if fast else base_model_folder(root)
    log = say if progress else (lambda message: None)
    tasks, experts = {}, {}
    for name in FAST_TASKS if fast else TASKS:
        tasks[name] = prepare_task(TASKS_DIR / name / "task.yaml", base, root, settings, log)
        experts[name] = prepare_adapter_expert(tasks[name], base, root, settings, lora, log)
    return AdapterDemo(base, experts, tasks, settings, lora)


# What `mergesmith demo --adapters` runs without --method/--all: the adapter methods (PEFT's
# combination types, KnOTS, LoRA-LEGO, and RMM's model per task) beside the full-weight
# baselines given `base+adapter`.
DEFAULT_ADAPTER_METHODS = ("linear", "task_arithmetic", "ties", "tsv_m", "lora_combine", "knots",
                           "lora_lego", "rmm")


def run_adapter_leaderboard(out: Path, *, fast: bool = False, seed: int = 0, cache: Path | None = None,
                            methods: list[str] | None = None, say=print, n_bootstrap: int = 1000,
                            search_seconds: float | None = None, progress: bool = True):
    """The adapters variant end to end: LoRA experts (cached), then the leaderboard."""
    from mergesmith.demo import search_row
    from mergesmith.demo.leaderboard import run_leaderboard

    setup = prepare_adapter_demo(fast=fast, seed=seed, cache=cache, progress=progress)
    root = cache_dir(cache) / ("leaderboard-adapters-fast" if fast else "leaderboard-adapters")
    if search_seconds is None:
        search_seconds = search_row.FAST_SECONDS if fast else search_row.SECONDS
    return run_leaderboard(setup.base, {t: e.merged for t, e in setup.experts.items()}, setup.tasks,
                           out, cache=root, seed=seed,
                           methods=list(methods or DEFAULT_ADAPTER_METHODS), say=say,
                           n_bootstrap=n_bootstrap, search_seconds=search_seconds,
                           adapters={t: e.adapter for t, e in setup.experts.items()})
