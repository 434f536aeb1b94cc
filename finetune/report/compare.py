"""Compare the jobs of a sweep (LoRA vs QLoRA, QAT targets, LoRA grids): the finetune-report command
(:mod:`finetune.cli.report`) and the Hydra callback that runs it after a sweep.

More: docs/modules.md, section ``finetune.report.compare``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.report.collect import collect_runs, ok_rows
from finetune.report.plots import write_plots
from finetune.report.format import markdown_table
from finetune.report.tables import KINDS, Comparison, compare, detect_kind

__all__ = [
    "KINDS", "Report", "build_report", "collect_runs", "detect_kind",
    "generate_report", "markdown_table",
]

MARKDOWN_FILE, CSV_FILE = "comparison.md", "comparison.csv"
_TITLES = {
    "lora_vs_qlora": "Full FT vs LoRA vs QLoRA: memory, speed and quality",
    "qat_targets": "QAT targets: full-precision vs simulated INT8 quality",
    "lora_grid": "LoRA hyper-parameter grid",
    "generic": "Sweep comparison",
}
_DEVICE_NAME_COLUMNS = ("hardware", "gpu")  # the first the runs have (runs before "hardware" name only a GPU)


@dataclass
class Report:
    """Everything one report build produced.

    Attributes:
        runs: the collected runs (as written to comparison.csv).
        comparison: the table, takeaway and notes.
        markdown: the text of comparison.md.
        paths: ``{"markdown": ..., "csv": ..., "plot": ...}`` files written.
    """

    runs: pd.DataFrame
    comparison: Comparison
    markdown: str
    paths: dict[str, Path]


def _values(df: pd.DataFrame, column: str) -> str:
    if column not in df.columns:
        return "unknown"
    values = sorted(df[column].dropna().astype(str).unique())
    return ", ".join(values) if values else "unknown"


def _hardware(df: pd.DataFrame) -> str:
    ok = ok_rows(df) if not ok_rows(df).empty else df
    names = [_values(ok, c) for c in _DEVICE_NAME_COLUMNS if c in ok.columns][:1]
    return _values(ok, "memory_device") + (f" ({names[0]})" if names else "")


def _metric_lines(comp: Comparison, ok: pd.DataFrame) -> list[str]:
    """What the rows are ranked or compared on, and whether a test score shown is a selected one."""
    if not comp.metric:
        return []
    if comp.kind == "qat_targets":  # arms in a fixed order, each paired with its seed's PTQ: nothing is selected
        return [f"- Compared on: {comp.metric} on the test split, arm by arm in a fixed order (no row is selected "
                "on it)"]
    direction = "higher" if comp.higher_is_better else "lower"
    lines = [f"- Ranked on: {comp.metric} ({direction} is better)"]
    if comp.metric.startswith("val_") or comp.metric == "eval_loss":
        lines.append("- Selected on the validation split; the test scores beside it played no part in the choice")
    elif comp.metric in ("accuracy", "f1", "perplexity"):
        validated = any(str(c).startswith("val_") and ok[c].notna().any() for c in ok.columns)
        lines.append(f"- Ranked on the test split ({comp.metric}): "
                     + ("as asked (`metric=`), though the runs have a validation score" if validated
                        else "these runs have no validation score")
                     + ", so the best row's test score is a selected, optimistic number")
    return lines


def render_markdown(df: pd.DataFrame, comp: Comparison, sweep_dir: Path, paths: dict[str, Path]) -> str:
    """The text of comparison.md.

    Args:
        df: collected runs.
        comp: the comparison to show.
        sweep_dir: the sweep directory (named in the header).
        paths: files written so far; a ``plot`` entry is embedded as an image.

    Returns:
        Markdown text ending with a newline.
    """
    ok = ok_rows(df)
    running = int((df["status"] == "running").sum())
    failed = len(df) - len(ok) - running
    dataset = _values(df, "dataset")
    extras = [v for v in (_values(df, "task"), _values(df, "data_source")) if v != "unknown"]
    lines = [
        f"# {_TITLES[comp.kind]}",
        "",
        f"- Sweep: `{sweep_dir.resolve().name}` ({len(df)} jobs: {len(ok)} ok, {failed} failed"
        + (f", {running} running" if running else "") + f"; kind `{comp.kind}`)",
        f"- Device: {_hardware(df)}",
        f"- Model: {_values(df, 'model')}",
        f"- Dataset: {dataset}" + (f" ({', '.join(extras)})" if extras else ""),
    ]
    lines += _metric_lines(comp, ok)
    lines += ["", f"**Takeaway:** {comp.takeaway}", ""]
    notes = [f"_{note}_" for note in comp.notes] + ([""] if comp.notes else [])
    if comp.summary is not None:  # the means first, with the notes that explain them, then every run
        lines += ["## Mean over seeds", "", markdown_table(comp.summary), ""] + notes + ["## Every run", ""]
        notes = []
    lines += [markdown_table(comp.table), ""] + notes
    for heading, table in comp.extra:
        lines += [f"## {heading}", "", markdown_table(table), ""]
    for key in ("plot", "plot_vs_best_ptq"):
        if key in paths:
            lines += [f"![{comp.kind}]({paths[key].name})", ""]
    lines.append(f"All columns of every job: [{CSV_FILE}]({CSV_FILE})")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    """Write atomically, so a concurrent reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy for comparison.csv: whole-number float columns (NaN-padded ints) written as integers."""
    out = df.copy()
    for column in out.columns:
        values = out[column]
        if values.dtype.kind == "f" and values.notna().any():
            filled = values.dropna()
            if (filled == filled.round()).all() and filled.abs().max() < 2**53:
                out[column] = values.astype("Int64")
    return out


def generate_report(sweep_dir: str | os.PathLike, kind: str | None = None, metric: str | None = None) -> Report:
    """Collect the runs of a sweep, compare them and write comparison.md / .csv / PNG beside them.

    Args:
        sweep_dir: the sweep directory (its job directories hold ``metrics.json``).
        kind: one of :data:`KINDS`; ``None`` detects it from what varies across jobs.
        metric: column to rank on; ``-name`` ranks lower-is-better. ``None``: accuracy, else
            perplexity, else eval_loss.

    Returns:
        The :class:`Report` (runs, comparison, markdown text, written paths).

    Raises:
        FinetuneError: missing directory, no runs, unknown kind or metric.
    """
    root = Path(sweep_dir)
    df = collect_runs(root)
    comp = compare(df, kind, metric)
    paths: dict[str, Path] = {"markdown": root / MARKDOWN_FILE, "csv": root / CSV_FILE}
    _write_text(paths["csv"], _csv_frame(df).to_csv(index=False, lineterminator="\n"))
    paths.update(write_plots(df, comp, root))
    text = render_markdown(df, comp, root, paths)
    _write_text(paths["markdown"], text)
    return Report(df, comp, text, paths)


def build_report(sweep_dir: str | os.PathLike, kind: str | None = None, metric: str | None = None) -> dict[str, Path]:
    """Write the comparison report of a sweep beside its jobs.

    Args:
        sweep_dir: the sweep directory.
        kind: ``lora_vs_qlora`` | ``qat_targets`` | ``lora_grid`` | ``generic``; ``None`` detects it.
        metric: column to rank on (``-name`` = lower is better); ``None`` picks the task default.

    Returns:
        ``{"markdown": comparison.md, "csv": comparison.csv, "plot": <png>}`` (no ``plot`` when
        no finished job has anything to draw).

    Raises:
        FinetuneError: missing directory, no runs, unknown kind or metric.
    """
    return generate_report(sweep_dir, kind, metric).paths
