"""Sweep jobs each in a fresh process (``isolate_jobs``): an own heap for honest peak memory, and a crash or an
out-of-memory kill that fails only its job, recorded in the job's metrics.json without touching a finished run."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune.config import validate
from finetune.errors import LOG_FORMAT, FinetuneError, RunInterrupted

log = logging.getLogger("finetune.cli.train")


def _record_failure(run_dir: Path, job: str, overrides: list[str], message: str, error_type: str) -> None:
    """A failure the job itself could not record (a hard-killed job process); never over a finished run."""
    from finetune.runs import atomic_write_json, read_status

    if read_status(run_dir) == "ok":
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "metrics.json", {
        "status": "failed", "job": job, "error": message, "error_type": error_type, "overrides": overrides,
    })


def _job_process(cfg_yaml: str, run_dir: str, overrides: list[str], job: str) -> None:
    """Body of an isolated sweep job (a spawned process): log to stderr like Hydra does, run (which keeps
    train.log), record."""
    fmt = logging.Formatter(LOG_FORMAT)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    import os

    start = time.perf_counter()
    log.info("job %s: process %d started", job, os.getpid())
    try:
        from finetune.training.job import run

        run(OmegaConf.create(cfg_yaml), Path(run_dir), overrides, job)
        log.info("job %s: process %d finished after %.1f s", job, os.getpid(), time.perf_counter() - start)
    except RunInterrupted as exc:  # a checkpoint of the step was saved; recorded in metrics.json
        sys.exit(128 + exc.signum)
    except FinetuneError as exc:  # recorded in metrics.json; the job's log says why too
        log.error("job %s failed: %s", job, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        sys.exit(1)
    except BaseException:  # recorded in metrics.json, traceback logged
        sys.exit(1)


@contextlib.contextmanager
def _passing_on_stop_signals(proc):
    """While the sweep waits for a job process, a stop signal (SIGTERM, SIGUSR1) sent to the sweep alone is passed
    on to the job, which saves a checkpoint of its step and stops; the signals received are collected, so the
    sweep then stops too instead of starting its next job. (A signal sent to the whole process group, as a
    scheduler does, reaches the job directly as well; it acts on the first.) Ctrl-C (SIGINT) is not passed on: the
    terminal sends it to the job too."""
    import os
    import signal
    import threading

    from finetune.training.signals import STOP_SIGNALS

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def pass_on(signum, frame):  # noqa: ARG001 - the signal module's signature
        if signum == signal.SIGINT:
            # A terminal's Ctrl-C reaches the job's process too (the whole foreground group): passing it on would
            # count as the second Ctrl-C there, which stops at once. Pressed again, the sweep stops now as well.
            if signal.SIGINT in received:
                raise KeyboardInterrupt
            received.append(signum)
            return
        received.append(signum)
        if proc.pid is not None and proc.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the out-of-memory killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"job process killed by {name}{hint}"
    return f"job process exited with status {code} before writing its metrics"


def run_isolated(cfg: DictConfig, run_dir: Path, overrides: list[str], job: str, target=None) -> dict:
    """Run one sweep job in a fresh process and return its metrics.json.

    Each job then starts from an empty heap, so its peak memory is its own (in one process, memory an
    earlier job freed but the allocator kept counts against the next one: +4.6 GB measured for the last
    job of a 4-job CPU sweep), and a crash or an out-of-memory kill fails only that job.
    ``target`` replaces the job body (same arguments as :func:`_job_process`; tests).
    """
    import multiprocessing
    import os

    from finetune.training import distributed
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    path = run_dir / "metrics.json"
    before = path.read_bytes() if path.is_file() else None
    # By module path: a launcher's worker process (joblib) imports it back by that name.
    body = target or importlib.import_module("finetune.training.sweep_jobs")._job_process
    proc = multiprocessing.get_context("spawn").Process(
        target=body, args=(cfg_yaml, str(run_dir), overrides, job), name=f"finetune-job-{job}")
    # With CUDA, the job gets gpus_per_job GPUs no other running job of the sweep holds (jobs side by side under
    # hydra/launcher=parallel); the sweep folder keeps the lease files.
    with distributed.gpu_lease(run_dir.parent / ".gpu-lease", int(cfg.get("gpus_per_job") or 0)) as gpus:
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpus is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = distributed.visible_devices(gpus)
            log.info("job %s on GPU(s) %s", job, os.environ["CUDA_VISIBLE_DEVICES"])
        try:
            with _stdlib_start_method():
                proc.start()  # the child takes this environment
        except Exception as exc:  # noqa: BLE001 - the job could not start: recorded like any job failure
            message = f"job process could not start: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            _record_failure(run_dir, job, overrides, message, "JobProcessError")
            return {"status": "failed", "job": job, "error": message, "error_type": "JobProcessError",
                    "overrides": overrides}
        finally:
            if gpus is not None:
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
        with _passing_on_stop_signals(proc) as stop_signals:
            proc.join()
    after = path.read_bytes() if path.is_file() else None
    status = json.loads(after).get("status") if after is not None else None
    if after is None or (after == before and proc.exitcode != 0) or status == "running":
        reason = _exit_reason(proc.exitcode)
        _record_failure(run_dir, job, overrides, reason, "JobProcessError")
        recorded = json.loads(path.read_text()) if path.is_file() else {}
        if recorded.get("status") != "failed":  # a finished run kept its metrics.json; this job still failed
            recorded = {"status": "failed", "job": job, "error": reason, "error_type": "JobProcessError",
                        "overrides": overrides}
    else:
        recorded = json.loads(after)
    if stop_signals:
        import signal

        outcome = recorded.get("error") if recorded.get("status") != "ok" else "finished"
        raise RunInterrupted(f"job {job}: {outcome}; the sweep stopped on {signal.Signals(stop_signals[0]).name} "
                             f"before its next job; continue the sweep with the same command and "
                             f"hydra.sweep.dir={_sweep_dir(run_dir)} trainer.resume_from_checkpoint=auto",
                             stop_signals[0])
    return recorded


def _sweep_dir(run_dir: Path) -> Path:
    """The folder of the sweep under way (Hydra's ``sweep.dir``; the job folder's parent outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().sweep.dir).absolute()
    except ValueError:
        return Path(run_dir).absolute().parent


@contextlib.contextmanager
def _stdlib_start_method():
    """A spawned child replays its parent's global start method; inside a joblib (loky) worker that is 'loky', which
    the child cannot resolve. Switch to 'spawn' while starting the job process, then put the worker's back."""
    import multiprocessing

    current = multiprocessing.get_start_method(allow_none=True)
    if current in (None, "spawn", "fork", "forkserver"):
        yield
        return
    saved = multiprocessing.context._default_context._actual_context  # the worker's own (loky) context
    multiprocessing.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocessing.context._default_context._actual_context = saved


def check_before_spawn(cfg: DictConfig, run_dir: Path, overrides: list[str], job: str) -> None:
    """The checks ``run`` starts with, in the sweep process: a bad value fails the job without a process."""
    from finetune.runs import check_run_dir
    from finetune.training.checkpoints import requeued_resume

    requeued_resume(cfg)  # as run() does: a requeued SLURM job continues its run
    # A directory that already holds a run is left exactly as it is: nothing is recorded in it.
    check_run_dir(run_dir, resume=cfg.trainer.get("resume_from_checkpoint") is not None,
                  overwrite=bool(cfg.get("overwrite_run", False)))
    try:
        validate(cfg)
    except FinetuneError as exc:
        _record_failure(run_dir, job, overrides, str(exc).splitlines()[0], type(exc).__name__)
        raise


def launcher_isolates() -> bool:
    """True when the Hydra launcher already runs every job in a fresh process of its own (submitit: local and
    SLURM); the basic launcher runs jobs in the sweep process and joblib reuses its workers, so there
    ``isolate_jobs`` spawns one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return "submitit" in str(HydraConfig.get().launcher.get("_target_", ""))
    except ValueError:
        return False
