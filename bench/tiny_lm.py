"""Tiny Llamas that answer the demo's tasks with a label word: built, trained, scored, cached.

Shared by bench/moe_quality.py and bench/align_quality.py. The input is `[BOS] text [SEP]` and
the answer the task's label as one token (`[noun]`, `[positive]`, ...); a model is scored by the
argmax over its task's label tokens at [SEP] (label-word accuracy). The tokenizer is a small BPE
trained on the four tasks' train texts, so nothing is downloaded. Training is seeded, on one
thread, and cached under a key of everything it depends on.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = ROOT / "src" / "mergesmith" / "demo" / "tasks"
TASKS = ("topic", "language", "sentiment", "part_of_speech")
VERSION = 1  # bump when training changes what it produces
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]"]


@dataclass(frozen=True)
class Setup:
    vocab: int = 2000
    hidden: int = 64
    layers: int = 4
    max_tokens: int = 40          # text tokens kept per example
    batch: int = 32
    pretrain_steps: int = 1500    # language modelling on all tasks' train texts
    pretrain_lr: float = 3e-3
    finetune_steps: int = 500     # label word after [SEP]
    finetune_lr: float = 3e-3
    seed: int = 0


def load_tasks() -> dict:
    from mergesmith.evaluate.tasks import load_task

    return {t: load_task(TASKS_DIR / t / "task.yaml") for t in TASKS}


def label_token(label: str) -> str:
    return f"[{label}]"


def texts(task, split: str) -> list[str]:
    return [row[task.text_field] for row in task.examples(split)]


def prompts(task_name: str, n: int, offset: int = 0) -> list[str]:
    """n train texts of the task as the models see them (the tools prepend BOS themselves)."""
    task = load_tasks()[task_name]
    return [f"{t}[SEP]" for t in texts(task, "train")[offset:offset + n]]


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_tokenizer(tasks: dict, folder: Path, vocab: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    labels = sorted({label_token(lab) for task in tasks.values() for lab in task.labels})
    core = Tokenizer(models.BPE(unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    corpus = [t for task in tasks.values() for t in texts(task, "train")]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS + labels,
                                                         show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                  eos_token="[EOS]", sep_token="[SEP]")
    tok.save_pretrained(folder)
    return tok


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer.json").exists() else None


def new_model(setup: Setup, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=setup.hidden, intermediate_size=4 * setup.hidden,
                         num_hidden_layers=setup.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config)


class Examples:
    """A split tokenized once: `[BOS] text [SEP]` ids, and each row's label token id."""

    def __init__(self, tok, task, split: str, max_tokens: int):
        ids = tok([t for t in texts(task, split)], add_special_tokens=False)["input_ids"]
        bos, sep = tok.convert_tokens_to_ids(["[BOS]", "[SEP]"])
        self.rows = [[bos, *r[:max_tokens], sep] for r in ids]
        self.choices = torch.tensor(tok.convert_tokens_to_ids([label_token(lab) for lab in task.labels]))
        self.labels = self.choices[torch.tensor(task.label_ids(split))]
        self.pad = tok.pad_token_id

    def batch(self, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids, attention mask (right padding) and each row's [SEP] position."""
        rows = [self.rows[i] for i in index]
        width = max(map(len, rows))
        ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        lengths = torch.tensor([len(r) for r in rows])
        return ids, (torch.arange(width) < lengths[:, None]).long(), lengths - 1


def _sep_logits(model, examples: Examples, index) -> torch.Tensor:
    ids, mask, last = examples.batch(index)
    logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[torch.arange(len(index)), last]


def _train(model, loss_of, steps: int, lr: float, params, seed: int) -> None:
    """AdamW, linear warm-up (10 %) then linear decay, gradients clipped at 1."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, (steps - s) / (steps - warm + 1)))
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        loss = loss_of(rng)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    model.eval()


def pretrain(model, sets: list[Examples], setup: Setup, seed: int) -> None:
    """Next-token prediction on `[BOS] text [SEP]` of every task (no labels)."""
    pool = [(s, i) for s in sets for i in range(len(s.rows))]

    def loss_of(rng):
        chosen = rng.sample(pool, setup.batch)
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s.rows[i]) for s, i in chosen], batch_first=True,
                                              padding_value=-100)
        mask = (ids != -100).long()
        logits = model(input_ids=ids.clamp(min=0), attention_mask=mask).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=-100)

    _train(model, loss_of, setup.pretrain_steps, setup.pretrain_lr, list(model.parameters()), seed)


def finetune(model, examples: Examples, setup: Setup, seed: int, mlp_only: bool) -> None:
    """Cross-entropy of the label token at [SEP] (over the whole vocabulary)."""
    params = [p for n, p in model.named_parameters() if ".mlp." in n or not mlp_only]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def loss_of(rng):
        index = rng.sample(range(len(examples.rows)), setup.batch)
        return F.cross_entropy(_sep_logits(model, examples, index), examples.labels[index])

    _train(model, loss_of, setup.finetune_steps, setup.finetune_lr, params, seed)
    for p in model.parameters():
        p.requires_grad_(True)


@torch.no_grad()
def accuracy(model, examples: Examples, chunk: int = 200) -> float:
    right = 0
    for start in range(0, len(examples.rows), chunk):
        index = list(range(start, min(start + chunk, len(examples.rows))))
        picked = _sep_logits(model, examples, index)[:, examples.choices].argmax(-1)
        right += int((examples.choices[picked] == examples.labels[index]).sum())
    return right / len(examples.rows)


def load_model(folder: Path):
    """(model, tokenizer) saved in `folder`: any causal LM transformers loads, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesmith.evaluate.run import quiet_transformers

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def score_folder(folder: Path, tasks: dict, split: str) -> dict[str, float]:
    """{task: label-word accuracy} of the model saved in `folder`."""
    model, tok = load_model(folder)
    return {t: accuracy(model, Examples(tok, task, split, Setup().max_tokens)) for t, task in tasks.items()}


def average(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def save(model, tok, folder: Path) -> Path:
    from mergesmith.evaluate.run import quiet_transformers

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def one_thread():
    """Seeded training on one thread: weights do not depend on the core count, and two spinning
    threads on a shared 2-core machine cost more than they gain on a model this small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def build_zoo(root: Path, tasks: dict, setup: Setup = Setup()) -> dict:
    """{"base": folder, task: its MLP-only expert, "root": cache folder, "setup": settings}."""
    root = root / digest(VERSION, asdict(setup), [t.fingerprint for t in tasks.values()])
    root.mkdir(parents=True, exist_ok=True)
    zoo = {"root": root, "setup": asdict(setup), "base": root / "base", **{t: root / t for t in TASKS}}
    if all((zoo[n] / "config.json").exists() for n in ("base", *TASKS)):
        return zoo
    threads = one_thread()
    try:
        tok = load_tokenizer(root / "tokenizer") or build_tokenizer(tasks, root / "tokenizer", setup.vocab)
        train = {t: Examples(tok, task, "train", setup.max_tokens) for t, task in tasks.items()}
        if not (zoo["base"] / "config.json").exists():
            model = new_model(setup, len(tok), setup.seed)
            pretrain(model, list(train.values()), setup, setup.seed)
            save(model, tok, zoo["base"])
            print(f"  base pretrained ({setup.pretrain_steps} steps)", flush=True)
        from transformers import AutoModelForCausalLM

        for t in TASKS:
            if (zoo[t] / "config.json").exists():
                continue
            model = AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32)
            finetune(model, train[t], setup, setup.seed + 1, mlp_only=True)
            save(model, tok, zoo[t])
            print(f"  expert {t} fine-tuned ({setup.finetune_steps} steps)", flush=True)
    finally:
        torch.set_num_threads(threads)
    return zoo


def table(rows: dict[str, dict[str, float]], title: str) -> str:
    head = f"| {title} | " + " | ".join(TASKS) + " | average |"
    lines = [head, "|---" * (len(TASKS) + 2) + "|"]
    for label, scores in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{scores[t]:.3f}" for t in TASKS) + f" | {average(scores):.3f} |")
    return "\n".join(lines)
