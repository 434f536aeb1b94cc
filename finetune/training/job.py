"""One run of finetune-train in its directory: the config and the directory are checked before anything is
written, the stages of :mod:`finetune.training.stages` run in order, and a failure is recorded without replacing a
finished run (:class:`finetune.runs.RunWriter`)."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from omegaconf import DictConfig

from finetune.config import validate
from finetune.errors import LOG_FORMAT, FinetuneError, RunInterrupted

log = logging.getLogger("finetune.cli.train")


class _RunLog:
    """train.log of a run: records are held in memory until the run may write into its directory, so a rejected
    command leaves an existing run's log untouched."""

    def __init__(self) -> None:
        import logging.handlers

        self.root = logging.getLogger()
        self.buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 10)
        self.buffer.setLevel(logging.INFO)
        self.file: logging.Handler | None = None
        self.root.addHandler(self.buffer)
        self.level = self.root.level
        if self.root.level > logging.INFO or self.root.level == logging.NOTSET:
            self.root.setLevel(logging.INFO)

    def open(self, path: Path) -> None:
        self.file = logging.FileHandler(path, mode="a", encoding="utf-8")
        self.file.setFormatter(logging.Formatter(LOG_FORMAT))
        self.buffer.setTarget(self.file)
        self.buffer.flush()
        self.root.removeHandler(self.buffer)
        self.root.addHandler(self.file)

    def close(self) -> None:
        self.root.removeHandler(self.buffer)
        self.buffer.close()
        if self.file is not None:
            self.root.removeHandler(self.file)
            self.file.close()
        self.root.setLevel(self.level)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None, job: str = "0") -> dict:
    """Train and evaluate one configuration; writes every artifact into ``run_dir``; returns the metrics.

    Nothing is written before the config and the data have been checked; a directory that already holds a run
    is refused unless resumed or ``overwrite_run=true``; a failure is recorded without replacing a finished run
    (:class:`finetune.runs.RunWriter`).

    Raises:
        FinetuneError: a user error (bad value, file, combination); anything else a run can raise.
    """
    from finetune.runs import REFUSED, RunWriter, atomic_write_json, holds_run
    from finetune.training import distributed
    from finetune.training.checkpoints import finished_run, requeued_resume, resolve_resume  # light: no Trainer

    requeued_resume(cfg)
    done = distributed.agree(lambda: finished_run(cfg, Path(run_dir)))
    if done is not None:  # resume=auto of a run that finished: nothing left to do (a sweep continued)
        return done
    writer = RunWriter(run_dir, resume=cfg.trainer.get("resume_from_checkpoint") is not None,
                       overwrite=cfg.get("overwrite_run", False) is True)
    run_log = _RunLog()
    try:
        validate(cfg)
        # Rank 0 checks the directory and picks the checkpoint; under torchrun every rank follows its decision.
        distributed.agree(writer.check)
        # Resolved before anything is written: a bad path or a damaged checkpoint leaves the directory as it was.
        resume = distributed.agree(lambda: resolve_resume(cfg.trainer.get("resume_from_checkpoint"), Path(run_dir)))
        return _run(cfg, run_dir, writer, run_log, overrides or [], job, resume)
    except BaseException as exc:
        if not distributed.is_main():  # rank 0 records the failure; the others only stop
            raise
        if isinstance(exc, REFUSED):  # the directory is another run's: nothing of this attempt is written there
            log.error("run refused: %s", str(exc).splitlines()[0])
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, RunInterrupted):
            log.warning("run stopped: %s", message)
        elif isinstance(exc, KeyboardInterrupt):
            log.warning("run stopped by Ctrl-C outside a training step: nothing of it was saved to resume from")
        elif isinstance(exc, FinetuneError):
            log.error("run failed: %s", message)
        else:
            log.error("job failed:\n%s", traceback.format_exc())
        # Stopped on request (a signal after its checkpoint, or Ctrl-C) is not a failure of the run: resume it.
        stopped = isinstance(exc, (RunInterrupted, KeyboardInterrupt))
        if isinstance(exc, KeyboardInterrupt):
            message = "stopped by Ctrl-C outside a training step (no checkpoint of it)"
        failure = {"status": "interrupted" if stopped else "failed", "job": job, "error": message,
                   "error_type": type(exc).__name__,
                   "overrides": overrides or []}
        if not writer.started and not holds_run(run_dir):  # a fresh directory: nothing there to lose
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            run_log.open(Path(run_dir) / "train.log")
            atomic_write_json(Path(run_dir) / "metrics.json", failure)
        failed = writer.fail(failure)
        if failed is not None:
            log.error("this attempt failed; the finished run in %s is kept as it was, the attempt is in %s",
                      run_dir, failed)
            if isinstance(exc, RunInterrupted) and (failed / "checkpoints").is_dir():
                # overwrite_run: the attempt went aside with its checkpoints, the run it was to replace came back
                moved = (f"{message.split(': ', 1)[0]}: this attempt and its checkpoints were moved to {failed} and "
                         f"the run it was to replace is back in {run_dir}; continue the attempt with "
                         f"hydra.run.dir={failed} trainer.resume_from_checkpoint=auto")
                atomic_write_json(failed / "metrics.json", {**failure, "error": moved})
                raise RunInterrupted(moved, exc.signum, exc.then) from exc
        raise
    finally:
        writer.release()
        run_log.close()


def _run(cfg: DictConfig, run_dir: Path, writer, run_log: _RunLog, overrides: list[str], job: str,
         resume: str | None) -> dict:
    """The stages of a run (:mod:`finetune.training.stages`), in order."""
    from finetune.training import distributed, stages
    state = stages.Job(cfg, Path(run_dir), writer, overrides, job, resume)
    stages.prepare(state, run_log)
    stages.baseline(state)
    stages.adapt(state)
    stages.fit(state)
    if stages.save(state):
        stages.baseline(state, after_training=True)  # where the adapters can be switched off: see the stage
        stages.score(state)
    if not state.main:  # rank 0 records
        return {"status": "ok", "rank": distributed.rank()}
    return stages.record(state)
