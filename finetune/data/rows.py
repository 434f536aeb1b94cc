"""Reading rows from one local file (json / jsonl / csv / parquet) and checking them per dataset kind.

Kept apart from :mod:`finetune.data.sources` so that the eval CLI, which scores an arbitrary file, can
read and validate rows without the split logic.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune.config import FORMAT_OF_NAME, FORMATS
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
# Validation


def to_container(value: Any) -> Any:
    """Turn an OmegaConf node into plain python (dict / list); leave anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return value


def dataset_kind(dcfg: Mapping) -> str:
    """The rows' format: ``dataset.format`` (or, for configs without it, the format ``dataset.name`` implies).

    Raises:
        FinetuneError: an unknown format.
    """
    fmt = dcfg.get("format") or FORMAT_OF_NAME.get(dcfg.get("name"))
    if fmt not in FORMATS:
        raise FinetuneError(f"dataset.format={fmt!r} is not a known format; allowed: {', '.join(FORMATS)}")
    return fmt


def coerce_label(value: Any, n_labels: int) -> int | None:
    """Return ``value`` as a label index in ``range(n_labels)``, or None when it is not one.

    Accepts ints, bools and integer strings such as ``"1"`` (CSV cells); floats only when integral.
    """
    if isinstance(value, bool):
        value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, int) and 0 <= value < n_labels:
        return value
    return None


def role_map(dcfg: Mapping) -> dict[str, str]:
    """The ``dataset.role_map`` as a plain dict (ShareGPT role -> chat-template role)."""
    return dict(to_container(dcfg.get("role_map")) or {})


def validate_rows(rows: list[dict], dcfg: Mapping, origin: str, require_label: bool = True) -> list[dict]:
    """Check every row for the fields its dataset kind needs and return normalised copies.

    Args:
        rows: raw rows.
        dcfg: the ``dataset`` config node (``name`` picks the kind).
        origin: where the rows came from (a file path or ``hub:<id> split``), used in error messages.
        require_label: classification only: False lets rows without a label through (label -> None).

    Returns:
        New dicts: classification labels become ints; alpaca ``input`` is a str ("" when missing);
        other keys are kept as they were.

    Raises:
        FinetuneError: naming ``origin``, the 0-based row index, the field and what is expected.
    """
    kind = dataset_kind(dcfg)
    check = {"labelled_text": _check_classification, "alpaca": _check_alpaca, "sharegpt": _check_sharegpt}[kind]
    ctx = _context(dcfg, kind)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise FinetuneError(f"{origin}: row {i} is {type(row).__name__}, expected an object")
        out.append(check(dict(row), i, origin, ctx, require_label))
    return out


def _context(dcfg: Mapping, kind: str) -> dict:
    # Resolve config values once per call instead of once per row.
    if kind == "labelled_text":
        words = list(to_container(dcfg.get("label_words")) or [])
        if len(words) < 2:
            raise FinetuneError(f"dataset.label_words={words!r}: need at least two label words, e.g. [negative, positive]")
        return {"text": dcfg.get("text_field", "text"), "label": dcfg.get("label_field", "label"), "n": len(words)}
    if kind == "sharegpt":
        return {
            "conv": dcfg.get("conversations_field", "conversations"),
            "system": dcfg.get("system_field"),
            "roles": role_map(dcfg),
        }
    return {}


def _check_classification(row: dict, i: int, origin: str, ctx: dict, require_label: bool) -> dict:
    text = row.get(ctx["text"])
    if not isinstance(text, str) or not text.strip():
        raise FinetuneError(
            f"{origin}: row {i} field {ctx['text']!r} (dataset.text_field) is {_show(text)}; expected a non-empty string"
        )
    raw = row.get(ctx["label"])
    if raw is None and not require_label:
        row[ctx["label"]] = None
        return row
    label = coerce_label(raw, ctx["n"])
    if label is None:
        raise FinetuneError(
            f"{origin}: row {i} field {ctx['label']!r} (dataset.label_field) is {_show(raw)}; "
            f"expected an integer label in 0..{ctx['n'] - 1} (one per dataset.label_words)"
        )
    row[ctx["label"]] = label
    return row


def _check_alpaca(row: dict, i: int, origin: str, ctx: dict, require_label: bool) -> dict:
    for field in ("instruction", "output"):
        if not isinstance(row.get(field), str) or (field == "instruction" and not row[field].strip()):
            raise FinetuneError(f"{origin}: row {i} field {field!r} is {_show(row.get(field))}; expected a non-empty string")
    value = row.get("input")
    if value is None:
        row["input"] = ""
    elif not isinstance(value, str):
        raise FinetuneError(f"{origin}: row {i} field 'input' is {_show(value)}; expected a string or null")
    return row


def _check_sharegpt(row: dict, i: int, origin: str, ctx: dict, require_label: bool) -> dict:
    conv, roles = row.get(ctx["conv"]), ctx["roles"]
    if not isinstance(conv, list) or not conv:
        raise FinetuneError(
            f"{origin}: row {i} field {ctx['conv']!r} (dataset.conversations_field) is {_show(conv)}; "
            "expected a non-empty list of {from, value} turns"
        )
    for j, turn in enumerate(conv):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise FinetuneError(
                f"{origin}: row {i} turn {j} is {_show(turn)}; expected an object with string fields 'from' and 'value'"
            )
        if turn["from"] not in roles:
            raise FinetuneError(
                f"{origin}: row {i} turn {j} has role {turn['from']!r}, which dataset.role_map does not map "
                f"(mapped: {', '.join(sorted(roles)) or 'none'}); add it, e.g. +dataset.role_map.{turn['from']}=assistant"
            )
    if not any(roles[t["from"]] == "assistant" for t in conv):
        raise FinetuneError(f"{origin}: row {i} has no turn that dataset.role_map maps to 'assistant'; nothing to learn from")
    system = row.get(ctx["system"]) if ctx["system"] else None
    if system is not None and not isinstance(system, str):
        raise FinetuneError(
            f"{origin}: row {i} field {ctx['system']!r} (dataset.system_field) is {_show(system)}; expected a string"
        )
    return row


def _show(value: Any) -> str:
    """Short description of a bad value for an error line (never dumps a whole review)."""
    if value is None:
        return "missing"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
