"""mergesmith vs mergekit: wall time, CPU time and peak memory of real merges.

    .venv/bin/python bench/run.py [--sizes 100m,1b] [--methods linear,task_arithmetic,slerp]
        [--dtypes bfloat16,float32] [--densities 0.2,0.5]
        [--work bench/work] [--repeat 1] [--tools mergekit,mergesmith]
        [--json bench/results/latest.json]

See bench/README.md for what is measured and how to read the output.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

import measure
import models
import recipes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MB = 1024 * 1024
BUF = 16 * MB

# Output shards of 250 MB for both tools, so both write the same files.
# mergekit's --out-shard-size is documented as "number of parameters" but its
# TensorWriter compares it with tensor bytes, so "250M" means 250e6 bytes.
MERGEKIT_FLAGS = [
    "--out-shard-size", "250M",
    "--no-copy-tokenizer",  # the models have no tokenizer: copying fails after a
                            # slow AutoTokenizer attempt and logs a traceback
    "--quiet",              # no progress bars (mergesmith also runs --quiet)
]
# Defaults kept on purpose: --no-cuda; --no-async-write (documented as trading
# memory for speed; on 1b linear it gave no measurable gain, 14 s either way);
# -j unset (torch's default: all cores); --lazy-unpickle only affects pickled
# .bin checkpoints; --write-model-card stays (a 1 KB README, no measurable cost).
MERGESMITH_FLAGS = ["--shard-size", "250MB", "--quiet"]

TOOLS = ("mergekit", "mergesmith")
# Targets checked at the end: (method, size) for ratio targets.
TARGET_METHODS = ("linear", "task_arithmetic", "slerp")
TARGET_SIZE, SMALL_SIZE = "1b", "100m"
MAX_WALL_RATIO = MAX_ANON_RATIO = 0.6
MAX_ANON_GROWTH = 1.3
# The sparse family (issue 5): mergekit sorts or samples per tensor where we select by k-th value.
SPARSE_METHODS = ("ties", "dare_ties", "breadcrumbs", "della")
MAX_SPARSE_WALL_RATIO = 0.25
# Methods mergekit does not have: timed beside task arithmetic, no ratio.
MERGESMITH_ONLY = ("tsv_m", "iso_c", "iso_cts")

METRICS = ("wall_s", "cpu_s", "peak_rss_bytes", "peak_anon_bytes", "max_hwm_bytes", "other_cpu_s")
NOISY = 0.10  # a run is flagged when other processes used > 10% of the machine's CPU


# ----------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=csv, default=["100m", "1b"])
    ap.add_argument("--methods", type=csv, default=list(TARGET_METHODS))
    ap.add_argument("--dtypes", type=csv, default=[recipes.DEFAULT_DTYPE],
                    help="the recipes' dtype, each a variant of every method: "
                         + ", ".join(recipes.DTYPES))
    ap.add_argument("--densities", type=csv, default=[],
                    help="each model's density, each a variant of the methods that take one "
                         f"({', '.join(recipes.SPARSE)}); default: the recipe's (0.5)")
    ap.add_argument("--tools", type=csv, default=list(TOOLS))
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    ap.add_argument("--idle-wait", type=float, default=15.0, metavar="S",
                    help="before each merge wait up to S seconds for the machine to be "
                         "idle (other processes < 10%% of its CPU); 0 disables")
    args = ap.parse_args(argv)
    for method in args.methods:
        try:
            recipes.parse_variant(method)
        except ValueError as exc:
            ap.error(str(exc))
    for name, given, known in (("size", args.sizes, models.SIZES),
                               ("dtype", args.dtypes, recipes.DTYPES),
                               ("tool", args.tools, TOOLS)):
        bad = [x for x in given if x not in known]
        if bad:
            ap.error(f"unknown {name}(s) {bad}; choose from {list(known)}")
    try:
        densities = [float(d) for d in args.densities] or [None]
    except ValueError:
        ap.error(f"--densities takes numbers, got {args.densities}")
    # from here on a "method" is a recipe variant (recipes.variant): method, dtype, density
    args.methods = list(dict.fromkeys(
        m if "-" in m else recipes.variant(m, dtype, d if recipes.has_density(m) else None)
        for m in args.methods for dtype in args.dtypes for d in densities))
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    args.work = args.work.resolve()  # recipes hold absolute model paths
    return args


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------- tools
def tool_command(tool: str, recipe: Path, out: Path) -> list[str]:
    if tool == "mergekit":
        return [str(BIN / "mergekit-yaml"), str(recipe), str(out), *MERGEKIT_FLAGS]
    return [str(BIN / "mergesmith"), "merge", str(recipe), str(out), *MERGESMITH_FLAGS]


def tool_env() -> dict:
    """Same environment for both tools: offline, nothing fetched from the Hub."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def probe_tool(tool: str) -> tuple[str | None, dict]:
    """Run the tool's --help: (None if it works else why not, its measurement).

    The measurement is a lower bound on the tool's fixed start-up cost (a CLI
    may import its heavy modules only when it actually merges)."""
    cmd = {"mergekit": [str(BIN / "mergekit-yaml"), "--help"],
           "mergesmith": [str(BIN / "mergesmith"), "merge", "--help"]}[tool]
    shown = " ".join([Path(cmd[0]).name, *cmd[1:]])
    try:
        m = measure.measure(cmd, env=tool_env())
    except OSError as e:
        return f"`{shown}`: {e}", {}
    if m.returncode != 0:
        last = m.stderr_tail.strip().splitlines()[-1:] or ["?"]
        return f"`{shown}` exited {m.returncode}: {last[0]}", m.to_dict()
    return None, m.to_dict()


def versions() -> dict:
    out = {}
    for pkg in ("mergesmith", "mergekit", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        out["mergesmith_git"] = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=30).stdout.strip() or None
    except OSError:
        out["mergesmith_git"] = None
    return out


def machine_info() -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "total_ram_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------- I/O floor
def wait_for_idle(max_wait: float) -> float:
    """Wait (at most max_wait s) until the machine is idle for 1 s; seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        if psutil.cpu_percent(interval=1.0) < 100 * NOISY:
            break
    return time.perf_counter() - t0


def read_files(paths: list[Path]) -> tuple[int, float]:
    """Read every file once, sequentially, 16 MB at a time; (bytes, seconds)."""
    buf = memoryview(bytearray(BUF))
    total, t0 = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.perf_counter() - t0


def write_file(path: Path, nbytes: int, direct: bool = False) -> float:
    """Write nbytes (random data, 16 MB writes, no fsync: the merge tools do not
    fsync either), through the page cache or past it (O_DIRECT, as mergesmith
    writes shards where it can; the last partial block is padded, then cut);
    seconds.  The file is deleted afterwards (not timed)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    buf = mmap.mmap(-1, BUF)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(BUF))
    view = memoryview(buf)
    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        left = nbytes
        while left:
            take = min(left, BUF)
            length = -(-take // 4096) * 4096 if direct else take
            left -= min(take, os.write(fd, view[:length]))
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    view.release()
    buf.close()
    path.unlink()
    os.sync()  # no dirty pages left over to slow down the next run
    return dt


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> dict:
    """Warm the cache with one read, then time a second read + the faster of a buffered and a
    direct write."""
    _, first_read_s = read_files(inputs)  # cold or warm, whatever state we found
    in_bytes, read_s = read_files(inputs)
    scratch.mkdir(parents=True, exist_ok=True)
    write_s = write_file(scratch / "io-floor.bin", out_bytes)
    try:
        direct_s = write_file(scratch / "io-floor.bin", out_bytes, direct=True)
    except (AttributeError, OSError):  # no O_DIRECT here: the buffered write is the floor
        direct_s = float("nan")
    best = min(write_s, direct_s) if direct_s == direct_s else write_s
    return {"in_bytes": in_bytes, "out_bytes": out_bytes, "first_read_s": first_read_s,
            "read_s": read_s, "write_s": write_s, "direct_write_s": direct_s,
            "floor_s": read_s + best}


# ----------------------------------------------------------------- one merge
@dataclass
class Case:
    size: str
    method: str
    recipe: Path
    inputs: list[Path]      # weight files the recipe reads
    out_bytes: int          # expected size of the merged weights


def output_problem(out: Path, expected_bytes: int) -> str | None:
    if not ((out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists()):
        return f"no model.safetensors(.index.json) in {out}"
    got = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    if abs(got - expected_bytes) > 0.01 * expected_bytes:
        return f"output weights are {got / MB:.0f} MB, expected ~{expected_bytes / MB:.0f} MB"
    return None


def run_merge(tool: str, case: Case, out_root: Path, idle_wait: float) -> dict:
    """Warm the cache, run one merge in a subprocess, check and delete its output."""
    out = out_root / f"{case.size}-{case.method}-{tool}"
    # mergesmith builds `.<name>.partial` beside the target: an interrupted earlier run's would
    # make this one refuse to start (it offers --resume)
    partial = out.with_name(f".{out.name}.partial")
    for folder in (out, partial):
        shutil.rmtree(folder, ignore_errors=True)
    read_files(case.inputs)  # same page-cache state for every run
    waited = wait_for_idle(idle_wait) if idle_wait > 0 else 0.0
    cmd = tool_command(tool, case.recipe, out)
    try:
        m = measure.measure(cmd, env=tool_env())
        problem = (f"exit code {m.returncode}" if m.returncode != 0
                   else output_problem(out, case.out_bytes))
        row = {**m.to_dict(), "ok": problem is None, "error": problem}
    except OSError as e:
        row = {"cmd": cmd, "ok": False, "error": str(e), "stderr_tail": ""}
    finally:
        for folder in (out, partial):
            shutil.rmtree(folder, ignore_errors=True)
        os.sync()
    row.update(tool=tool, size=case.size, method=case.method, idle_wait_s=waited,
               noisy=is_noisy(row))
    if not row["ok"]:
        log(f"    FAILED: {row['error']}\n    --- stderr tail ---\n"
            + "\n".join("    " + ln for ln in row.get("stderr_tail", "").splitlines()[-15:]))
    return row


def is_noisy(row: dict) -> bool:
    return bool(row.get("wall_s")) and \
        row.get("other_cpu_s", 0) > NOISY * row["wall_s"] * (os.cpu_count() or 1)


# ----------------------------------------------------------------- summary
def summarize(runs: list[dict]) -> dict[tuple, dict]:
    """(size, method, tool) -> medians of the successful runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["size"], r["method"], r["tool"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        good = [r for r in rs if r["ok"]]
        s = {"n_ok": len(good), "n_runs": len(rs), "n_noisy": sum(r["noisy"] for r in good)}
        for k in METRICS:
            s[k] = statistics.median(r[k] for r in good) if good else None
        out[key] = s
    return out


def ratio(summary: dict, size: str, method: str, metric: str) -> float | None:
    a = summary.get((size, method, "mergesmith"), {}).get(metric)
    b = summary.get((size, method, "mergekit"), {}).get(metric)
    return a / b if a is not None and b else None


def _noise_note(summary: dict, keys: list[tuple]) -> str:
    n = sum(summary.get(k, {}).get("n_noisy", 0) for k in keys)
    return f"; {n} noisy run(s), re-run on a quiet machine" if n else ""


def checks(summary: dict) -> list[dict]:
    out = []

    def add(name, value, limit, detail):
        status = "SKIP" if value is None else ("PASS" if value <= limit else "FAIL")
        out.append({"check": name, "value": value, "limit": limit, "status": status,
                    "detail": detail})

    measured = list(dict.fromkeys(m for (size, m, _) in summary if size == TARGET_SIZE
                                  and recipes.parse_variant(m)[0] not in MERGESMITH_ONLY))
    for method in measured:
        sparse = recipes.parse_variant(method)[0] in SPARSE_METHODS
        wall = MAX_SPARSE_WALL_RATIO if sparse else MAX_WALL_RATIO
        for metric, limit, label in (("wall_s", wall, "wall"),
                                     ("peak_anon_bytes", MAX_ANON_RATIO, "anon")):
            ms = summary.get((TARGET_SIZE, method, "mergesmith"), {}).get(metric)
            mk = summary.get((TARGET_SIZE, method, "mergekit"), {}).get(metric)
            detail = "no data" if ms is None or mk is None else (
                f"{_fmt(metric, ms)} / {_fmt(metric, mk)}"
                + _noise_note(summary, [(TARGET_SIZE, method, t) for t in TOOLS]))
            add(f"{TARGET_SIZE} {method} {label} ratio mergesmith/mergekit",
                ratio(summary, TARGET_SIZE, method, metric), limit, detail)
    for method in [m for m in TARGET_METHODS if m in measured]:
        big = summary.get((TARGET_SIZE, method, "mergesmith"), {}).get("peak_anon_bytes")
        small = summary.get((SMALL_SIZE, method, "mergesmith"), {}).get("peak_anon_bytes")
        value = big / small if big is not None and small else None
        detail = "no data" if value is None else (
            f"{big / MB:.0f} MB on {TARGET_SIZE} / {small / MB:.0f} MB on {SMALL_SIZE}")
        add(f"mergesmith {method} peak anon {TARGET_SIZE}/{SMALL_SIZE}", value,
            MAX_ANON_GROWTH, detail)
    return out


# ----------------------------------------------------------------- printing
def _fmt(metric: str, v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f} s" if metric.endswith("_s") else f"{v / MB:.0f} MB"


def table(headers: list[str], rows: list[list[str]], n_left: int) -> str:
    """Plain-text table; the first n_left columns left-aligned, the rest right."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) if i < n_left else str(x).rjust(w)  # noqa: E731
                               for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def results_table(summary: dict, sizes, methods, tools) -> str:
    rows = []
    for size in sizes:
        for method in methods:
            for tool in tools:
                s = summary.get((size, method, tool))
                if s is None:
                    continue
                if s["n_ok"] == 0:
                    rows.append([size, method, tool, "FAILED", "", "", "", "", "",
                                 f"0/{s['n_runs']}"])
                    continue
                noisy = f" ({s['n_noisy']} noisy)" if s["n_noisy"] else ""
                rows.append([size, method, tool, f"{s['wall_s']:.2f}", f"{s['cpu_s']:.2f}",
                             f"{s['peak_rss_bytes'] / MB:.0f}", f"{s['peak_anon_bytes'] / MB:.0f}",
                             f"{s['max_hwm_bytes'] / MB:.0f}", f"{s['other_cpu_s']:.2f}",
                             f"{s['n_ok']}/{s['n_runs']}{noisy}"])
            r = [ratio(summary, size, method, k) for k in METRICS[:4]]
            if any(x is not None for x in r):
                rows.append([size, method, "ratio ms/mk",
                             *("-" if x is None else f"{x:.2f}x" for x in r), "", "", ""])
    return table(["size", "method", "tool", "wall s", "CPU s", "peak RSS MB",
                  "peak anon MB", "max HWM MB", "other CPU s", "ok"], rows, n_left=3)


def floor_table(floors: dict) -> str:
    rows = []
    for (size, method), f in floors.items():
        rows.append([size, method, f"{f['in_bytes'] / MB:.0f}", f"{f['out_bytes'] / MB:.0f}",
                     f"{f['read_s']:.2f}", f"{f['write_s']:.2f}",
                     f"{f.get('direct_write_s', float('nan')):.2f}", f"{f['floor_s']:.2f}",
                     f"{f['first_read_s']:.2f}"])
    return table(["size", "method", "read MB", "write MB", "read s", "write s",
                  "direct write s", "floor s", "first read s"], rows, n_left=2)


def checks_text(cs: list[dict]) -> str:
    out = []
    for c in cs:
        v = "-" if c["value"] is None else f"{c['value']:.2f}"
        out.append(f"{c['status']:4}  {c['check']}: {v} (limit {c['limit']}) [{c['detail']}]")
    return "\n".join(out)


# ----------------------------------------------------------------- main
def prepare(size: str, methods: list[str], work: Path, stages: dict) -> list[Case]:
    t0 = time.perf_counter()
    dirs = models.build_size(size, work / "models", log=log)
    stages[f"build {size}"] = time.perf_counter() - t0
    out_bytes = models.weight_bytes(dirs["base"])
    cases = []
    for method in methods:
        path = work / "recipes" / f"{size}-{method}.yml"
        recipe = recipes.write_recipe(method, dirs, path)
        inputs = [f for d in recipes.recipe_models(recipe) for f in models.weight_files(d)]
        # the models are bf16; both tools write the recipe's dtype
        scale = 2 if recipe["dtype"] == "float32" else 1
        cases.append(Case(size, method, path, inputs, scale * out_bytes))
    return cases


def available_tools(requested: list[str]) -> tuple[list[str], dict[str, str], dict[str, dict]]:
    """(usable tools, {tool: why skipped}, {tool: start-up measurement})."""
    tools, skipped, startup = [], {}, {}
    for tool in requested:
        problem, startup[tool] = probe_tool(tool)
        if problem:
            log(f"[skip] {tool} unavailable: {problem}")
            skipped[tool] = problem
            continue
        tools.append(tool)
        m = startup[tool]
        log(f"[probe] {tool} --help ok: wall {m['wall_s']:.2f}s, "
            f"peak anon {m['peak_anon_bytes'] / MB:.0f} MB")
    return tools, skipped, startup


def log_run(row: dict) -> None:
    if row["ok"]:
        log(f"    wall {row['wall_s']:.2f}s  cpu {row['cpu_s']:.2f}s  "
            f"rss {row['peak_rss_bytes'] / MB:.0f} MB  anon {row['peak_anon_bytes'] / MB:.0f} MB  "
            f"other cpu {row['other_cpu_s']:.2f}s"
            + ("  [NOISY: machine busy, timing unreliable]" if row["noisy"] else ""))


def bench_case(case: Case, tools: list[str], args, stages: dict) -> tuple[dict, list[dict]]:
    """I/O floor, then every tool `repeat` times, alternating; (floor, runs)."""
    out_root = args.work / "out"
    t0 = time.perf_counter()
    floor = io_floor(case.inputs, case.out_bytes, out_root)
    stages[f"io floor {case.size} {case.method}"] = time.perf_counter() - t0
    log(f"[floor] {case.size} {case.method}: read {floor['in_bytes'] / MB:.0f} MB "
        f"{floor['read_s']:.2f}s + write {floor['out_bytes'] / MB:.0f} MB {floor['write_s']:.2f}s "
        f"(direct {floor['direct_write_s']:.2f}s)")
    t0, runs = time.perf_counter(), []
    for rep in range(args.repeat):
        for tool in tools:  # alternate: mergekit, mergesmith, mergekit, ...
            if tool == "mergekit" and recipes.parse_variant(case.method)[0] in MERGESMITH_ONLY:
                continue
            log(f"[run] {case.size} {case.method} {tool} ({rep + 1}/{args.repeat})")
            runs.append({**run_merge(tool, case, out_root, args.idle_wait), "repeat": rep})
            log_run(runs[-1])
    stages[f"merges {case.size} {case.method}"] = time.perf_counter() - t0
    return floor, runs


def report(summary, floors, cs, stages, args, tools) -> None:
    print()
    print(results_table(summary, args.sizes, args.methods, tools))
    print("\nI/O floor (warm-cache read of every input weight file + write of one "
          "output-sized file)")
    print(floor_table(floors))
    print("\nTargets")
    print(checks_text(cs))
    print("\nStages: " + ", ".join(f"{k} {v:.0f}s" for k, v in stages.items()))


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start, stages = time.perf_counter(), {}
    tools, skipped, startup = available_tools(args.tools)
    info = {"machine": machine_info(), "versions": versions(),
            "mergekit_flags": MERGEKIT_FLAGS, "mergesmith_flags": MERGESMITH_FLAGS}
    log(f"[info] {info['machine']['cpu_count']} CPUs, "
        f"{info['machine']['total_ram_bytes'] / 1024**3:.1f} GiB RAM; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))

    cases = [c for size in args.sizes for c in prepare(size, args.methods, args.work, stages)]
    floors, runs = {}, []
    for case in cases:
        floors[(case.size, case.method)], case_runs = bench_case(case, tools, args, stages)
        runs += case_runs
    stages["total"] = time.perf_counter() - t_start

    summary = summarize(runs)
    cs = checks(summary)
    report(summary, floors, cs, stages, args, tools)
    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **info, "skipped_tools": skipped, "startup": startup, "stages_s": stages,
        "io_floor": [{"size": s, "method": m, **f} for (s, m), f in floors.items()],
        "runs": runs,
        "summary": [{"size": s, "method": m, "tool": t, **v} for (s, m, t), v in summary.items()],
        "checks": cs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    log(f"\n[json] {args.json}")
    return 1 if any(not r["ok"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
