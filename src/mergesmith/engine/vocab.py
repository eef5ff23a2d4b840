"""The output vocabulary, as mergekit 0.1.5 builds it: rows matched by token string, chat templates.

Models whose vocabularies differ are never truncated (their sizes are an error, named) unless the
recipe says which vocabulary to write: `tokenizer_source: base | union | <model>`, or the
`tokenizer:` section (`source`, `tokens`, `pad_to_multiple_of`), which is the same thing with
tokens added or re-sourced. Both follow mergekit's rules (mergekit/tokenizer/build.py, embed.py):

- the output tokenizer is the base's (the first model's when there is no base), a model's, or the
  union: the base's tokens, then every other model's tokens it lacks; then the `tokens:` keys it
  still lacks. The output has one row per token, padded with the mean row to a multiple of
  `pad_to_multiple_of` (rows past a tokenizer's end, padding, are not carried over);
- each model's rows are gathered by token; a token some model lacks gets, in that model, the row
  of the one model that has it, else the base's, else the average of the models that have it; a
  `tokens:` entry chooses instead (a model's row for it, another token's row, or zeros), and with
  `force: true` it is used in every model.

mergekit appends the union's new tokens in hash-map order, which differs from run to run when
more than one is new; here they come model by model (recipe order), each model's by id.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mergesmith.io.tensor_names import INPUT_EMBEDDINGS
from mergesmith.errors import PlanError
from mergesmith.io import Checkpoint
from mergesmith.recipe.schema import ModelToken, ZeroToken

KEYWORDS = ("base", "union")  # tokenizer sources that are not models


@dataclass
class VocabPlan:
    rows: int                        # output rows: one per token, padded
    tokens: int                      # tokens in the output tokenizer
    tokenizer: Any                   # the output tokenizer (transformers), written with the model
    index: dict[int, torch.Tensor] = field(default_factory=dict)  # id(ckpt) -> its row per token, -1 if none
    order: list[Checkpoint] = field(default_factory=list)  # the recipe's model order (sums follow it)
    base: Checkpoint | None = None
    # `tokens:` entries: output row -> (model whose row is taken, or None for zeros; that row)
    rules: dict[int, tuple[Checkpoint | None, int]] = field(default_factory=dict)
    forced: torch.Tensor | None = None  # bool per token: the rule applies to every model
    dtype: torch.dtype | None = None     # the recipe's dtype: rows are gathered in it, as mergekit

    def gather(self, tensors: list[torch.Tensor], ckpts: list[Checkpoint]) -> list[torch.Tensor]:
        """Each model's rows in output order, with the rows it lacks filled by mergekit's rules."""
        if self.dtype is not None:
            tensors = [t.to(self.dtype) for t in tensors]
        dtype = tensors[0].dtype
        for t in tensors:
            dtype = torch.promote_types(dtype, t.dtype)
        by_id = {id(ck): t.to(dtype) for ck, t in zip(ckpts, tensors)}
        models = [ck for ck in self.order if id(ck) in by_id]
        models += [ck for ck in {id(c): c for c in ckpts}.values() if ck not in models]
        n, width = self.tokens, tensors[0].shape[1:]
        forced = self.forced if self.forced is not None else torch.zeros(n, dtype=torch.bool)
        index = [self.index[id(ck)] for ck in models]
        count = torch.stack([i >= 0 for i in index]).sum(0)
        # only the rows some model lacks (or a forced rule sets) need a default: few, usually
        rows_needed = ((count < len(models)) | forced).nonzero().squeeze(1)
        at = torch.full((n,), -1, dtype=torch.long)
        at[rows_needed] = torch.arange(len(rows_needed))
        index_k = [i[rows_needed] for i in index]
        have = torch.stack([i >= 0 for i in index_k])
        count = count[rows_needed]
        auto = torch.ones(len(rows_needed), dtype=torch.bool)
        auto[torch.tensor([int(at[r]) for r in self.rules if at[r] >= 0], dtype=torch.long)] = False
        default = torch.zeros((len(rows_needed), *width), dtype=dtype)

        def take(into: torch.Tensor, where: torch.Tensor, m: int) -> None:
            into[where] = by_id[id(models[m])][index_k[m][where]]

        for m in range(len(models)):  # the one model that has the token
            take(default, auto & (count == 1) & have[m], m)
        rest = auto & (count > 1)
        if self.base is not None and self.base in models:
            b = models.index(self.base)
            take(default, rest & have[b], b)
            rest &= ~have[b]
        if rest.any():  # summed in model order from zero, then divided, as mergekit
            total = torch.zeros_like(default)
            for m in range(len(models)):
                where = rest & have[m]
                total[where] = total[where] + by_id[id(models[m])][index_k[m][where]]
            default[rest] = total[rest] / count[rest].to(dtype).view(-1, *[1] * len(width))
        for row, (ck, source_row) in self.rules.items():
            if at[row] < 0 or ck is None:
                continue  # every model has the token, unforced; or zeros
            if id(ck) not in by_id:
                raise PlanError(f"tokenizer.tokens: the token of row {row} takes its rows from "
                                f"{ck.label}, which is not merged into this tensor")
            default[at[row]] = by_id[id(ck)][source_row]

        out = []
        for ck in ckpts:
            idx = self.index[id(ck)]
            own = (idx >= 0) & ~forced
            rows = torch.zeros((self.rows, *width), dtype=dtype)
            rows[:n][own] = by_id[id(ck)][idx[own]]
            fill = ~own[rows_needed]
            rows[rows_needed[fill]] = default[fill]
            if self.rows > n:  # padding: the mean row (as mergekit, after Hewitt's vocab expansion)
                rows[n:] = torch.mean(rows[:n], dim=0)
            out.append(rows)
        return out


def load_tokenizer(ckpt: Checkpoint, why: str = "to match vocabularies"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt.path, use_fast=True)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise PlanError(f"{ckpt.label}: cannot load its tokenizer {why} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})",
                        hint="every model folder needs its tokenizer files") from None


def load_vocab(ckpt: Checkpoint) -> dict[str, int]:
    return load_tokenizer(ckpt).get_vocab()


def embedding_rows(ckpt: Checkpoint) -> int:
    name = next((n for n in sorted(ckpt.tensors) if INPUT_EMBEDDINGS.search(n)), None)
    if name is None:
        raise PlanError(f"{ckpt.label}: no input embedding tensor found to match vocabularies")
    return ckpt.tensors[name].shape[0]


def merged_refs(recipe) -> list[str]:
    """The models merged, in mergekit's order for a tensor: as listed, the base last if unlisted."""
    refs = []
    for section in [recipe, *(recipe.modules or {}).values()]:
        refs += [m.model for m in section.models or ()]
        for piece in section.slices or ():
            refs += [s.model for s in piece.sources]
    refs.append(recipe.base_model)
    return list(dict.fromkeys(r for r in refs if r))


def plan_vocab(recipe, opened: dict[str, Checkpoint], ref: Checkpoint) -> VocabPlan | None:
    section = recipe.tokenizer
    choice = section.source if section else recipe.tokenizer_source
    if choice is None:
        return None
    field_name = ("tokenizer", "source") if section else ("tokenizer_source",)
    where = recipe.where(*field_name)
    order = list({id(ck): ck for ck in (opened[r] for r in merged_refs(recipe))}.values())
    base = opened[recipe.base_model] if recipe.base_model else None
    if choice == "base" and base is None:
        raise PlanError(f"{where}: {field_name[-1]}: base needs base_model")
    if choice not in KEYWORDS and choice not in opened:
        raise PlanError(f"{where}: {choice!r} is not base, union, or one of the recipe's models")
    first = base or order[0]
    tokenizers = {id(ck): load_tokenizer(ck) for ck in order}
    limits = {id(ck): embedding_rows(ck) for ck in order}
    if choice == "union":
        out = _union(first, order, tokenizers, limits)
    elif choice == "base":
        out = tokenizers[id(first)]
    else:
        out = load_tokenizer(opened[choice])
    settings = dict(section.tokens or {}) if section else {}
    existing = set(out.get_vocab())
    for token in settings:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab = out.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise PlanError(f"{where}: the output tokenizer's ids are not 0..{n - 1}; its rows cannot "
                        "be laid out")
    pad = section.pad_to_multiple_of if section else None
    rows = -(-n // pad) * pad if pad else n
    by_row = sorted(vocab, key=vocab.get)
    plan = VocabPlan(rows=rows, tokens=n, tokenizer=out, order=order, base=base,
                     forced=torch.zeros(n, dtype=torch.bool),
                     dtype={"float32": torch.float32, "float16": torch.float16,
                            "bfloat16": torch.bfloat16}.get(recipe.dtype or ""))
    for ck in order:
        own, limit = tokenizers[id(ck)].get_vocab(), limits[id(ck)]
        index = [own.get(tok, -1) for tok in by_row]
        plan.index[id(ck)] = torch.tensor([i if i < limit else -1 for i in index], dtype=torch.long)
    for token, setting in settings.items():
        plan.rules[vocab[token]] = _rule(recipe, opened, plan, tokenizers, limits, token, setting)
        plan.forced[vocab[token]] = setting.force
    return plan


def _rule(recipe, opened, plan: VocabPlan, tokenizers: dict, limits: dict, token: str,
          setting) -> tuple[Checkpoint | None, int]:
    """Where a `tokens:` entry's rows come from: (model, its row), or (None, 0) for zeros."""
    where = recipe.where("tokenizer", "tokens", token)
    row = plan.tokenizer.get_vocab()[token]
    source = setting.source
    if source is None:
        lacking = [ck.label for ck in plan.order if plan.index[id(ck)][row] < 0]
        if setting.force or lacking:
            raise PlanError(f"{where}: no source for {token!r}"
                            + (f", which {lacking[0]} lacks" if lacking else ""),
                            hint="give source: <model>, {kind: zero} or {kind: model_token, ...}")
        return None, 0
    if isinstance(source, ZeroToken):
        return None, 0
    ref = source.model if isinstance(source, ModelToken) else source
    ck = opened.get(ref)
    if ck is None or ck not in plan.order:
        raise PlanError(f"{where}: {ref!r} is not one of the models merged")
    if isinstance(source, ModelToken):
        if source.token is not None:
            got = tokenizers[id(ck)].get_vocab().get(source.token)
            if got is None:
                raise PlanError(f"{where}: {ck.label} has no token {source.token!r}")
        else:
            got = source.token_id
        if not 0 <= got < limits[id(ck)]:
            raise PlanError(f"{where}: token id {got} is beyond {ck.label}'s "
                            f"{limits[id(ck)]} rows")
        return ck, got
    got = int(plan.index[id(ck)][row])
    if got < 0:
        raise PlanError(f"{where}: {ck.label} has no token {token!r} to take its rows from",
                        hint="use {kind: model_token, model: ..., token: ...} to take another token's rows")
    return ck, got


def _union(first: Checkpoint, order: list[Checkpoint], tokenizers: dict, limits: dict):
    """mergekit's union tokenizer: the first's, then the tokens it lacks, then added tokens."""
    from transformers import AutoTokenizer

    new: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ck in [first] + [c for c in order if c is not first]:
        tok, limit = tokenizers[id(ck)], limits[id(ck)]
        for token, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < limit:
                new.setdefault(token)
        for i, info in tok.added_tokens_decoder.items():
            if i < limit:
                added.setdefault(info.content, info)
    base_tok = tokenizers[id(first)]
    with tempfile.TemporaryDirectory() as folder:  # a copy, so the base's stays as it was
        base_tok.save_pretrained(folder, legacy_format=False, safe_serialization=True)
        out = AutoTokenizer.from_pretrained(folder, use_fast=True)
    have = base_tok.get_vocab()
    for token in new:
        if token not in added and token not in have:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


# ---------------------------------------------------------------------------------------------
# chat templates

def named_chat_templates() -> list[str]:
    folder = resources.files("mergesmith.engine") / "chat_templates"
    return sorted(p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja"))


def chat_template_for(recipe, opened: dict[str, Checkpoint]) -> str | None:
    """The recipe's `chat_template` as Jinja text, as mergekit reads it: `auto` (the template most
    of the models share; None when none has one), a name it ships, or a template itself."""
    template = recipe.chat_template
    if not template:
        return None
    if template == "auto":
        found = []
        for ref in merged_refs(recipe):
            chosen = load_tokenizer(opened[ref], "for chat_template: auto").chat_template
            if isinstance(chosen, dict):
                chosen = chosen.get("default")
            if chosen:
                found.append(chosen.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(template) < 256 and "\n" not in template and "{" not in template:
        file = resources.files("mergesmith.engine") / "chat_templates" / f"{template}.jinja"
        if file.is_file():
            return file.read_text()
    if len(template) < 20 or "{" not in template:
        raise PlanError(f"{recipe.where('chat_template')}: unknown chat template {template!r}",
                        hint=f"name one of auto, {', '.join(named_chat_templates())}, or give "
                             "the Jinja template itself")
    return template


def write_tokenizer(vocab: VocabPlan | None, donor: Checkpoint, template: str | None,
                    folder: Path) -> None:
    """The output tokenizer: the one the vocabulary plan built, else the donor's, re-saved by
    transformers with the chat template set (as mergekit writes it)."""
    tokenizer = vocab.tokenizer if vocab is not None else load_tokenizer(donor, "to set its chat template")
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
