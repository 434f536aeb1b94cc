"""PNG plots for the comparison report (matplotlib, Agg canvas, no pyplot global state).

Each kind gets one figure whose title states its message (the takeaway); failed jobs are left
out. Figures are drawn on ``matplotlib.figure.Figure`` with an explicit Agg canvas, so building a
report never touches the interactive backend of the calling process.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from finetune.report.collect import ok_rows
from finetune.report.format import cell_text, fmt_metric, is_fraction_metric, metric_label
from finetune.report.qat import by_scheme, low_bit_label, mean_and_se, qat_scores, replicated
from finetune.report.tables import GRID_AXES, METHOD_ORDER, TARGET_ORDER, Comparison, sort_by_order, varying_overrides

DPI = 120
_FP_COLOR, _INT8_COLOR, _BAR_COLOR, _BASE_COLOR = "#4C72B0", "#DD8452", "#4C72B0", "#55A868"
_PTQ_COLOR = "#8C8C8C"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _title(text: str, width: int = 70, lines: int = 3) -> str:
    return "\n".join(textwrap.wrap(textwrap.shorten(text, width * lines, placeholder=" …"), width))


def _axis_label(metric: str) -> str:
    name = metric_label(metric)
    if is_fraction_metric(metric):
        return f"{name.capitalize()} (%)".replace("Int8", "INT8")
    return f"{name.capitalize()} (lower is better)".replace("Int8", "INT8")


def _as_display(metric: str, values: pd.Series) -> np.ndarray:
    """Metric values on the axis scale: fractions in percent."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    if is_fraction_metric(metric) and np.nanmax(np.append(numbers, 0)) <= 1:
        return numbers * 100
    return numbers


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def _device(df: pd.DataFrame) -> str:
    if "memory_device" not in df.columns:
        return ""
    devices = sorted(ok_rows(df)["memory_device"].dropna().astype(str).unique())
    return f", {'/'.join(devices)}" if devices else ""


def plot_memory(df: pd.DataFrame, comp: Comparison, path: Path) -> Path | None:
    """Bar chart of peak memory per method (the figure ``comp`` compares: peak memory in use where every run
    reports it), each bar annotated with the ratio and the metric.

    Args:
        df: collected runs; failed ones are skipped.
        comp: the ``lora_vs_qlora`` comparison (title, metric, baseline).
        path: where to write the PNG.

    Returns:
        ``path``, or ``None`` when no finished run reports peak memory.
    """
    ok = sort_by_order(ok_rows(df), "method", METHOD_ORDER)
    column = comp.memory_column
    if column not in ok.columns:
        return None
    ok = ok[pd.to_numeric(ok[column], errors="coerce").notna()]
    if ok.empty:
        return None
    labels = [str(m) for m in ok.get("method", ok["job"]).fillna("?")]
    if len(set(labels)) < len(labels):
        labels = [f"{m} #{j}" for m, j in zip(labels, ok["job"])]
    memory = ok[column].astype(float).to_numpy()
    base = ok[ok.get("method") == comp.baseline][column].astype(float).mean() \
        if "method" in ok.columns else float("nan")
    fig = _figure(max(6.0, 1.3 * len(ok) + 2.5), 4.8)
    ax = fig.add_subplot()
    colors = [_BASE_COLOR if m == comp.baseline else _BAR_COLOR for m in ok.get("method", [None] * len(ok))]
    bars = ax.bar(labels, memory, color=colors, width=0.6)
    for bar, (_, r) in zip(bars, ok.iterrows()):
        lines = [f"{bar.get_height():,.0f} MB"]
        if base == base and base > 0:
            lines.append(f"{bar.get_height() / base:.2f}x")
        if comp.metric:
            unit = "%" if is_fraction_metric(comp.metric) else ""
            lines.append(f"{metric_label(comp.metric)} {fmt_metric(comp.metric, r.get(comp.metric))}{unit}")
        ax.annotate("\n".join(lines), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, memory.max() * 1.3)
    ax.set_ylabel(f"{'Peak memory in use' if column == 'peak_in_use_mb' else 'Peak memory'} (MB{_device(df)})")
    ax.set_xlabel(f"Method (green = {comp.baseline}, the 1.00x reference)")
    ax.set_title(_title(comp.takeaway), fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)


def plot_qat(df: pd.DataFrame, comp: Comparison, path: Path) -> Path | None:
    """Grouped bars per QAT target set: full precision, simulated INT-n, and INT-n of the no-QAT run (PTQ).

    With one run per target set each bar is that run (its PTQ bar: the no-QAT run of the same seed). With
    several seeds each bar is the mean over them, with a standard-error whisker, and every seed's own value
    is drawn as a dot on its bar.

    Args:
        df: collected runs; failed ones are skipped.
        comp: the ``qat_targets`` comparison (its metric is ``accuracy`` or ``perplexity``).
        path: where to write the PNG.

    Returns:
        ``path``, or ``None`` when no finished run has the fp metric.
    """
    fp = comp.metric
    if not fp or fp not in ok_rows(df).columns:
        return None
    generation = not is_fraction_metric(fp)
    ordered = sort_by_order(df, "qat_targets", TARGET_ORDER)
    scores = by_scheme(ordered, qat_scores(ordered, generation), TARGET_ORDER)[0].dropna(subset=["fp"])
    if scores.empty:
        return None
    low = low_bit_label(df)
    bars = (("fp", "full precision", _FP_COLOR), ("q", f"simulated {low} (this run)", _INT8_COLOR),
            ("ptq", f"{low} of the no-QAT run, same targets and seed (PTQ)", _PTQ_COLOR))
    if replicated(scores):
        groups = list(scores.groupby("targets", sort=False))
        labels = [f"{t}\n({len(g)} seeds)" for t, g in groups]
        stats = {c: np.array([mean_and_se(g[c]) for _, g in groups]).reshape(-1, 2) for c, _, _ in bars}
        dots = {c: [g[c].to_numpy(dtype=float) for _, g in groups] for c, _, _ in bars}
        title = f"Mean over {scores['seed'].astype(str).nunique()} seeds (whiskers: 1 standard error; dots: seeds)"
    else:
        labels = list(scores["targets"])
        if len(set(labels)) < len(labels):
            labels = [f"{t} #{j}" for t, j in zip(labels, ok_rows(df).loc[scores.index, "job"])]
        stats = {c: np.column_stack([scores[c].to_numpy(dtype=float), np.full(len(scores), np.nan)])
                 for c, _, _ in bars}
        dots, title = None, comp.takeaway
    x = np.arange(len(labels))
    fig = _figure(max(6.5, 1.8 * len(labels) + 2.5), 4.8)
    ax = fig.add_subplot()
    w = 0.27
    digits = 2 if generation else 1
    for k, (column, name, color) in enumerate(bars):
        mean, se = stats[column][:, 0], stats[column][:, 1]
        if column == "ptq" and np.all(np.isnan(mean)):
            continue
        offset, drawn = (k - 1) * w, ~np.isnan(mean)
        ax.bar(x[drawn] + offset, mean[drawn], w, label=name, color=color,
               yerr=None if np.all(np.isnan(se[drawn])) else np.nan_to_num(se[drawn]), capsize=3,
               error_kw={"elinewidth": 1})
        for i, v in enumerate(mean):
            if v == v:
                ax.annotate(f"{v:.{digits}f}", (i + offset, v), xytext=(-8 if dots else 0, 2),
                            textcoords="offset points", ha="right" if dots else "center", va="bottom", fontsize=8)
            if dots:
                ys = dots[column][i][~np.isnan(dots[column][i])]
                ax.scatter(np.full(len(ys), i + offset), ys, s=9, color="black", zorder=3, linewidths=0)
    top = np.nanmax(np.concatenate([scores[c].to_numpy(dtype=float) for c, _, _ in bars]))
    ax.set_ylim(0, top * 1.3)
    if not generation and top <= 100:
        ax.set_yticks(range(0, 101, 20))
    ax.set_xticks(x, labels)
    ax.set_xlabel("QAT targets (sub-layers fake-quantized during training)")
    ax.set_ylabel(_axis_label(fp))
    ax.set_title(_title(title), fontsize=11)
    ax.legend(loc="upper right", ncol=2, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)


def plot_vs_best_ptq(df: pd.DataFrame, comp: Comparison, path: Path) -> Path | None:
    """Each QAT arm's simulated low-bit score minus the strongest post-training baseline of its own seed on the same
    targets (round-to-nearest or one of ``qat.baselines``): a dot per seed, the mean with a standard-error whisker,
    and a line at zero. Drawn only where the no-QAT runs scored ``qat.baselines`` (else the QAT plot says it all).

    Returns:
        ``path``, or ``None`` when there is nothing to pair.
    """
    fp = comp.metric
    ok = ok_rows(df)
    if not fp or fp not in ok.columns or not any(str(c).startswith("ptq_baselines.") for c in ok.columns):
        return None
    generation = not is_fraction_metric(fp)
    ordered = sort_by_order(df, "qat_targets", TARGET_ORDER)
    scores = by_scheme(ordered, qat_scores(ordered, generation), TARGET_ORDER)[0].dropna(subset=["vs_best"])
    if scores.empty:
        return None
    groups = list(scores.groupby("targets", sort=False))
    fig = _figure(7.5, 2.0 + 0.6 * len(groups))
    ax = fig.add_subplot()
    for i, (_, group) in enumerate(groups):
        values = group["vs_best"].to_numpy(dtype=float)
        mean, se = mean_and_se(group["vs_best"])
        ax.errorbar([mean], [i], xerr=None if se != se else [se], fmt="o", color=_INT8_COLOR, capsize=4,
                    markersize=7, zorder=3)
        ax.scatter(values, np.full(len(values), i + 0.18), s=12, color="black", zorder=4, linewidths=0)
        ax.annotate(f"{mean:+.{2 if generation else 1}f}", (mean, i), xytext=(0, 7), textcoords="offset points",
                    ha="center", fontsize=8)
    ax.axvline(0, color=_PTQ_COLOR, linewidth=1)
    ax.set_yticks(range(len(groups)), [f"{t} ({len(g)})" for t, g in groups])
    ax.set_ylim(len(groups) - 0.5, -0.7)
    low = low_bit_label(df)
    unit = "perplexity; < 0: QAT better" if generation else "points; > 0: QAT better"
    ax.set_xlabel(_title(f"simulated {low} minus the strongest PTQ baseline of the same seed ({unit})"))
    seeds = scores["seed"].astype(str).nunique()
    ax.set_title(_title(f"QAT vs the strongest PTQ baseline, {seeds} seed{'s' if seeds > 1 else ''}: mean ± 1 SE, "
                        "dots: seeds"), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)


def plot_grid(df: pd.DataFrame, comp: Comparison, path: Path) -> Path | None:
    """Heatmaps of the metric over LoRA rank x alpha, one panel per dropout, cells annotated.

    When other settings vary too (learning rate, targets, seed) each cell shows the best run.

    Args:
        df: collected runs; failed ones are skipped.
        comp: the ``lora_grid`` comparison (metric and direction).
        path: where to write the PNG.

    Returns:
        ``path``, or ``None`` when there is no metric or no rank/alpha values.
    """
    metric = comp.metric
    ok = ok_rows(df)
    if not metric or any(c not in ok.columns for c in GRID_AXES[:2]):
        return None
    data = ok.assign(_v=_as_display(metric, ok[metric]))
    data = data[data["_v"].notna() & data["lora.r"].notna() & data["lora.alpha"].notna()]
    if data.empty:
        return None
    if "lora.dropout" not in data.columns:
        data = data.assign(**{"lora.dropout": "n/a"})
    dropouts = sorted(data["lora.dropout"].dropna().unique(), key=str)
    ranks = sorted(data["lora.r"].unique())
    alphas = sorted(data["lora.alpha"].unique())
    agg = "max" if comp.higher_is_better else "min"
    values = data["_v"]
    vmin, vmax = float(values.min()), float(values.max())
    if vmin == vmax:
        vmin, vmax = vmin - 1e-9, vmax + 1e-9
    cmap = "viridis" if comp.higher_is_better else "viridis_r"
    fig = _figure(1.6 + 3.4 * len(dropouts), 2.4 + 0.8 * len(ranks))
    axes = fig.subplots(1, len(dropouts), squeeze=False)[0]
    best_value = values.max() if comp.higher_is_better else values.min()
    image = None
    for ax, dropout in zip(axes, dropouts):
        cell = data[data["lora.dropout"] == dropout].pivot_table(
            index="lora.r", columns="lora.alpha", values="_v", aggfunc=agg).reindex(index=ranks, columns=alphas)
        image = ax.imshow(cell.to_numpy(dtype=float), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for i in range(len(ranks)):
            for j in range(len(alphas)):
                v = cell.iat[i, j]
                if v != v:
                    ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="grey")
                    continue
                shade = (v - vmin) / (vmax - vmin)
                dark = shade < 0.6 if comp.higher_is_better else shade > 0.4
                star = " *" if v == best_value else ""
                ax.text(j, i, f"{v:.{1 if is_fraction_metric(metric) else 2}f}{star}", ha="center",
                        va="center", fontsize=9, color="white" if dark else "black",
                        fontweight="bold" if star else "normal")
        ax.set_xticks(range(len(alphas)), [cell_text(a) for a in alphas])
        ax.set_yticks(range(len(ranks)), [cell_text(r) for r in ranks])
        ax.set_xlabel("LoRA alpha")
        ax.set_ylabel("LoRA rank r")
        ax.set_title(f"dropout = {cell_text(dropout)}", fontsize=10)
    extra = [c for c in ("lr", "lora.target_modules", "seed") if c in data and data[c].nunique() > 1]
    note = f" (best over {', '.join(extra)}; * = best)" if extra else " (* = best)"
    fig.colorbar(image, ax=list(axes), label=_axis_label(metric), shrink=0.9)
    fig.suptitle(_title(comp.takeaway + note, 30 + 25 * len(dropouts)), fontsize=11)
    return _save(fig, path)


def plot_generic(df: pd.DataFrame, comp: Comparison, path: Path) -> Path | None:
    """Bar chart of the main metric per job (generic sweeps).

    Args:
        df: collected runs; failed ones are skipped.
        comp: the ``generic`` comparison.
        path: where to write the PNG.

    Returns:
        ``path``, or ``None`` when no finished run reports the metric.
    """
    metric = comp.metric
    ok = ok_rows(df)
    if not metric or metric not in ok.columns:
        return None
    ok = ok[pd.to_numeric(ok[metric], errors="coerce").notna()]
    if ok.empty:
        return None
    values = _as_display(metric, ok[metric])
    label = dict(zip(df.index, varying_overrides(df["overrides"])))
    labels = [textwrap.shorten(f"{j}: {label[i]}", 40) for i, j in zip(ok.index, ok["job"])]
    fig = _figure(7.5, 1.2 + 0.45 * len(ok))
    ax = fig.add_subplot()
    bars = ax.barh(labels, values, color=_BAR_COLOR)
    ax.bar_label(bars, [f"{v:.{1 if is_fraction_metric(metric) else 2}f}" for v in values], fontsize=8, padding=2)
    ax.invert_yaxis()
    ax.set_xlim(0, np.nanmax(values) * 1.15)
    ax.set_xlabel(_axis_label(metric))
    ax.set_ylabel("Job: overrides")
    ax.set_title(_title(comp.takeaway), fontsize=11)
    return _save(fig, path)


_PLOTS = {"lora_vs_qlora": ("memory_by_method.png", plot_memory), "qat_targets": ("qat_int8.png", plot_qat),
          "lora_grid": ("lora_grid_heatmap.png", plot_grid), "generic": ("metric_by_job.png", plot_generic)}


def write_plots(df: pd.DataFrame, comp: Comparison, out_dir: Path) -> dict[str, Path]:
    """Draw the plot(s) for ``comp.kind`` into ``out_dir``.

    Args:
        df: collected runs.
        comp: the comparison the plot illustrates.
        out_dir: folder for the PNG files.

    Returns:
        ``{"plot": path}`` (and ``"plot_vs_best_ptq"`` for a QAT sweep whose no-QAT runs scored PTQ baselines)
        for each file written (empty when there was nothing to draw).
    """
    name, draw = _PLOTS[comp.kind]
    written = {"plot": draw(df, comp, Path(out_dir) / name)}
    if comp.kind == "qat_targets":
        written["plot_vs_best_ptq"] = plot_vs_best_ptq(df, comp, Path(out_dir) / "qat_vs_best_ptq.png")
    return {key: path for key, path in written.items() if path}
