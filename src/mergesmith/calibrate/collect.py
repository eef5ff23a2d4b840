"""Per-tensor statistics of one model on its calibration examples, in memory-bounded groups.

Kinds (keys "<checkpoint tensor name>::<kind>", fp32):
- gram:   for every linear weight (nn.Linear, transformers' Conv1D), G = (1/n) Σ_t x_t x_tᵀ over the
          n real (unpadded) tokens that reach it, [in, in];
- act_sq: the diagonal of the same, (1/n) Σ_t x_t², [in];
- act_abs: (1/n) Σ_t |x_t|, [in], for every linear layer and also every normalization layer
          (LayerNorm, RMSNorm: their weight scales their input channels); AIM's channel
          importance (Nobari et al. 2025, code: mean |x| per input channel of each module with a
          weight, embeddings aside);
- fisher: the diagonal empirical Fisher F = (1/N) Σ_e (∂ log p(y_e | x_e) / ∂θ)² over the N
          examples, shaped like θ; y_e is the example's label, or the model's own prediction
          where there is none; for a causal LM the true next tokens, log p summed over the text.

Statistics are gathered for groups of modules whose statistics fit `max_stats_bytes`, one pass
over the data per group, and each finished group is handed on before the next starts, so memory
is one model plus one group, whatever the model's size. Forward-only kinds stop each pass after
the group's last layer (in execution order), so early groups cost only part of a forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from mergesmith.calibrate.data import Example
from mergesmith.calibrate.forward import Batch, CalibrationModel, checkpoint_names, empty_module
from mergesmith.errors import CalibrationError
from mergesmith.io.checkpoint import Checkpoint
from mergesmith.recipe import Calibration

KINDS = ("gram", "fisher", "act_sq", "act_abs")
FORWARD_KINDS = ("gram", "act_sq", "act_abs")
CHANNEL_KINDS = ("act_abs",)  # gathered for normalization layers too
FP32 = 4


def collect(folder: str | Path, examples: list[Example], cal: Calibration, root: Path, *,
            kinds: tuple[str, ...] | list[str], device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32, max_stats_bytes: int = 1 << 30,
            progress: bool = False) -> dict[str, torch.Tensor]:
    """Every statistic of `kinds` for the model in `folder`, in memory (for small models and
    tests; `store.ensure_statistics` streams the groups to disk instead)."""
    model = CalibrationModel.load(folder, cal, root, device, dtype)
    out: dict[str, torch.Tensor] = {}
    for group in collect_groups(model, examples, kinds=kinds, max_stats_bytes=max_stats_bytes,
                                progress=progress):
        out.update(group)
    return out


def collect_groups(model: CalibrationModel, examples: list[Example], *, kinds,
                   max_stats_bytes: int = 1 << 30, progress: bool = False
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """The statistics, one finished group at a time."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise CalibrationError(f"unknown statistics kind {', '.join(unknown) or '(none)'}",
                               hint=f"kinds: {', '.join(KINDS)}")
    forward_kinds = [k for k in KINDS if k in kinds and k in FORWARD_KINDS]
    with progress_bar(progress) as bar:
        if forward_kinds:
            batches = model.batches(examples)
            found = linear_layers(model, norms=bool(set(forward_kinds) & set(CHANNEL_KINDS)))
            if not found:
                raise CalibrationError(f"{model.folder}: no linear layers to gather "
                                       f"{' and '.join(forward_kinds)} statistics from")
            order, stop_early = execution_order(model, batches[0], found)
            groups = group_by_bytes(order, lambda layer: layer.stats_bytes(forward_kinds), max_stats_bytes)
            for number, group in enumerate(groups, 1):
                bar.start(f"{'+'.join(forward_kinds)} {number}/{len(groups)}", len(examples))
                yield forward_statistics(model, batches, group, forward_kinds,
                                         stop_early=stop_early, on_batch=bar.advance)
        if "fisher" in kinds:
            params = model.parameters()
            tensors = [name for name, p in params.items() if p.is_floating_point()]
            groups = group_by_bytes(tensors, lambda name: 2 * FP32 * params[name].numel(), max_stats_bytes)
            singles = model.batches(examples, batch_size=1)  # per-example gradients
            for number, group in enumerate(groups, 1):
                bar.start(f"fisher {number}/{len(groups)}", len(examples))
                yield fisher_diagonal(model, singles, group, on_batch=bar.advance)


# ---- linear layers ---------------------------------------------------------------------------

@dataclass
class Linear:
    """A linear layer of the module and the checkpoint tensor its weight is read from."""

    name: str              # module name
    module: torch.nn.Module
    weight: str            # checkpoint tensor name
    in_features: int
    norm: bool = False     # a normalization layer: only the CHANNEL_KINDS

    def kinds(self, kinds) -> list[str]:
        return [k for k in kinds if not self.norm or k in CHANNEL_KINDS]

    def stats_bytes(self, kinds) -> int:
        return sum(FP32 * (self.in_features ** 2 if kind == "gram" else self.in_features)
                   for kind in self.kinds(kinds))


def linear_layers(model: CalibrationModel, norms: bool = False) -> list[Linear]:
    """nn.Linear and transformers' Conv1D (GPT-2: weight [in, out]) layers whose weight is a
    checkpoint tensor: a tied output head or a freshly initialised pooler gathers nothing.
    With `norms`, normalization layers too."""
    return module_linears(model.module, model.checkpoint_name, norms)


def module_linears(root: torch.nn.Module, checkpoint_name, norms: bool = False) -> list[Linear]:
    """`linear_layers` of a bare module, `checkpoint_name` mapping its parameter names."""
    found = []
    for name, module in root.named_modules():
        in_features = _in_features(module)
        norm = in_features is None and norms and _is_norm(module)
        weight = checkpoint_name(f"{name}.weight" if name else "weight")
        if (in_features is not None or norm) and weight is not None:
            found.append(Linear(name, module, weight, in_features or module.weight.shape[0], norm))
    return found


def reachable_statistics(folder: str | Path, cal: Calibration, kinds, *,
                         module_folder: str | Path | None = None) -> set[str]:
    """The keys "<tensor>::<kind>" that collecting `kinds` for `folder` can give at most, from
    the structure alone (no weight or data read): a tensor no module parameter is read from
    gets none. `module_folder`: the model whose module runs with `folder`'s tensors
    (RegMean++'s one module for every expert)."""
    module = empty_module(module_folder or folder, cal)
    names = checkpoint_names(module, Checkpoint(Path(folder)))
    keys = set()
    for kind in kinds:
        if kind in FORWARD_KINDS:
            keys |= {f"{layer.weight}::{kind}" for layer in
                     module_linears(module, names.get, kind in CHANNEL_KINDS) if layer.kinds([kind])}
        elif kind == "fisher":
            keys |= {f"{ck}::fisher" for name, param in module.named_parameters(remove_duplicate=False)
                     if param.is_floating_point() and (ck := names.get(name)) is not None}
    return keys


def _in_features(module: torch.nn.Module) -> int | None:
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.shape[0]  # transformers' Conv1D computes x @ W with W [in, out]
    return None


def _is_norm(module: torch.nn.Module) -> bool:
    """LayerNorm, RMSNorm and their kin (transformers names each family's own: LlamaRMSNorm,
    T5LayerNorm, ...): one weight entry per input channel."""
    weight = getattr(module, "weight", None)
    return ("Norm" in type(module).__name__ and isinstance(weight, torch.nn.Parameter)
            and weight.dim() == 1)


def execution_order(model: CalibrationModel, batch: Batch, layers: list[Linear]) -> tuple[list[Linear], bool]:
    """The layers in the order a forward of one example calls them, and whether a pass may stop
    after the last one: not when a layer is called twice (shared weights) or not at all on that
    example (a routed expert), since those may still see inputs later. Unreached layers go last."""
    calls: list[str] = []
    probe = Batch({k: v[:1] for k, v in batch.inputs.items()}, None, batch.examples[:1])
    handles = [layer.module.register_forward_pre_hook(lambda m, args, name=layer.name: calls.append(name))
               for layer in layers]
    try:
        with torch.no_grad():
            model.logits(probe)
    finally:
        for handle in handles:
            handle.remove()
    first = list(dict.fromkeys(calls))
    rank = {name: i for i, name in enumerate(first)}
    order = sorted(layers, key=lambda layer: rank.get(layer.name, len(rank)))
    return order, len(first) == len(calls) == len(layers)


def group_by_bytes(items: list, size, limit: int) -> list[list]:
    """Consecutive items in groups of at most `limit` bytes (an item larger alone is its own)."""
    groups: list[list] = []
    total = 0
    for item in items:
        nbytes = size(item)
        if not groups or total + nbytes > limit:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += nbytes
    return groups


# ---- forward statistics: gram, act_sq --------------------------------------------------------

class StopForward(Exception):
    """Raised by the last layer of a group: the rest of the forward is not needed."""


@dataclass
class _Inputs:
    """Σ x xᵀ, Σ x², Σ |x| and the token count of one layer's inputs."""

    kinds: list[str]
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def add(self, delta: dict[str, torch.Tensor], count: int) -> None:
        for kind in self.kinds:
            if kind in self.sums:
                self.sums[kind] += delta[kind]
            else:
                self.sums[kind] = delta[kind].clone()
        self.count += count

    def means(self) -> dict[str, torch.Tensor]:
        return {kind: (total / max(self.count, 1)).cpu() for kind, total in self.sums.items()}


def real_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of a layer input [B, T, in] (or [B·T, in]) that belong to real tokens; inputs
    of another shape (a pooled [B, in]) are taken whole."""
    if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    flat = x.reshape(-1, x.shape[-1])
    return flat[mask.reshape(-1)] if flat.shape[0] == mask.numel() and x.dim() == 2 else flat


def input_statistics(rows: torch.Tensor, kinds) -> dict[str, torch.Tensor]:
    """Σ_t x_t x_tᵀ, Σ_t x_t² and Σ_t |x_t| over the rows, in fp32."""
    rows = rows.float()
    out = {}
    if "gram" in kinds:
        out["gram"] = rows.T @ rows
    if "act_sq" in kinds:
        out["act_sq"] = rows.square().sum(0)
    if "act_abs" in kinds:
        out["act_abs"] = rows.abs().sum(0)
    return out


def forward_until_stopped(model: CalibrationModel, batch: Batch) -> None:
    """A forward pass without gradients that a hook may end early by raising StopForward."""
    try:
        with torch.no_grad():
            model.logits(batch)
    except StopForward:
        pass


class InputHooks:
    """Forward pre-hooks that add each layer's real-token inputs to its sums. Layers that share
    one input tensor (q, k and v; gate and up) compute its sums once."""

    def __init__(self, layers: list[Linear], kinds, stop_after: Linear | None = None):
        self.layers, self.kinds, self.stop_after = layers, list(kinds), stop_after
        self.sums = {layer.name: _Inputs(layer.kinds(self.kinds)) for layer in layers}
        self.mask: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, int, dict, int] | None = None
        self._handles = []

    def __enter__(self) -> "InputHooks":
        self._handles = [layer.module.register_forward_pre_hook(self._hook(layer)) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None

    def _hook(self, layer: Linear):
        def hook(module, args):
            x = args[0]
            kinds = layer.kinds(self.kinds)
            # the same tensor, not changed in place since: the sums are those just computed
            if (self._last is None or self._last[0] is not x or self._last[1] != x._version
                    or not set(kinds) <= self._last[2].keys()):
                rows = real_rows(x.detach(), self.mask)
                self._last = (x, x._version, input_statistics(rows, kinds), rows.shape[0])
            self.sums[layer.name].add(self._last[2], self._last[3])
            if layer is self.stop_after:
                raise StopForward
        return hook

    def run(self, model: CalibrationModel, batch: Batch) -> None:
        self.mask = batch.inputs["attention_mask"].bool()
        try:
            forward_until_stopped(model, batch)
        finally:
            self._last = None

    def statistics(self) -> dict[str, torch.Tensor]:
        return {f"{layer.weight}::{kind}": value for layer in self.layers
                for kind, value in self.sums[layer.name].means().items()}


def forward_statistics(model: CalibrationModel, batches: list[Batch], layers: list[Linear], kinds, *,
                       stop_early: bool = True, on_batch=None) -> dict[str, torch.Tensor]:
    """Gram matrices / squared activations of `layers` over every batch (one pass)."""
    with InputHooks(layers, kinds, stop_after=layers[-1] if stop_early else None) as hooks:
        for batch in batches:
            hooks.run(model, batch)
            if on_batch:
                on_batch(len(batch.examples))
    return hooks.statistics()


# ---- Fisher ----------------------------------------------------------------------------------

def fisher_diagonal(model: CalibrationModel, singles: list[Batch], names: list[str], *,
                    on_batch=None) -> dict[str, torch.Tensor]:
    """(1/N) Σ_e (∂ log p(y_e|x_e)/∂θ)² for the named tensors; `singles` hold one example each.
    Only these tensors require gradients during the pass."""
    params = model.parameters()
    chosen = [params[name] for name in names]
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in chosen]
    for p in chosen:
        p.requires_grad_(True)
    try:
        for batch in singles:
            for p in chosen:
                p.grad = None
            loglik = model.log_likelihood(batch)
            if loglik.requires_grad:  # else no chosen tensor is on this example's path
                loglik.backward()
            for total, p in zip(sums, chosen):
                if p.grad is not None:  # a tensor the example does not reach has zero gradient
                    total.add_(p.grad.float().square())
            if on_batch:
                on_batch(len(batch.examples))
    finally:
        for p in chosen:
            p.requires_grad_(False)
            p.grad = None
    count = max(sum(len(b.examples) for b in singles), 1)
    return {f"{name}::fisher": (total / count).cpu() for name, total in zip(names, sums)}


# ---- progress --------------------------------------------------------------------------------

class ProgressBar:
    """Examples of the current pass and which group it is, on stderr (a no-op when off)."""

    def __init__(self, on: bool):
        self.progress = self.task = None
        if on:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]statistics {task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("examples ETA"), TimeRemainingColumn(),
                                     console=Console(stderr=True))

    def start(self, description: str, total: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(description, total=total)

    def advance(self, count: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=count)


@contextmanager
def progress_bar(on: bool):
    bar = ProgressBar(on)
    if bar.progress is not None:
        bar.progress.start()
    try:
        yield bar
    finally:
        if bar.progress is not None:
            bar.progress.stop()

