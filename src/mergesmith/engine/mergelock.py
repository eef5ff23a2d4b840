"""MergeLock on model folders: `lock` writes a model whose attention carries random per-head
transforms (same outputs, unmergeable), `unlock` undoes them from a reference model, and
`lock_findings` is `mergesmith check`'s test for a locked input. methods/mergelock.py has the
maths. Lock and unlock are programs (engine/program.py) whose attention tensors are views
transformed head by head as they are read: the engine streams them like any model.

Detection and unlock read one layer's attention weights at a time (float64), never a model.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Callable

import torch
import yaml

from mergesmith.engine.compatibility import check_config_matches_weights, config_difference
from mergesmith.engine.program import Output, Program, write_program
from mergesmith.errors import PlanError
from mergesmith.io.adapted import open_input
from mergesmith.io.views import Entry, View, stored
from mergesmith.methods.mergelock import (Evidence, Heads, LayerLock, check_lock, draw_lock, fit_lock,
                                          layer_evidence, transform_o, transform_rows, weight_distance)

# decoders whose attention is q/k/v/o_proj with RoPE over whole heads and nothing between the
# projection and the rotation (Qwen3's and Gemma 3's per-head q/k norms would not commute)
SUPPORTED = ("llama", "mistral", "qwen2", "gemma")
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def attention_heads(ck) -> Heads:
    """The model's attention shape, or a PlanError naming the model and what is not supported."""
    config, label = ck.config, ck.label
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        raise PlanError(f"{label}: MergeLock has no attention layout for architecture {kind!r}",
                        hint=f"it supports {', '.join(SUPPORTED)} (q/k/v/o_proj with RoPE)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if float(config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0) != 1.0:
        raise PlanError(f"{label}: RoPE over part of each head is not supported by MergeLock",
                        hint="partial_rotary_factor must be 1")
    queries = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or queries
    if not queries or queries % kv:
        raise PlanError(f"{label}: config.json gives {queries} attention heads and {kv} key/value heads",
                        hint="MergeLock needs whole groups of query heads per key/value head")
    dim = config.get("head_dim") or config["hidden_size"] // queries
    if dim % 2:
        raise PlanError(f"{label}: head dim {dim} is odd; RoPE pairs need an even one")
    return Heads(queries, kv, dim, rope=True)


def _name(layer: int, kind: str, what: str = "weight") -> str:
    return f"model.layers.{layer}.self_attn.{PROJECTIONS[kind]}.{what}"


def layer_count(ck) -> int:
    return int(ck.config["num_hidden_layers"])


def layer_weights(ck, layer: int) -> dict[str, torch.Tensor]:
    """{"q", "k", "v": weight with its bias as a last column (when it has one), "o": weight}."""
    found = {}
    for kind in "qkvo":
        weight = ck.read(_name(layer, kind)).double()
        bias = _name(layer, kind, "bias")
        if kind != "o" and bias in ck.tensors:
            weight = torch.cat([weight, ck.read(bias).double()[:, None]], dim=1)
        found[kind] = weight
    return found


def _transformed(ck, name: str, kind: str, lock: LayerLock, heads: Heads) -> Entry:
    """`ck`'s tensor `name` with the layer's lock applied as it is read: rows are read by whole
    heads (a head's block is one matrix product), o_proj rows as asked (its heads are columns)."""
    info, d = ck.tensors[name], heads.dim

    def read(rows):
        if kind == "o":
            return transform_o(ck.read(name, rows), lock, heads)
        start, stop = rows if rows is not None else (0, info.shape[0])
        first, last = start // d, -(-stop // d)
        block = ck.read(name, (first * d, last * d))
        return transform_rows(kind, block, lock, heads, first)[start - first * d:stop - first * d]

    return Entry(info, read)


def locked_view(ck, locks: dict[int, LayerLock], label: str | None = None) -> View:
    """`ck` with each layer's transforms applied to its q/k/v (weights and biases) and o_proj."""
    heads = attention_heads(ck)
    for lock in locks.values():
        check_lock(lock, heads)
    targets = {_name(layer, kind, what): (kind, lock) for layer, lock in locks.items()
               for kind in "qkvo" for what in ("weight", "bias") if not (kind == "o" and what == "bias")}
    entries = {name: _transformed(ck, name, *targets[name], heads) if name in targets else stored(ck, name)
               for name in ck.tensors}
    return View(label or ck.label, ck.config, entries, [ck])


def _open(ref) -> object:
    return ref if hasattr(ref, "tensors") else open_input(str(ref), {}, None, check_config_matches_weights)


def _program(view: View, source, title: str, summary: str, settings: dict) -> Program:
    outputs = [Output(name, [(view, name)]) for name in view.tensors]
    return Program(outputs, dict(source.config), source, title, summary,
                   record=("mergelock.yml", yaml.safe_dump(settings, sort_keys=False)),
                   models={settings["model"]: source})


def lock(model, out: str | Path, *, seed: int | None = None, spread: float = 2.0,
         layers: list[int] | None = None, **write) -> Path:
    """Write `model` locked to `out`: per layer and key/value head, random M (a rotation-scaling
    per RoPE pair) and N (singular values log-uniform in [1/spread, spread]). Without `seed` the
    transforms come from the OS's randomness and are not recorded anywhere: the written folder
    does not hold the key. `write`: write_program's options (shard_size, device, overwrite...)."""
    ck = _open(model)
    heads = attention_heads(ck)
    if not spread > 1.0:
        raise PlanError(f"lock: spread must be > 1, got {spread!r}", hint="2 scales by 1/2 to 2")
    chosen = list(range(layer_count(ck))) if layers is None else layers
    bad = [x for x in chosen if not 0 <= x < layer_count(ck)]
    if bad:
        raise PlanError(f"lock: {ck.label} has no layer {bad[0]}", hint=f"layers 0-{layer_count(ck) - 1}")
    gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    locks = {layer: draw_lock(heads, gen, spread) for layer in chosen}
    summary = (f"{ck.label} with MergeLock transforms on the attention of {len(locks)} layer(s): the "
               "same outputs, but merging it with related models no longer works.")
    settings = {"method": "mergelock", "model": str(model), "spread": spread, "layers": chosen}
    return write_program(_program(locked_view(ck, locks), ck, f"{ck.label} (locked)", summary, settings),
                         out, **write)


def unlock(locked, reference, out: str | Path, *, log: Callable[[str], None] | None = None,
           **write) -> Path:
    """Write `locked` with the transforms that best take `reference` to it undone, layer by
    layer: the same outputs as `locked`, its weights back near the reference (the pre-lock
    weights, to float rounding, when the reference is the model that was locked)."""
    ck, ref = _open(locked), _open(reference)
    heads = attention_heads(ck)
    found = config_difference(ref, ck, layers=True)
    if found is not None or attention_heads(ref) != heads:
        raise PlanError(f"unlock: {ck.label} and the reference {ref.label} are different models "
                        f"({found or 'attention heads differ'})",
                        hint="the reference must be the base or a sibling of the locked model")
    locks, before, after = {}, [], []
    for layer in range(layer_count(ck)):
        mine, theirs = layer_weights(ck, layer), layer_weights(ref, layer)
        fitted = fit_lock(mine, theirs, heads)
        locks[layer] = fitted.inverse()
        before.append(weight_distance(mine, theirs))
        after.append(weight_distance(_apply(mine, locks[layer], heads), theirs))
    if log:
        log(f"unlock: attention weights {max(before):.1%} -> {max(after):.1%} from {ref.label} "
            f"(largest over {len(locks)} layers)")
    summary = (f"{ck.label} with the per-head transforms that best map {ref.label} onto it undone "
               f"(attention weights {max(before):.1%} -> {max(after):.1%} from {ref.label}); the "
               "same outputs as the locked model.")
    settings = {"method": "unlock", "model": str(locked), "reference": str(reference),
                "distance_before": [round(x, 6) for x in before],
                "distance_after": [round(x, 6) for x in after]}
    view = locked_view(ck, locks)
    return write_program(_program(view, ck, f"{ck.label} (unlocked)", summary, settings), out, **write)


def _apply(weights: dict[str, torch.Tensor], lock: LayerLock, heads: Heads) -> dict[str, torch.Tensor]:
    """A layer's weights (layer_weights layout) with `lock` applied, in memory."""
    return {k: transform_o(w, lock, heads) if k == "o" else transform_rows(k, w, lock, heads)
            for k, w in weights.items()}


def evidence(ck, ref) -> list[Evidence]:
    """Per layer, `ck`'s attention against `ref`'s (one layer held at a time)."""
    heads = attention_heads(ck)
    return [layer_evidence(layer, layer_weights(ck, layer), layer_weights(ref, layer), heads)
            for layer in range(layer_count(ck))]


def lock_findings(models: dict[str, object], reference: str | None = None) -> list[str]:
    """One line per model that looks locked against the reference (the recipe's base, else its
    first model), naming the layers and the evidence; models MergeLock cannot read are skipped.
    When every other model looks locked against the reference but not against each other, the
    reference is the locked one."""
    unique = [(r, ck) for r, ck in {id(ck): (r, ck) for r, ck in models.items()}.values() if _readable(ck)]
    usable = [(r, ck) for r, ck in unique if _comparable(ck, unique[0][1])]
    if len(usable) < 2:
        return []
    names = [r for r, _ in usable]
    anchor = names.index(reference) if reference in names else 0
    ref = usable[anchor][1]
    others = [(r, ck) for i, (r, ck) in enumerate(usable) if i != anchor]
    found = dict(zip([r for r, _ in others], _locked_layers([ck for _, ck in others], ref)))
    if len(others) >= 2 and all(found.values()) and not _locked_layers([others[0][1]], others[1][1])[0]:
        return [_finding(names[anchor], others[0][0], _locked_layers([ref], others[0][1])[0])]
    either = len(usable) == 2 and reference not in names  # two models, neither is the base
    return [_finding(r, names[anchor] + (f" (or {names[anchor]} against {r})" if either else ""), layers)
            for r, layers in found.items() if layers]


def _locked_layers(models: list, ref) -> list[list[Evidence]]:
    """Per model, its layers that look locked against `ref` (each of ref's layers read once)."""
    heads, found = attention_heads(ref), [[] for _ in models]
    for layer in range(layer_count(ref)):
        theirs = layer_weights(ref, layer)
        for locked, ck in zip(found, models):
            one = layer_evidence(layer, layer_weights(ck, layer), theirs, heads)
            if one.locked:
                locked.append(one)
    return found


def _readable(ck) -> bool:
    try:
        attention_heads(ck)
    except PlanError:
        return False
    return True


def _comparable(ck, first) -> bool:
    names = [_name(layer, k) for layer in range(layer_count(ck)) for k in "qkvo"]
    return (attention_heads(ck) == attention_heads(first)
            and config_difference(ck, first, layers=True) is None
            and all(n in ck.tensors and n in first.tensors and ck.tensors[n].shape == first.tensors[n].shape
                    for n in names))


def _finding(model: str, against: str, layers: list[Evidence]) -> str:
    worst = max(e.weights for e in layers)
    invariant = max(max(e.qk, e.vo) for e in layers)
    spans = _spans([e.layer for e in layers])
    return (f"{model} looks MergeLock-ed (against {against}) in layer(s) {spans}: "
            f"attention weights up to {worst:.0%} apart while the per-head W_Q·W_Kᵀ and "
            f"W_V·W_O differ by at most {invariant:.1%}; merging it will not cancel its transforms")


def _spans(layers: list[int]) -> str:
    spans, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans)
