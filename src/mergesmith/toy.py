"""Toy model families with random weights: for the quickstart, the tests and the docs.

`build_model(folder, "llama", seed=0)` writes a small random model with a word-level
tokenizer; with `base=` it writes that base plus a seeded delta, the shape of a fine-tune.
Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "mistral", "gemma", "gpt2", "bert")
VOCAB = 96


def tiny_config(arch: str, vocab: int = VOCAB, layers: int = 4, hidden: int = 32):
    import transformers as tf

    decoder = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return tf.LlamaConfig(**decoder, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**decoder, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**decoder, tie_word_embeddings=False)
    if arch == "gemma":
        return tf.GemmaConfig(**decoder, head_dim=hidden // 4, tie_word_embeddings=True)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                             bos_token_id=0, eos_token_id=0)
    if arch == "bert":
        return tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64)
    raise ValueError(arch)


def model_class(arch: str):
    import transformers as tf

    return tf.BertForMaskedLM if arch == "bert" else tf.AutoModelForCausalLM


def save_tokenizer(folder: Path, tokens: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)


def default_tokens(n: int = VOCAB) -> list[str]:
    return ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(n - 2)]


def build_model(folder: Path, arch: str, *, seed: int, base: Path | None = None, delta: float = 0.02,
                vocab: int = VOCAB, layers: int = 4, hidden: int = 32, tokens: list[str] | None = None,
                dtype: torch.dtype = torch.float32) -> Path:
    """A random model, or `base` plus a seeded delta; saved as safetensors with a tokenizer."""
    cls = model_class(arch)
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab, layers, hidden)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    if base is not None:
        reference = cls.from_pretrained(base, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            own = model.state_dict()
            for name, tensor in reference.state_dict().items():
                if tensor.is_floating_point() and name in own:
                    own[name].copy_(tensor + delta * torch.randn(tensor.shape, generator=generator))
    model.to(dtype).save_pretrained(folder)
    save_tokenizer(folder, tokens or default_tokens(vocab))
    return folder
