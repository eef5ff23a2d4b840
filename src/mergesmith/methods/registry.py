"""One registry of merge methods: what each needs, which parameters it takes, and its function.

A method is a pure function `fn(base, experts, *, ctx, **params) -> Tensor` of fp32 tensors.
`base` is None for methods that take no base; per-model parameters arrive as lists aligned
with `experts`. The engine reads the spec to validate a recipe before it computes anything.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mergesmith.errors import MethodError

REQUIRED = object()
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Param:
    """A method parameter as the recipe names it.

    `per_model` parameters are given on each model entry (mergekit's "non-base" scope) and reach
    the function as a list named `arg`; global ones are given once and reach it as a scalar.
    """

    name: str
    type: type = float
    default: Any = REQUIRED
    per_model: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    arg: str | None = None
    doc: str = ""

    @property
    def argname(self) -> str:
        return self.arg or self.name

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any) -> Any:
        """Coerce a recipe value to the parameter's type; raise ValueError saying what is allowed."""
        if value is None and self.default is None:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
        elif self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"must be a number, got {value!r}")
            # NaN passes every comparison below, and a value beyond float32 becomes ±inf (or a
            # NaN from inf − inf) once a method computes with it in fp32
            if not abs(value) <= FLOAT32_MAX:  # also an int too large for a float
                raise ValueError(f"must be a finite number within float32 range, got {value!r:.40}")
            if self.type is int and float(value) != int(value):
                raise ValueError(f"must be an integer, got {value!r}")
            value = self.type(value)
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"must be >= {self.minimum}, got {value}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"must be <= {self.maximum}, got {value}")
        elif self.type is str and not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        return value


def seeded_generator(key: str, device: torch.device | str = "cpu") -> torch.Generator:
    digest = hashlib.sha256(key.encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges, besides its values."""

    name: str
    layer: int | None = None
    num_layers: int | None = None
    seed: int = 0
    # Row-major index, in the whole tensor, of the first entry the method is given: non-zero
    # when the engine streams the tensor in chunks.
    offset: int = 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded by (seed, tensor name): randomness independent of processing order."""
        return seeded_generator(f"{self.seed}\0{self.name}", device)

    def stream(self, index: int, device: torch.device | str = "cpu") -> "RandomStream":
        """Uniform draws for this tensor's entries from `self.offset` on, stream `index` (one
        per expert): entry j's draw depends on (seed, name, index, j) only, so a chunk of the
        tensor sees the same draws as the whole."""
        return RandomStream(f"{self.seed}\0{self.name}\0{index}", self.offset, device)


# Entries per block of a random stream: the unit a thread or chunk draws (and caches) at once.
RANDOM_BLOCK = 1 << 16
SFC64_COUNTER = (1).to_bytes(8, "little")
_generators = threading.local()


class RandomStream:
    """Counter-based uniform draws. Block b of the stream (entries [b·B, (b+1)·B)) is the raw
    output of numpy's SFC64 started from the state (x, y, z, 1), x, y, z the three little-endian
    words of blake2b(b as 8 little-endian bytes, key = sha256(key), 24-byte digest), as 32-bit
    words (each 64-bit output low half first); entry j's draw is its word's top 24 bits times
    2^-24, the usual exact float32 uniform in [0, 1). So any range of entries can be drawn
    without the ones before it, by any thread; a bit generator's raw output is stable across
    numpy versions, and a state from a cryptographic hash needs no warm-up. Drawn on the CPU
    whatever the device: a merge draws the same on any device. 5x faster than torch's CPU
    generator, which was most of DARE's time. `rand(shape)` takes the next entries in row-major
    order; `rand_at(i, shape)` those from entry i on (counted, like `rand`'s, from the stream's
    start)."""

    def __init__(self, key: str, start: int = 0, device: torch.device | str = "cpu"):
        self.key = hashlib.sha256(key.encode()).digest()
        self.start, self.device = start, torch.device(device)
        self.position = 0
        self._local = threading.local()  # each thread's last block: threads draw in parallel

    def _words(self, b: int) -> np.ndarray:
        """Block b's 32-bit words."""
        bits = getattr(_generators, "sfc64", None)
        if bits is None:  # one per thread, restarted per block: a new one costs 5x a restart
            bits = _generators.sfc64 = np.random.SFC64(0)
        start = hashlib.blake2b(b.to_bytes(8, "little"), key=self.key, digest_size=24).digest()
        bits.state = {"bit_generator": "SFC64", "has_uint32": 0, "uinteger": 0,
                      "state": {"state": np.frombuffer(start + SFC64_COUNTER, dtype="<u8")}}
        return bits.random_raw(RANDOM_BLOCK // 2).view(np.uint32)

    def _fill(self, index: int, out: np.ndarray, convert) -> np.ndarray:
        """convert(words, out part) over the words of entries index, index + 1, …, block by block;
        a partly used block's words are kept per thread for the next call that wants the rest."""
        first = self.start + index
        at, stop = first, first + out.size
        while at < stop:
            b, skip = divmod(at, RANDOM_BLOCK)
            take = min(RANDOM_BLOCK - skip, stop - at)
            if take == RANDOM_BLOCK:
                words = self._words(b)
            else:
                cached = getattr(self._local, "block", None)
                if cached is None or cached[0] != b:
                    cached = self._local.block = (b, self._words(b))
                words = cached[1][skip:skip + take]
            convert(words, out[at - first:at - first + take])
            at += take
        return out

    def rand(self, shape) -> torch.Tensor:
        """fp32 draws in [0, 1) for the next prod(shape) entries."""
        out = self.rand_at(self.position, shape)
        self.position += out.numel()
        return out

    def rand_at(self, index: int, shape) -> torch.Tensor:
        """fp32 draws in [0, 1) for prod(shape) entries from entry `index` on."""
        out = np.multiply(self.ticks_at(index, shape), np.float32(2.0 ** -24), dtype=np.float32)
        return torch.from_numpy(out).to(self.device)

    def ticks_at(self, index: int, shape) -> np.ndarray:
        """The draws of `rand_at(index, shape)` as the integers k of u = k·2^-24 (uint32, on
        the CPU)."""
        def top_bits(words, out):
            np.right_shift(words, 8, out=out)

        out = self._fill(index, np.empty(math.prod(shape), dtype=np.uint32), top_bits)
        return out.reshape(tuple(shape))

    def keep_at(self, index: int, shape, probability, value=1.0) -> torch.Tensor:
        """`value` where `rand_at(index, shape) < probability` (as fp32), else 0.0 (fp32). A
        scalar probability and value, or arrays of them along the last dimension (one per
        column). Found on the draws' integers (u = k·2^-24 < p ⇔ k < ⌈p·2^24⌉): a scalar
        probability costs a third of drawing the floats and comparing them."""
        count = math.prod(shape)
        if np.ndim(probability) or np.ndim(value):
            kept = self.ticks_at(index, shape) < tick_limits(probability)
            out = np.multiply(kept, np.asarray(value, dtype=np.float32), dtype=np.float32)
        else:
            limit = int(tick_limits(probability))
            if limit <= 0 or limit >= 1 << 24:
                out = np.full(count, value if limit > 0 else 0.0, dtype=np.float32)
            else:
                threshold = np.uint32(limit << 8)  # k < limit ⇔ word < limit·2^8

                def below(words, out):
                    np.less(words, threshold, out=out)

                out = self._fill(index, np.empty(count, dtype=np.float32), below)
                if value != 1:
                    out *= np.float32(value)
        return torch.from_numpy(out).view(tuple(shape)).to(self.device)


def tick_limits(probability) -> np.ndarray:
    """⌈p·2^24⌉ in [0, 2^24] for p as fp32: a draw u = k·2^-24 is below p exactly when k is
    below this (never for p ≤ 0, always for p ≥ 1)."""
    scaled = np.ceil(np.asarray(probability, dtype=np.float32).astype(np.float64) * (1 << 24))
    return np.clip(scaled, 0, 1 << 24).astype(np.uint32)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    paper: str
    needs_base: bool
    params: tuple[Param, ...]
    min_models: int = 1
    max_models: int | None = None
    # The base is used when given (e.g. as the origin of multislerp) but is not required.
    optional_base: bool = False
    # f(part of inputs) == that part of f(inputs) for any part (given ctx.offset, the part's
    # first entry, for random draws): the engine may stream such a method in row chunks and
    # split those into flat tiles.
    elementwise: bool = False
    # The same for parts made of whole rows (the first dimension against the rest) only: each
    # row is merged from that row alone (DELLA's per-row ranks). The engine streams it in row
    # chunks, never in tiles.
    row_local: bool = False
    # The method shares its row blocks out among the intra-op threads itself (DELLA's
    # compute-bound per-row sorts): the engine leaves it those threads, where it otherwise runs
    # a chunkable method's cache-sized work on one.
    own_threads: bool = False
    # For methods that are elementwise once a few whole-tensor sums are known (SLERP's norms and
    # dot product): `reduce(base_chunk, expert_chunks, **params)` returns float64 partial sums,
    # which the engine adds over chunks and passes to `fn` as `stats=`.
    reduce: Callable[..., torch.Tensor] | None = None
    # Methods whose sums depend on an earlier pass's (a radix select's second histogram counts
    # only inside the bin the first chose: TIES' and breadcrumbs' cuts) make `passes(params)`
    # reduce passes. After each, `finish(stats, sums, **params)` turns the pass's added sums,
    # and the statistics so far (None after the first pass), into the statistics that the next
    # pass's `reduce` gets as `stats=`, and `fn` after the last. Without `finish`, the
    # statistics are the pass's sums.
    passes: Callable[[dict[str, Any]], int] | None = None
    finish: Callable[..., Any] | None = None
    # Parameters under which a chunkable method needs the whole tensor at once (model_stock's
    # filter_wise: its per-row ratios are not sums over row blocks): f(resolved params) -> bool.
    whole_tensor_when: Callable[[dict[str, Any]], bool] | None = None
    # The method reads its inputs block by block and casts each block to fp32 itself (the
    # sparse family): the engine hands it the stored 16-bit tensors (after the recipe's `dtype`
    # cast), so a whole-tensor merge holds no fp32 copy of its inputs.
    stored_dtype_inputs: bool = False
    # Plan-time check of one tensor's resolved parameters (raise ValueError): lets the engine
    # reject a bad recipe before it computes anything.
    validate: Callable[[dict[str, Any]], None] | None = None
    # Outputs besides the merged model, which the engine stores beside it (engine/side_outputs/store.py):
    # `side(base, expert_chunks, **params)` returns EMR's per-expert masks and sums
    # (engine/side_outputs/emr.py), Twin-Merging's compressed exclusive parts (engine/side_outputs/twin.py).
    side: Callable[..., Any] | None = None
    # Twin-Merging: after the merge, a router is trained on the experts' calibration data to
    # mix the side outputs per input (calibrate/router.py).
    router: bool = False
    # Per-expert statistics gathered from data (calibrate/), one kind per name: "gram" (input Gram
    # matrix of a linear layer's weight), "fisher" (diagonal Fisher, shaped like the tensor),
    # "second_moment" (an optimizer's second moment, shaped like the tensor), "mask" (a learned
    # mask, shaped like the tensor). Each reaches `fn` as a keyword of the same name: a list
    # aligned with `experts`, or None for a tensor that has no such statistic.
    statistics: tuple[str, ...] = ()
    # Whose forward passes give the statistics: "experts" (each on its own calibration data), or
    # "base" (AIM weighs channels by θ0's activations: the base runs on each expert's data, and
    # each expert's list entry is that store's statistic).
    statistics_from: str = "experts"
    # Whether the method also runs without statistics, by a data-free rule of its own (stitch
    # localizes by magnitude); otherwise a merge without them is refused, never a silent fallback.
    optional_statistics: bool = False
    # Whole-model methods that learn from data before anything is written (AdaMerging, ...):
    # `learn(problem, **params)` (methods/adaptive.py) returns what the per-tensor merge needs.
    learn: Callable[..., Any] | None = None
    # Under `compat: mergekit`: `compat(params, compute_dtype) -> params`, the resolved
    # parameters with the options that make the method compute what mergekit 0.1.5 does
    # (its sign ties, rescale, selections), in `compute_dtype`, mergekit's: the recipe's
    # `dtype`, else the inputs' own. None: mergekit computes what the method does already.
    compat: Callable[[dict[str, Any], torch.dtype], dict[str, Any]] | None = None
    aliases: tuple[str, ...] = field(default=())
    # "adapter": the method merges LoRA adapters into one adapter (engine/adapters.py), one
    # module at a time: fn(Bs, As, scalings, *, weights, ctx, **params) -> (B, A[, info]), the
    # output's scaling 1; "tensor": a merge of full tensors as above.
    output: str = "tensor"
    # Adapter methods that need every adapter at one rank in each module (with these
    # parameters): why, as a short clause for the plan-time error, else None.
    equal_ranks_when: Callable[[dict[str, Any]], str | None] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def uses_base(self) -> bool:
        return self.needs_base or self.optional_base

    @property
    def needs_data(self) -> bool:
        return bool(self.statistics) or self.learn is not None or self.router

    @property
    def chunkable(self) -> bool:
        return self.elementwise or self.reduce is not None

    def reduce_passes(self, params: dict[str, Any]) -> int:
        """How many reduce passes one tensor's merge makes before the merge pass."""
        if self.reduce is None:
            return 0
        return self.passes(params) if self.passes is not None else 1

    def fold(self, stats: Any, sums: Any, params: dict[str, Any]) -> Any:
        """The statistics after a reduce pass whose chunks' sums add up to `sums`."""
        return self.finish(stats, sums, **params) if self.finish is not None else sums

    def streams(self, params: dict[str, Any]) -> bool:
        """Whether one tensor's merge, with these parameters, may go in row blocks."""
        return ((self.chunkable or self.row_local)
                and not (self.whole_tensor_when and self.whole_tensor_when(params)))

    def tiles(self, params: dict[str, Any]) -> bool:
        """Whether a row block may be split further into flat tiles, which cut rows: not for a
        row-local method, even one with reduce passes (WIDEN's per-column and per-row sums)."""
        return self.chunkable and not self.row_local and self.streams(params)


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, **spec: Any) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        entry = MethodSpec(name=name, fn=fn, **spec)
        for key in (name, *entry.aliases):
            if key in _REGISTRY:
                raise RuntimeError(f"merge method {key!r} registered twice")
            _REGISTRY[key] = entry
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "`mergesmith methods` lists them"
        raise MethodError(f"unknown merge method {name!r}", hint=hint)
    return _REGISTRY[name]


def all_methods() -> list[MethodSpec]:
    """Each method once (aliases folded), in registration order."""
    seen: dict[str, MethodSpec] = {}
    for spec in _REGISTRY.values():
        seen.setdefault(spec.name, spec)
    return list(seen.values())


@dataclass(frozen=True)
class Operation:
    """A method that builds a model by its own command rather than through a merge recipe
    (MoE assembly and compression, permutation alignment): listed by `mergesmith methods`
    beside the merge methods, with the command that runs it."""

    name: str
    command: str  # e.g. "mergesmith moe CONFIG OUT (gate_mode: hidden)"
    summary: str
    paper: str
    needs: str  # e.g. "dense experts + prompts", "an MoE + calibration data"


_OPERATIONS: dict[str, Operation] = {}


def register_operation(name: str, *, command: str, summary: str, paper: str, needs: str) -> Operation:
    if name in _OPERATIONS or name in _REGISTRY:
        raise RuntimeError(f"method {name!r} registered twice")
    _OPERATIONS[name] = Operation(name, command, summary, paper, needs)
    return _OPERATIONS[name]


def all_operations() -> list[Operation]:
    return list(_OPERATIONS.values())
