"""Dense experts into one Mixtral MoE, mergesmith moe against mergekit-moe in the same run.

    .venv/bin/python bench/moe_build.py [--size 100m|1b] [--experts 2,4] [--dtypes bfloat16,float32]
        [--gate-modes random,hidden] [--tools mergekit,mergesmith] [--repeat 1] [--idle-wait 15]
        [--work bench/work] [--json bench/results/moe-build-100m.json]

The experts are the bench model's four checkpoints (bench/models.py: expert1..3, then base; the
base is also `base_model`), seen through folders of symbolic links that add a word-level
tokenizer, which both tools load (mergekit-moe always does; `hidden` gates run the base on
prompts). Each case (gate mode x dtype x number of experts) runs once per tool, the tools
alternating, each measured as a process tree by measure.py after a cache-warming read of the
inputs and a wait for an idle machine; outputs are deleted after each run. With --parity
(default at 100m) the last outputs of both tools are loaded by transformers and compared.
Goals (issue 18): mergesmith <= 0.5x mergekit's wall time; peak memory flat in the number of
experts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
from pathlib import Path

import measure
import models
from run import BIN, MB, is_noisy, machine_info, read_files, tool_env, versions, wait_for_idle

GOAL = 0.5
ORDER = ("expert1", "expert2", "expert3", "base")  # the first N are an N-expert MoE
PROMPTS_PER_EXPERT = 4


def with_tokenizer(src: Path, dst: Path, vocab_size: int) -> Path:
    """`dst`: links to `src`'s files plus a word-level tokenizer (w0..w{n}), with bos/eos."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (dst / "tokenizer.json").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in models.model_files(src):
        (dst / f.name).symlink_to(f.resolve())
    tokens = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    core = Tokenizer(tok_models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(dst)
    return dst


def prompts(expert: int, vocab_size: int) -> list[str]:
    """A few distinct made-up prompts per expert (hidden gates need different ones)."""
    import random

    rng = random.Random(expert)
    return [" ".join(f"w{rng.randrange(vocab_size - 3)}" for _ in range(12)) for _ in range(PROMPTS_PER_EXPERT)]


def moe_config(folders: dict[str, Path], n: int, dtype: str, gate_mode: str, vocab_size: int) -> str:
    import yaml

    experts = []
    for i, name in enumerate(ORDER[:n]):
        e = {"source_model": str(folders[name])}
        if gate_mode != "random":
            e["positive_prompts"] = prompts(i, vocab_size)
        experts.append(e)
    return yaml.safe_dump({"base_model": str(folders["base"]), "gate_mode": gate_mode, "dtype": dtype,
                           "experts_per_token": 2, "experts": experts}, sort_keys=False)


def command(tool: str, config: Path, out: Path) -> list[str]:
    if tool == "mergekit":
        return [str(BIN / "mergekit-moe"), str(config), str(out), "--quiet", "--out-shard-size", "250M"]
    return [str(BIN / "mergesmith"), "moe", str(config), str(out), "--quiet", "--shard-size", "250MB"]


def out_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def parity(ours: Path, theirs: Path, routers_equal: bool) -> dict:
    """Largest difference between the two MoEs' tensors as transformers loads them (it fuses
    per-expert checkpoints); routers only when both tools compute them the same way."""
    from transformers import AutoModelForCausalLM

    a, b = (AutoModelForCausalLM.from_pretrained(p, dtype="auto").state_dict() for p in (ours, theirs))
    worst, worst_router, missing = 0.0, 0.0, sorted(set(a) ^ set(b))
    for name in sorted(set(a) & set(b)):
        d = float((a[name].float() - b[name].float()).abs().max())
        if name.endswith("mlp.gate.weight"):
            worst_router = max(worst_router, d / max(float(b[name].float().abs().max()), 1e-12))
        else:
            worst = max(worst, d)
    return {"max_abs_diff_non_router": worst, "max_rel_diff_router": worst_router if routers_equal else None,
            "names_only_in_one": missing[:10], "dtypes": sorted({str(t.dtype) for t in a.values()})}


def run_case(tool: str, config: Path, out: Path, inputs: list[Path], idle_wait: float, keep: bool) -> dict:
    partial = out.with_name(f".{out.name}.partial")
    for folder in (out, partial):
        shutil.rmtree(folder, ignore_errors=True)
    read_files(inputs)  # same page-cache state for every run
    waited = wait_for_idle(idle_wait) if idle_wait > 0 else 0.0
    m = measure.measure(command(tool, config, out), env=tool_env())
    row = {**m.to_dict(), "tool": tool, "waited_s": waited, "out_bytes": out_bytes(out) if m.ok else 0}
    row["noisy"] = is_noisy(row)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return row


def fmt_row(case: str, r: dict) -> str:
    if r["returncode"]:
        return f"{case:<26} {r['tool']:>10}: FAILED ({r['returncode']}): {r['stderr_tail'].splitlines()[-1:]}"
    return (f"{case:<26} {r['tool']:>10}: wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  anon "
            f"{r['peak_anon_bytes'] / MB:6.0f} MB  rss {r['peak_rss_bytes'] / MB:6.0f} MB  out "
            f"{r['out_bytes'] / MB:6.0f} MB  other cpu {r['other_cpu_s']:5.1f} s{'  NOISY' if r['noisy'] else ''}")


def main(argv=None) -> int:
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="100m", choices=sorted(models.SIZES))
    ap.add_argument("--experts", type=lambda s: [int(x) for x in csv(s)], default=[2, 4])
    ap.add_argument("--dtypes", type=csv, default=["bfloat16", "float32"])
    ap.add_argument("--gate-modes", type=csv, default=["random", "hidden"])
    ap.add_argument("--tools", type=csv, default=["mergekit", "mergesmith"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--idle-wait", type=float, default=15.0, help="seconds to wait for a quiet machine")
    ap.add_argument("--parity", action=argparse.BooleanOptionalAction, default=None,
                    help="compare the last case's outputs (default: at 100m)")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if max(args.experts) > len(ORDER) or min(args.experts) < 2:
        ap.error(f"--experts: 2..{len(ORDER)}")
    check = args.parity if args.parity is not None else args.size == "100m"
    work = args.work.resolve()
    vocab = models.SIZES[args.size]["vocab_size"]
    dirs = models.build_size(args.size, work / "models")
    root = work / "moe-build" / args.size
    folders = {n: with_tokenizer(dirs[n], root / "inputs" / n, vocab) for n in ORDER}
    runs, cases = [], list(itertools.product(args.gate_modes, args.dtypes, args.experts))
    for ci, (gate, dtype, n) in enumerate(cases):
        name = f"{gate}-{dtype}-{n}x"
        config = root / f"{name}.yaml"
        config.write_text(moe_config(folders, n, dtype, gate, vocab))
        # the base is read too (its non-MLP tensors) when it is not among the experts
        inputs = [f for d in dict.fromkeys([*ORDER[:n], "base"]) for f in models.weight_files(dirs[d])]
        last = check and ci == len(cases) - 1
        for rep, tool in itertools.product(range(args.repeat), args.tools):
            row = run_case(tool, config, root / "out" / tool, inputs, args.idle_wait, keep=last)
            row.update(case=name, gate_mode=gate, dtype=dtype, experts=n, repeat=rep)
            runs.append(row)
            print(fmt_row(name, row), flush=True)
        if last and len(args.tools) == 2:
            p = parity(root / "out" / "mergesmith", root / "out" / "mergekit", routers_equal=gate != "random")
            print(f"parity ({name}): {p}", flush=True)
            runs[-1]["parity"] = p
            shutil.rmtree(root / "out", ignore_errors=True)
    summary = summarize(runs, cases)
    print(table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": args.size, "runs": runs, "summary": summary,
                                         "versions": versions(), "machine": machine_info()},
                                        indent=2, default=str) + "\n")
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


def summarize(runs: list[dict], cases) -> list[dict]:
    """Per case: the median of each tool's successful runs, and mergesmith / mergekit."""
    import statistics

    out = []
    for gate, dtype, n in cases:
        row = {"case": f"{gate}-{dtype}-{n}x"}
        for tool in ("mergekit", "mergesmith"):
            good = [r for r in runs if r["case"] == row["case"] and r["tool"] == tool and r["returncode"] == 0]
            if good:
                row[tool] = {k: statistics.median(r[k] for r in good)
                             for k in ("wall_s", "cpu_s", "peak_anon_bytes", "peak_rss_bytes")}
                row[tool]["noisy"] = any(r["noisy"] for r in good)
        if "mergekit" in row and "mergesmith" in row:
            row["ratios"] = {k: row["mergesmith"][k] / row["mergekit"][k] for k in row["mergekit"] if k != "noisy"}
        out.append(row)
    return out


def table(summary: list[dict]) -> str:
    lines = ["| case | mergekit wall | mergesmith wall | ratio | mergekit anon | mergesmith anon | "
             "mergekit rss | mergesmith rss |", "|---|---|---|---|---|---|---|---|"]
    for row in summary:
        mk, ms = row.get("mergekit", {}), row.get("mergesmith", {})
        cell = lambda d, k, unit: ((f"{d[k] / MB:.0f} MB" if unit == "MB" else f"{d[k]:.1f} s")  # noqa: E731
                                   if k in d else "-")
        ratio = f"{row['ratios']['wall_s']:.2f}x" if "ratios" in row else "-"
        noisy = " (noisy)" if mk.get("noisy") or ms.get("noisy") else ""
        lines.append(f"| {row['case']}{noisy} | {cell(mk, 'wall_s', 's')} | {cell(ms, 'wall_s', 's')} | {ratio} | "
                     f"{cell(mk, 'peak_anon_bytes', 'MB')} | {cell(ms, 'peak_anon_bytes', 'MB')} | "
                     f"{cell(mk, 'peak_rss_bytes', 'MB')} | {cell(ms, 'peak_rss_bytes', 'MB')} |")
    met = [r["ratios"]["wall_s"] <= GOAL for r in summary if "ratios" in r]
    if met:
        lines.append(f"\ngoal (mergesmith <= {GOAL}x mergekit's wall): met in {sum(met)} of {len(met)} cases")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
