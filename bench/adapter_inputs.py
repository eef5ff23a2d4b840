"""A merge whose experts are `base+adapter`, against the same merge of full checkpoints: time and
peak memory.

    .venv/bin/python bench/adapter_inputs.py [--size 100m|1b] [--rank 16] [--repeats 3]
        [--method ties] [--work bench/work] [--json bench/results/adapter-inputs-100m.json]

Three rank-`--rank` LoRA adapters on every linear layer of the bench base (bench/models.py,
built and cached on first use), random fp32 factors (PEFT keeps adapter weights in fp32), each
written with io.adapter.write_adapter. Their full checkpoints are made once, untimed, by
mergesmith itself (a one-model linear merge of `base+adapter`: W + s·B·A rounded once to bf16).
Then bench/recipes.py's recipe for `--method` (ties: density 0.5, bf16) runs on the full
checkpoints and on `base+adapter` experts, alternating, each as a process tree measured by
measure.py; the median of the repeats is reported, and the two outputs are compared tensor by
tensor. Goal (issue 17): base+adapter ≤ 1.2× the full checkpoints' wall time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import measure
import models
import recipes
import yaml
from run import BIN, MB, MERGESMITH_FLAGS, machine_info, tool_env, versions, wait_for_idle

GOAL = 1.2
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapters(base: Path, root: Path, rank: int, n: int) -> list[Path]:
    """n random rank-`rank` adapters on every linear weight of `base` (cached by rank)."""
    import torch

    from mergesmith.io import Checkpoint
    from mergesmith.io.adapter import write_adapter

    folders = [root / f"adapter{i}-r{rank}" for i in range(1, n + 1)]
    if all((f / "adapter_model.safetensors").is_file() for f in folders):
        return folders
    shapes = {name: info.shape for name, info in Checkpoint(base).tensors.items()
              if name.rsplit(".", 2)[-2] in LINEAR}
    for i, folder in enumerate(folders, 1):
        gen = torch.Generator().manual_seed(i)
        factors = {name: (torch.randn(d_out, rank, generator=gen) * 0.02,
                          torch.randn(rank, d_in, generator=gen) * 0.02)
                   for name, (d_out, d_in) in shapes.items()}
        # α = 2r (scaling 2) as commonly trained, so the scaling is really applied
        write_adapter(folder, factors, base_model=str(base), alphas={k: 2.0 * rank for k in factors})
    return folders


def full_checkpoint(base: Path, adapter: Path, out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    recipe = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
    from mergesmith import merge

    return merge(recipe, out, shard_size="250MB")


def compare(a: Path, b: Path) -> dict:
    """Tensors that differ between two outputs, and the largest difference in bf16 steps."""
    import torch
    from safetensors import safe_open

    differ, elements, worst = 0, 0, 0.0
    for file in sorted(a.glob("*.safetensors")):
        with safe_open(file, "pt") as fa, safe_open(b / file.name, "pt") as fb:
            for name in fa.keys():
                x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
                if not torch.equal(x, y):
                    differ += 1
                    elements += int((x != y).sum())
                    step = torch.finfo(torch.bfloat16).eps * y.abs().clamp_min(1e-30)
                    worst = max(worst, float(((x - y).abs() / step).max()))
    return {"tensors_differing": differ, "elements_differing": elements,
            "max_diff_in_bf16_steps": worst}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="100m", choices=sorted(models.SIZES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--method", default="ties", choices=sorted(recipes.METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    ap.add_argument("--idle-wait", type=float, default=30.0, help="seconds to wait for a quiet machine")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    dirs = models.build_size(args.size, args.work / "models")
    root = args.work / "adapter-inputs" / args.size
    adapters = write_adapters(dirs["base"], root, args.rank, 3)
    full = [full_checkpoint(dirs["base"], a, root / f"full{i}-r{args.rank}") for i, a in enumerate(adapters, 1)]
    forms = {"full": {f"expert{i}": str(p) for i, p in enumerate(full, 1)},
             "base+adapter": {f"expert{i}": f"{dirs['base']}+{a}" for i, a in enumerate(adapters, 1)}}
    runs: dict[str, list[dict]] = {form: [] for form in forms}
    for repeat in range(args.repeats):
        for form, experts in forms.items():
            recipe = root / f"{args.method}-{form.replace('+', '-')}.yaml"
            recipe.write_text(yaml.safe_dump(recipes.METHODS[args.method]({"base": dirs["base"], **experts}),
                                             sort_keys=False))
            out = root / "out" / form.replace("+", "-")
            shutil.rmtree(out, ignore_errors=True)
            waited = wait_for_idle(args.idle_wait)
            m = measure.measure([str(BIN / "mergesmith"), "merge", str(recipe), str(out), *MERGESMITH_FLAGS],
                                env=tool_env())
            if not m.ok:
                print(f"{form} failed ({m.returncode}):\n{m.stderr_tail}", file=sys.stderr)
                return 1
            runs[form].append({**m.to_dict(), "waited_s": waited})
            print(f"{form:>13} #{repeat + 1}: wall {m.wall_s:6.1f} s  cpu {m.cpu_s:6.1f} s  peak anon "
                  f"{m.peak_anon_bytes / MB:6.0f} MB  peak rss {m.peak_rss_bytes / MB:6.0f} MB  "
                  f"(other cpu {m.other_cpu_s:.1f} s)", flush=True)
    median = {form: {k: statistics.median(r[k] for r in rows)
                     for k in ("wall_s", "cpu_s", "peak_anon_bytes", "peak_rss_bytes")}
              for form, rows in runs.items()}
    ratios = {k: median["base+adapter"][k] / median["full"][k] for k in median["full"]}
    same = compare(root / "out" / "base-adapter", root / "out" / "full")
    print(f"base+adapter / full: wall {ratios['wall_s']:.2f}x  cpu {ratios['cpu_s']:.2f}x  peak anon "
          f"{ratios['peak_anon_bytes']:.2f}x  peak rss {ratios['peak_rss_bytes']:.2f}x  (goal <= {GOAL}x)")
    print(f"outputs: {same}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "size": args.size, "rank": args.rank, "method": args.method, "repeats": args.repeats,
            "runs": runs, "median": median, "ratios": ratios, "goal": GOAL, "outputs": same,
            "machine": machine_info(), "versions": versions()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
