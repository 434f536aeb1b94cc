"""``finetune-eval harness=lm_eval``: a finished run scored by lm-evaluation-harness.

The result file holds lm-eval's per-task results as lm-eval reports them, and, for the run's own dataset
(``tasks=run``), the row-by-row comparison with this project's scorer on the same rows, prompt and precision.
Where the run logs to W&B, the results also go to a W&B run of job type ``eval`` in the run's group.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("finetune.eval")


def harness_run(own: dict, rows_to_score) -> dict:
    """Score ``own["run"]`` on ``own["tasks"]`` with lm-eval; returns the result written to the eval file.

    ``rows_to_score(path, cfg)``: the rows of the split or file asked for, their source, the name the result goes
    by and the dataset config (finetune-eval's own selection, with its ``dataset.*`` overrides).
    """
    from finetune.evaluation import harness
    from finetune.model.load import load_run, resolve_precision
    from finetune.runs import run_config, run_kind

    path, cfg = run_config(own["run"])
    run_kind(path)
    names = own["tasks"]
    harness.preflight(names)  # a misspelt or unreachable task is refused before the model is loaded
    own_rows, source, scored, dcfg = None, None, None, cfg.dataset
    if harness.OWN_TASK in names:
        rows, source, scored, dcfg = rows_to_score(path, cfg)
        own_rows = rows[: own["limit"]] if own["limit"] else rows
    model, tok, cfg, path = load_run(path)
    precision = resolve_precision(cfg.trainer.precision, cfg.model.dtype, full_finetune=cfg.lora.method == "none")
    bs = int(own["batch_size"] or cfg.eval.batch_size)
    max_len = int(cfg.trainer.max_length)
    t0 = time.perf_counter()
    out = harness.evaluate(model, tok, names, own_rows, dcfg, max_len, bs, precision.bf16, own["limit"])
    result = {"run": str(path), "harness": "lm_eval", "lm_eval_version": harness.lm_eval_version(),
              "tasks": out["tasks"], "precision": precision.name, "batch_size": bs, "limit": own["limit"],
              "results": out["results"], "versions": out["versions"], "n_samples": out["n_samples"]}
    if own_rows is not None:
        result.update(dataset=dcfg.name, data_source=source, scored=scored, n=len(own_rows),
                      own_task=out["own_task"])
        result["agreement"] = compare_with_scorer(model, tok, own_rows, dcfg, max_len, bs, precision.bf16,
                                                  out["own_loglikelihoods"])
    result["eval_runtime_s"] = round(time.perf_counter() - t0, 2)
    log_to_wandb(cfg, path, result)
    return result


def compare_with_scorer(model, tok, rows: list[dict], dcfg, max_len: int, bs: int, bf16: bool,
                        harness_lls: list[list[float]]) -> dict:
    """This project's scorer on the same rows, and how often its decision is the harness's."""
    from finetune.evaluation.harness import agreement, predictions
    from finetune.evaluation.scoring import label_scores, macro_f1

    scores = label_scores(model, tok, rows, dcfg, max_len, bs, bf16).tolist()
    labels = [int(r[dcfg.get("label_field", "label")]) for r in rows]
    found = agreement(harness_lls, scores, labels)
    k = len(dcfg.label_words)
    found.update(harness_f1=macro_f1(labels, predictions(harness_lls), k),
                 scorer_f1=macro_f1(labels, predictions(scores), k))
    if found["same_prediction"] < 0.99:
        log.warning("lm-eval and this project's scorer disagree on %d of %d rows (%.1f%%): see the eval file's "
                    "agreement.differing_rows", len(found["differing_rows"]), found["n"],
                    100 * (1 - found["same_prediction"]))
    return found


def log_to_wandb(cfg, run_dir: Path, result: dict) -> None:
    """The harness's numbers as a W&B run of job type ``eval`` beside the training run (where it logs to W&B)."""
    from finetune.report import tracking

    if cfg.logger.backend != "wandb":
        return
    name = f"{cfg.run_name or run_dir.name}-lm_eval"
    run = tracking.init_run(cfg, run_dir, name, ["eval", "lm_eval"])
    summary = {f"lm_eval/{task}/{metric}": value for task, metrics in result["results"].items()
               for metric, value in metrics.items()}
    if "agreement" in result:
        summary["lm_eval/agreement/same_prediction"] = result["agreement"]["same_prediction"]
    tracking.finish_run(run, summary)
