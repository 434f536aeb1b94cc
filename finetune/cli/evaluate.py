"""finetune-eval: score a finished run on another split or file of its dataset's format.

    finetune-eval run=outputs/<date>/<time>                                     # the run's own test split
    finetune-eval run=outputs/<date>/<time> dataset.path=../shared/data/chnsenticorp/validation.jsonl
    finetune-eval run=... dataset.path=<folder> split=validation out=scores.json
    finetune-eval run=outputs/<date>/<time> harness=lm_eval                     # lm-eval on the run's own test split
    finetune-eval run=outputs/<date>/<time> harness=lm_eval tasks=run,hellaswag limit=100

Arguments are ``key=value`` like the training CLI: ``run`` (required), ``split`` (test | validation | train,
for folder / hub sources), ``out`` (default: <run>/eval-<split or file stem>.json), ``batch_size``, and any
``dataset.*`` key of the run's config. ``harness=lm_eval`` scores with lm-evaluation-harness instead: ``tasks``
(comma-separated lm-eval task names; ``run``, the default, is the run's own dataset as a local task, compared
row by row with this project's scorer), ``limit`` (documents per task); the result goes to
<run>/eval-lm_eval-<split or file stem>.json. A single file is scored whole. The result names the precision it scored
in (the run's ``trainer.precision``, resolved on this machine), with a warning where the run's own differed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from finetune.checks import as_bool, as_choice, as_number, parse_kv
from finetune.model.load import allow_remote_code
from finetune.cli.common import run_cli
from finetune.errors import FinetuneError, say
from finetune.runs import atomic_write_json

log = logging.getLogger("finetune.eval")
OWN_ARGS = {"run": None, "split": "test", "out": None, "batch_size": None, "trust_remote_code": "false",
            "harness": "finetune", "tasks": "run", "limit": None}
SPLITS = ("test", "validation", "train")
HARNESSES = ("finetune", "lm_eval")


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """This command's own keys, and the ``dataset.*`` config overrides."""
    own, overrides = parse_kv(argv, OWN_ARGS, ("run",), " (a finetune-train run directory)", passthrough=("dataset.",))
    own["batch_size"] = as_number("batch_size", own["batch_size"], int, 1, optional=True)
    own["limit"] = as_number("limit", own["limit"], int, 1, optional=True)
    as_choice("split", own["split"], SPLITS)
    as_choice("harness", own["harness"], HARNESSES)
    if own["harness"] == "lm_eval":
        from finetune.evaluation.harness import lm_eval_version, parse_tasks

        own["tasks"] = parse_tasks(own["tasks"])
        lm_eval_version()  # installed, or one line saying how
    elif own["tasks"] != OWN_ARGS["tasks"] or own["limit"] is not None:
        raise FinetuneError("tasks= and limit= are lm-eval's: give harness=lm_eval with them")
    allow_remote_code(as_bool("trust_remote_code", own["trust_remote_code"]))
    return own, overrides


def check_dataset_keys(overrides: list[str], known: list[str]) -> None:
    """Each ``dataset.KEY=value`` names a key the dataset config has (a misspelt key would be ignored).

    Raises:
        FinetuneError: naming the key and the nearest known one.
    """
    from finetune.cli.overrides import nearest_key

    for override in overrides:
        key = override.split("=", 1)[0].removeprefix("dataset.")
        if key not in known and key.rpartition(".")[0] not in known:  # a new entry of a mapping (role_map) is fine
            guess = nearest_key(key, known)
            hint = f"did you mean dataset.{guess}?" if guess else f"dataset keys: {', '.join(known)}"
            raise FinetuneError(f"dataset.{key} is not a dataset key; {hint}")


def check_args(argv: list[str]) -> tuple[dict, list[str]]:
    """The arguments checked before a run is read: keys and values, and the ``dataset.*`` keys against those any
    dataset option declares (the run's own dataset is checked once it is read)."""
    from finetune.cli.overrides import leaf_keys
    from finetune.config import CONF_DIR

    own, overrides = parse_args(argv)
    known = sorted({k for path in (CONF_DIR / "dataset").glob("*.yaml")
                    for k in leaf_keys(OmegaConf.load(path)) if k != "defaults"})
    check_dataset_keys(overrides, known)
    return own, overrides


def what_is_scored(dcfg, split: str) -> tuple[Path | None, str]:
    """The file scored whole (or None: a split of a folder or hub source) and the name the result goes by."""
    as_choice("split", split, SPLITS)
    source_path = Path(str(dcfg.path)).expanduser() if dcfg.get("path") else None
    if source_path is not None and source_path.is_file():
        return source_path, source_path.stem
    return None, split


def dataset_config(cfg, overrides: list[str]):
    """The run's dataset config with this command's ``dataset.*`` overrides."""
    return OmegaConf.merge(cfg.dataset, OmegaConf.from_dotlist([o.removeprefix("dataset.") for o in overrides]))


def default_out(run_dir: str, overrides: list[str], split: str, harness: str = "finetune") -> str:
    """``<run>/eval-<split or file stem>.json`` (``eval-lm_eval-...`` with lm-eval), known before anything is
    scored (so it can be held meanwhile)."""
    from finetune.runs import run_config

    path, cfg = run_config(run_dir)
    prefix = "eval-" if harness == "finetune" else f"eval-{harness}-"
    return str(path / f"{prefix}{what_is_scored(dataset_config(cfg, overrides), split)[1]}.json")


def rows_to_score(path: Path, cfg, overrides: list[str], split: str) -> tuple[list[dict], str, str, object]:
    """The rows scored, their source, the name the result goes by and the dataset config.

    Raises:
        FinetuneError: a misspelt ``dataset.*`` key, a bad file, or no rows.
    """
    from finetune.cli.overrides import leaf_keys
    from finetune.data import load_splits, read_rows, validate_rows

    check_dataset_keys(overrides, leaf_keys(cfg.dataset))
    dcfg = dataset_config(cfg, overrides)
    source_path, scored = what_is_scored(dcfg, split)
    if source_path is not None:
        rows = validate_rows(read_rows(source_path), dcfg, str(source_path))
        source = f"file:{source_path.resolve()}"
    else:
        splits = load_splits(dcfg, cfg.seed)
        rows = getattr(splits, split)
        source = splits.source
    if not rows:
        raise FinetuneError(f"no rows to score in {source} ({split})")
    return rows, source, scored, dcfg


def evaluate_run(run_dir: str, overrides: list[str], split: str = "test", batch_size: int | None = None) -> dict:
    """Score a run on a split or file; returns the result dict (also what the CLI writes)."""
    from finetune.data import tokenize_split
    from finetune.evaluation.scoring import classify, loss_and_perplexity, scores_and_loss, scores_to_metrics
    from finetune.model.load import resolve_precision
    from finetune.model.load import load_run
    from finetune.runs import run_config, run_kind, run_metrics

    path, cfg = run_config(run_dir)
    run_kind(path)
    rows, source, scored, dcfg = rows_to_score(path, cfg, overrides, split)
    model, tok, cfg, path = load_run(path)
    precision = resolve_precision(cfg.trainer.precision, cfg.model.dtype, full_finetune=cfg.lora.method == "none")
    bs = int(batch_size or cfg.eval.batch_size)
    max_len = int(cfg.trainer.max_length)
    t0 = time.perf_counter()
    result = {"run": str(path), "dataset": dcfg.name, "data_source": source, "scored": scored, "n": len(rows),
              "precision": precision.name}
    try:
        trained = run_metrics(path).get("precision")  # what the run trained and scored in
    except (OSError, ValueError):
        trained = None
    if trained is not None and trained != precision.name:
        log.warning("scoring in %s; the run trained and scored in %s (trainer.precision=%s resolves by machine): "
                    "scores can differ from the run's in the last digits", precision.name, trained,
                    cfg.trainer.precision)
    # Each split scored as the run scored it: validation's scores and loss from one pass where that is exact
    # (scores_and_loss, as the run's selection score), so its figures reproduce the run's to the last digit.
    both = (scores_and_loss(model, tok, rows, dcfg, max_len, bs, precision.bf16)
            if dcfg.task == "classification" and split == "validation" else None)
    if both is not None:
        out = scores_to_metrics(both[0], rows, dcfg)
        result.update(accuracy=out["accuracy"], f1=out["f1"], eval_loss=both[1]["eval_loss"],
                      perplexity=both[1]["perplexity"])
    else:
        if dcfg.task == "classification":
            out = classify(model, tok, rows, dcfg, max_len, bs, precision.bf16)
            result.update(accuracy=out["accuracy"], f1=out["f1"])
        lp = loss_and_perplexity(model, tokenize_split(rows, dcfg, tok, max_len), tok.pad_token_id, bs, precision.bf16)
        result.update(eval_loss=lp["eval_loss"], perplexity=lp["perplexity"])
    result["eval_runtime_s"] = round(time.perf_counter() - t0, 2)
    return result


WRITTEN_BY = "finetune-eval"


def _ours(path: Path) -> bool:
    """An earlier finetune-eval result (replaced by a new one); anything else is never overwritten."""
    try:
        return json.loads(path.read_text()).get("written_by") == WRITTEN_BY
    except (OSError, ValueError, AttributeError):
        return False


def check_eval_out(own: dict, default_name: str | None = None) -> Path | None:
    """The result file: ``out=`` or ``<run>/<default_name>``, checked before anything is scored (None while the
    default name is not known yet).

    Raises:
        FinetuneError: a run's own artifact, the current directory, a directory, or a file finetune-eval did not
            write.
    """
    from finetune.runs import check_out_path

    if own.get("out"):
        return check_out_path(own["out"], kind="file", command=WRITTEN_BY, owned_file=_ours)
    if default_name is None:
        return None
    return check_out_path(str(Path(own["run"]) / default_name), kind="file", command=WRITTEN_BY, owned_file=_ours)


def _body(argv: list[str]) -> int:
    from finetune.platform.locks import out_lock

    own, overrides = check_args(argv)
    given = bool(own.get("out"))
    if not given:  # the run's own result file, held while this command scores, as out= is
        own["out"] = default_out(own["run"], overrides, own["split"], own["harness"])
    with out_lock(own["out"], key="out" if given else None):
        return _evaluate(own, overrides)


def _evaluate(own: dict, overrides: list[str]) -> int:
    out = check_eval_out(own)
    if own["harness"] == "lm_eval":
        from finetune.cli.eval_harness import harness_run

        result = harness_run(own, lambda path, cfg: rows_to_score(path, cfg, overrides, own["split"]))
    else:
        result = evaluate_run(own["run"], overrides, own["split"], own["batch_size"])
    atomic_write_json(out, {"written_by": WRITTEN_BY, **result})
    print(json.dumps(result, indent=2))
    say(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """finetune-eval entry point: 0 on success, 2 on a user error (one ``error:`` line on stderr)."""
    return run_cli(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
