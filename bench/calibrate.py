"""Cost of collecting calibration statistics: wall time, CPU time and peak memory.

    .venv/bin/python bench/calibrate.py [--size tiny|100m|1b] [--kinds gram[,fisher]]
        [--samples 64] [--tokens 128] [--batch-size 8] [--max-stats 1GB] [--dtype bfloat16]

Builds (or reuses) the benchmark's random Llama of that size (bench/models.py; `tiny` is the
tests' 4-layer toy), gives it a word-level tokenizer in a folder of its own (the weights are
linked, not copied, and the merge benchmark's folders stay untouched), writes `--samples`
random texts of `--tokens` words, and times `calibrate.ensure_statistics` in a fresh process
with an empty cache, measured by bench/measure.py (wall, CPU, peak RSS of the process tree).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import measure
import models

MB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
SIZES = ("tiny", *models.SIZES)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100m", choices=SIZES)
    parser.add_argument("--kinds", default="gram", help="comma-separated: gram, fisher, act_sq")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128, help="words (= tokens) per text")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-stats", default="1GB", help="statistics held in memory per pass")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # the measured process
    args = parser.parse_args()
    if args.child:
        return child(args)
    folder = calibration_model(args.size, args.work)
    scratch = Path(tempfile.mkdtemp(prefix="calibrate-", dir=args.work))
    try:
        write_texts(scratch / "texts.txt", args.samples, args.tokens, vocabulary(folder))
        result = scratch / "result.json"
        cmd = [sys.executable, __file__, "--child", str(result), "--size", args.size, "--kinds", args.kinds,
               "--samples", str(args.samples), "--batch-size", str(args.batch_size),
               "--max-stats", args.max_stats, "--dtype", args.dtype, "--work", str(args.work)]
        m = measure.measure(cmd, cwd=str(scratch))
        if not m.ok:
            print(m.stderr_tail, file=sys.stderr)
            print(f"collection failed (exit {m.returncode})", file=sys.stderr)
            return 1
        inner = json.loads(result.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"size={args.size} kinds={args.kinds} samples={args.samples} tokens/text={args.tokens} "
          f"batch={args.batch_size} max_stats={args.max_stats} dtype={args.dtype}")
    print(f"  wall {m.wall_s:8.2f} s   (mergesmith imports {inner['import_s']:.2f} s, "
          f"ensure_statistics {inner['collect_s']:.2f} s)")
    print(f"  cpu  {m.cpu_s:8.2f} s   (other processes used {m.other_cpu_s:.1f} s meanwhile)")
    print(f"  peak RSS {m.peak_rss_bytes / MB:8.0f} MB, anonymous {m.peak_anon_bytes / MB:.0f} MB, "
          f"VmHWM {m.max_hwm_bytes / MB:.0f} MB")
    print(f"  store {inner['store_bytes'] / MB:.0f} MB in {inner['files']} files, "
          f"{inner['tensors']} tensors; weights {inner['weight_bytes'] / MB:.0f} MB")
    return 0


def child(args) -> int:
    """Runs inside the measured process: load, collect into an empty cache, report."""
    started = time.perf_counter()
    import torch

    from mergesmith.calibrate import ensure_statistics
    from mergesmith.io import Checkpoint
    from mergesmith.io.checkpoint import weight_files
    from mergesmith.recipe import Calibration

    import_s = time.perf_counter() - started
    folder = calibration_model(args.size, args.work)
    cal = Calibration(data="texts.txt", samples=args.samples, batch_size=args.batch_size)
    dtype = getattr(torch, args.dtype)
    path = ensure_statistics(folder, cal, Path.cwd(), args.kinds.split(","), dtype=dtype,
                             cache=Path.cwd() / "cache", max_stats_bytes=parse_bytes(args.max_stats))
    files = [p for p in path.iterdir() if p.suffix == ".safetensors"]
    tensors = len(Checkpoint(path).tensors)
    args.child.write_text(json.dumps({
        "import_s": import_s, "collect_s": time.perf_counter() - started - import_s,
        "store_bytes": sum(p.stat().st_size for p in files), "files": len(files), "tensors": tensors,
        "weight_bytes": sum(p.stat().st_size for p in weight_files(folder)),
    }))
    return 0


def calibration_model(size: str, work: Path) -> Path:
    """A folder with the size's config and weights (linked) and a word-level tokenizer."""
    from mergesmith.toy import build_model, default_tokens, save_tokenizer

    folder = work / "calibrate" / size
    if (folder / "tokenizer.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    if size == "tiny":
        build_model(folder, "llama", seed=0)
        return folder
    source = models.build_size(size, work / "models")["base"]
    folder.mkdir(parents=True)
    for file in source.iterdir():
        (folder / file.name).symlink_to(file.resolve())
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    save_tokenizer(folder, default_tokens(vocab))
    return folder


def vocabulary(folder: Path) -> list[str]:
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    return [token for token in vocab if not token.startswith("[")]


def write_texts(path: Path, samples: int, words: int, vocabulary: list[str]) -> None:
    rng = random.Random(0)
    path.write_text("".join(" ".join(rng.choices(vocabulary, k=words)) + "\n" for _ in range(samples)))


def parse_bytes(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


if __name__ == "__main__":
    sys.exit(main())
