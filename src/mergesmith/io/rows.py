"""Rows of a JSONL or CSV data file, each with its line number, for messages that say where."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mergesmith.errors import MergesmithError


def read_rows(path: Path, error: type[MergesmithError] = MergesmithError) -> list[tuple[int, dict]]:
    """(line number, row) per JSONL line or CSV row; a CSV's numbers count the header as line 1
    and a quoted multi-line cell as the lines it spans. Bad input raises `error` at file:line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read: {exc}") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        return [(reader.line_num, {k: v for k, v in row.items() if k is not None}) for row in reader]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows
