"""QAT against post-training quantization, run by run and over seeds: the numbers behind the QAT report.

A QAT run is scored under simulated INT-n inference on its own targets (``accuracy_int8`` / ``f1_int8`` or
``perplexity_int8``). Its baseline is post-training quantization (PTQ): the run *without* QAT, trained with the
same settings and seed, scored the same way on the same targets (``accuracy_int8_attn``, ``..._ffn`` and, for
attn+ffn, ``accuracy_int8``; see :mod:`finetune.int8_eval`). When a sweep repeats the comparison over seeds, each
QAT run is paired with the no-QAT run of its own seed, and the summary states the mean paired difference with
its standard error and how many seeds QAT won: one seed of a short run is mostly noise.
"""

from __future__ import annotations

import math

import pandas as pd

from finetune.report_collect import ok_rows, varies
from finetune.report_format import to_float

# Where a no-QAT run keeps its post-training-quantization score for each target set (finetune.int8_eval).
PTQ_SUFFIX = {"attn": "_attn", "ffn": "_ffn", "attn+ffn": ""}
# Settings a QAT run shares with its PTQ baseline whenever they vary across the sweep (seed above all: a
# seed also picks the training and test rows, so runs of different seeds are not comparable one to one).
PAIR_KEYS = ("seed", "model", "dataset", "quantization", "lr", "lora.r", "lora.alpha", "lora.dropout",
             "lora.target_modules", "int8_eval_bits", "n_train", "n_test")


def low_bit_label(df: pd.DataFrame) -> str:
    """``INT8``, or ``INT4`` etc. when the sweep simulated another activation width (``qat.eval_bits``)."""
    col = df["int8_eval_bits"] if "int8_eval_bits" in df.columns else pd.Series(dtype=float)
    bits = {int(b) for b in pd.to_numeric(col, errors="coerce").dropna()}
    return f"INT{bits.pop()}" if len(bits) == 1 else "INT8" if not bits else "INT<n>"


def ptq_baseline(df: pd.DataFrame, row: pd.Series) -> pd.Series | None:
    """The finished no-QAT run that ``row`` is compared with: the first one that matches it on every
    :data:`PAIR_KEYS` setting that varies across the sweep; ``None`` when there is none."""
    ok = ok_rows(df)
    if "qat_targets" not in ok.columns:
        return None
    pool = ok[ok["qat_targets"].astype(str) == "none"]
    for key in PAIR_KEYS:
        if varies(ok, key):
            pool = pool[pool[key].astype(str) == str(row.get(key))]
    return pool.iloc[0] if len(pool) else None


def ptq_score(df: pd.DataFrame, row: pd.Series, key: str) -> float | None:
    """The PTQ score ``key`` (``accuracy_int8``, ``f1_int8``, ``perplexity_int8``) for the targets of QAT run
    ``row``: its baseline's score on the same target set; ``None`` for a no-QAT row or a missing baseline."""
    label = str(row.get("qat_targets"))
    if label not in PTQ_SUFFIX:
        return None
    base = ptq_baseline(df, row)
    return None if base is None else to_float(base.get(key + PTQ_SUFFIX[label]))


def qat_scores(df: pd.DataFrame, generation: bool) -> pd.DataFrame:
    """One row per finished run (same index as ``df``), in display units (percent / points, or perplexity).

    Columns: ``targets``, ``seed``, ``fp``, ``q`` (simulated INT-n), ``gap`` (what INT-n loses: points of
    accuracy, or perplexity added), ``ptq`` (the baseline's INT-n score on the same targets; NaN for the
    no-QAT row) and ``vs_ptq`` (QAT minus PTQ; positive = better for accuracy, negative for perplexity).
    Classification adds ``f1``, ``f1_q``, ``ptq_f1`` and ``vs_ptq_f1``.
    """
    fp, q = ("perplexity", "perplexity_int8") if generation else ("accuracy", "accuracy_int8")
    scale = 1.0 if generation else 100.0
    ok = ok_rows(df)

    def value(r: pd.Series, key: str) -> float:
        v = to_float(r.get(key))
        return math.nan if v is None else v * scale

    def ptq(r: pd.Series, key: str) -> float:
        v = ptq_score(df, r, key)
        return math.nan if v is None else v * scale

    records = []
    for index, r in ok.iterrows():
        rec = {"targets": str(r.get("qat_targets")), "seed": r.get("seed"), "fp": value(r, fp), "q": value(r, q),
               "ptq": ptq(r, q)}
        rec["gap"] = rec["q"] - rec["fp"] if generation else rec["fp"] - rec["q"]
        rec["vs_ptq"] = rec["q"] - rec["ptq"]
        if not generation:
            rec.update(f1=value(r, "f1"), f1_q=value(r, "f1_int8"), ptq_f1=ptq(r, "f1_int8"))
            rec["vs_ptq_f1"] = rec["f1_q"] - rec["ptq_f1"]
        records.append(pd.Series(rec, name=index))
    return pd.DataFrame(records)


def replicated(scores: pd.DataFrame) -> bool:
    """Whether some target set was run with several seeds: then means over seeds are what to compare."""
    return varies(scores, "seed") and bool(scores.groupby("targets").size().gt(1).any())


def mean_and_se(values: pd.Series) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN values dropped; SE is NaN below two values)."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def seed_summary(scores: pd.DataFrame, generation: bool, order: tuple[str, ...]) -> pd.DataFrame:
    """Per target set, over its runs (seeds): ``runs``, the mean of every column of :func:`qat_scores`,
    ``vs_ptq_se`` (standard error of the paired difference), ``paired`` (runs with a baseline) and ``wins``
    (paired runs where QAT matched or beat PTQ); classification adds ``vs_ptq_f1_se`` and ``wins_f1``.
    Rows in ``order`` (unknown target sets after)."""
    better = (lambda d: d <= 0) if generation else (lambda d: d >= 0)  # noqa: E731
    rows = {}
    for targets, group in scores.groupby("targets", sort=False):
        rec: dict = {"runs": len(group)}
        for column in group.columns.drop(["targets", "seed"]):
            rec[column] = mean_and_se(group[column])[0]
        for diff, suffix in (("vs_ptq", ""),) + (() if generation else (("vs_ptq_f1", "_f1"),)):
            paired = group[diff].dropna()
            rec[f"{diff}_se"] = mean_and_se(paired)[1]
            rec[f"paired{suffix}"], rec[f"wins{suffix}"] = len(paired), int(better(paired).sum())
        rows[targets] = rec
    out = pd.DataFrame.from_dict(rows, orient="index")
    rank = {t: i for i, t in enumerate(order)}
    return out.loc[sorted(out.index, key=lambda t: (rank.get(t, len(order)), t))] if len(out) else out
