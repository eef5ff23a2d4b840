"""Match embedding and head rows by token string when the models' vocabularies differ.

mergekit truncates to the smallest vocabulary unless told otherwise; we never do. With
`tokenizer_source: base | union | <model>`, the output vocabulary is that model's (or the base's
plus every other model's extra tokens), each model's rows are gathered by token, and a row a model
lacks is filled from the first model that has the token (so it is neither zeroed nor averaged
with zeros). The output tokenizer is written to match the output rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergesmith.engine.layers import INPUT_EMBEDDINGS
from mergesmith.errors import PlanError
from mergesmith.io import Checkpoint


@dataclass
class VocabPlan:
    rows: int
    source: Checkpoint                 # whose tokenizer the output starts from
    added: list[str] = field(default_factory=list)  # tokens appended to it (union)
    index: dict[int, torch.Tensor] = field(default_factory=dict)  # id(ckpt) -> row per output row, -1 if none
    order: list[Checkpoint] = field(default_factory=list)  # who fills a missing row first

    def gather(self, tensors: list[torch.Tensor], ckpts: list[Checkpoint]) -> list[torch.Tensor]:
        """Each model's rows in output order, missing rows filled from the first model that has them."""
        width = tensors[0].shape[1:]
        fallback = torch.zeros((self.rows, *width), dtype=tensors[0].dtype)
        filled = torch.zeros(self.rows, dtype=torch.bool)
        by_id = {id(ck): t for ck, t in zip(ckpts, tensors)}
        for ck in self.order:
            if id(ck) not in by_id:
                continue
            idx = self.index[id(ck)]
            take = (idx >= 0) & ~filled
            fallback[take] = by_id[id(ck)][idx[take]].to(fallback.dtype)
            filled |= take
        out = []
        for ck, tensor in zip(ckpts, tensors):
            idx = self.index[id(ck)]
            rows = fallback.clone().to(tensor.dtype)
            have = idx >= 0
            rows[have] = tensor[idx[have]]
            out.append(rows)
        return out


def load_vocab(ckpt: Checkpoint) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt.path).get_vocab()
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise PlanError(f"{ckpt.label}: cannot load its tokenizer to match vocabularies "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})",
                        hint="tokenizer_source needs a tokenizer in every model folder") from None


def embedding_rows(ckpt: Checkpoint) -> int:
    name = next((n for n in sorted(ckpt.tensors) if INPUT_EMBEDDINGS.search(n)), None)
    if name is None:
        raise PlanError(f"{ckpt.label}: no input embedding tensor found to match vocabularies")
    return ckpt.tensors[name].shape[0]


def plan_vocab(recipe, opened: dict[str, Checkpoint], ref: Checkpoint) -> VocabPlan | None:
    choice = recipe.tokenizer_source
    if choice is None:
        return None
    models = list({id(ck): ck for ck in opened.values()}.values())
    if choice == "base":
        if not recipe.base_model:
            raise PlanError(f"{recipe.where('tokenizer_source')}: tokenizer_source: base needs base_model")
        source = opened[recipe.base_model]
    elif choice == "union":
        source = opened[recipe.base_model] if recipe.base_model else ref
    else:
        if choice not in opened:
            raise PlanError(f"{recipe.where('tokenizer_source')}: {choice!r} is not base, union, "
                            "or one of the recipe's models")
        source = opened[choice]
    vocabs = {id(ck): load_vocab(ck) for ck in models}
    rows = {id(ck): embedding_rows(ck) for ck in models}
    tokens = dict(vocabs[id(source)])
    added: list[str] = []
    if choice == "union":
        next_id = len(tokens)
        for ck in models:
            for token, _ in sorted(vocabs[id(ck)].items(), key=lambda kv: kv[1]):
                if token not in tokens:
                    tokens[token] = next_id
                    added.append(token)
                    next_id += 1
    total = max(rows[id(source)], max(tokens.values()) + 1)
    by_row = [None] * total
    for token, row in tokens.items():
        by_row[row] = token
    plan = VocabPlan(rows=total, source=source, added=added,
                     order=[source] + [ck for ck in models if ck is not source])
    for ck in models:
        vocab, limit = vocabs[id(ck)], rows[id(ck)]
        index = [vocab.get(tok, -1) if tok is not None else -1 for tok in by_row]
        if ck is source:  # rows past the tokenizer (padding) stay where they are
            index = [i if i >= 0 or r >= limit else r for r, i in enumerate(index)]
        plan.index[id(ck)] = torch.tensor([i if i < limit else -1 for i in index], dtype=torch.long)
    return plan


def write_tokenizer(plan: VocabPlan, folder: Path) -> None:
    """The output tokenizer, matching the output rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan.source.path)
    if plan.added:
        tokenizer.add_tokens(plan.added)
    tokenizer.save_pretrained(folder)
