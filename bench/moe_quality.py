"""MoE quality on the demo's tasks: experts, their MoE, its compressed versions, dense merges.

    .venv/bin/python bench/moe_quality.py [--work bench/work] [--gate-mode hidden] [--top-k 2]
        [--keep 2] [--json bench/results/moe-quality.json]

A tiny Llama (bench/tiny_lm.py: BPE tokenizer over the demo's texts, label words as tokens) is
pretrained as a language model on the four demo tasks' train texts (src/mergesmith/embedded/tasks),
then one expert per task fine-tunes its MLPs (only: an MoE takes attention, norms and embeddings
from `base_model`) to answer `[BOS] text [SEP]` with the task's label word. Scores are label-word
accuracy on each task's test split (the argmax over that task's label words at [SEP]).

Rows: the base; each expert; the MoE of the four (`mergesmith moe`, `gate_mode: hidden` by
default, each task's train texts as its expert's positive prompts) and the same config through
mergekit-moe;
the MoE compressed to K = --keep experts by `mergesmith moe-compress` with mc_smoe, hc_smoe and
sub_moe (calibrated on the tasks' train texts); dense merges of the experts (task_arithmetic and
ties through mergesmith.merge, lambda picked on the validation splits). Models are cached under
--work/moe-quality; the first run trains them (~4-5 min on 2 busy cores). The script also prints
how often the router's first choice at [SEP] is the task's own expert.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import tiny_lm
from run import BIN, machine_info, tool_env, versions

PROMPTS = 16          # positive prompts per expert (train texts)
CALIBRATION = 64      # calibration texts per task for moe-compress
COMPRESS = ("mc_smoe", "hc_smoe", "sub_moe")
DENSE = {  # method -> the lambdas tried on the validation splits
    "task_arithmetic": (0.25, 0.5, 0.75, 1.0),
    "ties": (0.5, 0.75, 1.0, 1.5),
}


def moe_config(zoo: dict, top_k: int, gate_mode: str) -> dict:
    experts = [{"source_model": str(zoo[t]), "positive_prompts": tiny_lm.prompts(t, PROMPTS)}
               for t in tiny_lm.TASKS]
    return {"base_model": str(zoo["base"]), "gate_mode": gate_mode, "dtype": "float32",
            "experts_per_token": top_k, "experts": experts}


def cli(args: list[str], what: str) -> bool:
    """Run a CLI; False (with its stderr's tail) when it fails: a row is then missing, not the table."""
    started = time.perf_counter()
    done = subprocess.run(args, env=tool_env(), capture_output=True, text=True)
    if done.returncode:
        print(f"  {what}: FAILED ({done.returncode}): {done.stderr.strip().splitlines()[-3:]}", flush=True)
        return False
    print(f"  {what}: {time.perf_counter() - started:.1f} s", flush=True)
    return True


def build_moes(zoo: dict, out: Path, top_k: int, keep: int, gate_mode: str) -> dict[str, Path]:
    import yaml

    config = out / f"moe-top{top_k}.yaml"
    config.write_text(yaml.safe_dump(moe_config(zoo, top_k, gate_mode), sort_keys=False))
    built = {}
    for label, command in ((f"MoE (mergesmith moe, top-{top_k})", [str(BIN / "mergesmith"), "moe", "--quiet"]),
                           (f"MoE (mergekit-moe, top-{top_k})", [str(BIN / "mergekit-moe"), "--quiet"])):
        folder = out / (("ms-" if "mergesmith" in label else "mk-") + f"moe-top{top_k}")
        shutil.rmtree(folder, ignore_errors=True)
        if cli([*command, str(config), str(folder)], label):
            built[label] = folder
    ours = built.get(f"MoE (mergesmith moe, top-{top_k})")
    if ours is None:
        return built
    calibration = out / "calibration.txt"
    calibration.write_text("\n".join(p for t in tiny_lm.TASKS for p in tiny_lm.prompts(t, CALIBRATION, offset=PROMPTS)))
    for method in COMPRESS:
        folder = out / f"{method}-k{keep}-top{top_k}"
        shutil.rmtree(folder, ignore_errors=True)
        label = f"MoE -> {method}, K = {keep}"
        if cli([str(BIN / "mergesmith"), "moe-compress", str(ours), str(folder), "--method", method,
                "--experts", str(keep), "--data", str(calibration), "--samples", str(4 * CALIBRATION),
                "--quiet"], label):
            built[label] = folder
    return built


@torch.no_grad()
def routing(folder: Path, tasks: dict) -> dict[str, float]:
    """Per task: the share of (test example, layer) whose [SEP] token the router sends first to
    the task's own expert (expert i is task i, as moe_config lists them)."""
    model, tok = tiny_lm.load_model(folder)
    shares = {}
    for i, (name, task) in enumerate(tasks.items()):
        examples = tiny_lm.Examples(tok, task, "test", tiny_lm.Setup().max_tokens)
        ids, mask, last = examples.batch(range(len(examples.rows)))
        per_layer = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
        at_sep = torch.arange(len(ids)) * ids.shape[1] + last  # router logits are [batch * tokens, experts]
        shares[name] = float(torch.stack([logits[at_sep].argmax(-1) == i for logits in per_layer]).float().mean())
    return shares


def dense_merges(zoo: dict, out: Path, tasks: dict) -> tuple[dict[str, Path], dict]:
    """Each method's merge at its best lambda on the validation splits (average accuracy)."""
    import mergesmith

    chosen, tried = {}, {}
    for method, lambdas in DENSE.items():
        best = None
        for lam in lambdas:
            folder = out / f"{method}-{lam}"
            if not (folder / "config.json").exists():
                params = {"lambda": lam} | ({"density": 0.5} if method == "ties" else {})
                mergesmith.merge({"merge_method": method, "base_model": str(zoo["base"]),
                                  "models": [{"model": str(zoo[t]), "parameters": {"weight": 1.0}}
                                             for t in tiny_lm.TASKS],
                                  "parameters": params, "dtype": "float32"}, folder)
            score = tiny_lm.average(tiny_lm.score_folder(folder, tasks, "validation"))
            tried[f"{method} lambda={lam}"] = score
            if best is None or score > best[0]:
                best = (score, lam, folder)
        chosen[f"{method} (lambda {best[1]}, best on validation)"] = best[2]
    return chosen, tried


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    ap.add_argument("--top-k", type=int, default=2, help="experts_per_token of the MoE")
    ap.add_argument("--gate-mode", default="hidden", help="the MoE's router rows (mergekit-moe's gate_mode)")
    ap.add_argument("--keep", type=int, default=2, help="experts left after compression (K)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    tasks = tiny_lm.load_tasks()
    zoo = tiny_lm.build_zoo(args.work.resolve() / "moe-quality", tasks)
    out = zoo["root"] / "merges"
    out.mkdir(exist_ok=True)
    rows: dict[str, dict] = {"base": tiny_lm.score_folder(zoo["base"], tasks, "test")}
    for t in tiny_lm.TASKS:
        rows[f"expert: {t}"] = tiny_lm.score_folder(zoo[t], tasks, "test")
    # what a router that always picked the right expert would reach
    rows["each task by its own expert"] = {t: rows[f"expert: {t}"][t] for t in tiny_lm.TASKS}
    routed = {}
    for label, folder in build_moes(zoo, out, args.top_k, args.keep, args.gate_mode).items():
        rows[label] = tiny_lm.score_folder(folder, tasks, "test")
        if "K =" not in label:
            routed[label] = routing(folder, tasks)
    chosen, tried = dense_merges(zoo, out, tasks)
    for label, folder in chosen.items():
        rows[label] = tiny_lm.score_folder(folder, tasks, "test")
    print(tiny_lm.table(rows, "test-split label-word accuracy"))
    print(tiny_lm.table(routed, "router's first choice at [SEP] is the task's expert"))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "routing": routed, "dense_validation": tried, "setup": zoo["setup"],
                                         "versions": versions(), "machine": machine_info()},
                                        indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
