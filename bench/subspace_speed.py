"""TSV-M, Iso-C and Iso-CTS time as a multiple of task arithmetic's, in the same run.

    .venv/bin/python bench/subspace_speed.py [--size 100m|1b] [--mode tensors|merge]
        [--threads 1] [--methods tsv_m,iso_c,iso_cts] [--json out.json]

--mode tensors (default): each distinct weight shape of the bench model is merged in-process,
  three experts around a base as in bench/models.py (a shared plus an own delta per expert),
  by task arithmetic and by each subspace method; the CPU seconds (time.process_time, so other
  processes on a shared machine change them little) are summed over the model's tensors.
  Compute only: reading and writing the checkpoints (the bulk of task arithmetic's merge) is
  left out, so these ratios are the upper bound of the merge's.
--mode merge: the real merges through bench/run.py (mergesmith only), wall and CPU seconds;
  meaningful on a quiet machine only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import models

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("tsv_m", "iso_c", "iso_cts")


def experts_like(shape: tuple[int, ...], seed: int = 0):
    """A base and three correlated experts (bench/models.py's build: cosine ~0.5)."""
    gen = torch.Generator().manual_seed(seed)
    build = models.BUILD
    base = torch.randn(shape, generator=gen) * build["weight_std"]
    shared = torch.randn(shape, generator=gen) * build["shared_std"]
    return base, [base + shared + torch.randn(shape, generator=gen) * build["own_std"]
                  for _ in range(build["n_experts"])]


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def time_tensors(size: str, methods: list[str]) -> dict:
    """CPU seconds per distinct shape and per method, and their sums over the whole model."""
    from mergesmith.methods import get_method

    shapes = Counter(shape for _, shape in models.tensor_specs(size))
    per_shape, totals = {}, Counter()
    for shape, count in shapes.items():
        base, experts = experts_like(shape)
        row = {"task_arithmetic": cpu_seconds(
            lambda: get_method("task_arithmetic").fn(base, experts, weights=[1.0] * 3))}
        for name in methods:
            row[name] = cpu_seconds(lambda: get_method(name).fn(base, experts))
        per_shape["x".join(map(str, shape))] = {"count": count, **row}
        for name, seconds in row.items():
            totals[name] += count * seconds
        print(f"{'x'.join(map(str, shape)):>12} x{count:<3} "
              + "  ".join(f"{k} {v:7.2f}s" for k, v in row.items()), flush=True)
    return {"per_shape": per_shape, "totals_s": dict(totals)}


def time_merges(size: str, methods: list[str], json_path: Path) -> dict:
    """The real merges, through bench/run.py, in one run."""
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--sizes", size, "--tools",
           "mergesmith", "--methods", ",".join(["task_arithmetic", *methods]),
           "--json", str(json_path)]
    subprocess.run(cmd, check=True)
    summary = json.loads(json_path.read_text())["summary"]
    return {"totals_s": {row["method"]: row["wall_s"] for row in summary},
            "cpu_s": {row["method"]: row["cpu_s"] for row in summary}}


def main(argv=None) -> int:
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="100m", choices=list(models.SIZES))
    ap.add_argument("--mode", default="tensors", choices=["tensors", "merge"])
    ap.add_argument("--methods", type=csv, default=list(METHODS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in --mode tensors (1: CPU time is then robust to load)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.mode == "tensors":
        torch.set_num_threads(args.threads)
        result = time_tensors(args.size, args.methods)
    else:
        result = time_merges(args.size, args.methods,
                             args.json or ROOT / "bench" / "results" / "subspace-merge.json")
    totals = result["totals_s"]
    reference = totals["task_arithmetic"]
    print(f"\n{args.size} ({args.mode}): task_arithmetic {reference:.2f} s")
    for name in args.methods:
        ratio = totals[name] / reference
        print(f"  {name:8} {totals[name]:9.2f} s  = {ratio:7.1f}x task_arithmetic")
    if args.json and args.mode == "tensors":
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "torch": torch.__version__, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
