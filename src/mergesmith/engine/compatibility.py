"""Whether models can be merged at all: one architecture, one config where it fixes the
computation, one set of tensors (layer numbers aside), and a config that describes its own
weights. The plan (engine/plan.py) refuses the first difference, naming both models; with
allow_crimes a difference of architecture or config becomes a warning, a missing tensor never
does (it would be dropped, or invented from other tensors)."""

from __future__ import annotations

from mergesmith.errors import PlanError
from mergesmith.io import Checkpoint
from mergesmith.io import tensor_names as L
from mergesmith.recipe import Recipe

# Config fields that fix the shape of the computation: models that differ in one do not compute
# the same function of their tensors, so averaging those tensors means nothing.
SHAPE_KEYS = ("hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "ffn_dim",
              "num_attention_heads", "n_head", "num_key_value_heads", "head_dim",
              "tie_word_embeddings")
CRIMES_HINT = "pass --allow-crimes (allow_crimes=True) if you mean to merge them anyway"


def check_config_matches_weights(ck: Checkpoint) -> None:
    """The output config is a copy of one input's, so it must describe that input's tensors."""
    key = L.layer_count_key(ck.config)
    have = L.num_layers(list(ck.tensors))
    said = ck.config.get(key) if key else None
    # the numbered blocks may also hold multi-token-prediction layers after the last one
    # (DeepSeek-V3), or a longer decoder stack of an encoder-decoder (T5)
    stacks = [said + (ck.config.get("num_nextn_predict_layers") or 0) if isinstance(said, int) else 0]
    stacks += [ck.config[k] for k in ("num_decoder_layers", "decoder_layers", "encoder_layers")
               if isinstance(ck.config.get(k), int)]
    if isinstance(said, int) and have and have != max(stacks):
        raise PlanError(f"{ck.label}: config.json says {key}: {said}, but its weights have "
                        f"{have} layers", hint="the config belongs to another model; fix or replace it")
    vocab = ck.config.get("vocab_size")
    embedding = next((n for n in sorted(ck.tensors) if L.INPUT_EMBEDDINGS.search(n)), None)
    rows = ck.tensors[embedding].shape[0] if embedding and ck.tensors[embedding].shape else None
    if isinstance(vocab, int) and rows is not None and rows != vocab:
        raise PlanError(f"{ck.label}: config.json says vocab_size: {vocab}, but {embedding!r} has "
                        f"{rows} rows", hint="the config belongs to another model; fix or replace it")


def ties(ck: Checkpoint) -> bool:
    """Whether the model's output head is its input embedding (transformers' default: yes)."""
    return ck.config.get("tie_word_embeddings", True) is not False


def check_compatible(recipe: Recipe, slices: list, ref: Checkpoint,
                      allow_crimes: bool, warnings: list[str]) -> None:
    """Refuse models that are not the same architecture: the first difference of architecture,
    config or tensor names between `ref` and each other model merged. With allow_crimes a
    difference of architecture or config is a warning; a tensor some models lack stays an error
    (it would be dropped, or invented from other tensors)."""
    merged = {id(s.ckpt): s.ckpt for sl in slices for s in [*sl.sources, sl.base, sl.lines_base]
              if s is not None}
    for ck in merged.values():
        if ck is ref:
            continue
        found = config_difference(ref, ck, layers=recipe.slices is None)
        if found is not None:
            what = f"{ref.label} and {ck.label} are different models: {found}"
            if not allow_crimes:
                raise PlanError(what, hint=CRIMES_HINT)
            warnings.append(f"{what} (merged anyway: allow_crimes)")
        only = tensor_difference(ref, ck)
        if only is not None:
            name, has, lacks = only
            untied = (" (its config says tie_word_embeddings: false, so its embedding is not its "
                      "output head)" if L.tied_embedding(set(lacks.tensors), name) else "")
            raise PlanError(f"{ref.label} and {ck.label} have different tensors: {has.label} has "
                            f"{name!r}, {lacks.label} has no such tensor{untied}",
                            hint="mergesmith never drops or invents a tensor, with allow_crimes "
                                 "too; merge models of one architecture")


def config_difference(a: Checkpoint, b: Checkpoint, *, layers: bool) -> str | None:
    for key in ("architectures", "model_type", *SHAPE_KEYS, *(L.LAYER_COUNT_KEYS if layers else ())):
        if key == "tie_word_embeddings":
            mine, theirs = ties(a), ties(b)
        elif key in a.config and key in b.config:  # a field one config leaves out is no evidence
            mine, theirs = a.config[key], b.config[key]
        else:
            continue
        if mine != theirs:
            return f"{key} {mine!r} against {theirs!r}"
    return None


def tensor_difference(a: Checkpoint, b: Checkpoint) -> tuple[str, Checkpoint, Checkpoint] | None:
    """(name, the model that has it, the one that lacks it) for the first tensor name (layer
    numbers aside) only one of them has. A tied model's head is its embedding, so it has one."""
    def names(ck: Checkpoint, other: Checkpoint) -> set[str]:
        found = {n if L.layer_of(n) is None else L.with_layer(n, 0) for n in ck.tensors}
        if ties(ck):
            own = set(ck.tensors)
            found |= {n for n in other.tensors if L.layer_of(n) is None and L.tied_embedding(own, n)}
        return found

    mine, theirs = names(a, b), names(b, a)
    for name in sorted(mine ^ theirs):
        return (name, a, b) if name in mine else (name, b, a)
    return None
