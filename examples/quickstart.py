"""Merge a small random model family with every example recipe (`mergesmith demo` merges real fine-tunes).

Builds a random Llama base and two "fine-tunes" of it (base plus seeded deltas, 11.1M parameters
each, in examples/models/, reused on later runs), runs every recipe in examples/recipes/ through
`mergesmith merge`, loads each output with transformers, and prints what came out.

    python examples/quickstart.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mergesmith.toy import build_model, default_tokens

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
RECIPES = ROOT / "examples" / "recipes"
OUT = ROOT / "examples" / "merged"
SIZE = dict(arch="llama", vocab=4096, layers=6, hidden=384, dtype=torch.bfloat16)


def build_family(console: Console) -> None:
    if (MODELS / "DONE").exists():
        return
    console.print(f"building a base and two fine-tunes in {MODELS} ...")
    tokens = default_tokens(SIZE["vocab"])
    arch, options = SIZE["arch"], {k: v for k, v in SIZE.items() if k != "arch"}
    base = build_model(MODELS / "base", arch, seed=0, tokens=tokens, **options)
    for seed, name in enumerate(("math", "code"), 1):
        build_model(MODELS / name, arch, seed=seed, base=base, delta=0.002, tokens=tokens, **options)
    (MODELS / "DONE").write_text("ok\n")


def load_and_run(folder: Path, tokens: torch.Tensor) -> tuple[int, int, bool]:
    """Layers and parameters of the output, and whether a forward pass gives finite logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        finite = bool(torch.isfinite(model(tokens).logits.float()).all())
    return model.config.num_hidden_layers, sum(p.numel() for p in model.parameters()), finite


def main() -> int:
    console = Console()
    build_family(console)
    tokens = torch.randint(0, SIZE["vocab"], (4, 32), generator=torch.Generator().manual_seed(0))
    table = Table(title="mergesmith quickstart: every example recipe, merged and loaded")
    for column in ("recipe", "merge_method", "seconds", "layers", "parameters", "forward pass"):
        table.add_column(column)
    for recipe in sorted(RECIPES.glob("*.yaml")):
        target = OUT / recipe.stem
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mergesmith.cli", "merge", str(recipe),
                               str(target), "--overwrite"], cwd=ROOT)
        if done.returncode != 0:
            console.print(f"[red]{recipe.name} failed[/]")
            return done.returncode
        seconds = time.perf_counter() - start
        layers, params, finite = load_and_run(target, tokens)
        method = next(line.split(":", 1)[1].strip() for line in recipe.read_text().splitlines()
                      if line.startswith("merge_method"))
        table.add_row(recipe.name, method, f"{seconds:.1f}", str(layers), f"{params / 1e6:.1f}M",
                      "ok" if finite else "[red]NaN/Inf[/]")
    console.print(table)
    console.print("seconds include starting Python; `mergesmith merge` prints its own progress.")
    console.print(f"outputs are in {OUT}; each has a README.md model card with its recipe.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
