"""Calibration examples: texts (and labels, where an objective uses them) from a file or a dataset.

Files: .txt (one example per non-empty line), .jsonl, .csv, .parquet; or a `datasets` dataset
("name" or "name:config", offline when HF_DATASETS_OFFLINE / HF_HUB_OFFLINE say so). `samples`
examples are drawn with `seed`, so the same settings always give the same examples. Every error
names the file and, for a bad row, its line.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mergesmith.errors import CalibrationError
from mergesmith.io.rows import read_rows
from mergesmith.recipe import Calibration

EXTENSIONS = (".txt", ".jsonl", ".csv", ".parquet")
# Settings that change which examples are drawn or what is computed from them; `cache` does not.
STATISTICS_SETTINGS = ("dataset", "split", "text_field", "label_field", "labels", "samples",
                       "max_length", "batch_size", "seed")


@dataclass(frozen=True)
class Example:
    text: str
    label: int | None = None
    where: str = ""  # "data.jsonl:17", for messages


def data_path(cal: Calibration, root: Path) -> Path:
    """The calibration file, relative to the recipe's folder."""
    return (Path(root) / cal.data).resolve()


def head_path(cal: Calibration, root: Path) -> Path | None:
    return (Path(root) / cal.head).resolve() if cal.head else None


def load_examples(cal: Calibration, root: Path) -> list[Example]:
    """`cal.samples` examples drawn with `cal.seed` (all of them, in order, when there are fewer).
    Only the drawn rows are checked, so a large dataset costs what the sample costs."""
    if cal.data:
        path = data_path(cal, root)
        rows, source = _file_rows(path, cal), str(path)
        count, row_at = len(rows), rows.__getitem__
    elif cal.dataset:
        table, source = _dataset(cal), cal.dataset
        count = len(table)
        row_at = lambda i: (f"{cal.dataset}[{cal.split}] row {i + 1}", table[i])  # noqa: E731
    else:
        raise CalibrationError("calibration: no data", hint="give `data: <file>` or `dataset: <name>`")
    if count == 0:
        raise CalibrationError(f"{source}: no examples", hint="the calibration data is empty")
    drawn = draw(range(count), cal.samples, cal.seed)
    return [_example(row, where, cal) for where, row in map(row_at, drawn)]


def draw(items, count: int, seed: int) -> list:
    """`count` items chosen with `seed`, kept in their original order; all when there are fewer."""
    if len(items) <= count:
        return list(items)
    chosen = random.Random(seed).sample(range(len(items)), count)
    return [items[i] for i in sorted(chosen)]


def fingerprint(cal: Calibration, root: Path) -> str:
    """sha256 of the data (file bytes, or the dataset's name/config/split), the head file and every
    setting that changes the statistics."""
    digest = hashlib.sha256()
    settings = {key: getattr(cal, key) for key in STATISTICS_SETTINGS}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in (data_path(cal, root) if cal.data else None, head_path(cal, root)):
        if path is None:
            digest.update(b"\0none")
            continue
        if not path.is_file():
            raise CalibrationError(f"{path}: no such file")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _example(row: dict[str, Any], where: str, cal: Calibration) -> Example:
    if cal.text_field not in row:
        raise CalibrationError(f"{where}: no field {cal.text_field!r}",
                               hint=f"fields here: {', '.join(map(str, row)) or 'none'}; set text_field")
    text = row[cal.text_field]
    if not isinstance(text, str):
        raise CalibrationError(f"{where}: {cal.text_field}: expected text, got {text!r}")
    if cal.label_field is None:
        return Example(text, None, where)
    if cal.label_field not in row:
        raise CalibrationError(f"{where}: no field {cal.label_field!r}",
                               hint=f"fields here: {', '.join(map(str, row))}; set label_field")
    return Example(text, _label(row[cal.label_field], where, cal), where)


def _label(value: Any, where: str, cal: Calibration) -> int:
    """A class index: an integer as given, or a label name's position in `labels`."""
    field = cal.label_field
    if isinstance(value, bool):
        raise CalibrationError(f"{where}: {field}: expected a class index or a label name, got {value!r}")
    if isinstance(value, str) and cal.labels is not None:
        if value not in cal.labels:
            raise CalibrationError(f"{where}: {field}: {value!r} is not one of the labels",
                                   hint=f"labels: {', '.join(cal.labels)}")
        return cal.labels.index(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # CSV cells are text
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # parquet and pandas widen integer columns with gaps
    if not isinstance(value, int):
        raise CalibrationError(f"{where}: {field}: expected a class index or a label name, got {value!r}",
                               hint="text labels need `labels: [...]` in head order")
    if value < 0 or (cal.labels is not None and value >= len(cal.labels)):
        raise CalibrationError(f"{where}: {field}: class {value} is out of range",
                               hint=f"{len(cal.labels or ())} labels are named" if cal.labels else
                               "class indices start at 0")
    return value


def _file_rows(path: Path, cal: Calibration) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise CalibrationError(f"{path}: no such calibration file",
                               hint="`data` is relative to the recipe's folder")
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise CalibrationError(f"{path}: unknown calibration file type {suffix or '(none)'!r}",
                               hint=f"use one of {', '.join(EXTENSIONS)}")
    if suffix == ".txt" and cal.label_field is not None:
        raise CalibrationError(f"{path}: a .txt file has no fields, so no {cal.label_field!r}",
                               hint="labelled data goes in .jsonl, .csv or .parquet")
    reader = {".txt": _txt_rows, ".jsonl": _table_rows, ".csv": _table_rows, ".parquet": _parquet_rows}
    return list(reader[suffix](path, cal.text_field))


def _txt_rows(path: Path, text_field: str) -> Iterator[tuple[str, dict]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: cannot read: {exc}", hint="save it as UTF-8 text") from None
    for number, line in enumerate(io.StringIO(text, newline=None), 1):  # as open() splits
        if line.strip():
            yield f"{path}:{number}", {text_field: line.rstrip("\r\n")}


def _table_rows(path: Path, text_field: str) -> Iterator[tuple[str, dict]]:
    """JSONL or CSV, as evaluation tasks read them."""
    return ((f"{path}:{number}", row) for number, row in read_rows(path, CalibrationError))


def _optional(module: str, what: str):
    """An import of the `data` extra, or an error that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CalibrationError(f"calibration from {what} needs the {module.split('.')[0]} package",
                               hint="pip install 'mergesmith[data]'") from None


def _parquet_rows(path: Path, text_field: str) -> Iterator[tuple[str, dict]]:
    pq = _optional("pyarrow.parquet", f"{path} (parquet)")

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise CalibrationError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    for number, row in enumerate(table.to_pylist(), 1):
        yield f"{path}: row {number}", row


def _dataset(cal: Calibration):
    datasets = _optional("datasets", f"the dataset {cal.dataset!r}")

    name, _, config = cal.dataset.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=cal.split)
    except Exception as exc:  # hub, cache and builder errors have no common base class
        raise CalibrationError(f"dataset {cal.dataset!r} (split {cal.split!r}): cannot be loaded "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                               hint="offline (HF_DATASETS_OFFLINE=1), only cached datasets load") from None
