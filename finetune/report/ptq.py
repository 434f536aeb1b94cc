"""Post-training quantization (PTQ) beside QAT in a report: which no-QAT run a QAT run is paired with, its score on
the same targets, and the strongest of the PTQ baselines it scored (``qat.baselines``).

The strongest baseline is chosen on the validation split where the no-QAT run scored one there
(``ptq_validation``, :func:`finetune.evaluation.int8.validation_scores`), and its test score is the one compared:
choosing the best of a dozen baselines by their test scores would flatter PTQ by the luck of that choice.
"""

from __future__ import annotations

import math

import pandas as pd

from finetune.config import QAT_TARGETS
from finetune.report.collect import ok_rows, varies
from finetune.report.format import to_float

# Where a no-QAT run keeps its post-training-quantization score for each target set (finetune.evaluation.int8).
PTQ_SUFFIX = {**{group: f"_{group}" for group in QAT_TARGETS}, "+".join(QAT_TARGETS): ""}
# Settings a QAT run shares with its PTQ baseline whenever they vary across the sweep (seed above all: a
# seed also picks the training and test rows, so runs of different seeds are not comparable one to one).
PAIR_KEYS = ("seed", "model", "dataset", "quantization", "lr", "lora.r", "lora.alpha", "lora.dropout",
             "lora.target_modules", "int8_eval_bits", "int8_granularity", "int8_scale", "int8_scheme", "int8_weight_group_size",
             "int8_batch_size", "n_train", "n_test")


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


def targets_of(row: pd.Series) -> str:
    """The quantized target set of a run's row, whatever arm label follows it (``ffn QKD-self`` -> ``ffn``)."""
    return str(row.get("qat_targets")).split(" ")[0]


def ptq_score(df: pd.DataFrame, row: pd.Series, key: str) -> float | None:
    """The PTQ score ``key`` (``accuracy_int8``, ``f1_int8``, ``perplexity_int8``) for the targets of QAT run
    ``row``: its baseline's score on the same target set; ``None`` for a no-QAT row or a missing baseline."""
    label = targets_of(row)
    if label not in PTQ_SUFFIX:
        return None
    base = ptq_baseline(df, row)
    return None if base is None else to_float(base.get(key + PTQ_SUFFIX[label]))


def best_ptq(df: pd.DataFrame, row: pd.Series, key: str, generation: bool) -> tuple[float | None, str | None]:
    """The strongest post-training baseline for the targets of QAT run ``row``: round-to-nearest (``rtn``) or one
    of its baseline run's ``qat.baselines`` (metrics.json ``ptq_baselines``) on the same target set, by ``key``
    (highest accuracy, lowest perplexity) on the validation split where the baseline run scored them there
    (:func:`validation_scores`), else on the test split. ``(test score, name)``; ``(None, None)`` without one."""
    label = targets_of(row)
    base = ptq_baseline(df, row) if label in PTQ_SUFFIX and label != "none" else None
    if base is None:
        return None, None
    found = {"rtn": to_float(base.get(key + PTQ_SUFFIX[label]))}
    prefix, suffix = "ptq_baselines.", f".{label}.{key}"
    for column in base.index:
        if column.startswith(prefix) and column.endswith(suffix):
            found[column[len(prefix):-len(suffix)]] = to_float(base.get(column))
    found = {name: v for name, v in found.items() if v is not None and v == v}
    if not found:
        return None, None
    chosen = {name: v for name, v in validation_scores(base, label, key).items() if name in found} or found
    name = (min if generation else max)(chosen, key=chosen.get)
    return found[name], name


def validation_scores(base: pd.Series, label: str, key: str) -> dict[str, float]:
    """A no-QAT run's validation score ``key`` of round-to-nearest (``rtn``) and of each ``qat.baselines`` entry on
    target set ``label`` (metrics.json ``ptq_validation``); empty where it scored none there."""
    prefix, suffix = f"ptq_validation.{label}.", f".{key}"
    found = {c[len(prefix):-len(suffix)]: to_float(base.get(c)) for c in base.index
             if c.startswith(prefix) and c.endswith(suffix)}  # a name may hold dots (smoothquant-0.5)
    return {name: v for name, v in found.items() if v is not None and v == v}


def selection_note(df: pd.DataFrame) -> list[str]:
    """A line saying how each seed's strongest PTQ baseline was chosen, where the sweep's no-QAT runs scored any."""
    columns = [str(c) for c in ok_rows(df).columns]
    if not any(c.startswith("ptq_baselines.") for c in columns):
        return []
    if any(c.startswith("ptq_validation.") for c in columns):
        return ["The strongest PTQ baseline of each seed is the one with the best validation score (round-to-nearest "
                "and every baseline scored on the validation split too); the test score shown is that one's."]
    return ["The strongest PTQ baseline of each seed is the one with the best test score (its runs scored none on "
            "the validation split): a choice that flatters PTQ."]


def beyond_roundoff(df: pd.DataFrame, row: pd.Series, key: str, best_name: str | None) -> float:
    """1.0 where QAT run ``row``'s round-off range of ``key`` and that of its strongest PTQ baseline ``best_name``
    do not overlap (their difference is more than round-off), 0.0 where they do, NaN where either has none."""
    label, base = targets_of(row), ptq_baseline(df, row)
    if best_name is None or base is None or label not in PTQ_SUFFIX:
        return math.nan
    column = (key + "_spread" + PTQ_SUFFIX[label] if best_name == "rtn"
              else f"ptq_baselines.{best_name}.{label}.{key}_spread")
    ranges = [_range(row.get(key + "_spread")), _range(base.get(column))]
    if None in ranges:
        return math.nan
    (low_a, high_a), (low_b, high_b) = ranges
    return float(high_a < low_b or low_a > high_b)


def _range(spread) -> tuple[float, float] | None:
    """A ``[low, high]`` round-off range as collected (``"low,high"``); None without one."""
    try:
        low, high = (float(v) for v in str(spread).split(","))
    except ValueError:
        return None
    return low, high


def width(spread) -> float | None:
    """The width of a round-off range (:func:`_range`); None without one."""
    found = _range(spread)
    return None if found is None else found[1] - found[0]
