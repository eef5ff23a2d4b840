"""LoRA extraction, mergesmith against mergekit-extract-lora in the same run: time and peak memory.

    .venv/bin/python bench/extract_lora.py [--size 100m|1b] [--rank 64] [--work bench/work]
        [--tools mergekit,mergesmith] [--json bench/results/extract-lora-1b.json]

Base against expert1 of the bench model (bench/models.py, built and cached on first use), rank
64, both tools with their defaults (torch's threads, CPU), each measured as a process tree by
measure.py. The two adapters are then compared module by module: B·A (the sign of each singular
pair is free) relative to its largest entry, and the saved modules byte for byte. Goal (issue
17): mergesmith ≤ 0.5× mergekit's wall time and peak anonymous memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import measure
import models
from run import BIN, MB, machine_info, tool_env, versions, wait_for_idle

GOAL = 0.5


def command(tool: str, base: Path, expert: Path, out: Path, rank: int) -> list[str]:
    if tool == "mergekit":
        return [str(BIN / "mergekit-extract-lora"), "--model", str(expert), "--base-model",
                str(base), "--out-path", str(out), "--max-rank", str(rank)]
    return [str(BIN / "mergesmith"), "extract-lora", str(base), str(expert), str(out),
            "--rank", str(rank), "--quiet"]


def compare(ours: Path, theirs: Path) -> dict:
    """Largest |B·A difference| / max |B·A| over the modules, saved tensors equal, same config."""
    import torch
    from safetensors.torch import load_file

    mine, other = (load_file(p / "adapter_model.safetensors") for p in (ours, theirs))
    worst, unequal = 0.0, []
    for name, a in other.items():
        if ".lora_A." in name:
            b = name.replace(".lora_A.", ".lora_B.")
            want = other[b].float() @ a.float()
            got = mine[b].float() @ mine[name].float()
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        elif ".lora_B." not in name and not torch.equal(mine.get(name, torch.empty(0)), other[name]):
            unequal.append(name)
    configs = [json.loads((p / "adapter_config.json").read_text()) for p in (ours, theirs)]
    same = {k: configs[0][k] == configs[1][k] for k in ("r", "lora_alpha", "rank_pattern")}
    return {"max_rel_ba_diff": worst, "saved_unequal": unequal, "same_names": set(mine) == set(other),
            "config_same": same}


def main(argv=None) -> int:
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="100m", choices=sorted(models.SIZES))
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    ap.add_argument("--tools", type=csv, default=["mergekit", "mergesmith"])
    ap.add_argument("--idle-wait", type=float, default=30.0, help="seconds to wait for a quiet machine")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    dirs = models.build_size(args.size, args.work / "models")
    out_root = args.work / "out" / f"extract-lora-{args.size}"
    rows = {}
    for tool in args.tools:
        out = out_root / tool
        shutil.rmtree(out, ignore_errors=True)
        waited = wait_for_idle(args.idle_wait)
        m = measure.measure(command(tool, dirs["base"], dirs["expert1"], out, args.rank), env=tool_env())
        if not m.ok:
            print(f"{tool} failed ({m.returncode}):\n{m.stderr_tail}", file=sys.stderr)
            return 1
        rows[tool] = {**m.to_dict(), "waited_s": waited}
        print(f"{tool:>10}: wall {m.wall_s:7.1f} s  cpu {m.cpu_s:7.1f} s  peak anon "
              f"{m.peak_anon_bytes / MB:7.0f} MB  peak rss {m.peak_rss_bytes / MB:7.0f} MB  "
              f"other cpu {m.other_cpu_s:5.1f} s", flush=True)
    result = {"size": args.size, "rank": args.rank, "runs": rows, "versions": versions(),
              "machine": machine_info()}
    if len(rows) == 2:
        ours, theirs = rows["mergesmith"], rows["mergekit"]
        result["ratios"] = {k: ours[k] / theirs[k] for k in ("wall_s", "cpu_s", "peak_anon_bytes",
                                                                "peak_rss_bytes")}
        result["parity"] = compare(out_root / "mergesmith", out_root / "mergekit")
        print("mergesmith / mergekit: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["ratios"].items()))
        print(f"parity: {result['parity']}")
        met = all(result["ratios"][k] <= GOAL for k in ("wall_s", "peak_anon_bytes"))
        print(f"goal (≤ {GOAL}x wall and peak anon): {'met' if met else 'NOT met'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
