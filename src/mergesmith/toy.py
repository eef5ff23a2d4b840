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


MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


def tiny_moe_config(arch: str, *, experts: int = 4, layers: int = 2, hidden: int = 32, top_k: int = 2,
                    vocab: int = VOCAB, norm_topk_prob: bool | None = None):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=top_k, max_position_embeddings=64,
                  tie_word_embeddings=False)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=hidden + hidden // 2, num_local_experts=experts)
    qwen = dict(common, intermediate_size=2 * hidden, moe_intermediate_size=hidden + hidden // 2,
                num_experts=experts, norm_topk_prob=bool(norm_topk_prob))
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**qwen, shared_expert_intermediate_size=2 * hidden)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**qwen, head_dim=hidden // 4)
    raise ValueError(f"unknown MoE architecture {arch!r}; toy MoEs: {', '.join(MOE_ARCHS)}")


def build_moe(folder: Path, arch: str = "mixtral", *, experts: int = 4, seed: int = 0, layers: int = 2,
              hidden: int = 32, top_k: int = 2, vocab: int = VOCAB, norm_topk_prob: bool | None = None,
              router_scale: float = 1.0, fused: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """A random tiny transformers MoE with a word-level tokenizer. `save_pretrained` writes the
    per-expert layout (experts.{e}.w1/w2/w3 or gate/up/down_proj); `fused=True` writes the
    3-D tensors the modules hold instead (experts.gate_up_proj [E, 2I, H], experts.down_proj
    [E, H, I]), the other layout an MoE checkpoint may come in. `router_scale` multiplies the
    router rows: at the default initialisation (std 0.02) routing is close to uniform."""
    import transformers as tf
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    config = tiny_moe_config(arch, experts=experts, layers=layers, hidden=hidden, top_k=top_k, vocab=vocab,
                             norm_topk_prob=norm_topk_prob)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.02 * router_scale)  # Qwen-MoE initialises its router to zeros
    model = model.to(dtype)
    if fused:
        Path(folder).mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(folder) / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        model.save_pretrained(folder)
    save_tokenizer(folder, default_tokens(vocab))
    return folder
