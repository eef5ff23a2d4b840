"""Tiny random Hugging Face models for the tests: built here, never downloaded.

`zoo(arch)` gives a base and two experts (base plus small seeded deltas) of one architecture,
saved as safetensors with a word-level tokenizer, a few hundred KB each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

ARCHS = ("llama", "qwen2", "mistral", "gemma", "gpt2", "bert")
VOCAB = 96


def tiny_config(arch: str, vocab: int = VOCAB, layers: int = 4):
    import transformers as tf

    decoder = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return tf.LlamaConfig(**decoder, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**decoder, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**decoder, tie_word_embeddings=False)
    if arch == "gemma":
        return tf.GemmaConfig(**decoder, head_dim=8, tie_word_embeddings=True)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                             bos_token_id=0, eos_token_id=0)
    if arch == "bert":
        return tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers,
                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
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
                vocab: int = VOCAB, layers: int = 4, tokens: list[str] | None = None,
                dtype: torch.dtype = torch.float32) -> Path:
    """A random model, or `base` plus a seeded delta; saved as safetensors with a tokenizer."""
    cls = model_class(arch)
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab, layers)
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


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """zoo(arch) -> {"base": folder, "e1": folder, "e2": folder}, built once per session."""
    built: dict[str, dict[str, Path]] = {}

    def get(arch: str = "llama") -> dict[str, Path]:
        if arch not in built:
            root = tmp_path_factory.mktemp(f"zoo-{arch}")
            base = build_model(root / "base", arch, seed=0)
            built[arch] = {
                "base": base,
                "e1": build_model(root / "e1", arch, seed=1, base=base),
                "e2": build_model(root / "e2", arch, seed=2, base=base),
            }
        return built[arch]

    return get


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
