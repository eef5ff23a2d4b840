"""FlexOlmo (Shi et al. 2025, arXiv:2507.07024): experts trained apart, each beside a frozen copy
of a public model's FFN, merged into one MoE whose experts can be left out or added later.

Inputs: a public dense OLMo-2 model and N experts, each either a 2-expert FlexOlmo MoE
[public FFN, own FFN] (as FlexOlmo's data owners train them: router rows [r_pub, r_i]) or a
dense OLMo-2 model whose non-FFN tensors are the public model's. Output: one FlexOlmo MoE
(transformers' FlexOlmoForCausalLM) of N + 1 experts in the order [public, 1..N]: the public
model's shared tensors, expert k's FFN in slot k, router rows [r_pub, r_1..r_N] in every layer.

Router rows: a 2-expert expert brings its trained r_i (row 1) and the frozen r_pub (row 0,
which must be bitwise the same in every such expert); texts given for a member replace its rows
by its domain embedding, the embedder's mean-pooled last hidden states averaged over the texts
(methods/moe_router.py), one row for every layer. A dense expert needs texts; so does the
public row when no 2-expert expert brings it.

Checks, before anything is written: every expert's shared tensors and public FFN (and r_pub)
are bitwise the public model's (the merge script of FlexOlmo asserts the same), shapes agree.
Opt-out: `drop_experts` writes the MoE without some experts (FFNs and router rows re-indexed
together); opt-in: `add_experts` appends experts to a built MoE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergesmith.calibrate.prompt_states import load_prompt_model, pooled_states, prompt_progress
from mergesmith.engine.program import Output, Program, write_program
from mergesmith.errors import PlanError
from mergesmith.io.checkpoint import Checkpoint
from mergesmith.io.views import View, computed, reindexed, stored
from mergesmith.methods.moe_router import mean_embedding

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DENSE_FFN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
MOE_FFN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(experts\.\d+\.(gate_proj|up_proj|down_proj)|gate)\.weight$")
# what makes two OLMo-2 / FlexOlmo configs compute the same function of the shared tensors
SAME_CONFIG = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
               "rope_scaling", "attention_bias", "tie_word_embeddings")


def dense_ffn(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def expert_ffn(layer: int, slot: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{slot}.{proj}.weight"


def router(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


@dataclass
class Member:
    """One expert of the output: where its FFN is read, and its router rows [L, d] (None: from
    texts)."""

    label: str
    ck: Checkpoint
    slot: int | None  # its FFN's slot in ck (None: ck is dense)
    rows: torch.Tensor | None = None
    texts: list[str] | None = field(default=None, repr=False)

    def ffn(self, layer: int, proj: str) -> str:
        return dense_ffn(layer, proj) if self.slot is None else expert_ffn(layer, self.slot, proj)


# ---- building --------------------------------------------------------------------------------

def flexolmo(public: str | Path, experts: list[str | Path], out: str | Path, *,
             texts: list[list[str] | None] | None = None, public_texts: list[str] | None = None,
             embedder: str | Path | None = None, experts_per_token: int = 2,
             dtype: torch.dtype | None = None, device: str = "cpu", progress: bool = False,
             **write) -> Path:
    """Write the FlexOlmo MoE of `public` and `experts` at `out`; `texts[i]` (optional) are
    domain texts of expert i, `public_texts` the public data's. `write`: write_program's options."""
    pub = _open(public)
    _check_public(pub)
    members = [Member(f"public ({pub.label})", pub, None, texts=public_texts)]
    for i, ref in enumerate(experts):
        members.append(_expert_member(pub, _open(ref), members[0], None if texts is None else texts[i]))
    return _write(pub, members, out, embedder, experts_per_token, dtype, device, progress, write)


def add_experts(folder: str | Path, experts: list[str | Path], out: str | Path, *,
                texts: list[list[str] | None] | None = None, embedder: str | Path | None = None,
                device: str = "cpu", progress: bool = False, **write) -> Path:
    """Opt-in: the FlexOlmo MoE at `folder` with `experts` appended (checked against its shared
    tensors and its public expert, slot 0)."""
    moe = _open(folder)
    members = _moe_members(moe)
    for i, ref in enumerate(experts):
        members.append(_expert_member(moe, _open(ref), members[0], None if texts is None else texts[i]))
    top_k = moe.config.get("num_experts_per_tok", 2)
    return _write(moe, members, out, embedder, top_k, None, device, progress, write)


def drop_experts(folder: str | Path, drop: list[int], out: str | Path, **write) -> Path:
    """Opt-out: the FlexOlmo MoE at `folder` without experts `drop` (1..N; 0 is the public one):
    the remaining FFNs and router rows keep their order, re-indexed together."""
    moe = _open(folder)
    count = _check_flexolmo(moe)
    bad = [i for i in drop if not 1 <= i < count]
    if bad:
        raise PlanError(f"{moe.label}: cannot drop expert(s) {bad}: it has experts 1..{count - 1} "
                        "besides the public expert 0", hint="the public expert holds the shared model")
    keep = [k for k in range(count) if k not in set(drop)]
    entries = {}
    for name in moe.tensors:
        match = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$", name)
        if match:
            layer, slot, proj = int(match[1]), int(match[2]), match[3]
            if slot in keep:
                entries[expert_ffn(layer, keep.index(slot), proj)] = stored(moe, name)
        elif re.match(r"^model\.layers\.\d+\.mlp\.gate\.weight$", name):
            entries[name] = reindexed(moe, name, {0: torch.tensor(keep)})
        else:
            entries[name] = stored(moe, name)
    config = _moe_config(moe.config, len(keep), moe.config.get("num_experts_per_tok", 2))
    view = View(moe.label, config, entries, [moe])
    summary = (f"The FlexOlmo MoE {moe.label} without expert(s) {sorted(set(drop))} (opt-out): experts "
               f"{keep} of it, in that order, with their router rows.")
    return _program_out(view, [moe], config, f"FlexOlmo MoE of {len(keep)} experts (opt-out)",
                        summary, None, out, write)


# ---- members and checks ----------------------------------------------------------------------

def _open(ref: str | Path) -> Checkpoint:
    """As `mergesmith moe` opens its models: `BASE+ADAPTER` too (an adapter on the FFN only, or
    the expert's shared tensors stop being the public model's)."""
    from mergesmith.moe.assemble import open_model

    return open_model(str(ref), {})


def _check_public(pub: Checkpoint) -> None:
    kind = pub.config.get("model_type")
    if kind != "olmo2":
        raise PlanError(f"{pub.label}: the public model is {kind}, FlexOlmo's MoE is OLMo-2's "
                        "architecture (olmo2 -> flex_olmo)",
                        hint="for other families assemble a Mixtral-style MoE with `mergesmith moe`")


def _check_flexolmo(ck: Checkpoint) -> int:
    if ck.config.get("model_type") != "flex_olmo":
        raise PlanError(f"{ck.label}: not a FlexOlmo MoE (model_type {ck.config.get('model_type')})")
    return int(ck.config["num_experts"])


def _shared_names(ck: Checkpoint) -> list[str]:
    return [n for n in ck.tensors if not (DENSE_FFN.match(n) or MOE_FFN.match(n))]


def _layers(ck: Checkpoint) -> int:
    return int(ck.config["num_hidden_layers"])


def _moe_members(moe: Checkpoint) -> list[Member]:
    count = _check_flexolmo(moe)
    gates = torch.stack([moe.read(router(l)).float() for l in range(_layers(moe))])  # [L, E, d]
    return [Member(f"{moe.label} expert {k}", moe, k, gates[:, k]) for k in range(count)]


def _expert_member(reference: Checkpoint, ck: Checkpoint, public: Member,
                   texts: list[str] | None) -> Member:
    """Expert `ck` as a member, after checking its shared tensors (and, for a 2-expert MoE, its
    public FFN and r_pub) bitwise against the reference's."""
    kind = ck.config.get("model_type")
    for key in SAME_CONFIG:
        if ck.config.get(key) != reference.config.get(key):
            raise PlanError(f"{ck.label}: config.json {key} is {ck.config.get(key)!r}, "
                            f"{reference.label}'s is {reference.config.get(key)!r}",
                            hint="an expert keeps the public model's architecture and settings")
    if kind == "flex_olmo":
        if int(ck.config.get("num_experts", 0)) != 2:
            raise PlanError(f"{ck.label}: a FlexOlmo expert is a 2-expert MoE [public FFN, own FFN], "
                            f"this one has {ck.config.get('num_experts')} experts")
        _same(ck, reference, {n: n for n in _shared_names(reference)})
        layers = range(_layers(reference))
        _same(ck, public.ck, {expert_ffn(l, 0, p): public.ffn(l, p) for l in layers for p in PROJECTIONS},
              what="its public FFN (expert 0) differs from the public model's")
        gates = torch.stack([ck.read(router(l)) for l in layers])  # [L, 2, d] as stored
        if public.rows is None:
            public.rows = gates[:, 0].float()
        elif not torch.equal(gates[:, 0].float(), public.rows):
            raise PlanError(f"{ck.label}: its router row 0 (the public expert's) differs from "
                            f"{public.label}'s", hint="r_pub stays frozen while an expert trains")
        return Member(ck.label, ck, 1, gates[:, 1].float() if texts is None else None, texts)
    if kind != reference.config.get("model_type") and kind != "olmo2":
        raise PlanError(f"{ck.label}: model_type {kind}; a FlexOlmo expert is an OLMo-2 model or a "
                        "2-expert FlexOlmo MoE")
    _same(ck, reference, {n: n for n in _shared_names(reference)})
    if texts is None:
        raise PlanError(f"{ck.label}: a dense expert has no router row of its own",
                        hint="give domain texts for it (its row is their mean embedding)")
    return Member(ck.label, ck, None, None, texts)


def _same(ck: Checkpoint, reference: Checkpoint, names: dict[str, str],
          what: str = "its shared tensor {name!r} differs from the public model's") -> None:
    """ck[name] == reference[ref_name] bitwise (dtype, shape, values) for each pair."""
    for name, ref_name in names.items():
        if name not in ck.tensors:
            raise PlanError(f"{ck.label}: no tensor {name!r} (the public model has {ref_name!r})")
        a, b = ck.tensors[name], reference.tensors[ref_name]
        if a.shape != b.shape or a.dtype != b.dtype or not _equal(ck, name, reference, ref_name):
            raise PlanError(f"{ck.label}: {what.format(name=name)} "
                            f"({list(a.shape)} {a.dtype} against {list(b.shape)} {b.dtype})",
                            hint="FlexOlmo's experts train only their own FFN and router row; "
                                 "everything else must stay the public model's")


def _equal(a: Checkpoint, name: str, b: Checkpoint, other: str, block: int = 64 << 20) -> bool:
    """Bitwise equality of two same-shaped tensors, read in row blocks of about `block` bytes
    (an embedding matrix need not be held twice)."""
    def bits(t: torch.Tensor) -> torch.Tensor:  # NaN == NaN, -0.0 != 0.0: bytes, not values
        return t.contiguous().reshape(-1).view(torch.uint8)

    info = a.tensors[name]
    if len(info.shape) < 2:
        return torch.equal(bits(a.read(name)), bits(b.read(other)))
    step = max(1, block // max(info.row_bytes, 1))
    return all(torch.equal(bits(a.read(name, (r, min(r + step, info.shape[0])))),
                           bits(b.read(other, (r, min(r + step, info.shape[0])))))
               for r in range(0, info.shape[0], step))


# ---- rows and output -------------------------------------------------------------------------

def _embed_rows(members: list[Member], embedder: str | Path | None, public: Checkpoint,
                device: str, progress: bool) -> None:
    """Each member with texts gets its domain embedding as its row in every layer."""
    wanted = [m for m in members if m.texts is not None]
    missing = [m.label for m in members if m.texts is None and m.rows is None]
    if missing:
        raise PlanError(f"{missing[0]}: no router row: neither a 2-expert expert brings it nor "
                        "are texts given", hint="give domain texts for it")
    if not wanted:
        return

    source = _open(embedder) if embedder is not None else public
    model = load_prompt_model(source, device=device)
    width, d_model = model.module.config.hidden_size, public.config["hidden_size"]
    if width != d_model:
        raise PlanError(f"{source.label}: the embedder's hidden size is {width}, the model's is {d_model}",
                        hint="router rows are domain embeddings used as they are: the sizes must match")
    with prompt_progress(progress) as bar:
        bar.start("domain embeddings (texts)", sum(len(m.texts) for m in wanted))
        for m in wanted:
            row = mean_embedding(pooled_states(model, m.texts, who=m.label, bar=bar))
            m.rows = row.expand(_layers(public), -1).clone()


def _moe_config(config: dict, experts: int, top_k: int) -> dict:
    out = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    out.update(architectures=["FlexOlmoForCausalLM"], model_type="flex_olmo", num_experts=experts,
               num_experts_per_tok=min(top_k, experts), norm_topk_prob=config.get("norm_topk_prob", False),
               output_router_logits=False, router_aux_loss_coef=config.get("router_aux_loss_coef", 0.01))
    return out


def _write(shared: Checkpoint, members: list[Member], out, embedder, top_k: int, dtype, device,
           progress, write) -> Path:
    if top_k < 1:
        raise PlanError(f"experts_per_token is {top_k}", hint="route each token to at least 1 expert")
    _embed_rows(members, embedder, shared, device, progress)
    layers = _layers(shared)
    entries = {n: stored(shared, n) for n in _shared_names(shared)}
    for l in range(layers):
        for k, m in enumerate(members):
            for p in PROJECTIONS:
                entries[expert_ffn(l, k, p)] = stored(m.ck, m.ffn(l, p))
        rows = torch.stack([m.rows[l] for m in members])  # [N + 1, d]: [public, 1..N]
        entries[router(l)] = computed(router(l), rows)
    config = _moe_config(shared.config, len(members), top_k)
    sources = list({id(m.ck): m.ck for m in members}.values())
    view = View("flexolmo", config, entries, sources)
    names = ", ".join(m.label for m in members)
    summary = (f"A FlexOlmo MoE (Shi et al. 2025, arXiv:2507.07024) of {len(members)} experts in "
               f"the order {names}: the shared tensors of {shared.label}, expert k's FFN in slot k, "
               f"router rows [r_pub, r_1..r_N] in every layer, top-{config['num_experts_per_tok']}.")
    if dtype is None:
        dtype = shared.tensors[_shared_names(shared)[0]].dtype
    return _program_out(view, sources, config, f"FlexOlmo MoE of {len(members)} experts", summary,
                        dtype, out, {"progress": progress, **write})


def _program_out(view: View, models: list[Checkpoint], config: dict, title: str, summary: str,
                 dtype, out, write) -> Path:
    outputs = [Output(name, [(view, name)], layer=_layer_of(name)) for name in view.entries]
    program = Program(outputs, config, models[0], title, summary, dtype=dtype,
                      models={ck.label: ck for ck in models})
    return write_program(program, out, **write)


def _layer_of(name: str) -> int | None:
    match = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(match[1]) if match else None
