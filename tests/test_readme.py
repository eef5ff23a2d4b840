"""Every fenced block in README.md runs as pasted.

Conventions for README authors (keep new snippets inside them):

- ```python blocks are executed; ```bash blocks are run command by command; ```yaml blocks are
  loaded with `load_recipe` and merged. Blocks with any other info string (```text, ```console,
  none) are shown output and are not run.
- A block that cannot run offline carries, on the line just before its opening fence,
  `<!-- not run: REASON -->` (install commands, hub-only or network examples, `mergesmith demo`,
  which tests/test_demo.py exercises). Keep these few.
- Each block runs in its own fresh folder holding the toy world below, so a block may name these
  paths and nothing else that it does not create itself:
  - toy models (one Llama family, 4 layers, hidden 16; 32 layers in a block that mentions
    `layer_range`: `base` is random, every other model is `base` plus its own seeded delta, so
    any of them merge together): `base`, `math`, `code`,
    `merged`, `ta`, `experts/<task>`, `runs/<name>`, and every `model:` / `base_model:` value
    written anywhere in the block (a hub id such as `org/a` becomes the local folder `org/a`);
    `./x` and `x/` name the same folder as `x`, and `x+adapter` names `x` (the block writes the
    adapter);
  - training runs `trainer-runs/<name>`: a transformers Trainer output_dir of full checkpoints,
    `checkpoint-100`, `-200`, `-300` (each `base` plus its own delta), whose trainer_state.json
    logged the training losses 1.9, 1.2 and 1.4;
  - tasks `tasks/<name>` for the demo's task names (sentiment, topic, language,
    part_of_speech): the demo's task cut to a few rows per split, with a head for the toy models;
  - recipes `recipe.yaml` (task arithmetic of ./math and ./code on ./base) and `<method>.yaml`
    for any registered method (that method, its defaults, same models);
  - text data (one JSON object per line, field `text`, short lines): `math-train.jsonl`,
    `code-train.jsonl` and every `data:` value written in the block.
  A path that a block writes (the OUT of `mergesmith merge RECIPE OUT`) is not prepared.
- In a bash block every command (after joining `\\` continuations and dropping `# comments`)
  must be a `mergesmith ...` command; commands run in order, in process, and must exit 0.
- A yaml block must be a whole recipe; it is merged into a fresh folder.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from mergesmith.embedded.world import TASKS, TASKS_DIR
from mergesmith.methods import all_methods, get_method
from mergesmith.toy import build_model, default_tokens

README = Path(__file__).resolve().parent.parent / "README.md"
RUN = ("python", "bash", "yaml")
MARKER = re.compile(r"^<!--\s*not run:\s*(\S.*?)\s*-->$")
MODEL_REF = re.compile(r"\b(?:base_model|model)\s*:\s*['\"]?([A-Za-z0-9_.@/+-]+)")
DATA_REF = re.compile(r"\bdata\s*:\s*['\"]?([A-Za-z0-9_./-]+\.(?:jsonl|txt))")
FIXED_MODELS = ("base", "math", "code", "merged", "ta")
MODEL_PREFIXES = ("experts/", "runs/", "trainer-runs/")
TRAINER_RUN = {100: 1.9, 200: 1.2, 300: 1.4}  # step -> training loss logged at it
TOY = dict(hidden=16)
LAYERS = {"models": 4, "deep": 32}  # deep: for blocks that cut layer ranges (SOLAR's 0-24 + 8-32)
ROWS_PER_LABEL = 3  # in each split of a toy task


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None  # the not-run reason

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = re.match(r"^```\s*([\w-]*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        found.append(Block(i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n",
                           marker.group(1) if marker else None))
        i = end + 1
    return found


def commands(text: str) -> list[list[str]]:
    """The block's commands as argv lists: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def _name(path: str) -> str:
    return path.removeprefix("./").rstrip("/")


def outputs(block: Block) -> set[str]:
    if block.lang != "bash":
        return set()
    return {_name(argv[3]) for argv in commands(block.text)
            if argv[:2] == ["mergesmith", "merge"] and len(argv) > 3}


def models_named(block: Block) -> set[str]:
    # `BASE+ADAPTER` names the model BASE; the block makes the adapter itself
    names = {_name(ref.partition("+")[0]) for ref in MODEL_REF.findall(block.text)}
    if block.lang == "bash":
        for argv in commands(block.text):
            for arg in argv[1:]:
                for part in arg.split("="):  # --experts sentiment=experts/sentiment
                    name = _name(part)
                    if name in FIXED_MODELS or name.startswith(MODEL_PREFIXES):
                        names.add(name)
    return names - outputs(block)


# -- the toy world ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Everything any block may name, built once; each block gets a copy of what it names."""
    root = tmp_path_factory.mktemp("readme-world")
    names = {"models": set(FIXED_MODELS) | {f"experts/{t}" for t in TASKS} | {f"runs/lr{i}" for i in (1, 2, 3)},
             "deep": set(FIXED_MODELS)}
    data = {"math-train.jsonl", "code-train.jsonl"}
    for block in blocks():
        if block.skip is None:
            names[_family(block)] |= models_named(block)
            data |= {_name(d) for d in DATA_REF.findall(block.text)}
    tokens = default_tokens()
    for family, layers in LAYERS.items():
        base = build_model(root / family / "base", "llama", seed=0, tokens=tokens, layers=layers, **TOY)
        config = json.loads((base / "config.json").read_text())
        config["max_position_embeddings"] = 4096  # rotary: no tensor depends on it; snippets use real lengths
        (base / "config.json").write_text(json.dumps(config, indent=2))
        for seed, name in enumerate(sorted(names[family] - {"base"}), 1):
            make = _trainer_run if name.startswith("trainer-runs/") else _fine_tune
            make(base, root / family / name, seed)
    for seed, name in enumerate(sorted(data)):
        words = torch.randint(2, len(tokens), (160, 12), generator=torch.Generator().manual_seed(seed))
        rows = [{"text": " ".join(tokens[w] for w in row)} for row in words.tolist()]
        path = root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for task in TASKS:
        _toy_task(TASKS_DIR / task, root / "tasks" / task)
    return root


def _family(block: Block) -> str:
    return "deep" if "layer_range" in block.text else "models"


def _fine_tune(base: Path, target: Path, seed: int, delta: float = 0.02) -> None:
    """`base` plus a seeded delta, written straight from the base's files (toy.build_model with
    `base=` builds a model first: seconds each at 32 layers)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, target)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: t + delta * torch.randn(t.shape, generator=generator)
               for name, t in sorted(load_file(base / "model.safetensors").items())}
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})


def _trainer_run(base: Path, target: Path, seed: int) -> None:
    """checkpoint-<step>/ folders as transformers' Trainer saves them, losses in log_history."""
    for i, step in enumerate(TRAINER_RUN):
        _fine_tune(base, target / f"checkpoint-{step}", 100 * seed + i)
        history = [{"loss": loss, "step": s} for s, loss in TRAINER_RUN.items() if s <= step]
        (target / f"checkpoint-{step}" / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "log_history": history}))


def _toy_task(source: Path, target: Path) -> None:
    from safetensors.torch import save_file

    spec = yaml.safe_load((source / "task.yaml").read_text(encoding="utf-8"))
    target.mkdir(parents=True)
    for file in spec["data"].values():  # a few rows of each label, so every split has them all
        rows = [json.loads(line) for line in (source / file).read_text(encoding="utf-8").splitlines()]
        kept = [r for label in spec["labels"]
                for r in [r for r in rows if r[spec["label_field"]] == label][:ROWS_PER_LABEL]]
        (target / file).write_text("".join(json.dumps(r) + "\n" for r in kept))
    generator = torch.Generator().manual_seed(len(spec["labels"]))
    save_file({"weight": torch.randn(len(spec["labels"]), TOY["hidden"], generator=generator),
               "bias": torch.zeros(len(spec["labels"]))}, target / "head.safetensors")
    spec["head"] = "head.safetensors"
    (target / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _recipe(method: str) -> str:
    weight = {"parameters": {"weight": 1.0}} if get_method(method).param("weight") else {}
    return yaml.safe_dump({"merge_method": method, "base_model": "./base",
                           "models": [{"model": "./math", **weight}, {"model": "./code", **weight}],
                           "dtype": "float32"}, sort_keys=False)


def prepare(block: Block, world: Path, folder: Path) -> None:
    """Copy into `folder` what the block names (copies, not links: a block may write over them)."""
    folder.mkdir()
    models = world / _family(block)
    for name in models_named(block):
        shutil.copytree(models / name, folder / name)
    for source in (world / "data").iterdir():
        shutil.copyfile(source, folder / source.name)
    shutil.copytree(world / "tasks", folder / "tasks")
    methods = {spec.name for spec in all_methods()}
    for token in re.findall(r"[\w./-]+\.ya?ml\b", block.text):
        stem = Path(token).stem
        if stem == "recipe" or stem in methods:
            for name in ("base", "math", "code"):
                if not (folder / name).exists():
                    shutil.copytree(models / name, folder / name)
            (folder / token).parent.mkdir(parents=True, exist_ok=True)
            (folder / token).write_text(_recipe("task_arithmetic" if stem == "recipe" else stem))


# -- running ----------------------------------------------------------------------------------

def _run_cli(argv: list[str], monkeypatch, capsys) -> None:
    from mergesmith import cli

    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        cli.main()
    captured = capsys.readouterr()
    assert (done.value.code or 0) == 0, f"{shlex.join(argv)} exited {done.value.code}: {captured.err[-1500:]}"


def run_block(block: Block, folder: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(folder)
    if block.lang == "python":
        exec(compile(block.text, str(block), "exec"), {"__name__": "__main__"})
    elif block.lang == "bash":
        for argv in commands(block.text):
            assert argv[0] == "mergesmith", (
                f"{block}: `{shlex.join(argv)}` is not a mergesmith command; mark the block "
                "<!-- not run: REASON --> if it cannot run offline")
            _run_cli(argv, monkeypatch, capsys)
    else:
        import mergesmith
        from mergesmith.recipe import load_stages

        load_stages(block.text)  # one recipe, or the stages of a multi-stage one
        mergesmith.merge(block.text, folder / "out")
        assert (folder / "out" / "config.json").is_file()


RUNNABLE = [b for b in blocks() if b.lang in RUN]


def test_the_readme_has_snippets_and_few_exceptions():
    assert len(RUNNABLE) >= 8
    skipped = [b for b in RUNNABLE if b.skip]
    assert len(skipped) <= 5, [str(b) for b in skipped]  # 4 today: two installs, lm-eval, a VLM


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("block", [pytest.param(b, id=f"line{b.line}-{b.lang}") for b in RUNNABLE])
def test_snippet_runs_as_pasted(block, world, tmp_path, monkeypatch, capsys):
    if block.skip:
        pytest.skip(f"not run: {block.skip}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MERGESMITH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "work"
    prepare(block, world, folder)
    run_block(block, folder, monkeypatch, capsys)


def test_conventions_parse_what_they_say():
    block = Block(1, "bash", "mergesmith merge r.yaml ./merged  # out\nmergesmith evaluate merged/ \\\n"
                  "  --experts s=experts/s --base base/\n", None)
    assert commands(block.text) == [["mergesmith", "merge", "r.yaml", "./merged"],
                                    ["mergesmith", "evaluate", "merged/", "--experts", "s=experts/s",
                                     "--base", "base/"]]
    assert outputs(block) == {"merged"}
    assert models_named(block) == {"experts/s", "base"}
    assert models_named(Block(1, "yaml", "base_model: org/a\nmodels: [{model: ./b}]\n", None)) == {"org/a", "b"}
