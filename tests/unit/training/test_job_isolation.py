"""Sweep jobs in their own processes: the metrics come back through metrics.json, a user error inside the
job is recorded with its message, and a job process that dies hard (a crash, the OOM killer) is recorded
as failed with the reason instead of taking the sweep down."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from finetune.training.sweep_jobs import _exit_reason, run_isolated
from tests.conftest import TINY, compose_cfg


def _killed(cfg_yaml: str, run_dir: str, overrides: list[str], job: str) -> None:
    """A job body that dies the way an out-of-memory kill does, after the job has started."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "metrics.json").write_text(json.dumps({"status": "running", "job": job}))
    os.kill(os.getpid(), signal.SIGKILL)


def _writes_ok(cfg_yaml: str, run_dir: str, overrides: list[str], job: str) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "metrics.json").write_text(json.dumps({"status": "ok", "job": job, "pid": os.getpid()}))


def test_metrics_come_back_from_a_separate_process(tmp_path):
    m = run_isolated(compose_cfg(TINY, tmp_path), tmp_path / "job", ["lora.r=4"], "3", target=_writes_ok)
    assert m["status"] == "ok" and m["job"] == "3" and m["pid"] != os.getpid()


def test_hard_killed_job_is_recorded_as_failed(tmp_path):
    m = run_isolated(compose_cfg(TINY, tmp_path), tmp_path / "job", ["lora.r=4"], "1", target=_killed)
    assert m["status"] == "failed" and m["error_type"] == "JobProcessError"
    assert m["error"].startswith("job process killed by SIGKILL") and m["overrides"] == ["lora.r=4"]
    assert json.loads((tmp_path / "job" / "metrics.json").read_text()) == m


def test_user_error_inside_the_job_process_keeps_its_message(tmp_path):
    cfg = compose_cfg([*TINY, "lora.r=-1"], tmp_path)
    m = run_isolated(cfg, tmp_path / "job", ["lora.r=-1"], "0")
    assert m["status"] == "failed" and m["error_type"] == "FinetuneError" and "lora.r=-1" in m["error"]
    assert "lora.r=-1" in (tmp_path / "job" / "train.log").read_text()


def test_exit_reasons_name_the_cause():
    assert _exit_reason(-9).startswith("job process killed by SIGKILL (the out-of-memory killer")
    assert _exit_reason(3) == "job process exited with status 3 before writing its metrics"


def test_a_job_process_that_cannot_start_is_recorded_as_failed(tmp_path):
    """A job body the spawn cannot hand to the child (here: a lambda, which does not pickle) fails that job,
    recorded in its metrics.json, instead of leaving an empty job folder."""
    m = run_isolated(compose_cfg(TINY, tmp_path), tmp_path / "job", ["lora.r=4"], "2", target=lambda *a: None)
    recorded = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert m["status"] == recorded["status"] == "failed" and "could not start" in recorded["error"]
    assert recorded["job"] == "2" and recorded["overrides"] == ["lora.r=4"]
