"""Reading JSON-lines files of records, with one clear error per bad line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from cpmctl.errors import UserError


def iter_records(path: str | Path, *, what: str = "input file", text_field: str = "text") -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSONL file of objects that carry a
    string `text_field`; a missing file, bad UTF-8, bad JSON or a record without that field is a
    UserError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise UserError(f"{path}:{number} is not valid UTF-8") from None
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise UserError(f"{path}:{number} has no string field {text_field!r}")
            yield number, record
