"""Small formatting helpers for the comparison report: numbers, metrics and markdown tables.

Accuracy-like metrics (stored as fractions in metrics.json) are shown in percent and their
differences in percentage points ("pts"); missing values are shown as ``n/a``.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

NA = "n/a"
NOT_SCORED = ("failed: ", "running now")  # a row's cell where its job failed or is under way: text
_LABELS = {
    "accuracy": "accuracy", "f1": "F1", "accuracy_int8": "INT8 accuracy", "f1_int8": "INT8 F1",
    "perplexity": "perplexity", "perplexity_int8": "INT8 perplexity", "eval_loss": "eval loss",
    "val_accuracy": "validation accuracy", "val_f1": "validation F1",
}


def to_float(value: Any) -> float | None:
    """``float(value)``, or ``None`` for missing, NaN or non-numeric values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def is_fraction_metric(name: str | None) -> bool:
    """Whether ``name`` is an accuracy/F1-style score in [0, 1] shown as a percentage."""
    return bool(name) and ("accuracy" in name or name.startswith("f1") or "_f1" in name)


def metric_label(name: str | None) -> str:
    """Human name of a metric column (``accuracy_int8`` -> ``INT8 accuracy``)."""
    return _LABELS.get(name or "", (name or "").replace("_", " "))


def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    """Format a number with ``digits`` decimals (thousands separated); missing -> ``n/a``."""
    number = to_float(value)
    return NA if number is None else f"{number:,.{digits}f}{suffix}"


def fmt_metric(name: str | None, value: Any) -> str:
    """Format a metric value: fractions as percent (1 decimal), perplexity 2, losses 3 decimals."""
    number = to_float(value)
    if number is None:
        return NA
    if is_fraction_metric(name):
        return f"{number * 100 if number <= 1 else number:.1f}"
    return f"{number:.2f}" if "perplexity" in (name or "") else f"{number:.3f}"


def metric_text(name: str | None, value: Any) -> str:
    """A metric value for prose: ``accuracy 84.0%``, ``perplexity 12.30``."""
    unit = "%" if is_fraction_metric(name) and to_float(value) is not None else ""
    return f"{metric_label(name)} {fmt_metric(name, value)}{unit}"


def metric_delta(name: str | None, new: Any, old: Any) -> str:
    """Signed difference ``new - old`` with units: ``-1.2 pts accuracy`` or ``+0.35 perplexity``."""
    a, b = to_float(new), to_float(old)
    if a is None or b is None:
        return f"unknown {metric_label(name)}"
    if is_fraction_metric(name):
        scale = 100 if max(a, b) <= 1 else 1
        return f"{(a - b) * scale:+.1f} pts {metric_label(name)}"
    return f"{a - b:+.{2 if 'perplexity' in (name or '') else 3}f} {metric_label(name)}"


def human_count(value: Any) -> str:
    """Parameter counts for humans: 4200000 -> ``4.2M``, 1.5e9 -> ``1.5B``."""
    number = to_float(value)
    if number is None:
        return NA
    for factor, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= factor:
            return f"{number / factor:.1f}{unit}"
    return f"{number:.0f}"


def cell_text(value: Any) -> str:
    """A setting for display: missing -> ``n/a``, ``8.0`` -> ``8``, anything else ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """Render a DataFrame of cells as a GitHub markdown table, padded to line up in a terminal.

    Args:
        table: cells (converted with ``str``); columns are the headers.

    Returns:
        The table text; columns whose filled cells are all numbers are right-aligned.
    """
    headers = [str(h) for h in table.columns]
    cells = [["" if v is None else str(v).replace("|", "\\|").replace("\n", " ") for v in row]
             for row in table.itertuples(index=False)]

    def numeric(i: int) -> bool:
        filled = [row[i] for row in cells if row[i] not in ("", NA) and not row[i].startswith(NOT_SCORED)]
        return bool(filled) and all(to_float(v.rstrip("x%").replace(",", "")) is not None for v in filled)

    widths = [max([len(h)] + [len(row[i]) for row in cells] + [3]) for i, h in enumerate(headers)]
    right = [numeric(i) for i in range(len(headers))]
    line = lambda vals: "| " + " | ".join(  # noqa: E731
        v.rjust(w) if r and not v.startswith(NOT_SCORED) else v.ljust(w) for v, w, r in zip(vals, widths, right)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(headers), rule] + [line(row) for row in cells])


def first_value(r: pd.Series, *keys: str):
    """The first of ``keys`` that ``r`` has a value for (metrics.json shapes differ across versions)."""
    for key in keys:
        if to_float(r.get(key)) is not None:
            return r.get(key)
    return None
