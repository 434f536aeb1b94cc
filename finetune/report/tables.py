"""Turn collected runs into a comparison: the sweep kind, the display table and a one-line takeaway.

Every kind (``lora_vs_qlora``, ``qat_targets``, ``lora_grid``, ``generic``) produces a
:class:`Comparison`: a DataFrame of display strings (what comparison.md shows) plus a takeaway
computed from the numbers. Accuracy-like metrics stored as fractions are shown in percent and
their differences in percentage points ("pts").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from finetune.config import QAT_TARGETS, QUANT_MODES
from finetune.errors import FinetuneError
from finetune.report.collect import ok_rows, varies
from finetune.report.qat import (best_ptq_known, by_scheme as by_scheme_scores, low_bit_label,
                                 ptq_baselines_table, qat_scores, score_cell, targets_takeaway)
from finetune.report.format import (
    NA, cell_text, first_value, to_float, fmt, fmt_metric, human_count, is_fraction_metric, metric_delta,
    metric_label, metric_text,
)

KINDS = ("lora_vs_qlora", "qat_targets", "lora_grid", "generic")
METHOD_ORDER = ("full", "lora", "dora", *(f"q{m}-{q}" for q in QUANT_MODES if q != "none" for m in ("lora", "dora")))
TARGET_ORDER = ("none", *QAT_TARGETS, "+".join(QAT_TARGETS))
GRID_AXES = ("lora.r", "lora.alpha", "lora.dropout")
_LOWER_BETTER = ("loss", "perplexity", "ppl", "runtime", "memory", "_mb")


@dataclass
class Comparison:
    """A rendered comparison of one sweep.

    Attributes:
        kind: the sweep kind the table follows.
        metric: the column ranked on (``None`` when the runs report no metric).
        higher_is_better: direction of ``metric``.
        table: display strings, one row per job, columns = table headers.
        takeaway: one line stating the main result, computed from the data.
        notes: extra lines for comparison.md (e.g. which run the ratios are relative to).
        baseline: the method ratios are relative to (``lora_vs_qlora`` only).
        memory_column: the figure its memory ratios compare (``lora_vs_qlora`` only; :func:`memory_column`).
        summary: means over seeds, one row per setting, shown before ``table`` (``qat_targets`` run over
            several seeds only).
        extra: further ``(heading, table)`` pairs (the PTQ baselines a QAT sweep's no-QAT runs scored).
    """

    kind: str
    metric: str | None
    higher_is_better: bool
    table: pd.DataFrame
    takeaway: str
    notes: list[str] = field(default_factory=list)
    baseline: str | None = None
    summary: pd.DataFrame | None = None
    memory_column: str = "peak_memory_mb"
    extra: list = field(default_factory=list)  # (heading, table) pairs shown after every run's row


def memory_column(ok: pd.DataFrame) -> str:
    """The memory figure that compares methods across the finished runs ``ok``: ``peak_in_use_mb`` where every one
    reports it, else ``peak_memory_mb``.

    On a CPU the peak resident set also counts the free memory glibc's allocator keeps, which differs between
    identical runs (3.3 or 4.4 GB for the same training, see docs/measurements/memory.md); the peak in use does not. On a GPU both are
    ``max_memory_allocated``. Runs from before ``peak_in_use_mb`` existed compare on ``peak_memory_mb``.
    """
    if not ok.empty and "peak_in_use_mb" in ok.columns and \
            pd.to_numeric(ok["peak_in_use_mb"], errors="coerce").notna().all():
        return "peak_in_use_mb"
    return "peak_memory_mb"


MEMORY_WORDS = {"peak_in_use_mb": ("In use", "peak memory in use"), "peak_memory_mb": ("Memory", "peak memory")}


def resolve_metric(df: pd.DataFrame, metric: str | None = None) -> tuple[str | None, bool]:
    """Pick the column to rank runs on and its direction.

    Args:
        df: collected runs.
        metric: explicit column name; a leading ``-`` means lower is better (``-perplexity``),
            a leading ``+`` higher is better; otherwise the direction follows the name
            (losses, perplexity, time and memory: lower is better).

    Returns:
        ``(column, higher_is_better)``; the column is ``None`` when no default metric exists.
        Defaults select on the validation split: ``val_accuracy`` (classification), else ``eval_loss`` (the
        validation loss, generation); classification runs recorded before validation scoring existed fall back
        to ``accuracy`` (test), and runs without a validation loss to ``perplexity``.

    Raises:
        FinetuneError: an explicit ``metric`` is not a numeric column of the runs.
    """
    if metric:
        name = metric.lstrip("+-")
        values = pd.to_numeric(df[name], errors="coerce") if name in df.columns else None
        if values is None or values.isna().all():
            numeric = sorted(c for c in df.columns if c not in ("job", "run_dir", "seed")
                             and pd.to_numeric(df[c], errors="coerce").notna().any())
            raise FinetuneError(f"metric '{name}' not found in the runs; numeric columns: {', '.join(numeric)}")
        if metric[0] in "+-":
            return name, metric[0] == "+"
        lower = any(token in name for token in _LOWER_BETTER) or (name.endswith("_s") and "per_s" not in name)
        return name, not lower
    for name, higher in (("val_accuracy", True), ("accuracy", True), ("eval_loss", False), ("perplexity", False)):
        if name in df.columns and pd.to_numeric(ok_rows(df)[name], errors="coerce").notna().any():
            return name, higher
    return None, True


def detect_kind(df: pd.DataFrame, kind: str | None = None) -> str:
    """Decide which comparison a sweep is, from what varies across its jobs.

    Methods or quantization vary -> ``lora_vs_qlora``; QAT targets vary -> ``qat_targets``;
    LoRA rank / alpha / dropout vary -> ``lora_grid``; nothing varies but the runs were scored under simulated
    INT-n inference -> ``qat_targets``; anything else -> ``generic``.

    Args:
        df: collected runs (failed jobs count: their overrides tell what they varied).
        kind: an explicit kind, returned after validation.

    Returns:
        One of :data:`KINDS`.

    Raises:
        FinetuneError: ``kind`` is not one of :data:`KINDS`.
    """
    if kind is not None:
        if kind not in KINDS:
            raise FinetuneError(f"unknown report kind '{kind}'; choose one of: {', '.join(KINDS)}")
        return kind
    if varies(df, "method") or varies(df, "quantization"):
        return "lora_vs_qlora"
    if varies(df, "qat_targets"):
        return "qat_targets"
    if any(varies(df, c) for c in GRID_AXES):
        return "lora_grid"
    if "qat_targets" in df.columns and (_has(df, "accuracy_int8") or _has(df, "perplexity_int8")):
        return "qat_targets"  # e.g. one target set tried at other bits: still fp vs INT-n per target
    return "generic"


def _has(df: pd.DataFrame, column: str) -> bool:
    """Whether any finished run has a numeric value in ``column``."""
    return column in df.columns and pd.to_numeric(ok_rows(df)[column], errors="coerce").notna().any()


def _failed_cell(row: pd.Series) -> str:
    error = row.get("error")
    lines = error.strip().splitlines() if isinstance(error, str) else []
    text = lines[0] if lines else "unknown error"
    if row.get("status") == "running":
        return text
    return "failed: " + (text if len(text) <= 120 else text[:117] + "...")


def _labels(rows: pd.DataFrame, column: str, within: tuple[str, ...] = ()) -> list[str]:
    """Row labels from ``column``; a label repeated with the same ``within`` values gets its job number appended."""
    base = rows[column].fillna("?").astype(str) if column in rows else pd.Series(["?"] * len(rows), index=rows.index)
    dup = pd.concat([base] + [rows[c].astype(str) for c in within], axis=1).duplicated(keep=False)
    return [f"{b} #{j}" if d else b for b, d, j in zip(base, dup, rows["job"])]


def sort_by_order(df: pd.DataFrame, column: str, order: tuple[str, ...]) -> pd.DataFrame:
    """Rows ordered by ``order`` on ``column`` (unknown values after, alphabetically; stable)."""
    if column not in df.columns:
        return df
    def rank(v: Any) -> str:
        v = v if isinstance(v, str) else "~"
        return f"{order.index(v):03d}" if v in order else f"{len(order):03d}{v}"
    return df.assign(_rank=df[column].map(rank)).sort_values("_rank", kind="stable").drop(columns="_rank")


def _task_metrics(df: pd.DataFrame, metric: str | None) -> list[str]:
    ok = ok_rows(df)
    has = [c for c in ("accuracy", "f1", "perplexity", "eval_loss") if c in ok and ok[c].notna().any()]
    chosen = [c for c in has if c in ("accuracy", "f1")] or [c for c in has if c in ("perplexity", "eval_loss")]
    if metric and metric not in chosen:
        chosen.append(metric)
    return chosen


def _headed(name: str) -> str:
    return metric_label(name).capitalize().replace("Int8", "INT8") + (" (%)" if is_fraction_metric(name) else "")


def _table(rows: list[list[str]], headers: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=headers, dtype=object)


def _lora_vs_qlora(df: pd.DataFrame, metric: str | None, higher: bool) -> Comparison:
    df = sort_by_order(df, "method", METHOD_ORDER)
    if "method" not in df.columns:
        df = df.assign(method=None)
    ok = ok_rows(df)
    notes: list[str] = []
    base, base_rows = "lora", ok[ok["method"] == "lora"]
    if base_rows.empty and not ok.empty:
        base_rows = ok.iloc[:1]
        base = cell_text(base_rows["method"].iloc[0])
        notes.append(f"No finished lora run: ratios are relative to {base}, the first finished run.")

    def mean(col: str | None) -> float | None:
        if not col or col not in base_rows.columns:
            return None
        return to_float(pd.to_numeric(base_rows[col], errors="coerce").mean())

    memory = memory_column(ok)
    short, words = MEMORY_WORDS[memory]
    if memory == "peak_in_use_mb":
        notes.append("Memory ratios compare the peak memory in use (the allocator's bytes handed out; on a GPU "
                     "max_memory_allocated), not the CPU peak resident set, which also counts the free memory the "
                     "allocator keeps and differs between identical runs.")
    base_mem, base_tps = mean(memory), mean("train_tokens_per_s")
    ratio = lambda v, b: NA if to_float(v) is None or not b else f"{to_float(v) / b:.2f}x"  # noqa: E731
    metrics = _task_metrics(df, metric)
    headers = ["Method", "Peak memory (MB)", "Peak in use (MB)", f"{short} vs {base} (x)", "Weights (MB)",
               "Train time (s)", "Tokens/s", f"Tokens/s vs {base} (x)"] + [_headed(m) for m in metrics] + [
        "Trainable params", "Trainable %"]
    rows = []
    for label, (_, r) in zip(_labels(df, "method"), df.iterrows()):
        if r["status"] != "ok":
            rows.append([label, _failed_cell(r)] + [""] * (len(headers) - 2))
            continue
        rows.append([label, fmt(r.get("peak_memory_mb"), 0), fmt(r.get("peak_in_use_mb"), 0),
                     ratio(r.get(memory), base_mem), fmt(r.get("model_memory_mb"), 0),
                     fmt(r.get("train_runtime_s"), 1), fmt(r.get("train_tokens_per_s"), 0),
                     ratio(r.get("train_tokens_per_s"), base_tps)]
                    + [fmt_metric(m, r.get(m)) for m in metrics]
                    + [f"{human_count(r.get('trainable_params'))} / {human_count(r.get('total_params'))}",
                       fmt(r.get("trainable_pct"), 2, "%")])
    others = ok.drop(index=base_rows.index)
    if memory in others.columns:
        others = others[pd.to_numeric(others[memory], errors="coerce").notna()]
    if ok.empty:
        takeaway = "No job finished; nothing to compare."
    elif others.empty or base_mem is None:
        takeaway = f"Only {base} has usable results; nothing to compare against."
    else:
        best = others.loc[pd.to_numeric(others[memory]).idxmin()]
        takeaway = (f"{best['method']} uses {float(best[memory]) / base_mem:.2f}x the {words} of {base}"
                    + (f" at {metric_delta(metric, best.get(metric), mean(metric))}" if metric else ""))
        if base_tps and to_float(best.get("train_tokens_per_s")):
            takeaway += f" and {best['train_tokens_per_s'] / base_tps:.2f}x its tokens/s"
    return Comparison("lora_vs_qlora", metric, higher, _table(rows, headers), takeaway, notes, base,
                      memory_column=memory)


def _qat_rows(df: pd.DataFrame, scores: pd.DataFrame, sort_keys: list[str], by_scheme: bool, by_seed: bool,
              columns: list[str], width: int, generation: bool) -> tuple[list[list[str]], dict]:
    """The QAT table's rows (a failed job: its error) and each job's label (``W8A8 ffn`` per scheme)."""
    rows, label_of = [], {}
    for label, (index, r) in zip(_labels(df, "qat_targets", within=tuple(sort_keys)), df.iterrows()):
        scheme = str(r["int8_scheme"]).upper() if isinstance(r.get("int8_scheme"), str) else "?"  # "?": not yet known
        label_of[index] = f"{scheme} {label}" if by_scheme else label
        cells = ([scheme] if by_scheme else []) + [label] \
            + ([cell_text(r.get("seed"))] if by_seed else [])
        if r["status"] != "ok":
            rows.append(cells + [_failed_cell(r)] + [""] * (width - len(cells) - 1))
            continue
        s = scores.loc[index]
        rows.append(cells + [score_cell(s, c, generation) for c in columns]
                    + [fmt(r.get(f"qat.snr_db.{g}"), 1) for g in QAT_TARGETS]
                    + [fmt(first_value(r, "qat.num_quantized_modules.total", "qat.num_quantized_modules"), 0)])
    return rows, label_of


def _qat_targets(df: pd.DataFrame, metric: str | None, higher: bool) -> Comparison:
    # A sweep over deployment schemes (qat.scheme: w8a8, w4a8, ...) compares targets within each scheme: every
    # table row, mean and takeaway is per scheme ("W8A8 ffn"), never pooled across schemes.
    by_scheme = varies(df, "int8_scheme")
    sort_keys = (["int8_scheme"] if by_scheme else []) + (["seed"] if varies(df, "seed") else [])
    df = sort_by_order(df.sort_values(sort_keys, kind="stable") if sort_keys else df, "qat_targets", TARGET_ORDER)
    if by_scheme:
        df = df.sort_values("int8_scheme", kind="stable", key=lambda c: c.astype(str))
    generation = "perplexity" in (metric or "") or (not _has(df, "accuracy") and _has(df, "perplexity"))
    fp = "perplexity" if generation else "accuracy"
    low = low_bit_label(df)
    scores, order = by_scheme_scores(df, qat_scores(df, generation), TARGET_ORDER)
    by_seed = "seed" in sort_keys
    if generation:
        metric_heads = ["Perplexity", f"{low} perplexity", f"{low} increase (ppl)", f"PTQ {low} perplexity",
                        "QAT vs PTQ (ppl)"]
        columns = ["fp", "q", "gap", "ptq", "vs_ptq"]
    else:
        metric_heads = ["Accuracy (%)", f"{low} accuracy (%)", f"{low} drop (pts)", f"PTQ {low} accuracy (%)",
                        "QAT vs PTQ (pts)", "F1 (%)", f"{low} F1 (%)", f"PTQ {low} F1 (%)", "QAT vs PTQ F1 (pts)"]
        columns = ["fp", "q", "gap", "ptq", "vs_ptq", "f1", "f1_q", "ptq_f1", "vs_ptq_f1"]
    if best_ptq_known(scores):  # the strongest baseline of the run's seed, chosen on validation where recorded
        unit = "ppl" if generation else "pts"
        metric_heads += [f"Best PTQ {low} ({'perplexity' if generation else 'accuracy, %'})",
                         f"QAT vs best PTQ ({unit})"]
        columns += ["best", "vs_best"]
    lead = (["Scheme"] if by_scheme else []) + ["Targets"] + (["Seed"] if by_seed else [])
    headers = lead + metric_heads + [f"SNR {g} (dB)" for g in QAT_TARGETS] + ["Modules quantized"]
    rows, label_of = _qat_rows(df, scores, sort_keys, by_scheme, by_seed, columns, len(headers), generation)
    takeaway, notes, summary = targets_takeaway(df, scores, label_of, order, low, generation, by_scheme)
    baselines = ptq_baselines_table(df, generation)
    extra = [] if baselines is None else [(f"PTQ baselines ({low}, calibrated on training rows)", baselines)]
    return Comparison("qat_targets", fp, not generation, _table(rows, headers), takeaway, notes, summary=summary,
                      extra=extra)


def _setting(r: pd.Series, axes: list[str]) -> str:
    return ", ".join(f"{c.split('.')[-1]}={cell_text(r.get(c))}" for c in axes)


def _lora_grid(df: pd.DataFrame, metric: str | None, higher: bool) -> Comparison:
    axes = list(GRID_AXES) + [c for c in ("lr", "lora.target_modules", "seed") if varies(df, c)]
    show_loss = metric != "eval_loss"
    # Selected on a validation score: its test counterpart is shown beside it (reported, not selected on).
    test = [metric[len("val_"):]] if metric and metric.startswith("val_") and _has(df, metric[len("val_"):]) else []
    headers = ["r", "alpha", "dropout"] + [c.split(".")[-1].replace("_", " ") for c in axes[3:]] \
        + ([_headed(metric)] if metric else []) + [_headed(m) for m in test] + (["Eval loss"] if show_loss else []) \
        + ["Train time (s)"]
    ok, failed = ok_rows(df), df[df["status"] != "ok"]
    if metric:
        ok = ok.assign(_m=pd.to_numeric(ok[metric], errors="coerce")).sort_values(
            "_m", ascending=not higher, na_position="last", kind="stable").drop(columns="_m")
    rows = []
    for _, r in pd.concat([ok, failed]).iterrows():
        cells = [cell_text(r.get(c)) for c in axes]
        if r["status"] != "ok":
            rows.append(cells + [_failed_cell(r)] + [""] * (len(headers) - len(cells) - 1))
            continue
        rows.append(cells + ([fmt_metric(metric, r.get(metric))] if metric else []) + [fmt_metric(m, r.get(m)) for m in test]
                    + ([fmt_metric("eval_loss", r.get("eval_loss"))] if show_loss else [])
                    + [fmt(r.get("train_runtime_s"), 1)])
    scored = ok[pd.to_numeric(ok[metric], errors="coerce").notna()] if metric else ok.iloc[0:0]
    if scored.empty:
        takeaway = "No finished run reports a metric; nothing to rank."
    else:
        best, worst = scored.iloc[0], scored.iloc[-1]
        takeaway = f"Best: {_setting(best, axes)} -> {metric_text(metric, best[metric])}"
        if len(scored) > 1:
            takeaway += (f" ({metric_delta(metric, best[metric], worst[metric]).rsplit(' ', 1)[0]}"
                         f" vs the worst, {_setting(worst, axes)})")
    return Comparison("lora_grid", metric, higher, _table(rows, headers), takeaway)


def varying_overrides(overrides: pd.Series) -> list[str]:
    """Each job's overrides less those every job shares (the part that tells the jobs apart); ``same overrides``
    where nothing differs, ``defaults`` where a job has none."""
    split = [str(o or "").split() for o in overrides]
    shared = set.intersection(*(set(s) for s in split)) if len(split) > 1 else set()
    out = [" ".join(o for o in s if o not in shared) for s in split]
    return [text or ("same overrides" if s else "defaults") for text, s in zip(out, split)]


def _generic(df: pd.DataFrame, metric: str | None, higher: bool) -> Comparison:
    metrics = _task_metrics(df, metric)
    headers = ["Job", "Overrides", "Method", "Status"] + [_headed(m) for m in metrics] \
        + ["Peak memory (MB)", "Train time (s)"]
    rows = []
    for _, r in df.iterrows():
        lead = [str(r["job"]), str(r.get("overrides") or "(defaults)"), str(r.get("method") or NA)]
        if r["status"] != "ok":
            rows.append(lead + [_failed_cell(r)] + [""] * (len(headers) - 4))
            continue
        rows.append(lead + ["ok"] + [fmt_metric(m, r.get(m)) for m in metrics]
                    + [fmt(r.get("peak_memory_mb"), 0), fmt(r.get("train_runtime_s"), 1)])
    ok = ok_rows(df)
    scored = ok[pd.to_numeric(ok[metric], errors="coerce").notna()] if metric else ok.iloc[0:0]
    if scored.empty:
        takeaway = f"{len(ok)} of {len(df)} jobs finished; none reports a metric."
    else:
        values = pd.to_numeric(scored[metric])
        label = dict(zip(df.index, varying_overrides(df.get("overrides", pd.Series([""] * len(df), df.index)))))
        best = values.idxmax() if higher else values.idxmin()
        takeaway = (f"Best of {len(scored)} runs: job {scored.loc[best, 'job']} ({label[best]})"
                    f" with {metric_text(metric, scored.loc[best, metric])}")
    return Comparison("generic", metric, higher, _table(rows, headers), takeaway)


_BUILDERS = {"lora_vs_qlora": _lora_vs_qlora, "qat_targets": _qat_targets,
             "lora_grid": _lora_grid, "generic": _generic}


def compare(df: pd.DataFrame, kind: str | None = None, metric: str | None = None) -> Comparison:
    """Build the comparison table and takeaway for collected runs.

    Args:
        df: output of :func:`finetune.report.collect.collect_runs`.
        kind: one of :data:`KINDS`; ``None`` detects it with :func:`detect_kind`.
        metric: column to rank on (see :func:`resolve_metric`); ``None`` picks the task default.

    Returns:
        The :class:`Comparison`.

    Raises:
        FinetuneError: unknown ``kind`` or ``metric``.
    """
    kind = detect_kind(df, kind)
    name, higher = resolve_metric(df, metric)
    return _BUILDERS[kind](df, name, higher)
