"""The `slurm` launcher on a real one-node SLURM cluster (scripts/slurm-local: slurmctld, slurmd, slurmdbd, munge on
this machine), with the tiny model: a sweep submitted as an array, a job signalled as submitit's signal delay does
(requeued, resumed to the uninterrupted job's figures), a 2-task job as one DDP run, a failed job in the exit status,
and what sacct shows of each. Skipped, with the reason, only where SLURM is not installed (`scripts/slurm-local
install` installs Debian's packages; .ci/run does)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, shared

SCRIPT = ROOT / "scripts" / "slurm-local"
# Each job one CPU and 2 GB: the two jobs of a sweep run side by side on a 2-core node.
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=15"]
# 64 steps with a checkpoint every 3: long enough to be signalled mid-training from outside.
RESUMABLE = [*TINY, "trainer.max_steps=-1", "trainer.epochs=2", "dataset.max_train_samples=64",
             "trainer.logging_steps=3", "trainer.save_strategy=steps", "trainer.save_steps=3",
             "trainer.save_total_limit=2", "trainer.eval_strategy=steps", "trainer.eval_steps=4", "trainer.lr=5e-3"]
COMPARED = ("train_steps", "train_loss", "train_tokens", "eval_loss", "accuracy", "f1", "perplexity")


@pytest.fixture(scope="module")
def slurm():
    """The local cluster, started for this module (and stopped after it, unless it was running before); the
    environment its clients need (SLURM_CONF)."""
    check = subprocess.run([SCRIPT, "check"], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:  # "[slurm-local] missing ...: scripts/slurm-local install ..."
        pytest.skip(f"SLURM is not installed: {check.stderr.strip().removeprefix('[slurm-local] ')}")
    was_running = subprocess.run([SCRIPT, "status"], capture_output=True).returncode == 0
    started = subprocess.run([SCRIPT, "start"], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, f"the local SLURM cluster did not start:\n{started.output[-3000:]}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               SLURM_CONF=started.stdout.strip().split("=", 1)[1])
    env.pop("WANDB_API_KEY", None)
    yield env
    if not was_running:
        subprocess.run([SCRIPT, "stop"], capture_output=True, timeout=120)


def _sweep(env: dict, sweep: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "finetune.cli.train", "-m", *overrides, f"dataset.path={shared('chnsenticorp')}",
         *LAUNCHER, f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _sacct(env: dict, job: str, fields: str = "JobID,State,NTasks") -> list[dict]:
    """Every record of the job and its steps (-D: a requeued job's earlier runs too)."""
    out = subprocess.run(["sacct", "-D", "-n", "-P", "-j", job, "-o", fields], env=env, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return [dict(zip(fields.split(","), line.split("|"))) for line in out.splitlines() if line]


def _array_id(sweep: Path, timeout: float = 120) -> str:
    """The SLURM job id of the sweep's array (submitit names its folders <id>_<task>)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        folders = [p.name for p in (sweep / ".submitit").glob("*_0")] if (sweep / ".submitit").is_dir() else []
        if folders:
            return folders[0].split("_")[0]
        time.sleep(0.1)
    raise AssertionError(f"no array job was submitted into {sweep}")


def _wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the sweep ended before {what}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _settled(env: dict, job: str) -> list[dict]:
    """sacct's records once every one has ended (a job's record can trail its process by a moment)."""
    deadline = time.time() + 60
    while True:
        records = _sacct(env, job)
        if not any(r["State"] in ("RUNNING", "PENDING", "COMPLETING") for r in records) or time.time() > deadline:
            return records
        time.sleep(0.5)


def test_a_sweep_is_one_array_and_a_job_signalled_before_its_limit_is_requeued_and_resumes_to_the_same_figures(
        slurm, tmp_path):
    """Two identical jobs as one array; job 0 gets SIGUSR2 mid-training (what submitit's signal delay sends before
    the time limit): it checkpoints the step under way, submitit requeues it, and the requeued job resumes from
    that checkpoint to the figures of job 1, which ran uninterrupted. The report is written once, by the submitting
    process, when both have ended; sacct shows the requeue."""
    sweep = tmp_path / "sweep"
    proc = _sweep(slurm, sweep, *RESUMABLE, "seed=0,0")
    array = _array_id(sweep)
    _wait_for(lambda: (sweep / "0" / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file(),
              "job 0's first checkpoint", proc)
    subprocess.run(["scancel", "--signal=USR2", f"{array}_0"], env=slurm, check=True, timeout=60)

    # The local cluster holds a requeued job back 10 s (cred_expire in scripts/slurm-local; 120 s is SLURM's default).
    _wait_for(lambda: "REQUEUED" in {r["State"] for r in _sacct(slurm, f"{array}_0")}, "job 0's requeue", proc)
    output = proc.communicate(timeout=600)[0]  # Hydra's log and the command's own lines
    assert proc.returncode == 0, output[-3000:]

    stopped, plain = (json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1"))
    assert stopped["status"] == plain["status"] == "ok"
    step = stopped["resumed_from"]["step"]
    assert 3 <= step < 64 and "resumed_from" not in plain
    for key in COMPARED:
        assert stopped.get(key) == plain.get(key), key
    log = "".join(p.read_text() for p in (sweep / ".submitit" / f"{array}_0").glob("*_log.*"))
    assert f"finetune-train: stopped by SIGUSR2 after step {step}" in log and f"Requeued job {array}_0" in log
    assert "SLURM requeued this job (SLURM_RESTART_COUNT=1)" in log

    assert output.count("comparison report:") == 1
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert sorted((r["job"], r["status"]) for r in rows) == [("0", "ok"), ("1", "ok")]
    jobs = [(r["JobID"], r["State"]) for r in _settled(slurm, array) if "." not in r["JobID"]]
    assert jobs.count((f"{array}_0", "REQUEUED")) == 1 and jobs.count((f"{array}_0", "COMPLETED")) == 1, jobs
    assert (f"{array}_1", "COMPLETED") in jobs, jobs


def test_a_two_task_job_is_one_ddp_run_and_a_failed_job_sets_the_sweeps_exit_status(slurm, tmp_path):
    """tasks_per_node=2: each job runs as one DDP job over its two SLURM tasks (world size 2, gloo), into one run
    directory. The sweep's second job fails inside (a LoRA target the model lacks): its failure is recorded in its
    metrics.json and the report, and the sweep exits 1 naming it. sacct shows both jobs COMPLETED (the failure is the
    framework's record, not SLURM's), each with a 2-task step."""
    sweep = tmp_path / "sweep"
    proc = _sweep(slurm, sweep, *TINY, "distributed=ddp", "lora.target_modules=attn,[no_such_proj]",
                  "hydra.launcher.tasks_per_node=2")
    output = proc.communicate(timeout=600)[0]  # Hydra's log and the command's own lines
    assert proc.returncode == 1, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("finetune-train: 1 of 2 jobs of the sweep failed: job 1 (") and "no_such_proj" in last

    ok, failed = (json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1"))
    assert ok["status"] == "ok" and ok["distributed"]["world_size"] == 2, ok.get("distributed")
    assert failed["status"] == "failed" and "no_such_proj" in failed["error"]
    # one run directory per job (beside submitit's folder and the sweep's job records)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [".finetune-jobs", ".submitit", "0", "1"]
    array = _array_id(sweep)
    assert len(list((sweep / ".submitit" / f"{array}_0").glob("*_log.out"))) == 2  # one log per task
    records = _settled(slurm, array)
    assert [(r["JobID"], r["State"]) for r in records if "." not in r["JobID"]] == [
        (f"{array}_0", "COMPLETED"), (f"{array}_1", "COMPLETED")], records
    assert {r["NTasks"] for r in records if r["JobID"].endswith(".0")} == {"2"}, records
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert sorted((r["job"], r["status"]) for r in rows) == [("0", "ok"), ("1", "failed")]
