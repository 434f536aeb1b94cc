"""How one finetune-train job runs where it was started: a single run (a user error exits 2 with one line), a
sweep job (every failure recorded in its metrics.json, the sweep goes on; each job in its own process), or one
job over the processes of torchrun / accelerate launch. Returns what a sweeper optimises."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path

from omegaconf import DictConfig

from finetune.errors import FinetuneError, RunInterrupted, print_error, say
from finetune.runs import REFUSED
from finetune.training.job import run

log = logging.getLogger("finetune.cli.train")


def _hydra_context() -> tuple[bool, list[str], str, str | None]:
    """(multirun?, this job's overrides, job id, sweep folder) — defaults when called outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:
        return False, [], "0", None
    multirun = hc.mode == RunMode.MULTIRUN
    return multirun, list(hc.overrides.task), str(hc.job.get("num", "0")), str(hc.sweep.dir) if multirun else None


def objective(metrics: dict) -> float:
    """What a sweeper maximises, measured on the validation split, never on test (a configuration chosen by its
    test score would report an optimistic, selected number): validation accuracy for classification, minus
    the validation loss for generation. Test scores are recorded beside it, not used for selection."""
    if "val_accuracy" in metrics:
        return float(metrics["val_accuracy"])
    return -float(metrics.get("eval_loss", math.inf))


def run_and_record(cfg: DictConfig) -> float:
    """Run one job. A user error in a single run exits 2 with one line; in a sweep every failure is
    recorded in the job's metrics.json and the sweep goes on (``isolate_jobs``: each job in its own process).
    Ctrl-C during training stops after a checkpoint of the step (:mod:`finetune.training.signals`); elsewhere, or
    pressed twice, it stops at once: one line and exit status 130, never a traceback."""
    try:
        return _run_and_record(cfg)
    except KeyboardInterrupt:
        say("finetune-train: stopped by Ctrl-C; nothing since the last checkpoint was saved (metrics.json says "
            "status: interrupted)")
        sys.exit(128 + 2)  # as a shell reports a process ended by SIGINT


def _run_and_record(cfg: DictConfig) -> float:
    from finetune.training import distributed, sweep_jobs

    from finetune.report.hydra_callback import note_job_outcome
    from finetune.training.checkpoints import finished_run

    multirun, overrides, job, sweep_dir = _hydra_context()
    run_dir = Path(cfg.output_dir)
    if sweep_dir and cfg.logger.get("backend") == "wandb" and not cfg.logger.get("group"):
        # <sweep name>/<time> (the sweep folder below multirun_sweeps/): W&B groups the sweep's jobs together
        cfg.logger.group = "/".join(Path(sweep_dir).parts[-2:])
    distributed.adopt_slurm_tasks()
    if distributed.launched():
        if multirun and not sweep_jobs.launcher_isolates():
            print_error("a sweep (-m) cannot run inside torchrun / accelerate launch: launch single runs with them, "
                        "or give each sweep job several processes with hydra/launcher=slurm (tasks_per_node)")
            sys.exit(2)
        try:
            return objective(_run_launched(cfg, run_dir, overrides, job))
        except RunInterrupted as exc:
            _exit_interrupted(exc)
        except FinetuneError as exc:
            if multirun:  # recorded in the job's metrics.json by rank 0
                if distributed.is_main():
                    note_job_outcome(sweep_dir, job, "failed", str(exc).splitlines()[0], isinstance(exc, REFUSED))
                return float("nan")
            print_error(exc)
            sys.exit(2)
        finally:
            distributed.finish()
    if multirun:
        try:
            done = finished_run(cfg, run_dir)  # a continued sweep: this job finished before
            if done is not None:
                metrics = done
            elif cfg.get("isolate_jobs", True) and not sweep_jobs.launcher_isolates():
                sweep_jobs.check_before_spawn(cfg, run_dir, overrides, job)
                metrics = sweep_jobs.run_isolated(cfg, run_dir, overrides, job)
            else:
                metrics = run(cfg, run_dir, overrides, job)
        except RunInterrupted as exc:  # the scheduler wants the sweep to stop, not the next job to start
            _exit_interrupted(exc)
        except (FinetuneError, Exception) as exc:  # noqa: BLE001 - recorded in metrics.json by run()
            metrics = {"status": "failed", "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                       "refused": isinstance(exc, REFUSED)}
        note_job_outcome(sweep_dir, job, metrics.get("status"), metrics.get("error"), bool(metrics.get("refused")))
        if metrics.get("status") != "ok":
            log.error("job %s failed: %s (see %s)", job, metrics.get("error"), run_dir)
            return float("nan")
        return objective(metrics)
    try:
        return objective(run(cfg, run_dir, overrides, job))
    except RunInterrupted as exc:
        _exit_interrupted(exc)
    except FinetuneError as exc:
        print_error(exc)
        sys.exit(2)


def _exit_interrupted(exc: RunInterrupted) -> None:
    """Training stopped on SIGTERM / SIGUSR1 / SIGINT after saving a checkpoint (recorded in metrics.json): one line, and
    the exit status of a process ended by that signal (128 + its number), as schedulers expect. A sweep stopped so
    writes its report first (what ran, this job as interrupted)."""
    from finetune.report.hydra_callback import report_stopped_sweep

    report_stopped_sweep()
    say(f"finetune-train: {exc}")
    if exc.then is not None:  # e.g. submitit's: requeue the SLURM job, then exit
        exc.then(exc.signum, None)
    sys.exit(128 + exc.signum)


def _run_launched(cfg: DictConfig, run_dir: Path, overrides: list[str], job: str) -> dict:
    """One job over the processes of torchrun / accelerate launch: rank 0's run directory is everyone's (each
    rank's Hydra picked a time-stamped one of its own; an empty one it made is removed)."""
    import os

    from finetune.training import distributed
    distributed.init()
    shared = Path(distributed.broadcast(os.path.abspath(run_dir)))
    if shared != Path(os.path.abspath(run_dir)):
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only if empty: never anything this rank did not create
        cfg.output_dir = str(shared)
    return run(cfg, shared, overrides, job)
