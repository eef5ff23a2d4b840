"""Everything beside the weights: index, config, generation config, tokenizer, model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mergesmith import __version__
from mergesmith.engine.plan import Plan
from mergesmith.engine.vocab import write_tokenizer
from mergesmith.io import weight_index

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)


def write_metadata(plan: Plan, folder: Path) -> None:
    if len(plan.shards) > 1:
        _json(folder / "model.safetensors.index.json", weight_index(plan.shards))
    _json(folder / "config.json", plan.config)
    source = plan.config_source.path
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", folder / "generation_config.json")
    if plan.vocab is not None:
        write_tokenizer(plan.vocab, folder)
    else:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
    if plan.recipe.chat_template:
        (folder / "chat_template.jinja").write_text(plan.recipe.chat_template)
    (folder / "README.md").write_text(model_card(plan))


def model_card(plan: Plan) -> str:
    recipe, method = plan.recipe, plan.method
    front = ["---", "library_name: transformers", "tags:", "- mergesmith", "- merge"]
    if recipe.base_model:
        front.append(f"base_model: {json.dumps(recipe.base_model)}")
    front.append("---")
    inputs = "\n".join(f"| `{ref}` | `{ck.path}` |" for ref, ck in plan.models.items())
    return "\n".join(front) + f"""

# {recipe.name or 'Merged model'}

Merged with [mergesmith](https://github.com/mergesmith/mergesmith) {__version__} using
**{method.name}**: {method.summary} ({method.paper}). Seed: {plan.seed}.

## Inputs

| model | folder |
|---|---|
{inputs}

## Recipe

```yaml
{recipe.to_yaml().rstrip()}
```
"""


def _json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
