"""Stream a plan to disk: a reader thread prefetches, the method merges, a writer appends.

Memory holds one work unit being merged and one being read: a whole tensor, or a block of rows
when the method is element-wise (or element-wise after passes of sums, like SLERP, or of
counts, like TIES' cuts). So the
peak depends on `chunk_bytes` and the number of inputs, not on the model's or the shard's size.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from mergesmith.engine.allocator import keep_freed_memory
from mergesmith.engine.plan import Plan, TensorJob
from mergesmith.errors import MethodError, OutputError
from mergesmith.io import OutputFolder, ShardWriter
from mergesmith.methods.lines import scale_task_vector

# Small enough that the prefetched and in-flight units of a 70B model weigh what a 100M
# model's do (peak memory flat in model size); large enough that reads stay sequential.
DEFAULT_CHUNK_BYTES = 8 * 1024**2
RESUME_HINT = "the merge can continue with --resume once the cause is fixed"
CPU_TILE = 1 << 18  # elements: inputs, result and scratch of one tile stay within L2/L3 cache


@dataclass(frozen=True)
class Unit:
    job: TensorJob
    rows: tuple[int, int] | None  # None: the whole tensor
    phase: str  # "merge", or "reduce" for a pass of sums before it (SLERP's, the cuts' counts)
    step: int = 0  # which reduce pass
    last: bool = False  # the last unit of its reduce pass: its sums are then complete

    @property
    def out_bytes(self) -> int:
        if self.phase != "merge":
            return 0
        if self.rows is None:
            return self.job.out.nbytes
        return (self.rows[1] - self.rows[0]) * math.prod(self.job.out.shape[1:]) * self.job.out.dtype.itemsize


def units(plan: Plan, job: TensorJob, chunk_bytes: int) -> list[Unit]:
    shape = job.out.shape
    row_elems = math.prod(shape[1:]) if shape else 1
    whole = job.copy or not plan.streams(job) or not shape or 4 * math.prod(shape) <= chunk_bytes
    if whole:
        return [Unit(job, None, "merge")]
    step = max(1, chunk_bytes // (4 * row_elems))
    blocks = [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]
    # each reduce pass reads the inputs again (from the page cache, mostly): a pass's sums may
    # need the statistics of the one before, so no two passes share a read
    reduces = [Unit(job, rows, "reduce", p, rows == blocks[-1])
               for p in range(plan.method.reduce_passes(job.params)) for rows in blocks]
    return reduces + [Unit(job, rows, "merge") for rows in blocks]


def read_unit(plan: Plan, unit: Unit, source=None) -> list[torch.Tensor]:
    """The unit's inputs in their stored dtypes; `source(checkpoint, name, rows)` reads them
    from elsewhere than the files (a cache of the inputs: engine/memory.py)."""
    if source is None:
        tensors = [ck.read(name, unit.rows) for ck, name in unit.job.inputs]
    else:
        tensors = [source(ck, name, unit.rows) for ck, name in unit.job.inputs]
    if unit.job.vocab_axis:
        tensors = plan.vocab.gather(tensors, [ck for ck, _ in unit.job.inputs])
    return tensors


class Reader(threading.Thread):
    """Reads the inputs of each unit, in order, one unit ahead of the merge: the next unit is
    read only once the merge has taken the previous one, so at most two units are in memory."""

    def __init__(self, work: list[Unit], plan: Plan):
        super().__init__(daemon=True, name="mergesmith-reader")
        self.work, self.plan = work, plan
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.slot = threading.Semaphore(1)
        self.stopped = threading.Event()

    def run(self) -> None:
        for unit in self.work:
            while not self.slot.acquire(timeout=0.1):
                if self.stopped.is_set():
                    return
            try:
                item = read_unit(self.plan, unit)
            except BaseException as exc:  # handed to the main thread, which raises it
                item = exc
            while not self.stopped.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self.stopped.is_set() or isinstance(item, BaseException):
                return

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        for _ in self.work:
            item = self.queue.get()
            self.slot.release()
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        self.stopped.set()


def merge_unit(plan: Plan, unit: Unit, tensors: list[torch.Tensor], device: torch.device,
               stats: torch.Tensor | None):
    """The unit's merged values in the output dtype on the CPU (or, in a reduce pass, its sums)."""
    job = unit.job
    if job.copy:
        return tensors[0]
    # where the unit starts in the whole tensor, row-major: random methods draw by entry index
    start = unit.rows[0] * math.prod(job.out.shape[1:]) if unit.rows else 0
    tile = _tile(plan, job, tensors[0], device)
    if tile is None:
        return _merge_tile(plan, job, unit.phase, tensors, device, stats, start)
    flat = [t.view(-1) for t in tensors]
    size = flat[0].numel()

    def reduce_tiles(stats):
        return sum(_merge_tile(plan, job, "reduce", [f[a:a + tile] for f in flat], device, stats,
                               start + a)
                   for a in range(0, size, tile))

    if unit.phase == "reduce":
        return reduce_tiles(stats)
    if stats is None:  # a whole-tensor unit has no reduce passes of its own: they span its tiles
        for _ in range(plan.method.reduce_passes(job.params)):
            stats = plan.method.fold(stats, reduce_tiles(stats), job.params)
    out = torch.empty(size, dtype=job.out.dtype)
    for a in range(0, size, tile):
        out[a:a + tile] = _merge_tile(plan, job, "merge", [f[a:a + tile] for f in flat], device,
                                      stats, start + a)
    return out.view(tensors[0].shape)


def _tile(plan: Plan, job: TensorJob, tensor: torch.Tensor, device: torch.device) -> int | None:
    """Element-wise work on the CPU goes in cache-sized tiles: the cast, the method's few
    operations and the cast back then stream through cache once instead of through memory
    several times. GPUs want the whole block in one launch."""
    if device.type != "cpu" or not plan.method.tiles(job.params) or tensor.numel() <= CPU_TILE:
        return None
    return CPU_TILE


def _merge_tile(plan: Plan, job: TensorJob, phase: str, tensors: list[torch.Tensor],
                device: torch.device, stats: torch.Tensor | None, offset: int = 0) -> torch.Tensor:
    xs, statistics = _split_statistics(plan, job, tensors)
    # converted in place, so each stored-dtype input is freed as soon as its fp32 copy exists
    upcast = not plan.method.stored_dtype_inputs
    check = stats is None  # else a first pass (reduce) has checked these same inputs
    narrowed = {}  # input -> whether it was finite before the recipe's float16 cast
    for i, tensor in enumerate(xs):
        if check and plan.load_dtype == torch.float16 and tensor.dtype != torch.float16:
            narrowed[i] = _finite(tensor)
        xs[i] = _prepare(tensor, plan.load_dtype, device, upcast)
    for values in statistics.values():  # never through the recipe's dtype: fp16 zeroes 1e-12
        for i, tensor in enumerate(values or []):
            values[i] = tensor.to(device, non_blocking=True).float()
    if check:
        _check_inputs(job, xs + [t for values in statistics.values() for t in values or []],
                      narrowed)
    origin = xs[0] if job.lines_scale is not None else None  # θ0 of LiNeS
    if origin is not None and not job.has_base:
        xs = xs[1:]
    base, experts = (xs[0], xs[1:]) if job.has_base else (None, xs)
    method = plan.method
    extra = {"stats": stats} if stats is not None else {}  # those of the passes before
    ctx = replace(job.ctx, offset=offset) if offset else job.ctx  # random draws go by entry
    if phase == "reduce":
        return method.reduce(base, experts, ctx=ctx, **job.params, **extra)
    extra.update(statistics)
    try:
        result = method.fn(base, experts, ctx=ctx, **job.params, **extra)
    except ValueError as exc:
        raise MethodError(f"{method.name} failed on tensor {job.out.name!r}: {exc}") from None
    if tuple(result.shape) != tuple(tensors[0].shape):
        raise MethodError(f"{method.name} returned shape {list(result.shape)} for {job.out.name!r}, "
                          f"expected {list(tensors[0].shape)}")
    if origin is not None:
        result = scale_task_vector(origin, result, job.lines_scale)
    out = result.to(job.out.dtype)
    if not _finite(out):  # checked after the cast: float16 turns values beyond 65504 into inf
        if torch.isfinite(result).all():
            big = float(result.abs().max())
            raise MethodError(f"tensor {job.out.name!r}: merged values reach {big:.6g}, beyond "
                              f"{_dtype_name(job.out.dtype)}'s range (max "
                              f"{torch.finfo(job.out.dtype).max:.6g})",
                              hint="set `out_dtype: bfloat16`, which has float32's range")
        raise MethodError(f"{method.name} produced NaN/Inf in tensor {job.out.name!r} from "
                          "finite inputs", hint="look for extreme weights or scales in the recipe")
    return out.cpu()


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum, finite exactly when no value is NaN/Inf, barring an overflow of the sum itself
    (float16's is taken in float32, where a tile's cannot overflow). It costs a cast's time, a
    full check 30 times more: the full check runs only when the sum is not finite."""
    return tensor.sum(dtype=torch.float32 if tensor.dtype == torch.float16 else None)


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf in `tensor`."""
    return bool(torch.isfinite(_sum(tensor))) or bool(torch.isfinite(tensor).all())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_inputs(job: TensorJob, xs: list[torch.Tensor], narrowed: dict[int, bool]) -> None:
    """Refuse NaN/Inf in any input before a method sees it: methods would otherwise fail
    without a name (eigh) or turn it into finite values (a mask, a clamp) silently. One sum per
    input and one test of their total (a single device sync); each input on its own only
    when that total is not finite. `xs` are in `job.inputs` order (statistics last, whichever
    kinds this tensor has); `narrowed[i]`: input i was finite before the recipe's float16 cast."""
    sums = [_sum(x) for x in xs if x.is_floating_point()]
    if not sums or bool(torch.isfinite(torch.stack(sums).sum())):
        return
    for i, x in enumerate(xs):
        if not x.is_floating_point() or _finite(x):
            continue
        ck, name = job.inputs[i]
        if narrowed.get(i):
            raise MethodError(f"tensor {name!r} of model {ck.label} overflows the recipe's dtype "
                              f"float16 (max {torch.finfo(torch.float16).max:.6g})",
                              hint="set `dtype: bfloat16` or `dtype: float32` in the recipe")
        raise MethodError(f"tensor {name!r} of model {ck.label} has NaN or Inf values",
                          hint="the checkpoint is damaged or diverged in training: repair it or "
                               "merge without it")


def _split_statistics(plan: Plan, job: TensorJob, tensors: list[torch.Tensor]):
    """(model inputs, {kind: per-expert statistics, or None where this tensor has none})."""
    if not plan.method.statistics:
        return tensors, {}
    if not job.statistics:
        return tensors, {kind: None for kind in plan.method.statistics}
    origin = 1 if (job.has_base or job.lines_scale is not None) else 0
    experts = (len(tensors) - origin) // (1 + len(job.statistics))
    count = origin + experts
    found = {kind: tensors[count + k * experts: count + (k + 1) * experts]
             for k, kind in enumerate(job.statistics)}
    return tensors[:count], found


def _prepare(tensor: torch.Tensor, load_dtype: torch.dtype | None, device: torch.device,
             upcast: bool = True) -> torch.Tensor:
    """As mergekit: cast to the recipe's `dtype` on load, then compute in fp32 (or leave that
    to a method that casts block by block)."""
    tensor = tensor.to(device, non_blocking=True)
    if load_dtype is not None:
        tensor = tensor.to(load_dtype)
    if not upcast and not tensor.is_floating_point():
        upcast = True  # integer inputs of a float merge
    return tensor.float() if upcast else tensor


class WriteBehind:
    """Writes in a thread of their own, so the next tile is merged while bytes go to disk;
    at most `depth` writes wait, so memory stays bounded."""

    def __init__(self, depth: int = 2):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mergesmith-writer")
        self.waiting: deque = deque()
        self.depth = depth

    def submit(self, fn, *args) -> None:
        self.waiting.append(self.pool.submit(fn, *args))
        while len(self.waiting) > self.depth:
            self.waiting.popleft().result()

    def drain(self) -> None:
        while self.waiting:
            self.waiting.popleft().result()

    def close(self) -> None:
        for future in self.waiting:
            future.cancel()
        self.pool.shutdown(wait=True)


def stream(plan: Plan, output: OutputFolder, *, device: torch.device, chunk_bytes: int,
           progress=None, side=None) -> None:
    """Write every shard not already finished, each through a fresh writer. `side` (engine/api.py:
    SIDE_STORES) stores the method's side outputs, per shard, before it is marked done."""
    keep_freed_memory()
    with merge_threads(plan, device):
        _stream(plan, output, device=device, chunk_bytes=chunk_bytes, progress=progress, side=side)


@contextmanager
def merge_threads(plan: Plan, device: torch.device) -> Iterator[None]:
    """The thread count every merge of the plan runs with (in memory too, so the bytes match)."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and plan.method.chunkable and not plan.method.own_threads:
        # cache-sized tiles are too small to split across cores: the split costs more than it
        # saves (several times more on a busy machine), and the reader and writer threads use
        # the other cores
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def merge_job(plan: Plan, job: TensorJob, chunk_bytes: int, read, device: torch.device
              ) -> Iterator[tuple[Unit, list[torch.Tensor], torch.Tensor]]:
    """(unit, its inputs, its merged values) for each merge unit of the job, in row order;
    `read(unit)` gives a unit's inputs. The reduce passes before them (SLERP's sums, the cuts'
    counts) fold into the statistics the merge units get."""
    stats = sums = None
    for unit in units(plan, job, chunk_bytes):
        tensors = read(unit)
        result = merge_unit(plan, unit, tensors, device, stats)
        if unit.phase == "reduce":
            sums = result if sums is None else sums + result
            if unit.last:
                stats, sums = plan.method.fold(stats, sums, job.params), None
            continue
        yield unit, tensors, result


def _stream(plan: Plan, output: OutputFolder, *, device: torch.device, chunk_bytes: int,
            progress=None, side=None) -> None:
    pending = [s for s in plan.shards if not output.is_done(s.filename, s.size)]
    if progress:
        progress.advance(sum(s.data_bytes for s in plan.shards if s not in pending),
                         sum(len(s.tensors) for s in plan.shards if s not in pending))
    jobs = {job.out.name: job for job in plan.jobs}
    work = [u for shard in pending for t in shard.tensors for u in units(plan, jobs[t.name], chunk_bytes)]
    reader = Reader(work, plan)
    reader.start()
    inputs = iter(reader)
    read = lambda unit: next(inputs)  # noqa: E731 (the reader yields the units in order)
    behind = WriteBehind()
    try:
        for shard in pending:
            writer = _open_writer(output, shard)
            try:
                if side is not None:
                    side.open(shard)
                for out in shard.tensors:
                    job = jobs[out.name]
                    for unit, tensors, result in merge_job(plan, job, chunk_bytes, read, device):
                        if side is not None and not job.copy:
                            side.add(job, side_outputs(plan, job, tensors, device))
                        behind.submit(_write, writer, result)
                        if progress:
                            progress.advance(unit.out_bytes, 0, job.out.name)
                    if progress:
                        progress.advance(0, 1)
                behind.submit(_close, writer)
                behind.drain()
                if side is not None:
                    side.close()
            except BaseException:
                behind.close()
                writer.abort()
                if side is not None:
                    side.abort()
                raise
            output.mark_done(shard.filename, shard.size)
    finally:
        behind.close()
        reader.stop()


def side_outputs(plan: Plan, job: TensorJob, tensors: list[torch.Tensor], device: torch.device):
    """The method's outputs besides the merge (EMR's masks and sums, Twin-Merging's parts) for
    one unit's inputs; such methods take a base, which is inputs[0]."""
    xs = [_prepare(t, plan.load_dtype, device) for t in tensors]
    return plan.method.side(xs[0], xs[1:], **job.params)


def _open_writer(output: OutputFolder, shard) -> ShardWriter:
    try:
        return ShardWriter(output.path(shard.filename), shard)
    except OSError as exc:
        raise OutputError(f"cannot write {output.path(shard.filename)}: {exc.strerror}",
                          hint=RESUME_HINT) from None


def _write(writer: ShardWriter, tensor: torch.Tensor) -> None:
    try:
        writer.write(tensor)
    except OSError as exc:
        raise OutputError(f"writing {writer.path} failed: {exc.strerror or exc}",
                          hint=RESUME_HINT) from None


def _close(writer: ShardWriter) -> None:
    try:
        writer.close()
    except OSError as exc:
        raise OutputError(f"writing {writer.path} failed: {exc.strerror or exc}",
                          hint=RESUME_HINT) from None
