"""Reading rows from one local file (json / jsonl / csv / parquet) and checking them per dataset format.

Kept apart from :mod:`finetune.data.sources` so that the eval CLI, which scores an arbitrary file, can
read and validate rows without the split logic.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

from finetune import formats
from finetune.errors import FinetuneError

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")


def read_rows(path: str | Path) -> list[dict]:
    """Read every row of one data file as a list of dicts.

    Args:
        path: a ``.json`` (a JSON list of objects, or JSON lines), ``.jsonl``, ``.csv`` or ``.parquet`` file.

    Returns:
        The rows in file order. CSV values are strings (an empty cell is ``""``).

    Raises:
        FinetuneError: the file is missing, its extension is not supported, or its content is malformed
            (JSON errors name the file and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"data file {path} does not exist or is not a file")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise FinetuneError(
            f"data file {path}: unsupported extension {ext or '(none)'!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    rows = _read_parquet(path) if ext == ".parquet" else _read_text_rows(path, ext)
    if not rows:
        raise FinetuneError(f"data file {path} holds no rows; it needs at least one")
    return rows


def _read_text_rows(path: Path, ext: str) -> list[dict]:
    if path.stat().st_size == 0:
        raise FinetuneError(f"data file {path} is empty (0 bytes); it needs at least one row")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM written by spreadsheet tools
    except UnicodeDecodeError as exc:
        raise FinetuneError(
            f"data file {path} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
            "re-save it as UTF-8"
        ) from None
    if not text.strip():
        raise FinetuneError(f"data file {path} is empty (only whitespace); it needs at least one row")
    if ext == ".csv":
        return [dict(r) for r in csv.DictReader(text.splitlines())]
    if ext == ".jsonl":
        return _read_json_lines(path, text)
    return _read_json(path, text)


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # pyarrow comes with `datasets`; imported lazily as it is slow to load

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise FinetuneError(f"data file {path}: not a readable parquet file ({exc})") from exc


def _read_json(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # "Extra data" after a first complete value means the .json file is really JSON lines.
        if exc.msg == "Extra data":
            return _read_json_lines(path, text)
        raise FinetuneError(f"data file {path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise FinetuneError(f"data file {path}: expected a JSON list of objects (or JSON lines), got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise FinetuneError(f"data file {path}: row {i} is {type(row).__name__}, expected a JSON object")
    return data


def _read_json_lines(path: Path, text: str) -> list[dict]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FinetuneError(f"data file {path}: malformed JSON at line {lineno}: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise FinetuneError(f"data file {path}: line {lineno} is {type(row).__name__}, expected a JSON object")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Validation: each dataset format (finetune.formats) checks its own rows


def dataset_kind(dcfg: Mapping) -> str:
    """The rows' format name: ``dataset.format`` (or, for configs without it, the format ``dataset.name`` implies).

    Raises:
        FinetuneError: an unknown format.
    """
    return formats.of_config(dcfg).name


def validate_rows(rows: list[dict], dcfg: Mapping, origin: str, require_label: bool = True) -> list[dict]:
    """Check every row for the fields its dataset format needs and return normalised copies.

    Args:
        rows: raw rows.
        dcfg: the ``dataset`` config node (``format`` picks the checks).
        origin: where the rows came from (a file path or ``hub:<id> split``), used in error messages.
        require_label: classification only: False lets rows without a label through (label -> None).

    Returns:
        New dicts, normalised by the format (e.g. classification labels become ints; alpaca ``input`` is a str);
        other keys are kept as they were.

    Raises:
        FinetuneError: naming ``origin``, the 0-based row index, the field and what is expected.
    """
    check = formats.of_config(dcfg).row_check(dcfg)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise FinetuneError(f"{origin}: row {i} is {type(row).__name__}, expected an object")
        out.append(check(dict(row), i, origin, require_label))
    return out
