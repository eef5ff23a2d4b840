"""`mergesmith analyze` beside a task-arithmetic merge of the same models, in the same run: wall
time, CPU time and peak memory of each command (bench/measure.py polls the process tree).

    .venv/bin/python bench/analyze_1b.py                      # the ~1B bench models (bf16)
    .venv/bin/python bench/analyze_1b.py --models bench/work/models/100m-5dbf6b4291

The models are bench/models.py's (base + 3 experts whose task vectors share a delta, cosine
~0.5); the recipe is bench/recipes.py's task_arithmetic (bf16). Each command starts with the
inputs read once (the same page-cache state). Three commands: the merge; the analysis of the
recipe; the analysis against the merge just written (--merged). Memory: RSS counts the inputs'
mapped pages, RssAnon what the process itself holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import measure  # noqa: E402
import recipes  # noqa: E402

HERE = Path(__file__).parent
MB = 1024 * 1024
CLI = str(Path(sys.executable).parent / "mergesmith")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=HERE / "work/models/1b-de6b127f07",
                   help="a folder of base, expert1, expert2, expert3 (bench/models.py)")
    p.add_argument("--work", type=Path, default=HERE / "work/analyze")
    p.add_argument("--rank", type=int, default=32, help="analyze --rank")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def warm(folders: list[Path]) -> None:
    for folder in folders:
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb") as f:
                while f.read(16 * MB):
                    pass


def run(name: str, cmd: list[str], inputs: list[Path]) -> dict:
    warm(inputs)
    m = measure.measure(cmd)
    if not m.ok:
        raise SystemExit(f"{name} failed ({m.returncode}):\n{m.stderr_tail}")
    print(f"{name:>16}: {m.wall_s:7.1f} s wall, {m.cpu_s:7.1f} s CPU, peak RSS "
          f"{m.peak_rss_bytes / MB:6.0f} MB, peak anon {m.peak_anon_bytes / MB:6.0f} MB", flush=True)
    return {"name": name, **m.to_dict()}


def main(argv=None) -> None:
    args = parse_args(argv)
    models = {p.name: p for p in args.models.iterdir() if p.is_dir()}
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = args.work / "task_arithmetic.yaml"
    recipe.write_text(yaml.safe_dump(recipes.task_arithmetic(models), sort_keys=False))
    inputs = [models[k] for k in ("base", "expert1", "expert2", "expert3")]
    merged, out = args.work / "merged", args.work / "analysis"
    shutil.rmtree(merged, ignore_errors=True)
    rank = ["--rank", str(args.rank)]
    results = [
        run("merge", [CLI, "merge", str(recipe), str(merged), "-q"], inputs),
        run("analyze", [CLI, "analyze", str(recipe), str(out), "-q", "--overwrite", *rank], inputs),
        run("analyze --merged", [CLI, "analyze", str(recipe), str(out), "-q", "--overwrite", *rank,
                                 "--merged", str(merged)], inputs + [merged]),
    ]
    summary = json.loads((out / "summary.json").read_text())
    model = summary["model"]
    report = {"models": str(args.models), "tensors": summary["tensors"],
              "elements": summary["elements"], "rank": args.rank, "runs": results,
              "figures": {k: model[k] for k in ("norms", "cosine", "sign_conflict_rate",
                                                "mean_effective_rank", "merged")}}
    print(json.dumps(report["figures"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
