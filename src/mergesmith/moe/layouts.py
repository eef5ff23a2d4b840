"""Where a dense model's tensors go in an MoE, and the MoE's config.json.

Three layouts, those of mergekit-moe: Mixtral (from Llama or Mistral), Qwen2-MoE (from Llama,
Mistral or Qwen2, with one shared expert) and Qwen3-MoE (from Qwen3). Experts are written one
tensor per expert and projection (`experts.{e}.w1`), the layout mergekit-moe wrote before
transformers 5, which transformers 4 and 5 and vLLM load (transformers 5 fuses them on load;
mergekit 0.1.5 writes them fused, which only transformers 5 reads). The config is converted with
transformers' config classes exactly as mergekit-moe converts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mergesmith.errors import PlanError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # a dense MLP's tensors


@dataclass(frozen=True)
class Layout:
    name: str  # as `architecture:` names it
    mergekit: str  # mergekit-moe's name for it; `architecture:` may give a prefix, as there
    inputs: tuple[str, ...]  # the dense model_types it is built from
    block: str  # the MoE block of layer l, under model.layers.{l}.
    expert_names: dict[str, str]  # dense projection -> the expert's tensor
    shared: bool  # one shared expert, gated by a sigmoid of its own router row
    config_class: str
    count_key: str  # the config field holding the number of experts

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def expert(self, layer: int, e: int, projection: str) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{e}.{self.expert_names[projection]}.weight"

    def shared_expert(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert.{projection}.weight"

    def shared_gate(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert_gate.weight"


SAME = {p: p for p in PROJECTIONS}
LAYOUTS = {
    "mixtral": Layout("mixtral", "Mixtral", ("llama", "mistral"), "block_sparse_moe",
                      {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}, False,
                      "MixtralConfig", "num_local_experts"),
    "qwen2_moe": Layout("qwen2_moe", "Qwen MoE", ("llama", "mistral", "qwen2"), "mlp", SAME, True,
                        "Qwen2MoeConfig", "num_experts"),
    "qwen3_moe": Layout("qwen3_moe", "Qwen3 MoE", ("qwen3",), "mlp", SAME, False,
                        "Qwen3MoeConfig", "num_experts"),
}


def supported() -> str:
    return "; ".join(f"{l.name} from {'/'.join(l.inputs)}" + (" (with one shared expert)" if l.shared else "")
                     for l in LAYOUTS.values())


def pick_layout(asked: str | None, model_type: str, shared: int | None, base_label: str,
                where: str = "architecture") -> Layout:
    """The output layout: `asked` (ours or a prefix of mergekit's name, as mergekit-moe matches
    it), else mergekit's choice: Mixtral where it fits, else the one layout that takes the model
    with `shared` shared experts (None: with or without)."""
    if asked is not None:
        key = asked.strip().lower()
        candidates = [l for l in LAYOUTS.values()
                      if key == l.name or l.mergekit.lower().startswith(key)]
        if not candidates:
            raise PlanError(f"{where}: {asked!r} is not an MoE layout mergesmith writes",
                            hint=f"supported: {supported()}")
    else:
        candidates = list(LAYOUTS.values())
    fitting = [l for l in candidates if model_type in l.inputs and shared in (None, l.shared)]
    if fitting:
        return fitting[0]
    takes = [l for l in candidates if model_type in l.inputs]
    if takes:  # the model fits; the shared experts do not
        l = takes[0]
        need = "exactly one shared expert (shared_experts:)" if l.shared else "no shared experts"
        head = f"{where}: {l.name}" if asked is not None else \
            f"{base_label} is a {model_type} model, whose MoE layout {l.name}"
        raise PlanError(f"{head} takes {need}; the config gives {shared}",
                        hint=f"supported: {supported()}")
    what = f"the layout {candidates[0].name} does not take" if asked is not None else "no MoE layout takes"
    raise PlanError(f"{base_label} is a {model_type} model, which {what}",
                    hint=f"supported: {supported()}; transformers has no MoE class for other "
                         "dense families")


def moe_config(layout: Layout, base_config: dict, experts: int, top_k: int, dtype: str | None,
               norm_topk_prob: bool | None) -> dict:
    """The MoE's config.json, as mergekit-moe writes it (its _generate_config, then
    save_pretrained's difference from the class defaults)."""
    import transformers as tf

    base = tf.AutoConfig.for_model(**base_config)
    if layout.name == "mixtral":
        if not isinstance(base, tf.MistralConfig):
            mistral = tf.MistralConfig(**base.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base.max_position_embeddings
            base = mistral
        out = tf.MixtralConfig(**base.to_dict())
        out.num_local_experts = experts
        out.sliding_window = None
    else:
        out = getattr(tf, layout.config_class)(**base.to_dict())
        out.num_experts = experts
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True if norm_topk_prob is None else norm_topk_prob
        out.moe_intermediate_size = out.intermediate_size
        if layout.shared:
            out.sliding_window = None
            out.use_sliding_window = False
            out.shared_expert_intermediate_size = out.intermediate_size
    out.architectures = [layout.config_class.replace("Config", "ForCausalLM")]
    out.num_experts_per_tok = top_k
    if dtype is not None:
        out.dtype = dtype
    return json.loads(out.to_json_string(use_diff=True))


def non_expert_shapes(layout: Layout, config: dict) -> dict[str, tuple[int, ...]]:
    """The tensors besides the MoE blocks that a transformers model of this layout and config
    (moe_config's) holds, with their shapes, a tied output head once, as its embedding: what the
    base's tensors are checked against. A table of the modeling code's parameters rather than a
    model built on the meta device, whose import costs more start-up than writing a small MoE;
    tests/test_moe_assemble.py checks it against that model."""
    hidden, vocab, heads = config["hidden_size"], config["vocab_size"], config["num_attention_heads"]
    kv = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    linear = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden),
              "v_proj": (kv * head_dim, hidden), "o_proj": (hidden, heads * head_dim)}
    biased = {"mixtral": (), "qwen2_moe": ("q_proj", "k_proj", "v_proj") if config.get("qkv_bias", True) else (),
              "qwen3_moe": tuple(linear) if config.get("attention_bias", False) else ()}[layout.name]
    layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
    for proj, shape in linear.items():
        layer[f"self_attn.{proj}.weight"] = shape
        if proj in biased:
            layer[f"self_attn.{proj}.bias"] = shape[:1]
    if layout.name == "qwen3_moe":  # normed per head
        layer.update({"self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,)})
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    shapes.update((f"model.layers.{l}.{name}", shape)
                  for l in range(config["num_hidden_layers"]) for name, shape in layer.items())
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes
