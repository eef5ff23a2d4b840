"""`mergesmith merge --ray` against a local merge of the same recipe: time, CPU and the peak
memory of each process (driver, each Ray worker, Ray's own processes), and whether the two
outputs are the same bytes.

    .venv/bin/python bench/ray_merge.py                       # the ~1B bench model, bf16 ties
    .venv/bin/python bench/ray_merge.py --method linear --workers 2 --shard-size 250MB

The models are the ones bench/run.py builds (bench/models.py); the recipe is bench/recipes.py's.
Both merges write the same shards (--shard-size), so the Ray workers have shards to share. Each
run starts with the inputs read once (the same page-cache state). Memory is polled from
/proc/<pid>/status over the command's whole process tree (a local Ray runtime's processes are
its descendants): RSS counts the inputs' mapped pages, RssAnon what the process itself holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import measure  # noqa: E402
import recipes  # noqa: E402

HERE = Path(__file__).parent
MB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=HERE / "work/models/1b-de6b127f07",
                   help="a folder of base, expert1, expert2, expert3 (bench/models.py)")
    p.add_argument("--method", default="ties", help="a recipe of bench/recipes.py (bf16)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-size", default="250MB")
    p.add_argument("--work", type=Path, default=HERE / "work/ray-merge")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def role(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    try:
        name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return "gone"
    return "worker" if name.startswith("ray::") else f"ray:{Path(name).name}"


def run(cmd: list[str]) -> dict:
    """Run `cmd`, polling its process tree: wall time, and per process its role, peak RSS,
    peak RssAnon, VmHWM and CPU seconds (as last seen)."""
    procs: dict[int, dict] = {}
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tree: list[int] = []
    refresh = 0.0
    while child.poll() is None:
        now = time.perf_counter()
        if now >= refresh:
            tree = [child.pid] + measure._descendants(child.pid)
            refresh = now + 0.2
        for pid in tree:
            status = measure.read_status(pid)
            if not status:
                continue
            seen = procs.setdefault(pid, {"role": "", "rss": 0, "anon": 0, "hwm": 0, "cpu_s": 0.0})
            if seen["role"] != "worker":  # a Ray worker takes its `ray::` title once started
                seen["role"] = role(pid, child.pid)
            seen["rss"] = max(seen["rss"], status.get("rss", 0))
            seen["anon"] = max(seen["anon"], status.get("anon", 0))
            seen["hwm"] = max(seen["hwm"], status.get("hwm", 0))
            seen["cpu_s"] = max(seen["cpu_s"], cpu_seconds(pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    err = child.stderr.read().decode(errors="replace")
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "processes": list(procs.values())}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def warm(folders: list[Path]) -> None:
    for folder in folders:
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb") as f:
                while f.read(16 * MB):
                    pass


def summary(name: str, result: dict) -> list[str]:
    rows = []
    by_role: dict[str, list[dict]] = {}
    for p in result["processes"]:
        by_role.setdefault("worker" if p["role"] == "worker" else
                           "ray runtime" if p["role"].startswith("ray:") else p["role"], []).append(p)
    for r in ("driver", "worker", "ray runtime"):
        group = by_role.get(r, [])
        if not group:
            continue
        if r == "ray runtime":  # many small processes: their sum
            rows.append(f"| {name} | {r} ({len(group)} processes) | {sum(p['cpu_s'] for p in group):.1f} | "
                        f"{sum(p['rss'] for p in group) / MB:.0f} | {sum(p['anon'] for p in group) / MB:.0f} |")
            continue
        big = [p for p in group if r != "worker" or p["cpu_s"] > 1.0] or group  # idle prestarted workers aside
        for i, p in enumerate(sorted(big, key=lambda p: -p["cpu_s"])):
            label = r if r == "driver" else f"worker {i + 1}"
            rows.append(f"| {name} | {label} | {p['cpu_s']:.1f} | {p['rss'] / MB:.0f} | {p['anon'] / MB:.0f} |")
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    models = {p.name: p for p in args.models.iterdir() if p.is_dir()}
    recipe = args.work / f"{args.method}.yaml"
    recipe.write_text(yaml.safe_dump(recipes.METHODS[args.method](models), sort_keys=False))
    inputs = sorted({Path(v) for v in models.values()})
    mergesmith = str(Path(sys.executable).parent / "mergesmith")
    results, outs = {}, {}
    for name, extra in (("local", []), (f"--ray --workers {args.workers}",
                                        ["--ray", "--workers", str(args.workers)])):
        out = args.work / ("out-ray" if extra else "out-local")
        for folder in (out, out.with_name(f".{out.name}.partial")):
            shutil.rmtree(folder, ignore_errors=True)
        warm(inputs)
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = run([mergesmith, "merge", str(recipe), str(out), "--shard-size",
                             args.shard_size, "-q", *extra])
        outs[name] = out
    same = digest(outs["local"]) == digest(outs[next(n for n in outs if n != "local")])
    shards = len(list(outs["local"].glob("*.safetensors")))
    print(f"\n{args.method} (bf16 recipe) on {args.models.name}, {shards} shards of <= "
          f"{args.shard_size}; outputs byte-identical: {same}\n")
    for name, r in results.items():
        print(f"{name}: {r['wall_s']:.1f} s wall")
    print("\n| run | process | CPU s | peak RSS MB | peak anon MB |\n|---|---|---|---|---|")
    for name, r in results.items():
        print("\n".join(summary(name, r)))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "identical": same, "shards": shards,
                                         "results": results}, indent=1))
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
