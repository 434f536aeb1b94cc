"""QAT against post-training quantization, run by run and over seeds: the numbers behind the QAT report.

A QAT run is scored under simulated INT-n inference on its own targets (``accuracy_int8`` / ``f1_int8`` or
``perplexity_int8``). Its baseline is post-training quantization (PTQ): the run *without* QAT, trained with the
same settings and seed, scored the same way on the same targets (``accuracy_int8_attn``, ``..._ffn`` and, for
attn+ffn, ``accuracy_int8``; see :mod:`finetune.evaluation.int8`). When a sweep repeats the comparison over seeds, each
QAT run is paired with the no-QAT run of its own seed, and the summary states the mean paired difference with
its standard error and how many seeds QAT won: one seed of a short run is mostly noise.
"""

from __future__ import annotations

import math

import pandas as pd

from finetune.report.collect import ok_rows, varies
from finetune.report.format import NA, to_float
from finetune.report.ptq import (PTQ_SUFFIX, beyond_roundoff, best_ptq, ptq_score, selection_note,
                                  validation_scores, width)

def low_bit_label(df: pd.DataFrame) -> str:
    """The simulated deployment's name in headings: ``INT8`` (8-bit activations, INT8 weights), ``INT4`` etc. when
    the sweep simulated another activation width (``qat.eval_bits``), ``W4A8`` for ``qat.scheme=w4a8`` (INT4
    group-wise weights); ``low-bit`` when the sweep mixes them."""
    col = df["int8_eval_bits"] if "int8_eval_bits" in df.columns else pd.Series(dtype=float)
    bits = {int(b) for b in pd.to_numeric(col, errors="coerce").dropna()}
    schemes = {str(v) for v in df["int8_scheme"].dropna()} if "int8_scheme" in df.columns else set()
    if "w4a8" in schemes:
        return "W4A8" if schemes == {"w4a8"} and bits <= {8} else "low-bit"
    return f"INT{bits.pop()}" if len(bits) == 1 else "INT8" if not bits else "INT<n>"


def qat_scores(df: pd.DataFrame, generation: bool) -> pd.DataFrame:
    """One row per finished run (same index as ``df``), in display units (percent / points, or perplexity).

    Columns: ``targets``, ``seed``, ``fp``, ``q`` (simulated INT-n), ``gap`` (what INT-n loses: points of
    accuracy, or perplexity added), ``ptq`` (the baseline's INT-n score on the same targets; NaN for the
    no-QAT row) and ``vs_ptq`` (QAT minus PTQ; positive = better for accuracy, negative for perplexity).
    Classification adds ``f1``, ``f1_q``, ``ptq_f1`` and ``vs_ptq_f1``. ``best``, ``best_name`` and ``vs_best``:
    the strongest PTQ baseline on the same targets (:func:`best_ptq`) and QAT minus it.
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
        best, rec["best_name"] = best_ptq(df, r, q, generation)
        rec["best"] = math.nan if best is None else best * scale
        rec["vs_best"] = rec["q"] - rec["best"]
        rec["beyond"] = beyond_roundoff(df, r, q, rec["best_name"])
        if not generation:
            rec.update(f1=value(r, "f1"), f1_q=value(r, "f1_int8"), ptq_f1=ptq(r, "f1_int8"))
            rec["vs_ptq_f1"] = rec["f1_q"] - rec["ptq_f1"]
        records.append(pd.Series(rec, name=index))
    return pd.DataFrame(records)


def by_scheme(df: pd.DataFrame, scores: pd.DataFrame, order: tuple[str, ...]) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """``scores`` of a sweep over deployment schemes (``int8_scheme`` varies) with each target set named by its
    scheme (``W8A8 ffn``), so that means, pairs and bars never pool schemes, rows ordered scheme by scheme; and
    ``order`` spelt the same way. Unchanged for a single-scheme sweep."""
    if scores.empty or not varies(ok_rows(df), "int8_scheme"):
        return scores, order
    scheme_of = ok_rows(df)["int8_scheme"].astype(str).str.upper().reindex(scores.index)
    named = scores.assign(targets=scheme_of + " " + scores["targets"])
    spelt = tuple(f"{s} {t}" for s in sorted(set(scheme_of)) for t in order)
    rank = {t: i for i, t in enumerate(spelt)}
    return named.iloc[sorted(range(len(named)), key=lambda i: rank.get(named["targets"].iloc[i], len(spelt)))], spelt


def qat_wins(diffs: pd.Series, generation: bool) -> int:
    """How many QAT-minus-PTQ differences say QAT matched or beat PTQ (accuracy not lower, perplexity not
    higher); NaN (no baseline) never counts."""
    return int((diffs <= 0).sum() if generation else (diffs >= 0).sum())


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
    rows = {}
    for targets, group in scores.groupby("targets", sort=False):
        rec: dict = {"runs": len(group)}
        for column in group.columns.drop(["targets", "seed", "best_name", "beyond"], errors="ignore"):
            rec[column] = mean_and_se(group[column])[0]
        known = group["beyond"].dropna() if "beyond" in group else pd.Series(dtype=float)
        rec["beyond"], rec["beyond_known"] = int(known.sum()), len(known)  # runs whose difference beats round-off
        names = group["best_name"].dropna() if "best_name" in group else pd.Series(dtype=object)
        rec["best_name"] = "/".join(sorted(set(names))) if len(names) else None  # the baselines that were best
        rec["vs_best_se"] = mean_and_se(group["vs_best"].dropna())[1] if "vs_best" in group else math.nan
        for diff, suffix in (("vs_ptq", ""),) + (() if generation else (("vs_ptq_f1", "_f1"),)):
            paired = group[diff].dropna()
            rec[f"{diff}_se"] = mean_and_se(paired)[1]
            rec[f"paired{suffix}"], rec[f"wins{suffix}"] = len(paired), qat_wins(paired, generation)
        rows[targets] = rec
    out = pd.DataFrame.from_dict(rows, orient="index")
    rank = {t: i for i, t in enumerate(order)}
    return out.loc[sorted(out.index, key=lambda t: (rank.get(t, len(order)), t))] if len(out) else out


def display_number(value: float, generation: bool, signed: bool = False) -> str:
    """A display-unit number (points / percent, or perplexity); NaN -> ``n/a``."""
    if value != value:
        return NA
    return f"{value:{'+' if signed else ''}.{2 if generation else 1}f}"


def qat_takeaway(deployed: dict[str, float], full: dict[str, float], baseline: dict[str, float], diffs: dict[str, str],
                 wins: int, low: str, generation: bool, lead: str = "", ptq: str = "PTQ") -> str:
    """One line: which target set deploys best in INT-n (``deployed``: its simulated score per target set, ``full``:
    its full-precision score, ``baseline``: the run without QAT deployed on the same targets), and how QAT fares
    against PTQ of the same targets (``ptq``: its name, ``round-to-nearest PTQ`` where stronger baselines are
    compared after it).

    It leads with the deployed score, not with the drop from a run's own full precision: a QAT run whose full
    precision collapsed loses little to quantization and would otherwise lead. The run without QAT's full precision
    is the reference a deployment is read against."""
    what = f"{low} perplexity" if generation else f"{low} accuracy"
    deployed = {t: v for t, v in deployed.items() if v == v}
    if not deployed:
        return "No finished run has both fp and INT8 results; nothing to compare."
    best = (min if generation else max)(deployed, key=deployed.get)
    superlative = "lowest" if generation else "highest"

    def score(value: float) -> str:
        return display_number(value, generation) + ("" if generation else "%")

    leaders = [t for t, v in deployed.items() if score(v) == score(deployed[best])]  # equal as displayed: a tie
    best = "none" if "none" in leaders else best
    reference = full.get("none", math.nan)
    in_full = f" ({score(reference)} in full precision)" if reference == reference else ""
    if set(deployed) == {"none"}:  # e.g. a sweep under way whose QAT runs have not finished
        return f"No QAT run has finished: the run without QAT alone, {lead}{what} {score(deployed[best])}{in_full}; " \
               "nothing to compare QAT with"
    if best == "none":
        return f"QAT does not help here: the run without QAT has the {superlative} {lead}{what}, " \
               f"{score(deployed[best])}{in_full}" + ptq_clause(diffs, wins, low, generation, lead, ptq)
    takeaway = f"{' and '.join(leaders)} QAT {'have' if len(leaders) > 1 else 'has'} the {superlative} " \
               f"{lead}{what}: {score(deployed[best])}"
    same = baseline.get(best, math.nan) if len(leaders) == 1 else math.nan
    if same == same:  # the run without QAT deployed as the leader is, and its full precision: the reference
        takeaway += f" vs {score(same)} for the run without QAT on the same targets{in_full}"
    elif len(leaders) > 1 and in_full:
        takeaway += f" (the run without QAT: {score(reference)} in full precision)"
    elif full.get(best, math.nan) == full.get(best, math.nan):
        takeaway += f" (its own full precision {score(full[best])})"
    return takeaway + ptq_clause(diffs, wins, low, generation, lead, ptq)


def ptq_clause(diffs: dict[str, str], wins: int, low: str, generation: bool, lead: str, ptq: str) -> str:
    """``; in INT8, QAT matches or beats PTQ of the same targets on 2 of 3 target sets (attn +1.0, ...)``."""
    if not diffs:
        return ""
    # In INT-n, QAT is at least as good as PTQ when its accuracy is not lower / perplexity not higher.
    return (f"; in {low}, QAT matches or beats {ptq} of the same targets {'on average ' if lead else ''}"
            f"on {wins} of {len(diffs)} target sets (" + ", ".join(f"{t} {d}" for t, d in diffs.items())
            + f" {'ppl' if generation else 'pts'})")


def best_ptq_clause(rows: dict, generation: bool, se: bool = False) -> str:
    """``; against the strongest PTQ baseline: ffn -10.1 pts (smoothquant-0.8, 83.0)``: each QAT row (a run, or with
    ``se`` a mean over seeds ± its standard error) against the strongest baseline of its seed's plain run
    (:func:`finetune.report.ptq.best_ptq`); empty where no row has one other than round-to-nearest."""
    unit = "ppl" if generation else "pts"

    def difference(r: dict) -> str:
        return plus_minus(r["vs_best"], r["vs_best_se"], generation) if se \
            else display_number(r["vs_best"], generation, signed=True)

    def roundoff(r: dict) -> str:
        """Whether the difference is more than round-off: the two scores' ranges apart (per seed, over seeds)."""
        if se:
            return f"; beyond round-off on {r['beyond']} of {r['beyond_known']} seeds" if r.get("beyond_known") else ""
        return {0.0: "; within round-off", 1.0: "; beyond round-off"}.get(r.get("beyond"), "")

    parts = [f"{label} {difference(r)} {unit} ({r['best_name']}, {display_number(r['best'], generation)}{roundoff(r)})"
             for label, r in rows.items() if isinstance(r.get("best_name"), str) and r["best_name"] != "rtn"
             and r["vs_best"] == r["vs_best"]]
    return "; against the strongest PTQ baseline: " + ", ".join(parts) if parts else ""


def score_cell(s: pd.Series, column: str, generation: bool) -> str:
    """One cell of the QAT table; the strongest PTQ baseline's score names the baseline, and the difference to it
    says when it lies within the two scores' round-off ranges."""
    text = display_number(s[column], generation, signed=column.startswith("vs_"))
    if column == "best" and text != NA and isinstance(s.get("best_name"), str):
        text += f" ({s['best_name']})"
    if column == "vs_best" and text != NA and s.get("beyond") == 0.0:
        text += " (within round-off)"
    return text


def best_ptq_known(scores: pd.DataFrame) -> bool:
    """Whether some run is paired with a PTQ baseline other than round-to-nearest (its plain run scored
    ``qat.baselines``)."""
    return "best_name" in scores and scores["best_name"].map(lambda n: isinstance(n, str) and n != "rtn").any()


def plus_minus(mean: float, se: float, generation: bool) -> str:
    """``+3.0 ± 1.2``: a signed mean difference and its standard error (the error left out when unknown)."""
    return display_number(mean, generation, signed=True) + ("" if se != se else f" ± {display_number(se, generation)}")


def summary_table(summary: pd.DataFrame, low: str, generation: bool) -> pd.DataFrame:
    """Display cells of :func:`seed_summary`: per target set, the runs, the mean fp / INT-n / PTQ scores, the
    mean paired QAT-vs-PTQ difference ± its standard error, and how many paired runs QAT matched or beat PTQ."""
    def won(r: pd.Series, suffix: str = "") -> str:
        return NA if not r[f"paired{suffix}"] else f"{int(r[f'wins{suffix}'])}/{int(r[f'paired{suffix}'])}"

    def cells(r: pd.Series, columns: tuple[str, ...]) -> list[str]:
        return [display_number(r[c], generation) for c in columns]

    if generation:
        headers = ["Targets", "Runs", "Perplexity", f"{low} perplexity", f"PTQ {low} perplexity",
                   "QAT vs PTQ (ppl, mean ± SE)", "QAT ≤ PTQ (runs)"]
        rows = [[t, str(int(r["runs"]))] + cells(r, ("fp", "q", "ptq"))
                + [plus_minus(r["vs_ptq"], r["vs_ptq_se"], True), won(r)] for t, r in summary.iterrows()]
    else:
        headers = ["Targets", "Runs", "Accuracy (%)", f"{low} accuracy (%)", f"PTQ {low} accuracy (%)",
                   "QAT vs PTQ (pts, mean ± SE)", "QAT ≥ PTQ (runs)", "F1 (%)", f"{low} F1 (%)",
                   f"PTQ {low} F1 (%)", "QAT vs PTQ F1 (pts, mean ± SE)", "QAT ≥ PTQ F1 (runs)"]
        rows = [[t, str(int(r["runs"]))] + cells(r, ("fp", "q", "ptq"))
                + [plus_minus(r["vs_ptq"], r["vs_ptq_se"], False), won(r)] + cells(r, ("f1", "f1_q", "ptq_f1"))
                + [plus_minus(r["vs_ptq_f1"], r["vs_ptq_f1_se"], False), won(r, "_f1")]
                for t, r in summary.iterrows()]
    if "best_name" in summary and summary["best_name"].map(lambda n: n not in (None, "rtn")).any():
        # a sweep whose baseline runs scored qat.baselines: QAT against the strongest of them, paired by seed
        unit = "ppl" if generation else "pts"
        headers += [f"Best PTQ {low} (baseline)", f"QAT vs best PTQ ({unit}, mean ± SE)",
                    "Beyond round-off (runs)"]
        for row, (_, r) in zip(rows, summary.iterrows()):
            row += [NA if r["best"] != r["best"] else f"{display_number(r['best'], generation)} ({r['best_name']})",
                    plus_minus(r["vs_best"], r["vs_best_se"], generation),
                    f"{r['beyond']}/{r['beyond_known']}" if r.get("beyond_known") else NA]
    return pd.DataFrame(rows, columns=headers, dtype=object)


def targets_takeaway(df: pd.DataFrame, scores: pd.DataFrame, label_of: dict, order: tuple[str, ...], low: str,
                     generation: bool, by_scheme: bool) -> tuple[str, list[str], pd.DataFrame | None]:
    """The qat_targets comparison's takeaway, notes and (over several seeds) summary table: one takeaway per
    deployment scheme (the only one when the sweep has a single scheme), over its own target sets.

    Args:
        df: the collected runs; scores: :func:`qat_scores` (by scheme); label_of: score index -> its row label;
        order: the target sets' display order; low: the low-bit label; by_scheme: whether schemes vary.
    """
    if scores.empty:
        return qat_takeaway({}, {}, {}, {}, 0, low, generation), [], None
    schemes = sorted(set(ok_rows(df)["int8_scheme"].astype(str))) if by_scheme else [""]

    def own(keys, scheme: str) -> dict:
        """``{target set: value}`` of one scheme's entries, the scheme prefix dropped."""
        prefix = f"{scheme.upper()} " if scheme else ""
        return {k[len(prefix):]: v for k, v in keys if k.startswith(prefix)}

    def per_scheme(make) -> str:
        parts = []
        for scheme in schemes:
            scheme_low = low_bit_label(df[df["int8_scheme"].astype(str) == scheme]) if scheme else low
            parts.append((f"{scheme.upper()}: " if scheme else "") + make(scheme, scheme_low))
        return ". ".join(parts)

    if not replicated(scores):
        paired = scores.dropna(subset=["vs_ptq"])

        def single(scheme: str, scheme_low: str) -> str:
            diffs = own(((label_of[i], display_number(d, generation, signed=True))
                         for i, d in paired["vs_ptq"].items()), scheme)
            wins = qat_wins(pd.Series(own(((label_of[i], d) for i, d in paired["vs_ptq"].items()), scheme),
                                      dtype=float), generation)
            best = best_ptq_clause(own(((label_of[i], r) for i, r in scores.iterrows()), scheme), generation)
            deployed, full, same = (own(((label_of[i], v) for i, v in scores[c].items()), scheme)
                                    for c in ("q", "fp", "ptq"))
            return qat_takeaway(deployed, full, same, diffs, wins, scheme_low, generation,
                                ptq="round-to-nearest PTQ" if best else "PTQ") + best
        return per_scheme(single), selection_note(df) + majority_note(df), None
    summary = seed_summary(scores, generation, order)
    seeds = scores["seed"].dropna().astype(str).nunique()

    def replicated_takeaway(scheme: str, scheme_low: str) -> str:
        prefix = f"{scheme.upper()} " if scheme else ""
        sub = summary.loc[[t for t in summary.index if t.startswith(prefix)]].rename(index=lambda t: t[len(prefix):])
        paired = sub[sub["paired"] > 0]
        diffs = {t: plus_minus(r["vs_ptq"], r["vs_ptq_se"], generation) for t, r in paired.iterrows()}
        best = best_ptq_clause(sub.to_dict("index"), generation, se=True)
        text = qat_takeaway(sub["q"].to_dict(), sub["fp"].to_dict(), sub["ptq"].to_dict(), diffs,
                            qat_wins(paired["vs_ptq"], generation), scheme_low, generation, lead="mean ",
                            ptq="round-to-nearest PTQ" if best else "PTQ")
        if not generation and len(paired):  # accuracy alone flatters a run that settled on the majority class
            text += "; F1 " + ", ".join(f"{t} {plus_minus(r['vs_ptq_f1'], r['vs_ptq_f1_se'], False)}"
                                        for t, r in paired.iterrows()) + " pts"
        return text + best

    takeaway = f"Over {seeds} seeds (mean ± standard error of the paired difference): " \
        + per_scheme(replicated_takeaway)
    notes = [f"Means over {seeds} seeds: each QAT run is paired with the no-QAT run of its own seed "
             + ("and scheme " if by_scheme else "") + "(its PTQ baseline) and the differences are averaged over those "
             "pairs; a QAT run whose seed has no finished no-QAT run is left out of the paired columns."]
    return takeaway, notes + selection_note(df) + majority_note(df), summary_table(summary, low, generation)


def majority_note(df: pd.DataFrame) -> list[str]:
    """A line with what always answering the most frequent test label scores (metrics.json ``majority_*``): a
    model at or below it has learned nothing a deployment could use."""
    ok = ok_rows(df)
    if "majority_accuracy" not in ok or ok["majority_accuracy"].dropna().empty:
        return []
    acc = pd.to_numeric(ok["majority_accuracy"], errors="coerce").dropna()
    f1 = pd.to_numeric(ok.get("majority_f1", pd.Series(dtype=float)), errors="coerce").dropna()
    span = lambda v: f"{100 * v.min():.1f}" + ("" if v.max() == v.min() else f"-{100 * v.max():.1f}")  # noqa: E731
    return [f"Always answering the majority label scores {span(acc)}% accuracy"
            + (f" (macro-F1 {span(f1)}%)" if len(f1) else "") + " on these test rows: the floor every arm must clear."]


def ptq_baselines_table(df: pd.DataFrame, generation: bool) -> pd.DataFrame | None:
    """Every PTQ baseline the no-QAT runs scored (round-to-nearest and ``qat.baselines``), per scheme and target
    set: the mean score over the runs (seeds), its F1 (classification), the per-run scores, the widest round-off
    range and, where the runs scored them there, the mean validation score that chooses the strongest; ``None`` when
    no run scored a baseline beyond round-to-nearest."""
    key = "perplexity_int8" if generation else "accuracy_int8"
    scale = 1.0 if generation else 100.0
    plain = ok_rows(df)
    plain = plain[plain["qat_targets"].astype(str) == "none"] if "qat_targets" in plain else plain.iloc[:0]
    found: dict[tuple, list[tuple]] = {}
    for _, r in plain.iterrows():
        scheme = str(r.get("int8_scheme") or "").upper()
        scored = [c[len("ptq_baselines."):-len("." + key)].rsplit(".", 1) for c in r.index
                  if c.startswith("ptq_baselines.") and c.endswith("." + key) and to_float(r.get(c)) is not None]
        for target_set in dict.fromkeys(t for _, t in scored):  # "<name>.<set>": a name may hold dots (0.5)
            rtn = PTQ_SUFFIX.get(target_set)
            rows = [("rtn", key + rtn, "f1_int8" + rtn, key + "_spread" + rtn)] if rtn is not None else []
            rows += [(n, f"ptq_baselines.{n}.{t}.{key}", f"ptq_baselines.{n}.{t}.f1_int8",
                      f"ptq_baselines.{n}.{t}.{key}_spread") for n, t in scored if t == target_set]
            chosen_by = validation_scores(r, target_set, key)
            for name, score, f1, spread in rows:
                if to_float(r.get(score)) is not None:
                    found.setdefault((scheme, target_set, name), []).append(
                        (to_float(r.get(score)) * scale, to_float(r.get(f1)), r.get(spread), chosen_by.get(name)))
    if not found:
        return None
    validated = any(v is not None for runs in found.values() for *_, v in runs)
    records = []
    for (scheme, target_set, name), runs in found.items():
        scores = [s for s, *_ in runs]
        f1s = [f * scale for _, f, _, _ in runs if f is not None]
        widths = [width(spread) * scale for _, _, spread, _ in runs if width(spread) is not None]
        vals = [v * scale for *_, v in runs if v is not None]
        records.append([scheme, target_set, name, str(len(runs)), display_number(sum(scores) / len(scores), generation)]
                       + ([] if generation else [display_number(sum(f1s) / len(f1s), False) if f1s else NA])
                       + [", ".join(display_number(s, generation) for s in scores),
                          display_number(max(widths), generation) if widths else NA]
                       + ([display_number(sum(vals) / len(vals), generation) if vals else NA] if validated else []))
    unit = "perplexity" if generation else "accuracy (%)"
    headers = ["Scheme", "Targets", "PTQ baseline", "Runs", f"Mean {unit}"] + ([] if generation else ["Mean F1 (%)"]) \
        + [f"Per run {unit}", "Widest round-off range"] + ([f"Mean validation {unit}"] if validated else [])
    return pd.DataFrame(records, columns=headers, dtype=object)
