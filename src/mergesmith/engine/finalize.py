"""Everything beside the weights: index, config, generation config, tokenizer, model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from mergesmith import __version__
from mergesmith.engine.plan import Plan
from mergesmith.engine.vocab import write_tokenizer
from mergesmith.io import weight_index

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)


def write_metadata(plan: Plan, folder: Path, *, copy_tokenizer: bool = True,
                   write_model_card: bool = True) -> None:
    if len(plan.shards) > 1:
        _json(folder / "model.safetensors.index.json", weight_index(plan.shards))
    _json(folder / "config.json", plan.config)
    source = plan.config_source.path
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", folder / "generation_config.json")
    if plan.vocab is not None or (copy_tokenizer and plan.recipe.chat_template):
        # as mergekit: a chat template means the tokenizer is re-saved with it, not copied
        write_tokenizer(plan.vocab, plan.config_source, plan.chat_template, folder)
    elif copy_tokenizer:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
    if write_model_card and plan.program is not None:
        (folder / "README.md").write_text(program_card(plan))
        if plan.program.record:
            name, text = plan.program.record
            (folder / name).write_text(text)
    elif write_model_card:
        (folder / "README.md").write_text(model_card(plan))
        # as mergekit does: the recipe as written, to run again with either tool
        (folder / CONFIG_FILE).write_text(recipe_text(plan.recipe))


CONFIG_FILE = "mergekit_config.yml"


def recipe_text(recipe) -> str:
    """The recipe's YAML as the user wrote it (comments, anchors and all), else as dumped."""
    return recipe._text if recipe._text is not None else recipe.to_yaml()


def hub_ids(plan: Plan) -> dict[str, str]:
    """reference -> hub repo id, for the inputs that came from the hub (not a local folder):
    only those can be linked to, or listed as base_model, without pointing nowhere."""
    ids = {}
    for ref in plan.models:
        if not Path(ref).expanduser().exists():
            ids[ref] = ref.split("@", 1)[0]
    return ids


def model_card(plan: Plan) -> str:
    recipe, method = plan.recipe, plan.method
    hub = hub_ids(plan)
    front = {"library_name": "transformers", "tags": ["merge", "mergesmith"]}
    # every input the Hub can resolve; a local folder has no page for base_model to point to
    bases = list(dict.fromkeys(hub[ref] for ref in plan.models if ref in hub))
    if bases:
        front["base_model"] = bases
    inputs = "\n".join(
        f"| {f'[{hub[ref]}](https://huggingface.co/{hub[ref]})' if ref in hub else f'`{ref}`'} "
        f"| {'base' if ref == recipe.base_model else 'input'} |" for ref in plan.models
    )
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + f"""---

# {recipe.name or 'Merged model'}

Merged with mergesmith {__version__} using **{method.name}**: {method.summary}
({method.paper}). Seed: {plan.seed}.{_compat_note(recipe)} The recipe is also in `{CONFIG_FILE}`.

## Inputs

| model | role |
|---|---|
{inputs}

## Recipe

```yaml
{recipe_text(recipe).rstrip()}
```
"""


def program_card(plan: Plan) -> str:
    """The card of a model built by a program (engine/program.py): what it is, from what."""
    program, hub = plan.program, hub_ids(plan)
    front = {"library_name": "transformers", "tags": ["merge", "mergesmith"]}
    inputs = "\n".join(f"| {f'[{hub[ref]}](https://huggingface.co/{hub[ref]})' if ref in hub else f'`{ref}`'} |"
                       for ref in plan.models)
    record = ""
    if program.record:
        name, text = program.record
        record = f"\n## Configuration (`{name}`)\n\n```yaml\n{text.rstrip()}\n```\n"
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + f"""---

# {program.title}

Built with mergesmith {__version__}: {program.summary} Seed: {plan.seed}.

## Inputs

| model |
|---|
{inputs}
{record}"""


def _compat_note(recipe) -> str:
    """The arithmetic the tensors follow, when not the papers' (`--compat` or `compat:`)."""
    if recipe.compat != "mergekit":
        return ""
    return " Computed with compat: mergekit (mergekit 0.1.5's arithmetic)."


def _json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
