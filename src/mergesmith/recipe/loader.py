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

# Bounds that keep a hostile or broken recipe from costing more than a second to refuse. The
# largest published recipes are a few KB, a few hundred YAML nodes and under a hundred entries.
MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 20_000  # YAML nodes, counting each alias as the nodes it stands for
MAX_DEPTH = 64  # nested mappings and lists
MAX_ENTRIES = 1_000  # models, slices, or sources of one slice


def load_recipe(source: str | Path | dict) -> Recipe:
    """A Recipe from a YAML file path, a YAML string, or an already-parsed dict."""
    stages = load_stages(source)
    if len(stages) > 1:
        where = stages[0].source if stages[0].source != NO_FILE else "recipe"
        raise RecipeError(f"{where}: holds {len(stages)} recipes (YAML documents), a multi-stage "
                          "recipe, where one recipe was expected",
                          hint="run it with `mergesmith merge RECIPE OUT` or mergesmith.merge")
    return stages[0]


def load_stages(source: str | Path | dict, searches: list | None = None) -> list[Recipe]:
    """Every recipe of a YAML file, path or string, in order: one for an ordinary recipe, one per
    document for a multi-stage recipe (mergekit-multi's form, documents separated by ---).
    A `search:` section is refused (it is mergesmith search's input) unless `searches` is a list:
    then each document's section (None where absent) is appended to it and left out of its Recipe."""
    if isinstance(source, dict):
        return [_validate(source, NO_FILE, {}, searches)]
    if isinstance(source, str) and not _is_file(source) and ("\n" in source or ":" in source):
        return _parse(source, NO_FILE, searches)
    path = Path(source)
    if not path.is_file():
        what = "is a directory, not a recipe file" if path.is_dir() else "recipe file not found"
        raise RecipeError(f"{path}: {what}", hint="give the path of a .yaml recipe")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)  # no more: a 10 GB file is refused as fast
        if len(raw) > MAX_RECIPE_BYTES:
            _too_big(str(path))
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from None
    return _parse(text, str(path), searches)


def _too_big(where: str):
    raise RecipeError(f"{where}: the recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB",
                      hint="a recipe is a few KB; is this the right file?")


def _is_file(text: str) -> bool:
    try:
        return "\n" not in text and Path(text).is_file()
    except (OSError, ValueError):  # a YAML string too long or odd to be a path
        return False


class _BoundedLoader(yaml.SafeLoader):
    """Composes at most MAX_NODES nodes (an alias counts one here), at most MAX_DEPTH deep."""

    def __init__(self, text: str):
        super().__init__(text)
        self.nodes = 0
        self.depth = 0

    def compose_node(self, parent, index):
        self.nodes += 1
        self.depth += 1
        try:
            if self.nodes > MAX_NODES:
                raise _TooLarge(f"more than {MAX_NODES} YAML nodes")
            if self.depth > MAX_DEPTH:
                raise _TooLarge(f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _TooLarge(Exception):
    pass


def _expanded_size(node: yaml.Node, memo: dict, active: set) -> int:
    """Nodes under `node` with every alias expanded, as the data and every walk over it see them
    (9 levels of 9 aliases: 9^9 nodes from 90 written)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:  # a recursive alias: the walks stop there too
        return 1
    active.add(key)
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    size = 1
    for child in children:
        size += _expanded_size(child, memo, active)
        if size > MAX_NODES:
            break
    active.discard(key)
    memo[key] = size
    return size


def _parse(text: str, source: str, searches: list | None = None) -> list[Recipe]:
    where = source if source != NO_FILE else "recipe"
    if len(text) > MAX_RECIPE_BYTES:  # characters: at most as many as bytes
        _too_big(where)
    loader = _BoundedLoader(text)
    documents = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if _expanded_size(node, {}, set()) > MAX_NODES:
                raise _TooLarge(f"aliases that expand to more than {MAX_NODES} YAML nodes")
            documents.append((node, loader.construct_document(node)))
    except _TooLarge as exc:
        raise RecipeError(f"{where}: the recipe has {exc}",
                          hint="a recipe is a few hundred nodes; write repeated parts out, or "
                               "split the merge") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        head = source if source != NO_FILE else "recipe"
        if mark is not None:
            head += f":{mark.line + 1}"
        raise RecipeError(f"{head}: invalid YAML: {' '.join(str(problem).split())}") from None
    finally:
        loader.dispose()
    documents = [(node, data) for node, data in documents if data is not None]  # a bare ---
    if not documents:
        raise RecipeError(
            f"{where}:1: the recipe is empty" if source != NO_FILE else "the recipe is empty",
            hint="a recipe needs at least merge_method and models (or slices)",
        )
    recipes = []
    for node, data in documents:
        lines: dict[tuple, int] = {}
        _collect_lines(node, (), lines, set())
        recipe = _validate(data, source, lines, searches)
        # a stage's text would name other stages, not the folders they become
        recipe._text = text if len(documents) == 1 else None
        recipes.append(recipe)
    return recipes


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


def _validate(data: Any, source: str, lines: dict, searches: list | None = None) -> Recipe:
    if not isinstance(data, dict):
        where = locate(source, lines, ())
        raise RecipeError(
            f"{where}: a recipe must be a mapping of fields, got {describe(data)}",
            hint="start with 'merge_method: ...' and 'models:' or 'slices:'",
        )
    if "search" in data:
        if searches is None:
            raise RecipeError(f"{locate(source, lines, ('search',))}: this recipe has a search: "
                              "section; run mergesmith search",
                              hint="`mergesmith search RECIPE OUT` searches it and writes the best "
                                   "recipe as plain YAML, which merge takes")
        searches.append(data["search"])
        data = {k: v for k, v in data.items() if k != "search"}
    elif searches is not None:
        searches.append(None)
    _check_counts(data, source, lines)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _recipe_error(exc, data, source, lines) from None
    recipe._source = source
    recipe._lines = lines
    return recipe


def _check_counts(data: dict, source: str, lines: dict) -> None:
    """At most MAX_ENTRIES models, slices, and sources per slice (a dict recipe skips the
    YAML bounds, so these are checked on the data)."""
    lists = [(key,) for key in ("models", "slices")]
    if isinstance(data.get("slices"), list):
        lists += [("slices", i, "sources") for i, s in enumerate(data["slices"])
                  if isinstance(s, dict)]
    for path in lists:
        value = data
        for step in path:
            value = value.get(step) if isinstance(value, dict) else value[step]
        if isinstance(value, list) and len(value) > MAX_ENTRIES:
            raise RecipeError(f"{locate(source, lines, path)}: {len(value)} entries, more than "
                              f"{MAX_ENTRIES}", hint="merge in stages of at most "
                              f"{MAX_ENTRIES} models")


def _recipe_error(exc: ValidationError, data: dict, source: str, lines: dict,
                  prefix: tuple = (), fields_at=None) -> RecipeError:
    """One RecipeError for a pydantic error on `data`, which sits at `prefix` in the recipe;
    `fields_at(owner path)`, where given, lists the fields allowed there (for a section the
    recipe schema does not know, such as search:), or None."""
    found = []
    for err in exc.errors():
        field = (err.get("ctx") or {}).get("field")
        path = prefix + ((field,) if field else () if field == "" else _data_path(err["loc"], data))
        message, hint = _explain(err, path, fields_at)
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


def _explain(err: dict, path: tuple, fields_at=None) -> tuple[str, str | None]:
    kind, value = err["type"], err.get("input")
    if kind == "missing":
        return "required field missing", None
    if kind == "extra_forbidden":
        return f"unknown field {path[-1]!r}", _suggest(str(path[-1]), path[:-1], fields_at)
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


def _suggest(key: str, owner_path: tuple, fields_at=None) -> str | None:
    """A hint for an unknown field: the closest allowed name, or where the value belongs."""
    fields = fields_at(owner_path) if fields_at else None
    if fields is not None:
        pass
    elif "tokenizer" in owner_path:
        return None
    elif "parameters" in owner_path:
        fields = ["value", "filter"]
    elif not owner_path:
        fields = list(Recipe.model_fields)
    elif len(owner_path) >= 2 and owner_path[-2] in _OWNERS:
        fields = list(_OWNERS[owner_path[-2]].model_fields)
    else:
        return None
    close = difflib.get_close_matches(key, fields, n=3)
    close.sort(key=lambda f: sorted(f) != sorted(key))  # two letters swapped first: modles -> models
    if close:
        return f"did you mean {close[0]!r}?"
    hint = f"allowed: {', '.join(fields)}"
    if "parameters" in fields:
        hint += f"; method parameters go under 'parameters:' ({{{key}: ...}})"
    return hint
