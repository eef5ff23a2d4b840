"""Score a model on a task: batched, without gradients, deterministic.

A model is a folder, a loaded transformers module (its tokenizer is loaded from the folder it
came from), or a (module, tokenizer) pair. Examples are batched by length so padding stays small;
results come back in the split's order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from mergesmith.calibrate.forward import mean_pool, quiet_transformers, read_head  # noqa: F401 (re-exported)
from mergesmith.errors import MergesmithError, TaskError
from mergesmith.evaluate.metrics import TaskResult, macro_f1, perplexity
from mergesmith.evaluate.tasks import Task, load_task

ModelLike = Any  # str | Path | torch.nn.Module | tuple[torch.nn.Module, tokenizer]


def evaluate_model(model: ModelLike, task: Task | str | Path, split: str = "test", *,
                   batch_size: int = 32, device: str = "cpu",
                   max_examples: int | None = None) -> TaskResult:
    """The model's score on one split of the task, with every example's outcome kept.

    A folder is loaded onto `device`; a module stays where it is and its inputs follow it.
    """
    task = task if isinstance(task, Task) else load_task(task)
    module, tokenizer = load_model(model, task, device)
    rows = task.examples(split)[:max_examples]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            if task.kind == "classification":
                return _classification(module, tokenizer, task, split, rows, batch_size)
            if task.kind == "multiple_choice":
                return _multiple_choice(module, tokenizer, task, split, rows, batch_size)
            return _perplexity(module, tokenizer, task, rows, batch_size)
    finally:
        module.train(was_training)


def evaluate_models(models: dict[str, ModelLike], tasks: list[Task], split: str = "test", *,
                    batch_size: int = 32, device: str = "cpu",
                    max_examples: int | None = None) -> dict[str, dict[str, TaskResult]]:
    """Every model on every task: model name -> task name -> result. A folder is loaded once
    for all the tasks that need the same model class."""
    results: dict[str, dict[str, TaskResult]] = {}
    for name, model in models.items():
        loaded: dict[tuple, tuple] = {}
        results[name] = {}
        for task in tasks:
            key = (task.kind, task.head is not None)
            if key not in loaded:
                loaded[key] = load_model(model, task, device)
            results[name][task.name] = evaluate_model(loaded[key], task, split, batch_size=batch_size,
                                                      max_examples=max_examples)
    return results


def load_model(model: ModelLike, task: Task, device: str = "cpu"):
    """(module, tokenizer) for the task's kind: an encoder for a head file, the model's own
    sequence-classification head otherwise, a causal LM for multiple choice and perplexity."""
    import transformers as tf

    if isinstance(model, tuple):
        return model
    if isinstance(model, torch.nn.Module):
        source = getattr(getattr(model, "config", None), "_name_or_path", "")
        if not source or not Path(source).is_dir():
            raise MergesmithError("a model given as a module needs its tokenizer",
                                  hint="pass (module, tokenizer)")
        return model, _tokenizer(Path(source))
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise MergesmithError(f"{folder}: not a model folder (no config.json)")
    if task.kind != "classification":
        cls = tf.AutoModelForCausalLM
    elif task.head is not None:
        cls = tf.AutoModel
    else:
        cls = tf.AutoModelForSequenceClassification
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            # transformers would add a freshly initialised head and score noise
            raise TaskError(f"{task.path}: task {task.name!r} has no `head` file and {folder} has no "
                            f"sequence-classification head ({', '.join(architectures) or 'no architecture'})",
                            hint="add head: <file.safetensors> to the task")
    try:
        with quiet_transformers():
            module = cls.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise MergesmithError(f"{folder}: cannot load as {cls.__name__}: "
                              f"{str(exc).splitlines()[0]}") from None
    module = module.to(device)
    if is_routed(folder):  # a Twin-Merging model: every input runs on its own routed weights
        from mergesmith.calibrate.router import routed_module

        module = routed_module(folder, module)
    return module, _tokenizer(folder)


def is_routed(folder: Path) -> bool:
    """Whether the folder is a twin merge with a router."""
    index = folder / "twin" / "twin.json"
    return index.is_file() and json.loads(index.read_text()).get("router") is not None


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise MergesmithError(f"{folder}: no usable tokenizer: {str(exc).splitlines()[0]}") from None


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _encode(tokenizer, texts: list[str], max_length: int | None) -> list[list[int]]:
    """Token ids per text, cut to `max_length` (None: whole)."""
    return tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]


def _batches(sequences: list[list[int]], batch_size: int, pad_id: int,
             device: torch.device) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(positions, ids, mask): sequences in length order, right-padded, `batch_size` at a time."""
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, i in enumerate(chosen):
            ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, :len(sequences[i])] = 1
        yield chosen, ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return value
    return 0


def _classification(module, tokenizer, task: Task, split: str, rows: list[dict],
                    batch_size: int) -> TaskResult:
    texts = [row[task.text_field] for row in rows]
    sequences = _encode(tokenizer, texts, task.max_length)
    weight, bias = _head(task, module) if task.head is not None else (None, None)
    device = _device(module)
    predictions = torch.empty(len(rows), dtype=torch.long)
    for chosen, ids, mask in _batches(sequences, batch_size, _pad_id(tokenizer), device):
        if weight is None:
            logits = module(input_ids=ids, attention_mask=mask).logits
            if logits.shape[-1] != len(task.labels):
                raise TaskError(f"{task.path}: labels: the model's head has {logits.shape[-1]} "
                                f"outputs, the task {len(task.labels)} labels")
        else:
            hidden = module.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = mean_pool(hidden, mask) @ weight.T + bias
        predictions[chosen] = logits.argmax(-1).cpu()
    return _graded(task, split, predictions)


def _graded(task: Task, split: str, predictions: torch.Tensor) -> TaskResult:
    """Predicted label (or choice) indices against the split's labels."""
    labels = torch.tensor(task.label_ids(split)[:len(predictions)])
    correct = (predictions == labels).float()
    if task.metric == "accuracy":
        score = float(correct.mean())
    else:
        score = float(macro_f1(predictions.numpy(), labels.numpy()))
    return TaskResult(task.name, task.metric, score, correct, len(predictions), True,
                      predictions=predictions, labels=labels)


_mean_pool = mean_pool  # the demo's first import name; use mean_pool


def _head(task: Task, module) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = read_head(task.head, getattr(module.config, "hidden_size", None), len(task.labels),
                             error=TaskError)
    device = _device(module)
    return weight.to(device), bias.to(device)


def _token_losses(module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-log p(token_t | tokens_<t) for t = 1..L-1, zero where t is padding: [B, L-1]."""
    logits = module(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return losses * mask[:, 1:]


def _multiple_choice(module, tokenizer, task: Task, split: str, rows: list[dict],
                     batch_size: int) -> TaskResult:
    """Each choice scored by Σ log p(choice tokens | context); the best-scoring one is the answer.

    As lm-eval-harness does, context + " " + choice is tokenized whole and the choice's tokens are
    those past the context's own tokens, so a merge of tokens across the boundary is not lost.
    """
    contexts = [row[task.context_field] for row in rows]
    context_lengths = [len(ids) for ids in _encode(tokenizer, contexts, None)]
    for i, length in enumerate(context_lengths):
        if length == 0:
            raise TaskError(f"{task.data[split]}: example {i + 1}: the context tokenizes to nothing")
    pairs = [(i, f"{context} {choice}") for i, (context, row) in enumerate(zip(contexts, rows))
             for choice in row[task.choices_field]]
    sequences, spans = [], []
    for (i, _), whole in zip(pairs, _encode(tokenizer, [text for _, text in pairs], None)):
        kept = whole[-task.max_length:]  # drop the context's start, never the choice
        sequences.append(kept)
        spans.append(min(max(1, len(whole) - context_lengths[i]), len(kept) - 1))
    device = _device(module)
    loglik = torch.empty(len(sequences), dtype=torch.float64)
    for chosen, ids, mask in _batches(sequences, batch_size, _pad_id(tokenizer), device):
        losses = _token_losses(module, ids, mask).double().cpu()
        for row, i in enumerate(chosen):
            length = len(sequences[i])
            loglik[i] = -losses[row, length - 1 - spans[i]:length - 1].sum()
    predictions = torch.empty(len(rows), dtype=torch.long)
    start = 0
    for i, row in enumerate(rows):
        count = len(row[task.choices_field])
        predictions[i] = int(loglik[start:start + count].argmax())
        start += count
    return _graded(task, split, predictions)


def _perplexity(module, tokenizer, task: Task, rows: list[dict], batch_size: int) -> TaskResult:
    texts = [row[task.text_field] for row in rows]
    sequences = _encode(tokenizer, texts, task.max_length)
    device = _device(module)
    mean_loss = torch.zeros(len(rows))
    tokens = torch.zeros(len(rows), dtype=torch.long)
    for chosen, ids, mask in _batches(sequences, batch_size, _pad_id(tokenizer), device):
        losses = _token_losses(module, ids, mask).double().cpu()
        counts = mask[:, 1:].sum(1).cpu()
        mean_loss[chosen] = (losses.sum(1) / counts.clamp(min=1)).float()
        tokens[chosen] = counts
    if int(tokens.sum()) == 0:
        raise TaskError(f"{task.path}: every text of task {task.name!r} is shorter than two tokens")
    score = perplexity(mean_loss.double().numpy(), tokens.numpy())
    return TaskResult(task.name, "perplexity", score, mean_loss, len(rows), False, tokens=tokens)
