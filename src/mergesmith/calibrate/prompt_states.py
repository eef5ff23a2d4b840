"""Hidden states of prompts through a model: what an MoE's router rows are made of (mergekit-moe's
`hidden` gate mode, FlexOlmo's domain embeddings).

Prompts are tokenized as mergekit-moe does: the tokenizer's BOS string (if it has one) glued to
the prompt, no other special tokens. Batches are right-padded and each prompt's state is read at
its own positions, so a prompt's state does not depend on the batch it lands in:
- "hidden" / "hidden_last": the last real token. (mergekit pads on the left with BOS, which on a
  RoPE model gives the same state up to rounding; with right padding it would read a pad.)
- "hidden_avg": the mean over the prompt's real tokens. mergekit also averages over its left
  padding, so its rows depend on the lengths of the other prompts of the set; ours do not, and
  the two agree when a set's prompts have one length.
hidden_states[l] is the input of layer l (l = 0: the embedding output), l < num_layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergesmith.calibrate.collect import progress_bar
from mergesmith.calibrate.forward import CalibrationModel, pad_id, padded, mean_pool
from mergesmith.errors import CalibrationError
from mergesmith.recipe import Calibration

MODES = ("hidden", "hidden_last", "hidden_avg")


def load_prompt_model(source, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, batch_size: int = 8) -> CalibrationModel:
    """The model's bare decoder (no LM head: only hidden states are read) and its tokenizer.
    `source`: a model folder, or an opened input (io/adapted.py's open_input): a `BASE+ADAPTER`
    view (or a delta pack) runs as mergekit reads that reference elsewhere, the adapter merged in:
    its base's module with every weight read through the view, one tensor at a time."""
    folder = Path(getattr(source, "path", source))
    cal = Calibration(batch_size=batch_size)
    model = CalibrationModel.load(folder, cal, folder, device=device, dtype=dtype, objective="features")
    if len(getattr(source, "sources", ())) > 1:  # the folder's weights are not the model's
        with torch.no_grad():
            for name, param in model.parameters().items():
                param.copy_(source.read(name))
    return model


def load_prompt_tokenizer(folder: str | Path):
    """The folder's tokenizer (for cheap_embed, which runs no model)."""
    from mergesmith.calibrate.forward import folder_tokenizer

    return folder_tokenizer(Path(folder))


def tokenize_prompts(tokenizer, prompts: list[str], who: str, context: int | None = None
                     ) -> list[list[int]]:
    """BOS + prompt per prompt, as mergekit-moe's tokenize_prompts (no truncation: a prompt
    longer than `context` is refused)."""
    bos = tokenizer.bos_token or ""
    ids = tokenizer([bos + p for p in prompts], add_special_tokens=False)["input_ids"]
    for prompt, tokens in zip(prompts, ids):
        if not tokens:
            raise CalibrationError(f"{who}: the prompt {prompt!r} tokenizes to nothing")
        if context is not None and len(tokens) > context:
            raise CalibrationError(f"{who}: a prompt is {len(tokens)} tokens long, the model "
                                   f"takes at most {context}", hint="shorten the prompt")
    return ids


def padded_prompts(tokenizer, prompts: list[str], who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All the prompts as one right-padded batch: ids and attention mask [B, T]."""
    if not prompts:
        raise CalibrationError(f"{who}: no prompts")
    return padded(tokenize_prompts(tokenizer, prompts, who), pad_id(tokenizer))


def _batches(model: CalibrationModel, sequences: list[list[int]]):
    size = model.cal.batch_size
    pad = pad_id(model.tokenizer)
    for start in range(0, len(sequences), size):
        ids, mask = padded(sequences[start:start + size], pad)
        yield ids.to(model.device), mask.to(model.device)


@torch.no_grad()
def prompt_states(model: CalibrationModel, prompts: list[str], mode: str = "hidden", *,
                  who: str = "prompts", bar=None) -> torch.Tensor:
    """Mean over the prompts of each layer's input state [num_layers, d] (fp32), read at the
    last real token ("hidden", "hidden_last") or averaged over the real tokens ("hidden_avg")."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not prompts:
        raise CalibrationError(f"{who}: no prompts")
    total = None
    sequences = tokenize_prompts(model.tokenizer, prompts, who, model.context)
    for ids, mask in _batches(model, sequences):
        hidden = model.module(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        states = torch.stack([h.float() for h in hidden[:-1]])  # [L, B, T, d]
        if mode == "hidden_avg":
            weights = mask.to(states.dtype)[None, :, :, None]
            per_prompt = (states * weights).sum(2) / weights.sum(2)
        else:
            last = (mask.sum(1) - 1).long()  # right padding: the last real token
            per_prompt = states[:, torch.arange(len(last), device=ids.device), last]
        total = per_prompt.sum(1) if total is None else total + per_prompt.sum(1)
        if bar is not None:
            bar.advance(len(ids))
    return (total / len(prompts)).cpu()


@torch.no_grad()
def pooled_states(model: CalibrationModel, texts: list[str], *, who: str = "texts",
                  bar=None) -> torch.Tensor:
    """Each text's last hidden state mean-pooled over its real tokens, [n, d] fp32: FlexOlmo's
    embedding of a document (texts tokenized as the model's tokenizer does by default)."""
    if not texts:
        raise CalibrationError(f"{who}: no texts")
    ids = model.tokenizer(list(texts))["input_ids"]
    for text, tokens in zip(texts, ids):
        if not tokens:
            raise CalibrationError(f"{who}: the text {text[:40]!r} tokenizes to nothing")
    limit = model.context
    ids = [tokens[:limit] if limit else tokens for tokens in ids]
    rows = []
    for batch_ids, mask in _batches(model, ids):
        out = model.module(input_ids=batch_ids, attention_mask=mask)
        rows.append(mean_pool(out.last_hidden_state.float(), mask).cpu())
        if bar is not None:
            bar.advance(len(batch_ids))
    return torch.cat(rows)


def prompt_progress(on: bool):
    """A progress bar over prompts (calibrate/collect.py's), a no-op when off."""
    return progress_bar(on)
