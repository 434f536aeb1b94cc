"""Build the comparison report when a Hydra sweep ends, and (optionally) log it to W&B.

Register the callback in a sweep config::

    hydra:
      callbacks:
        report:
          _target_: finetune.report.hydra_callback.ReportCallback

Neither the callback nor :func:`log_table_to_wandb` ever raises: a report is a convenience,
so a problem with it is logged as a warning and the sweep's own result stands.

:class:`SweepOutcomeCallback` notes which jobs of the sweep did not finish (:data:`LAST_SWEEP`), from which
finetune-train sets its exit status: 1 when any job failed, so a script or a scheduler sees it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from finetune.errors import FinetuneError
from finetune.report.tracking import wandb_credentials

if TYPE_CHECKING:  # pandas, matplotlib and the report are imported when a sweep ends, not at every job's start
    import pandas as pd

log = logging.getLogger(__name__)


def _wandb_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy W&B can serialise: object columns as strings, missing values as empty strings."""
    out = df.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = out[column].map(lambda v: "" if v is None or v != v else str(v))
    return out


def log_table_to_wandb(df: pd.DataFrame, config: DictConfig | dict | None, table: pd.DataFrame | None = None,
                       images: list[Path] | None = None, sweep_dir: str | os.PathLike | None = None,
                       summary: pd.DataFrame | None = None) -> bool:
    """Best effort: log the comparison to a small W&B run in the sweep's group.

    Does nothing unless ``wandb`` imports and ``config.logger.backend == "wandb"``. Runs offline
    (``WANDB_MODE=offline``) when no credentials are configured or ``logger.mode`` says so;
    ``logger.mode: disabled`` skips it. Never raises; bounded by W&B's init/finish timeouts.

    Args:
        df: the collected runs (logged as table ``runs``).
        config: the sweep's config (``logger.*``; ``hydra.sweep.dir`` names the group when
            ``logger.group`` is null).
        table: the display comparison table (logged as table ``comparison``).
        images: PNG files to log as images.
        sweep_dir: where the W&B files go (default: ``hydra.sweep.dir`` or the current dir).
        summary: the means over seeds, when the comparison has them (logged as table ``comparison_mean``).

    Returns:
        True when the run was logged, False when skipped or when anything went wrong.
    """
    try:
        cfg = OmegaConf.create(config) if isinstance(config, dict) else config
        if cfg is None or OmegaConf.select(cfg, "logger.backend", default=None) != "wandb":
            return False
        mode = str(OmegaConf.select(cfg, "logger.mode", default="auto") or "auto")
        if mode == "disabled":
            return False
        try:
            import wandb
        except Exception:  # noqa: BLE001 - wandb absent or broken: nothing to log to
            return False
        if mode not in ("online", "offline"):
            mode = "online" if wandb_credentials(wandb) else "offline"
        elif mode == "online" and not wandb_credentials(wandb):
            mode = "offline"
        folder = Path(sweep_dir or OmegaConf.select(cfg, "hydra.sweep.dir", default=None) or ".")
        group = OmegaConf.select(cfg, "logger.group", default=None) or "/".join(folder.resolve().parts[-2:])
        previous = os.environ.get("WANDB_MODE")
        if mode == "offline":
            os.environ["WANDB_MODE"] = "offline"  # no credentials: never try the network
        try:
            run = wandb.init(
                project=OmegaConf.select(cfg, "logger.project", default=None) or "finetune",
                entity=OmegaConf.select(cfg, "logger.entity", default=None),
                group=str(group), job_type="report", name=f"report-{folder.resolve().name}",
                dir=str(folder), mode=mode, reinit="create_new",
                settings=wandb.Settings(init_timeout=60, finish_timeout=60, silent=True, console="off",
                                        x_disable_stats=True, disable_git=True, save_code=False),
            )
        finally:
            if previous is None:
                os.environ.pop("WANDB_MODE", None)
            else:
                os.environ["WANDB_MODE"] = previous
        try:
            payload: dict[str, Any] = {"runs": wandb.Table(dataframe=_wandb_frame(df))}
            if table is not None:
                payload["comparison"] = wandb.Table(dataframe=_wandb_frame(table))
            if summary is not None:
                payload["comparison_mean"] = wandb.Table(dataframe=_wandb_frame(summary))
            for image in images or []:
                payload[f"plot/{Path(image).stem}"] = wandb.Image(str(image))
            run.log(payload)
        finally:
            run.finish()
        return True
    except Exception as exc:  # noqa: BLE001 - best effort by contract
        log.warning("could not log the comparison table to W&B: %s", exc)
        return False


class ReportCallback(Callback):
    """Hydra callback: write comparison.md / .csv / PNG into the sweep dir when a multirun ends.

    Args:
        kind: force a report kind (default: detected from the jobs).
        metric: column to rank on (default: the task's main metric).
        wandb: also log the table to W&B when ``logger.backend == "wandb"``.
    """

    def __init__(self, kind: str | None = None, metric: str | None = None, wandb: bool = True) -> None:
        self.kind, self.metric, self.wandb = kind, metric, wandb

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global SWEEP_UNDER_WAY
        SWEEP_UNDER_WAY = (self, config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Build the report for ``config.hydra.sweep.dir``; failures become a logged warning.

        Args:
            config: the sweep's composed config (with its ``hydra`` node).
            **kwargs: unused (Hydra passes ``config_name``).
        """
        global SWEEP_UNDER_WAY
        SWEEP_UNDER_WAY = None
        try:
            sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
            if not sweep_dir:
                log.warning("comparison report skipped: the config has no hydra.sweep.dir")
                return
            if nothing_ran(sweep_dir):
                log.warning("no job of this sweep ran (each one's directory already holds a run): the report of the "
                            "earlier runs in %s is left as it was", sweep_dir)
                return
            from finetune.report.compare import generate_report

            report = generate_report(sweep_dir, self.kind, self.metric)
            log.info("comparison report: %s", report.comparison.takeaway)
            log.info("wrote %s", ", ".join(str(p) for p in report.paths.values()))
        except Exception as exc:  # noqa: BLE001 - a report must never fail the sweep
            log.warning("comparison report not built: %s", exc)
            return
        if self.wandb:
            images = [report.paths[k] for k in ("plot", "plot_vs_best_ptq") if k in report.paths]
            log_table_to_wandb(report.runs, config, table=report.comparison.table, images=images,
                               sweep_dir=sweep_dir, summary=report.comparison.summary)


# The report callback and config of a sweep that started in this process and has not ended (None otherwise).
SWEEP_UNDER_WAY: tuple[ReportCallback, DictConfig] | None = None


def report_stopped_sweep() -> None:
    """A sweep stopped by a signal (its job saved a checkpoint and stopped; no other job starts) never reaches
    Hydra's end of multirun: write its report here, listing what ran, the stopped job as ``interrupted``."""
    global SWEEP_UNDER_WAY
    started, SWEEP_UNDER_WAY = SWEEP_UNDER_WAY, None
    if started is not None:
        callback, config = started
        log.warning("the sweep stopped before its last job: writing the report of the jobs that ran")
        callback.on_multirun_end(config)


@dataclass
class SweepOutcome:
    """What the jobs of one sweep directory came to: how many, and each one that did not finish (job, error)."""

    sweep_dir: str
    jobs: int
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self, shown: int = 5) -> str:
        """One line naming the failed jobs and their errors (the first ``shown`` of them)."""
        items = [f"job {job} ({error if len(error) <= 120 else error[:119] + '…'})"
                 for job, error in self.failed[:shown]]
        more = f" and {len(self.failed) - shown} more" if len(self.failed) > shown else ""
        return (f"{len(self.failed)} of {self.jobs} jobs of the sweep failed: {', '.join(items)}{more}; "
                f"every job's metrics.json and the report are in {self.sweep_dir}")


# The outcome of the last sweep that ended in this process (None before one ends).
LAST_SWEEP: SweepOutcome | None = None
# What each job of the sweep under way came to, written into the sweep folder by the process that ran the job (the
# sweep's own, a launcher's worker, a SLURM job): ``<sweep>/.finetune-jobs/<job>.json``. A job refused because its
# directory already holds a run leaves that run's metrics.json as it was (status ok): only this record says the job
# did not run.
OUTCOMES = ".finetune-jobs"


def note_job_outcome(sweep_dir: str | os.PathLike, job: str, status: str | None, error: str | None = None,
                     refused: bool = False) -> None:
    """Record what a job of the sweep under way came to (finetune.training.launch calls it for each job)."""
    from finetune.runs import atomic_write_json

    folder = Path(sweep_dir) / OUTCOMES
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / f"{job}.json", {"job": str(job), "status": str(status or "failed"),
                                               "error": str(error or ""), "refused": bool(refused)})


def job_outcomes(sweep_dir: str | os.PathLike) -> dict[str, tuple[str, str, bool]]:
    """The records of :func:`note_job_outcome`: job -> (status, error, refused)."""
    out = {}
    for file in sorted((Path(sweep_dir) / OUTCOMES).glob("*.json")):
        try:
            r = json.loads(file.read_text())
            out[str(r["job"])] = (str(r["status"]), str(r["error"]), bool(r["refused"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record cut short: the job's own metrics.json still speaks for it
    return out


def forget_job_outcomes(sweep_dir: str | os.PathLike) -> None:
    """A new sweep into the folder: the records of an earlier one say nothing of it."""
    for file in (Path(sweep_dir) / OUTCOMES).glob("*.json"):
        file.unlink(missing_ok=True)


def nothing_ran(sweep_dir: str | os.PathLike) -> bool:
    """Every job of the sweep was refused (its directory held a run): the sweep made no run."""
    outcomes = job_outcomes(sweep_dir)
    return bool(outcomes) and all(refused for _, _, refused in outcomes.values())


def sweep_outcome(sweep_dir: str | os.PathLike) -> SweepOutcome:
    """Read every job of ``sweep_dir``: a job without ``status: ok`` in its metrics.json (failed, or never wrote
    one) did not finish; a directory with no job at all counts as one failure."""
    try:
        from finetune.report.collect import collect_runs

        df = collect_runs(sweep_dir)
    except (FinetuneError, OSError) as exc:  # no job wrote anything: that is the failure to report
        return SweepOutcome(str(sweep_dir), 0, [("-", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)])
    failed = [(str(row["job"]), str(row.get("error") or row["status"]))
              for _, row in df.iterrows() if row["status"] != "ok"]
    listed, outcomes = {job for job, _ in failed}, job_outcomes(sweep_dir)
    failed += [(job, error or status) for job, (status, error, _) in sorted(outcomes.items(), key=_job_order)
               if status != "ok" and job not in listed]
    return SweepOutcome(str(sweep_dir), max(len(df), len(outcomes)), failed)


def _job_order(item: tuple[str, Any]) -> tuple:
    return (0, int(item[0]), "") if item[0].isdigit() else (1, 0, item[0])


class SweepOutcomeCallback(Callback):
    """Hydra callback: when a multirun ends, record in :data:`LAST_SWEEP` which of its jobs did not finish."""

    def __init__(self) -> None:
        self.kept: tuple[Path, bytes] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Forget the last sweep; keep the bytes of an earlier sweep's multirun.yaml in this folder (Hydra rewrites
        it next), to put back if this sweep makes no run."""
        global LAST_SWEEP
        LAST_SWEEP = None
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if sweep_dir:
            forget_job_outcomes(sweep_dir)
        record = Path(str(sweep_dir)) / "multirun.yaml" if sweep_dir else None
        self.kept = (record, record.read_bytes()) if record is not None and record.is_file() else None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Note the outcome in :data:`LAST_SWEEP`; when every job was refused, the folder's records stay those of
        the runs it holds: the earlier multirun.yaml is put back."""
        global LAST_SWEEP
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        LAST_SWEEP = sweep_outcome(sweep_dir) if sweep_dir else None
        if self.kept is not None and sweep_dir and nothing_ran(sweep_dir):
            from finetune.runs import atomic_write_text

            record, text = self.kept
            atomic_write_text(record, text.decode())
        self.kept = None
