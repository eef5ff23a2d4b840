"""Alignment quality: two models trained from different seeds on one demo task, merged.

    .venv/bin/python bench/align_quality.py [--task part_of_speech] [--seeds 1,2]
        [--budgets 1.0,1.5] [--work bench/work] [--json bench/results/align-quality.json]

Two tiny Llamas (bench/tiny_lm.py) from different random initialisations, each pretrained as a
language model on the demo's train texts and then fully fine-tuned to answer the task with its
label word, so that they share nothing but the tokenizer and the data. Rows: each model; their
plain average (mergesmith.merge, linear); `mergesmith align A B` (weight matching, Git
Re-Basin) then the average of A and the aligned B (and the aligned B alone, which must score as
B: a permutation keeps the function); `mergesmith align --method pleas` at each budget, with
calibration texts (the task's train split) and data-free. Scores: label-word accuracy on the
task's test and validation splits. Models are cached under --work/align-quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import tiny_lm
from moe_quality import cli
from run import BIN, machine_info, versions

SPLITS = ("validation", "test")


def train_pair(root: Path, task_name: str, seeds: list[int], setup: tiny_lm.Setup) -> dict[int, Path]:
    """One model per seed: its own initialisation, pretraining order and fine-tuning order."""
    import torch

    tasks = tiny_lm.load_tasks()
    root = root / tiny_lm.digest(tiny_lm.VERSION, asdict(setup), task_name,
                                 [t.fingerprint for t in tasks.values()])
    folders = {s: root / f"{task_name}-seed{s}" for s in seeds}
    if all((f / "config.json").exists() for f in folders.values()):
        return folders
    threads = tiny_lm.one_thread()
    try:
        tok = tiny_lm.load_tokenizer(root / "tokenizer") or tiny_lm.build_tokenizer(tasks, root / "tokenizer",
                                                                                       setup.vocab)
        train = {t: tiny_lm.Examples(tok, task, "train", setup.max_tokens) for t, task in tasks.items()}
        for seed, folder in folders.items():
            if (folder / "config.json").exists():
                continue
            started = time.perf_counter()
            model = tiny_lm.new_model(setup, len(tok), seed)
            tiny_lm.pretrain(model, list(train.values()), setup, seed)
            tiny_lm.finetune(model, train[task_name], setup, seed, mlp_only=False)
            tiny_lm.save(model, tok, folder)
            print(f"  seed {seed}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        torch.set_num_threads(threads)
    return folders


def average(a: Path, b: Path, out: Path) -> Path:
    import mergesmith

    shutil.rmtree(out, ignore_errors=True)
    mergesmith.merge({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                          {"model": str(b), "parameters": {"weight": 0.5}}],
                      "dtype": "float32"}, out)
    return out


def distance(a: Path, b: Path) -> float:
    """||A - B|| over all weights, relative to ||A||: what weight matching minimises."""
    from safetensors.torch import load_file

    wa, wb = (load_file(next(f.glob("*.safetensors"))) for f in (a, b))
    num = sum(float((wa[k].double() - wb[k].double()).square().sum()) for k in wa)
    return (num / sum(float(wa[k].double().square().sum()) for k in wa)) ** 0.5


def main(argv=None) -> int:
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="part_of_speech", choices=tiny_lm.TASKS)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in csv(s)], default=[1, 2])
    ap.add_argument("--budgets", type=lambda s: [float(x) for x in csv(s)], default=[1.0, 1.5])
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if len(args.seeds) != 2:
        ap.error("--seeds: two seeds")
    started = time.perf_counter()
    task = {args.task: tiny_lm.load_tasks()[args.task]}
    a, b = train_pair(args.work.resolve() / "align-quality", args.task, args.seeds, tiny_lm.Setup()).values()
    out = a.parent / "merges"
    out.mkdir(exist_ok=True)
    score = lambda folder: {s: tiny_lm.score_folder(folder, task, s)[args.task] for s in SPLITS}  # noqa: E731
    rows = {f"model A (seed {args.seeds[0]})": score(a), f"model B (seed {args.seeds[1]})": score(b),
            "plain average": score(average(a, b, out / "average"))}
    aligned = out / "weight-matching"
    shutil.rmtree(aligned, ignore_errors=True)
    if cli([str(BIN / "mergesmith"), "align", str(a), str(b), str(aligned), "--quiet"], "weight matching"):
        rows["B aligned to A (must equal B)"] = score(aligned / b.name)
        print(f"  ||A - B|| / ||A||: {distance(a, b):.3f} before, {distance(a, aligned / b.name):.3f} after "
              "weight matching", flush=True)
        rows["weight matching, then average"] = score(average(a, aligned / b.name, out / "wm-average"))
    calibration = out / "calibration.txt"
    calibration.write_text("\n".join(tiny_lm.prompts(args.task, 256)))
    for budget in args.budgets:
        for data in (calibration, None):
            folder = out / f"pleas-{budget}-{'data' if data else 'free'}"
            shutil.rmtree(folder, ignore_errors=True)
            label = f"PLeaS, budget {budget}, {'with data' if data else 'data-free'}"
            if cli([str(BIN / "mergesmith"), "align", str(a), str(b), str(folder), "--method", "pleas",
                    "--budget", str(budget), *(["--data", str(data)] if data else []), "--quiet"], label):
                rows[label] = score(folder)
    print(f"| {args.task}: label-word accuracy | " + " | ".join(SPLITS) + " |")
    print("|---" * (len(SPLITS) + 1) + "|")
    for label, scores in rows.items():
        print(f"| {label} | " + " | ".join(f"{scores[s]:.3f}" for s in SPLITS) + " |")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"task": args.task, "seeds": args.seeds, "rows": rows,
                                         "setup": asdict(tiny_lm.Setup()), "versions": versions(),
                                         "machine": machine_info()}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
