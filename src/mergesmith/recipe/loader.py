"""Loading a recipe, and turning every way it can be wrong into one RecipeError line.

Errors read 'recipe.yaml:12: models[1].parameters.weight: <what is wrong>'. Lines come from the
YAML node tree (every mapping key and sequence item); pydantic's error locations are mapped
back onto the data, dropping the union-branch tags pydantic inserts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergesmith.errors import RecipeError
from mergesmith.recipe.parameters import UNION_TAGS, describe
from mergesmith.recipe.schema import NO_FILE, InputModel, Recipe, Slice, SliceSource, locate

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "list_type": "a list", "tuple_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
}  # fmt: skip

_OWNERS = {"models": InputModel, "slices": Slice, "sources": SliceSource}


def load_recipe(source: str | Path | dict) -> Recipe:
    """A Recipe from a YAML file path, a YAML string, or an already-parsed dict."""
    if isinstance(source, dict):
        return _validate(source, NO_FILE, {})
    if isinstance(source, str) and not _is_file(source) and ("\n" in source or ":" in source):
        return _parse(source, NO_FILE)
    path = Path(source)
    if not path.is_file():
        what = "is a directory, not a recipe file" if path.is_dir() else "recipe file not found"
        raise RecipeError(f"{path}: {what}", hint="give the path of a .yaml recipe")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from None
    return _parse(text, str(path))


def _is_file(text: str) -> bool:
    try:
        return "\n" not in text and Path(text).is_file()
    except (OSError, ValueError):  # a YAML string too long or odd to be a path
        return False


def _parse(text: str, source: str) -> Recipe:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        head = source if source != NO_FILE else "recipe"
        if mark is not None:
            head += f":{mark.line + 1}"
        raise RecipeError(f"{head}: invalid YAML: {' '.join(str(problem).split())}") from None
    finally:
        loader.dispose()
    where = source if source != NO_FILE else "recipe"
    if node is None or data is None:
        raise RecipeError(
            f"{where}:1: the recipe is empty" if source != NO_FILE else "the recipe is empty",
            hint="a recipe needs at least merge_method and models (or slices)",
        )
    lines: dict[tuple, int] = {}
    _collect_lines(node, (), lines, set())
    return _validate(data, source, lines)


def _collect_lines(node: yaml.Node, path: tuple, lines: dict, active: set) -> None:
    """Record the 1-based line of every mapping key and sequence item under `node`."""
    if id(node) in active:  # a recursive alias
        return
    lines.setdefault(path, node.start_mark.line + 1)
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                # The last duplicate key wins in the data, so its line wins here too.
                lines[path + (key.value,)] = key.start_mark.line + 1
                _collect_lines(value, path + (key.value,), lines, active)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_lines(item, path + (i,), lines, active)
    active.discard(id(node))


def _validate(data: Any, source: str, lines: dict) -> Recipe:
    if not isinstance(data, dict):
        where = locate(source, lines, ())
        raise RecipeError(
            f"{where}: a recipe must be a mapping of fields, got {describe(data)}",
            hint="start with 'merge_method: ...' and 'models:' or 'slices:'",
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _recipe_error(exc, data, source, lines) from None
    recipe._source = source
    recipe._lines = lines
    return recipe


def _recipe_error(exc: ValidationError, data: dict, source: str, lines: dict) -> RecipeError:
    found = []
    for err in exc.errors():
        field = (err.get("ctx") or {}).get("field")
        path = (field,) if field else () if field == "" else _data_path(err["loc"], data)
        message, hint = _explain(err, path)
        line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), 0)
        # A typo usually also makes a required field "missing": report the typo first.
        found.append((err["type"] != "extra_forbidden", line, message, hint, path))
    found.sort(key=lambda f: f[:2])
    messages = [f"{locate(source, lines, f[4])}: {f[2]}" for f in found]
    error = RecipeError(messages[0], hint=found[0][3])
    error.errors = messages  # every problem, one line each, for callers that want them all
    return error


def _data_path(loc: tuple, data: Any) -> tuple:
    """pydantic's error location as a path through the data, without union tags."""
    path, node = [], data
    for n, item in enumerate(loc):
        if isinstance(node, dict) and item in node:
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            node = node[item]
        elif n == len(loc) - 1 and item not in UNION_TAGS and "[" not in str(item):
            pass  # a missing field: keep its name, it is the last entry
        else:
            continue  # a tag such as 'conditional' or '[key]'
        path.append(item)
    return tuple(path)


def _explain(err: dict, path: tuple) -> tuple[str, str | None]:
    kind, value = err["type"], err.get("input")
    if kind == "missing":
        return "required field missing", None
    if kind == "extra_forbidden":
        return f"unknown field {path[-1]!r}", _suggest(str(path[-1]), path[:-1])
    if kind == "value_error":
        return str(err["ctx"]["error"]), None
    if kind in _EXPECTED:
        hint = None
        if kind == "model_type" and isinstance(value, str) and path[:1] in (("models",), ("slices",)):
            hint = f"write each entry as '- model: {value}'"
        return f"expected {_EXPECTED[kind]}, got {describe(value)}", hint
    if kind == "too_short":
        return f"needs at least {err['ctx']['min_length']} entry, got none", None
    return err["msg"], None


def _suggest(key: str, owner_path: tuple) -> str | None:
    """A hint for an unknown field: the closest allowed name, or where the value belongs."""
    if "tokenizer" in owner_path:
        return None
    if "parameters" in owner_path:
        fields = ["value", "filter"]
    elif not owner_path:
        fields = list(Recipe.model_fields)
    elif len(owner_path) >= 2 and owner_path[-2] in _OWNERS:
        fields = list(_OWNERS[owner_path[-2]].model_fields)
    else:
        return None
    close = difflib.get_close_matches(key, fields, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    hint = f"allowed: {', '.join(fields)}"
    if "parameters" in fields:
        hint += f"; method parameters go under 'parameters:' ({{{key}: ...}})"
    return hint
