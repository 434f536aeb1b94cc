"""Collect the ``metrics.json`` of every job below a sweep directory into one flat table.

One row per job. Nested ``lora`` / ``qat`` dicts are flattened to dotted columns
(``lora.r``, ``qat.snr_db.attn``); lists become stable strings (``qat_targets`` ->
``none`` / ``attn`` / ``ffn`` / ``attn+ffn``; ``overrides`` -> space-separated). A Hydra job
directory (it has ``.hydra/``) without ``metrics.json`` is a job that died hard and becomes
a ``failed`` row, so a sweep never silently loses a job.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from finetune.config import QAT_TARGETS, QUANT_MODES
from finetune.errors import FinetuneError
from finetune.platform.locks import LOCK_FILE, holder

METRICS_FILE = "metrics.json"
NO_METRICS_ERROR = "no metrics.json (job did not finish)"
SKIP_DIRS = (".hydra", "wandb", "adapter")
SKIP_PREFIXES = ("checkpoint-",)
QAT_TARGET_ORDER = QAT_TARGETS
QKD_LABEL = "QKD"  # after the targets of a distilled QAT run (distill=self | run): "ffn QKD-run"

# Columns first in the CSV, in this order; any other column follows alphabetically.
LEADING_COLUMNS = [
    "job", "run_dir", "status", "error", "method", "model", "dataset", "data_source", "task",
    "quantization", "qat_targets", "lora.r", "lora.alpha", "lora.dropout",
    "lora.target_modules", "lr", "seed", "accuracy", "f1", "accuracy_int8", "f1_int8",
    "zero_shot_accuracy", "zero_shot_f1", "perplexity", "perplexity_int8", "eval_loss",
    "train_loss", "peak_memory_mb", "peak_in_use_mb", "eval_peak_memory_mb", "model_memory_mb", "memory_device", "train_runtime_s",
    "train_tokens_per_s", "train_steps", "trainable_params", "total_params", "trainable_pct",
]

# Override keys that fill a column when metrics.json lacks it (hard-died jobs have no metrics).
_OVERRIDE_COLUMNS = {
    "lora.r": "lora.r", "lora.alpha": "lora.alpha", "lora.dropout": "lora.dropout",
    "trainer.lr": "lr", "seed": "seed", "model": "model", "dataset": "dataset",
}


def _skip(name: str) -> bool:
    return name in SKIP_DIRS or name.startswith(SKIP_PREFIXES)


def _scalar(text: str) -> Any:
    """Parse one override value the way YAML would (``8`` -> 8, ``1e-4`` -> 0.0001)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            return value
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn Hydra override strings into ``{key: value}`` (``+``/``~`` prefixes dropped).

    Args:
        overrides: strings such as ``"lora.r=8"``, ``"quantization=nf4"``, ``"qat_targets=[attn,ffn]"``.

    Returns:
        The parsed values; list syntax ``[a,b]`` becomes a Python list.
    """
    parsed: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            continue
        key, _, value = str(item).partition("=")
        parsed[key.lstrip("+~")] = _scalar(value)
    return parsed


def _targets_label(targets: Any) -> str:
    """Canonical label of a QAT target list: ``none``, ``attn``, ``ffn`` or ``attn+ffn``."""
    if targets is None or (isinstance(targets, float) and math.isnan(targets)):
        return "none"
    if isinstance(targets, str):
        targets = [t for t in re.split(r"[\s,+\[\]]+", targets) if t]
    names = [str(t) for t in targets if str(t) not in ("", "none", "null")]
    ordered = [t for t in QAT_TARGET_ORDER if t in names] + sorted(set(names) - set(QAT_TARGET_ORDER))
    return "+".join(ordered) or "none"


def _method_from_overrides(ov: dict[str, Any]) -> str | None:
    """Guess the method name of a job that wrote no metrics, from its overrides.

    ``method=qlora_nf4`` (the conf/method presets the lora_vs_qlora sweep varies) names it directly;
    otherwise ``lora`` / ``quantization`` overrides compose it.
    """
    preset = ov.get("method")
    if isinstance(preset, str) and preset:
        return preset.replace("_", "-")
    lora = ov.get("lora")
    quant = ov.get("quantization")
    if lora is None and quant is None:
        return None
    if lora in ("none", "full"):
        return "full"
    base = "dora" if lora == "dora" else "lora"
    if quant in QUANT_MODES and quant != "none":
        return f"q{base}-{quant}"
    return base


def _flatten(prefix: str, value: Any, row: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, row)
    elif isinstance(value, (list, tuple)):
        row[prefix] = ",".join(str(v) for v in value)
    else:
        row[prefix] = value


def _read_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    return [str(x) for x in loaded] if isinstance(loaded, list) else []


def _load_job(job_dir: Path, root: Path) -> dict[str, Any]:
    """One table row for a job directory (metrics.json present or not)."""
    metrics_path = job_dir / METRICS_FILE
    metrics: dict[str, Any]
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            metrics = {"status": "failed", "error": f"unreadable metrics.json: {exc}"}
    elif (pid := holder(job_dir / LOCK_FILE)) is not None:  # a job under way: not a failure
        metrics = {"status": "running", "error": f"running now (pid {pid}), no metrics.json yet"}
    else:
        metrics = {"status": "failed", "error": NO_METRICS_ERROR}
    rel = job_dir.relative_to(root).as_posix()
    overrides = metrics.get("overrides") or _read_overrides(job_dir)
    ov = parse_overrides(overrides)

    row: dict[str, Any] = {"run_dir": "." if rel == "." else rel}
    for key, value in metrics.items():
        if key in ("overrides", "qat_targets"):
            continue
        if isinstance(value, dict):  # lora.*, qat.*, qat.snr_db.*
            _flatten(key, value, row)
        elif isinstance(value, (list, tuple)):
            row[key] = ",".join(str(v) for v in value)
        else:
            row[key] = value
    row["job"] = str(metrics.get("job", job_dir.name if rel != "." else job_dir.resolve().name))
    row["status"] = str(metrics.get("status", "ok"))
    row["overrides"] = " ".join(overrides)
    if "qat_targets" in metrics or "qat_targets" in ov:  # unknown stays empty, not "none"
        row["qat_targets"] = _targets_label(metrics.get("qat_targets", ov.get("qat_targets")))
        mode = (metrics.get("distill") or {}).get("mode")
        if mode in ("self", "run"):  # a distilled arm is its own row group: "ffn QKD-self" beside plain QAT "ffn"
            row["qat_targets"] += f" {QKD_LABEL}-{mode}"
    if "method" not in row:
        guess = _method_from_overrides(ov)
        if guess is not None:
            row["method"] = guess
    if "quantization" not in row and "quantization" in ov:
        row["quantization"] = str(ov["quantization"])
    for key, column in _OVERRIDE_COLUMNS.items():
        if column not in row and key in ov:
            row[column] = ov[key]
    if "lr" not in row and "learning_rate" in row:
        row["lr"] = row["learning_rate"]
    return row


def _job_sort_key(row: dict[str, Any]) -> tuple:
    parts = re.split(r"(\d+)", row["run_dir"])
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def _find_job_dirs(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        is_job = METRICS_FILE in filenames or ".hydra" in dirnames
        dirnames[:] = sorted(d for d in dirnames if not _skip(d))
        if is_job:
            found.append(Path(dirpath))
    return found


def collect_runs(sweep_dir: str | os.PathLike) -> pd.DataFrame:
    """Read every job below ``sweep_dir`` into one DataFrame, one row per job.

    Directories named ``.hydra``, ``wandb``, ``adapter`` or ``checkpoint-*`` are not searched.

    Args:
        sweep_dir: a Hydra sweep directory (or any folder holding job directories, or one run).

    Returns:
        A DataFrame with ``job``, ``run_dir`` (relative to ``sweep_dir``), ``status`` (``ok``, ``failed``, or
        ``running`` for a job without metrics.json whose run still holds its directory), ``error``, ``overrides``,
        ``qat_targets`` (label) and every metrics.json key, nested keys flattened with dots. Rows are in job order,
        columns in a fixed order.

    Raises:
        FinetuneError: ``sweep_dir`` does not exist, is not a directory, or holds no jobs.
    """
    root = Path(sweep_dir)
    if not root.exists():
        raise FinetuneError(f"sweep directory not found: {root}")
    if not root.is_dir():
        raise FinetuneError(f"not a directory: {root}")
    rows = [_load_job(d, root) for d in _find_job_dirs(root)]
    if not rows:
        raise FinetuneError(
            f"no runs found under {root}: no metrics.json and no Hydra job directory (.hydra/)"
        )
    rows.sort(key=_job_sort_key)
    df = pd.DataFrame(rows)
    for column in ("error", "qat_targets"):
        if column not in df.columns:
            df[column] = None
    columns = [c for c in LEADING_COLUMNS if c in df.columns]
    columns += sorted(c for c in df.columns if c not in columns)
    return df[columns].reset_index(drop=True)


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of jobs that finished (``status == "ok"``)."""
    return df[df["status"] == "ok"]


def varies(df: pd.DataFrame, column: str) -> bool:
    """Whether ``column`` takes more than one value across the rows (missing values ignored)."""
    return column in df.columns and df[column].dropna().astype(str).nunique() > 1
