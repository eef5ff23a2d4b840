"""Evaluation tasks: a folder with `task.yaml` and JSONL/CSV splits, validated on load.

Every error names the file, the line and the field: 'tasks/sst/task.yaml:4: labels: ...' for the
definition, 'tasks/sst/test.jsonl:17: label: ...' for a row.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from mergesmith.errors import TaskError
from mergesmith.io.rows import read_rows

KINDS = ("classification", "multiple_choice", "perplexity")
METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "multiple_choice": ("accuracy", "macro_f1"),
    "perplexity": ("perplexity",),
}
FIELDS = {
    "name", "kind", "data", "description", "text_field", "label_field", "labels", "head",
    "max_length", "context_field", "choices_field", "metric",
}  # fmt: skip


@dataclass(frozen=True)
class Task:
    """A validated task. `data` maps split name -> file; rows are read once, on load."""

    name: str
    kind: str
    path: Path
    data: dict[str, Path]
    metric: str
    text_field: str = "text"
    label_field: str = "label"
    labels: tuple[str, ...] = ()
    head: Path | None = None
    max_length: int = 128
    context_field: str = "context"
    choices_field: str = "choices"
    description: str = ""
    _rows: dict[str, list[dict]] = field(default_factory=dict, repr=False, compare=False)
    _label_ids: dict[str, list[int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"

    @property
    def splits(self) -> list[str]:
        return list(self.data)

    def examples(self, split: str) -> list[dict]:
        """The split's rows as dicts (labels left as written)."""
        if split not in self._rows:
            raise TaskError(f"{self.path}: task {self.name!r} has no split {split!r}",
                            hint=f"its splits are {', '.join(self.data)}")
        return self._rows[split]

    def label_ids(self, split: str) -> list[int]:
        """Each row's label as an index: into `labels` (classification) or `choices` (multiple choice)."""
        self.examples(split)
        return self._label_ids[split]

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the definition and every data file: what a cached score depends on."""
        digest = hashlib.sha256(self.path.read_bytes())
        for split, file in sorted(self.data.items()):
            digest.update(split.encode() + b"\0" + file.read_bytes())
        if self.head is not None:
            digest.update(self.head.read_bytes())
        return digest.hexdigest()


def load_task(path: str | Path) -> Task:
    """A Task from `task.yaml` (or the folder holding it), with every split read and checked."""
    path = Path(path)
    if path.is_dir():
        path = path / "task.yaml"
    if not path.is_file():
        raise TaskError(f"{path}: task file not found", hint="give a task.yaml or the folder holding one")
    spec, lines = _read_yaml(path)
    where = lambda *key: _where(path, lines, key)  # noqa: E731

    unknown = sorted(set(spec) - FIELDS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], FIELDS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"fields: {', '.join(sorted(FIELDS))}"
        raise TaskError(f"{where(unknown[0])}: unknown field", hint=hint)
    for key in ("name", "kind", "data"):
        if key not in spec:
            raise TaskError(f"{where()}: missing field {key!r}")
    name = _string(spec, "name", where)
    kind = _string(spec, "kind", where)
    if kind not in KINDS:
        raise TaskError(f"{where('kind')}: unknown kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
    metric = spec.get("metric", METRICS[kind][0])
    if metric not in METRICS[kind]:
        raise TaskError(f"{where('metric')}: metric {metric!r} does not apply to {kind} tasks",
                        hint=f"use {' or '.join(METRICS[kind])}")
    data = _data_files(spec["data"], path, where)
    options: dict[str, Any] = {"max_length": _max_length(spec, where)}
    for key in ("text_field", "label_field", "context_field", "choices_field", "description"):
        if key in spec:
            options[key] = _string(spec, key, where)
    if kind == "classification":
        options.update(_classification_options(spec, path, where))
    elif "labels" in spec or "head" in spec:
        key = "labels" if "labels" in spec else "head"
        raise TaskError(f"{where(key)}: only classification tasks take `{key}`")

    task = Task(name=name, kind=kind, path=path, data=data, metric=metric, **options)
    for split, file in data.items():
        task._rows[split], task._label_ids[split] = _check_rows(task, split, file, _read_rows(file))
    return task


def _classification_options(spec: dict, path: Path, where) -> dict[str, Any]:
    labels = spec.get("labels")
    if isinstance(labels, list) and any(isinstance(x, bool) for x in labels):
        raise TaskError(f"{where('labels')}: YAML reads yes/no/true/false/on/off as booleans, not names",
                        hint='quote them: labels: ["no", "yes"]')
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise TaskError(f"{where('labels') if 'labels' in spec else where()}: classification needs "
                        "`labels`, a list of at least two label names in head-row order")
    if len(set(labels)) != len(labels):
        raise TaskError(f"{where('labels')}: labels repeat a name")
    options: dict[str, Any] = {"labels": tuple(labels)}
    if "head" in spec:
        head = path.parent / _string(spec, "head", where)
        if not head.is_file():
            raise TaskError(f"{where('head')}: head file not found: {head}")
        options["head"] = head
    return options


def _read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    try:
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            spec = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise TaskError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: cannot read: {exc}") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path}:1: a task definition is a mapping (name, kind, data, ...)")
    lines: dict[tuple, int] = {}
    for key_node, value in node.value:
        lines[(key_node.value,)] = key_node.start_mark.line + 1
        if isinstance(value, yaml.MappingNode):
            for sub, _ in value.value:
                lines[(key_node.value, sub.value)] = sub.start_mark.line + 1
    return spec, lines


def _where(path: Path, lines: dict[tuple, int], key: tuple) -> str:
    line = lines.get(key) or lines.get(key[:1])
    dotted = ".".join(map(str, key))
    return f"{path}:{line}: {dotted}" if line else (f"{path}: {dotted}" if dotted else str(path))


def _string(spec: dict, key: str, where) -> str:
    value = spec[key]
    if not isinstance(value, str) or not value:
        raise TaskError(f"{where(key)}: expected a non-empty string, got {value!r}")
    return value


def _max_length(spec: dict, where) -> int:
    value = spec.get("max_length", 128)
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise TaskError(f"{where('max_length')}: expected an integer >= 2, got {value!r}")
    return value


def _data_files(data: Any, path: Path, where) -> dict[str, Path]:
    if not isinstance(data, dict) or not data:
        raise TaskError(f"{where('data')}: expected a mapping of split name to file, "
                        "e.g. {validation: validation.jsonl, test: test.jsonl}")
    files = {}
    for split, name in data.items():
        if not isinstance(name, str):
            raise TaskError(f"{where('data', split)}: expected a file name, got {name!r}")
        file = path.parent / name
        if file.suffix not in (".jsonl", ".csv"):
            raise TaskError(f"{where('data', split)}: {name!r} is neither .jsonl nor .csv")
        if not file.is_file():
            raise TaskError(f"{where('data', split)}: data file not found: {file}")
        files[str(split)] = file
    return files


def _read_rows(file: Path) -> list[tuple[int, dict]]:
    return read_rows(file, TaskError)


def _check_rows(task: Task, split: str, file: Path,
                rows: list[tuple[int, dict]]) -> tuple[list[dict], list[int]]:
    if not rows:
        raise TaskError(f"{file}: split {split!r} of task {task.name!r} is empty")
    label_ids = []
    for number, row in rows:
        at = f"{file}:{number}"
        if task.kind == "multiple_choice":
            _text(row, task.context_field, at)
            choices = _choices(row, task.choices_field, at)
            label_ids.append(_index(row, task.label_field, len(choices), at))
        else:
            _text(row, task.text_field, at)
        if task.kind == "classification":
            label_ids.append(_label(row, task.label_field, task.labels, at))
    return [row for _, row in rows], label_ids


def _column(row: dict, name: str, at: str) -> Any:
    if name not in row or row[name] is None:
        close = difflib.get_close_matches(name, list(row), n=1)
        raise TaskError(f"{at}: missing column {name!r}",
                        hint=f"did you mean {close[0]!r}?" if close else "set the task's *_field to its name")
    return row[name]


def _text(row: dict, name: str, at: str) -> str:
    value = _column(row, name, at)
    if not isinstance(value, str) or not value.strip():
        raise TaskError(f"{at}: column {name!r} must be non-empty text, got {value!r}")
    return value


def _choices(row: dict, name: str, at: str) -> list[str]:
    value = _column(row, name, at)
    if isinstance(value, str):  # CSV cells hold the list as JSON
        try:
            value = row[name] = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) and c for c in value):
        raise TaskError(f"{at}: column {name!r} must be a list of at least two non-empty strings")
    return value


def _label(row: dict, name: str, labels: tuple[str, ...], at: str) -> int:
    value = _column(row, name, at)
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    return _index(row, name, len(labels), at, names=labels)


def _index(row: dict, name: str, count: int, at: str, names: tuple[str, ...] = ()) -> int:
    value = row[name] if name in row else _column(row, name, at)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
        allowed = f"one of {list(names)} or an index 0..{count - 1}" if names else f"an index 0..{count - 1}"
        raise TaskError(f"{at}: unknown label {row[name]!r} in column {name!r}", hint=f"expected {allowed}")
    return value
