"""LoRA extraction: a full fine-tune -> a PEFT LoRA adapter on its base, by truncated SVD of τ.

mergekit-extract-lora 0.1.5's semantics (METHODS.md "extract_lora"): per Linear / Embedding
weight τ = θ_ft − θ0 in fp32, its top-r singular triplets, A = diag(√S)Vᵀ and B = U diag(√S)
(distribute_scale) or A = diag(S)Vᵀ and B = U; embeddings (τᵀ, lora_embedding_A/B) only with
`embed_lora`, else embeddings, the LM head and every module that is not Linear / Embedding (norms)
are saved whole in modules_to_save, or dropped with `skip_undecomposable`; config r = largest
rank, lora_alpha = r, rank_pattern = alpha_pattern for smaller ranks (scaling 1 everywhere).
Beyond mergekit: an energy rank rule and per-module ranks; GPT-2's Conv1D weights, which mergekit
saves whole, are factored (fan_in_fan_out). Which module goes where: engine/extract_targets.py.

The top-r triplets come from the Gram matrix of τ's smaller side, formed and solved in float64
(lowrank.gram): exact to fp32 rounding, and for r ≪ min(m, n) only the r eigenvectors wanted are
computed (LAPACK's bisection + inverse iteration, scipy's `evx`): 2048×5632 at rank 64 costs
0.8 + 0.4 s on one core against 5.5 s for the fp32 thin SVD mergekit takes. Neither τ nor
anything of its size is ever copied to float64: the Gram matrix is summed over column blocks. `randomized` asks for
lowrank.randomized_svd instead: an approximation, labelled so.

One tensor at a time: both models' rows are read for one matrix, factored, written; the adapter
file's header space is reserved up front (io.writer.ReservedShard, its size at the largest
ranks) and filled in at the end, so no factor waits in memory and nothing is copied twice.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from mergesmith.errors import MergesmithError
from mergesmith.engine.extract_targets import Target, plan_targets
from mergesmith.io import Checkpoint, OutputFolder, OutTensor, resolve_model
from mergesmith.io.adapter import CONFIG_FILE, PREFIX, WEIGHTS_FILES
from mergesmith.io.writer import ReservedShard
from mergesmith.methods.lowrank import (
    gram, kept_energy, randomized_svd, select_rank, top_eigenpairs,
)

BLOCK_BYTES = 8 << 20  # of τ's columns converted to float64 at a time (as fast as 32 MB, 52 MB less)
CHUNK_BYTES = 16 << 20  # rows of each model read at a time for τ


# ---------------------------------------------------------------- the factorization (pure)

@dataclass(frozen=True)
class RankRule:
    """How many singular triplets a module keeps: at most `rank` (the first `patterns` regex that
    finds the module's name overrides it), fewer where `energy` (the fewest whose Σ S² reaches
    that share of ‖τ‖²) or `epsilon` (S > epsilon, absolute, as mergekit's sv_epsilon) say."""

    rank: int = 128
    energy: float | None = None
    epsilon: float = 0.0
    patterns: tuple[tuple[str, int], ...] = ()

    def cap(self, module: str) -> int:
        return next((r for pattern, r in self.patterns if re.search(pattern, module)), self.rank)

    @property
    def needs_spectrum(self) -> bool:
        return self.energy is not None or self.epsilon > 0


class Factors(NamedTuple):
    """τ ≈ B A: B (m×r), A (r×n) as PEFT stores them, and the share of ‖τ‖² kept."""

    b: torch.Tensor
    a: torch.Tensor
    energy: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def lora_factors(tau: torch.Tensor, rule: RankRule, module: str = "", *,
                 distribute_scale: bool = True, randomized: bool = False,
                 seed: int = 0) -> Factors:
    """τ (m×n) ≈ B A from its top-r singular triplets, r as `rule` says for `module`, in fp32.
    With distribute_scale B = U diag(√S), A = diag(√S)Vᵀ; without, B = U, A = diag(S)Vᵀ."""
    tau = tau.to(torch.float32)
    if randomized:
        return _randomized(tau, rule, module, distribute_scale, seed)
    flipped = tau.shape[0] > tau.shape[1]
    a = tau.mT if flipped else tau  # the smaller side first: a aᵀ is small
    g = _gram64(a)
    total = float(g.diagonal().sum())
    sigma_sq, q = _top_eigh(g, rule, module)
    del g
    sigma = sigma_sq.clamp(min=0).sqrt()
    inv = torch.where(sigma > 0, 1 / sigma, torch.zeros_like(sigma))
    other = _project(q, a)  # a = Q diag(S) Wᵀ, so Qᵀa = diag(S) Wᵀ: no division by a small S
    if flipped:  # τ = W S Qᵀ: U = (Qᵀa)ᵀ S⁻¹, Vᵀ = Qᵀ
        b = other.mT * (inv.sqrt() if distribute_scale else inv)
        a_factor = q.mT * (sigma.sqrt() if distribute_scale else sigma)[:, None]
    else:  # τ = Q S Wᵀ: U = Q, diag(S) Vᵀ = Qᵀa
        b = q * sigma.sqrt() if distribute_scale else q
        a_factor = other * inv.sqrt()[:, None] if distribute_scale else other
    return Factors(b.to(torch.float32).contiguous(), a_factor.to(torch.float32).contiguous(),
                   kept_energy(sigma, len(sigma), total))


def _blocks(a: torch.Tensor):
    """a's columns in float64, BLOCK_BYTES at a time: never a whole float64 copy of τ."""
    step = max(1, BLOCK_BYTES // (8 * a.shape[0]))
    for start in range(0, a.shape[1], step):
        yield start, a[:, start:start + step].to(torch.float64)


def _gram64(a: torch.Tensor) -> torch.Tensor:
    """a aᵀ in float64, summed over column blocks."""
    g = torch.zeros(a.shape[0], a.shape[0], dtype=torch.float64, device=a.device)
    for _, block in _blocks(a):
        g += gram(block)
    return g


def _project(q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Qᵀa in float64, by column blocks of a."""
    out = q.new_empty(q.shape[1], a.shape[1])
    for start, block in _blocks(a):
        out[:, start:start + block.shape[1]] = q.mT @ block
    return out


def _top_eigh(g: torch.Tensor, rule: RankRule, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The r largest eigenpairs of the Gram matrix g, descending, r from the module's rule."""
    n = g.shape[0]
    rank = min(rule.cap(module), n)
    if rule.needs_spectrum:
        sigma = torch.linalg.eigvalsh(g).flip(0).clamp(min=0).sqrt()
        rank = select_rank(sigma, rank=rank, epsilon=rule.epsilon, energy=rule.energy)
    if rank <= 0:
        return g.new_zeros(0), g.new_zeros(n, 0)
    return top_eigenpairs(g, rank)


def _randomized(tau: torch.Tensor, rule: RankRule, module: str, distribute_scale: bool,
                seed: int) -> Factors:
    """APPROXIMATE triplets from lowrank.randomized_svd; ‖τ‖² makes the energy rule exact on
    the triplets it finds."""
    total = float(tau.double().square().sum())
    u, s, vh = randomized_svd(tau, min(rule.cap(module), *tau.shape), seed=seed)
    r = select_rank(s, epsilon=rule.epsilon, energy=rule.energy, total=total)
    u, s, vh = u[:, :r].float(), s[:r].float(), vh[:r].float()
    scale_b, scale_a = (s.sqrt(), s.sqrt()) if distribute_scale else (torch.ones_like(s), s)
    return Factors((u * scale_b).contiguous(), (vh * scale_a[:, None]).contiguous(),
                   kept_energy(s, r, total))


# ---------------------------------------------------------------- options

@dataclass(frozen=True)
class Options:
    """mergekit-extract-lora's options (same defaults), plus the rank rule and `randomized`."""

    rule: RankRule = RankRule()
    distribute_scale: bool = True
    embed_lora: bool = False
    save_modules: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_undecomposable: bool = False
    randomized: bool = False
    seed: int = 0


# ---------------------------------------------------------------- streaming it out

@dataclass
class Extraction:
    """What was written: each factored module's rank and share of ‖τ‖² kept, the modules saved
    whole, and notes for the user."""

    path: Path
    ranks: dict[str, int]
    energy: dict[str, float]
    saved: list[str]
    notes: list[str]


def extract_lora(base: str | Path, finetuned: str | Path, out: str | Path,
                 options: Options = Options(), *, overwrite: bool = False,
                 progress: bool = False) -> Extraction:
    """Write a PEFT LoRA adapter folder at `out` (it appears only when complete) such that base +
    adapter ≈ finetuned; one matrix in memory at a time."""
    base_ck = Checkpoint(resolve_model(str(base)), label=f"base {base}")
    ft_ck = Checkpoint(resolve_model(str(finetuned)), label=f"fine-tune {finetuned}")
    targets = plan_targets(base_ck, ft_ck, options)
    blob = json.dumps([str(base_ck.path), str(ft_ck.path), repr(options)])
    output = OutputFolder(Path(out), hashlib.sha256(blob.encode()).hexdigest(),
                          overwrite=overwrite, inputs=[base_ck.path, ft_ck.path])
    try:
        file = ReservedShard(output.path(WEIGHTS_FILES[0]), _largest(targets, base_ck, ft_ck, options.rule))
        result = Extraction(output.target, {}, {}, [], [])
        try:
            for target in _bar(targets, progress):
                _write_target(target, base_ck, ft_ck, options, file, result)
        except BaseException:
            file.abort()
            raise
        file.close()
        config = adapter_config(str(base), targets, result, ft_ck.config)
        (output.partial / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        result.saved = config["modules_to_save"] or []
        _note_biases(targets, config, result)
        output.finalize()
        return result
    finally:
        output.release()


def _write_target(t: Target, base: Checkpoint, ft: Checkpoint, options: Options,
                  file: ReservedShard, result: Extraction) -> None:
    if t.kind == "save":  # PEFT maps base_model.model.<tensor> into the module's saved copy
        file.copy(PREFIX + f"{t.module}.weight", ft, t.weight)
        if t.bias is not None:
            file.copy(PREFIX + f"{t.module}.bias", ft, t.bias)
        return
    dtype = _factor_dtype(t, base, ft)
    tau = _task_vector(base, ft, t.weight)
    factors = lora_factors(tau.mT if t.transposed else tau, options.rule, t.module,
                           distribute_scale=options.distribute_scale,
                           randomized=options.randomized, seed=options.seed)
    del tau
    result.ranks[t.module], result.energy[t.module] = factors.rank, factors.energy
    if factors.rank == 0:
        return  # τ = 0 here (as the rule sees it): PEFT takes no rank 0, so the module is excluded
    a_name, b_name = _factor_names(t)
    file.write(PREFIX + a_name, factors.a.to(dtype))
    file.write(PREFIX + b_name, factors.b.to(dtype))
    if t.bias is not None:
        file.write(PREFIX + f"{t.module}.lora_B.bias",
                   (ft.read(t.bias).to(dtype) - base.read(t.bias).to(dtype)))


def _task_vector(base: Checkpoint, ft: Checkpoint, name: str) -> torch.Tensor:
    """θ_ft − θ0 in float32, read a few rows of each at a time."""
    info = ft.tensors[name]
    tau = torch.empty(info.shape, dtype=torch.float32)
    step = max(1, CHUNK_BYTES // max(info.row_bytes, 1))
    for start in range(0, info.shape[0], step):
        rows = (start, min(start + step, info.shape[0]))
        tau[rows[0]:rows[1]] = ft.read(name, rows)
        tau[rows[0]:rows[1]] -= base.read(name, rows)
    return tau


def _largest(targets: list[Target], base: Checkpoint, ft: Checkpoint,
             rule: RankRule) -> list[OutTensor]:
    """Every tensor the file may hold, at its largest rank: the room its header may need."""
    tensors = []
    for t in targets:
        if t.kind == "save":
            names = [(f"{t.module}.weight", t.weight)] + ([(f"{t.module}.bias", t.bias)] if t.bias else [])
            tensors += [OutTensor(PREFIX + n, ft.tensors[s].dtype, tuple(ft.tensors[s].shape))
                        for n, s in names]
            continue
        dtype = _factor_dtype(t, base, ft)
        m, n = t.shape[::-1] if t.transposed else t.shape
        r = min(rule.cap(t.module), m, n)
        a, b = _factor_names(t)
        tensors += [OutTensor(PREFIX + a, dtype, (r, n)), OutTensor(PREFIX + b, dtype, (m, r))]
        if t.bias is not None:
            tensors.append(OutTensor(PREFIX + f"{t.module}.lora_B.bias", dtype, (m,)))
    return tensors


def _factor_dtype(t: Target, base: Checkpoint, ft: Checkpoint) -> torch.dtype:
    """mergekit's: that of θ_ft − θ0 (the factors are computed in fp32, stored in this)."""
    return torch.promote_types(base.tensors[t.weight].dtype, ft.tensors[t.weight].dtype)


def _factor_names(t: Target) -> tuple[str, str]:
    if t.kind == "embedding":
        return f"{t.module}.lora_embedding_A", f"{t.module}.lora_embedding_B"
    return f"{t.module}.lora_A.weight", f"{t.module}.lora_B.weight"


def adapter_config(base_ref: str, targets: list[Target], result: Extraction,
                   model_config: dict) -> dict:
    """mergekit's adapter_config.json: r = the largest rank, lora_alpha = r, and rank_pattern =
    alpha_pattern for the modules of smaller rank (scaling 1 everywhere)."""
    ranks = {m: r for m, r in result.ranks.items() if r > 0}
    top = max(ranks.values(), default=1)
    smaller = {m: r for m, r in ranks.items() if r != top}
    factored = [t for t in targets if t.kind != "save" and ranks.get(t.module)]
    save = list(dict.fromkeys(t.module.rsplit(".", 1)[-1] for t in targets if t.kind == "save"))
    causal = any(a.endswith("ForCausalLM") for a in model_config.get("architectures") or [])
    return {
        "base_model_name_or_path": base_ref, "peft_type": "LORA", "use_rslora": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "exclude_modules": sorted(m for m, r in result.ranks.items() if r == 0) or None,
        "modules_to_save": save or None, "task_type": "CAUSAL_LM" if causal else None,
        "r": top, "lora_alpha": top, "rank_pattern": smaller, "alpha_pattern": smaller,
        "lora_dropout": 0.0, "fan_in_fan_out": any(t.kind == "conv1d" for t in factored),
        "lora_bias": bool(factored) and all(t.bias is not None for t in factored),
        "inference_mode": True,
    }


def _note_biases(targets: list[Target], config: dict, result: Extraction) -> None:
    """PEFT's lora_bias is all or nothing: bias deltas of a model where only some adapted
    modules have a bias are written (as mergekit does) but PEFT does not load them."""
    with_bias = [t.module for t in targets if t.kind != "save" and t.bias and result.ranks.get(t.module)]
    if with_bias and not config["lora_bias"]:
        result.notes.append(f"{len(with_bias)} modules' bias deltas (e.g. {with_bias[0]}) are in the "
                            "file but PEFT does not load them: lora_bias needs a bias on every "
                            "adapted module")


def _bar(targets: list[Target], progress: bool):
    if not progress:
        return targets
    from rich.console import Console
    from rich.progress import track

    return track(targets, description="extracting", console=Console(stderr=True))


def parse_module_ranks(items: list[str]) -> tuple[tuple[str, int], ...]:
    """['mlp\\..*=32', ...] -> ((regex, 32), ...), checked."""
    patterns = []
    for item in items:
        pattern, sep, rank = item.rpartition("=")
        try:
            re.compile(pattern)
            patterns.append((pattern, int(rank)))
            ok = bool(sep and pattern) and int(rank) >= 0
        except (re.error, ValueError):
            ok = False
        if not ok:
            raise MergesmithError(f"--module-rank {item!r}: expected REGEX=RANK, e.g. 'mlp=32'",
                                  hint="REGEX is searched in module names such as "
                                  "model.layers.0.mlp.down_proj; RANK is a whole number")
    return tuple(patterns)


def summary(result: Extraction) -> str:
    ranks = [r for r in result.ranks.values() if r]
    energy = list(result.energy.values())
    kept = (f", {min(energy):.1%} to {max(energy):.1%} of each ‖τ‖² kept" if energy else "")
    return (f"wrote {result.path}: {len(ranks)} modules as LoRA (rank {min(ranks, default=0)} to "
            f"{max(ranks, default=0)}{kept}); saved whole: {', '.join(result.saved) or 'none'}")
