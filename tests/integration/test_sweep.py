"""A real Hydra multirun on the tiny model: jobs run, a bad job is recorded as failed while the others
complete, the report is written at the end of the sweep and rebuilds identically from the directory, and the
command's exit status says that jobs failed."""

from __future__ import annotations

import csv
import json

from tests.conftest import TINY, shared
from tests.integration.test_cli_e2e import cli


def test_multirun_records_failures_and_writes_the_report(tmp_path):
    sweep_dir = tmp_path / "sweep"
    data = shared("chnsenticorp")
    # The third value passes validation (a list of module names) but fails inside its job, when LoRA is applied.
    proc = cli(
        "finetune.cli.train", "-m", *[o for o in TINY if not o.startswith("logger=")], "logger=wandb",
        f"dataset.path={data}", "lora.r=4,8", "lora.target_modules=attn,[no_such_proj]", "sweep_name=test_grid",
        "isolate_jobs=false",  # in the sweep's own process: a job per process is tested in test_job_isolation.py
        f"hydra.sweep.dir={sweep_dir}", check=False,
    )
    # The sweep goes on past the failed jobs; its exit status and one last line say which failed.
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune-train: 2 of 4 jobs of the sweep failed: job 1 (") and "job 3 (" in last
    assert "no_such_proj" in last and str(sweep_dir) in last
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    metrics = {j.name: json.loads((j / "metrics.json").read_text()) for j in jobs}
    assert metrics["0"]["status"] == metrics["2"]["status"] == "ok"
    assert metrics["2"]["trainable_params"] == 2 * metrics["0"]["trainable_params"]  # r=8 vs r=4
    for failed in ("1", "3"):
        assert metrics[failed]["status"] == "failed" and "no_such_proj" in metrics[failed]["error"]
    # every job of the sweep shares one W&B group named after the sweep folder
    config = (jobs[0] / "config.yaml").read_text()
    assert f"group: {sweep_dir.parent.name}/{sweep_dir.name}" in config or f"group: {'/'.join(sweep_dir.parts[-2:])}" in config

    md = (sweep_dir / "comparison.md").read_text()
    assert "failed" in md and "no_such_proj" in md
    rows = list(csv.DictReader((sweep_dir / "comparison.csv").open()))
    assert len(rows) == 4 and sorted(r["status"] for r in rows) == ["failed", "failed", "ok", "ok"]
    assert list(sweep_dir.glob("*.png")), "no plot written"

    first = (sweep_dir / "comparison.csv").read_text()
    cli("finetune.cli.report", str(sweep_dir))
    assert (sweep_dir / "comparison.csv").read_text() == first


def test_a_sweep_whose_jobs_are_all_refused_exits_1_and_keeps_the_earlier_report(tmp_path):
    """The -m command twice with one hydra.sweep.dir, through the parallel launcher. The first runs its two jobs side
    by side and writes the report. The second refuses both jobs (their finished runs are kept), exits 1 with one line
    naming them, and leaves the first sweep's report and multirun.yaml as they were: the launcher's jobs run in worker
    processes, and each job's refusal reaches the sweep from the sweep folder's job records (the sweep's own process
    saw it before; a worker's it never did: exit 0)."""
    sweep_dir = tmp_path / "sweep"
    args = ["finetune.cli.train", "-m", *TINY, f"dataset.path={shared('chnsenticorp')}", "lora.r=4,8",
            "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}"]
    first = cli(*args, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = [json.loads((sweep_dir / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert [j["status"] for j in jobs] == ["ok", "ok"] and sorted(j["lora"]["r"] for j in jobs) == [4, 8]
    assert "Joblib.Parallel(n_jobs=2," in first.stdout + first.stderr
    # side by side: each job process's lifetime (from its start to its end, as it logs them) overlaps the other's
    spans = [_process_span(first.stderr, job) for job in ("0", "1")]
    assert max(s[0] for s in spans) < min(s[1] for s in spans), spans
    report, record = (sweep_dir / "comparison.md").read_bytes(), (sweep_dir / "multirun.yaml").read_bytes()
    runs = {p.name: (p / "metrics.json").read_bytes() for p in sweep_dir.iterdir() if p.name.isdigit()}
    again = cli(*args, "seed=7", check=False)  # a different command: Hydra writes its own multirun.yaml first
    assert again.returncode == 1, again.stderr[-3000:]
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune-train: 2 of 2 jobs of the sweep failed: job 0 (output_dir=") and "job 1 (" in last
    assert "already holds a run" in last
    assert (sweep_dir / "comparison.md").read_bytes() == report
    assert (sweep_dir / "multirun.yaml").read_bytes() == record  # the record of the sweep that made the runs
    assert {p.name: (p / "metrics.json").read_bytes() for p in sweep_dir.iterdir() if p.name.isdigit()} == runs


def _process_span(log: str, job: str) -> tuple[float, float]:
    """The two job processes share stderr, so a log record can land in the middle of the other's progress bar
    line: find each record by its own stamp and message, wherever it starts."""
    import re
    from datetime import datetime

    def stamp(event: str) -> float:
        found = re.findall(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]*\]\[INFO\] - "
                           rf"job {job}: process \d+ {event}", log)
        assert len(found) == 1, (job, event, found)
        return datetime.strptime(found[0], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    return stamp("started"), stamp("finished")


def test_a_sweep_folder_has_one_owner_at_a_time(tmp_path):
    """While a sweep runs in hydra.sweep.dir (here this process holds the folder, as that sweep would), a second
    sweep into it stops before Hydra writes anything there: one line naming the holder, exit status 2."""
    import os

    from finetune.platform.locks import RunDirLock

    sweep_dir = tmp_path / "sweep"
    held = RunDirLock(sweep_dir)
    held.acquire()
    try:
        proc = cli("finetune.cli.train", "-m", *TINY, f"dataset.path={shared('chnsenticorp')}", "lora.r=4,8",
                   f"hydra.sweep.dir={sweep_dir}", check=False)
    finally:
        before = sorted(p.name for p in sweep_dir.iterdir())
        held.release()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: hydra.sweep.dir={sweep_dir} is in use by another sweep right now (pid {os.getpid()}:")
    assert before == [".finetune.lock"]  # nothing of the second sweep: no multirun.yaml, no job folder


def test_a_stopped_sweep_continues_where_it_stopped(tmp_path):
    """The same -m command again with trainer.resume_from_checkpoint=auto: a job that finished is kept as it is (not
    trained or scored again), a job that never ran runs, and the report covers both. A finished run trained with
    another config and no checkpoint is refused, not replaced."""
    sweep_dir = tmp_path / "sweep"
    args = ["finetune.cli.train", "-m", *TINY, f"dataset.path={shared('chnsenticorp')}", "lora.r=4,8",
            "isolate_jobs=false", f"hydra.sweep.dir={sweep_dir}"]
    cli(*args)
    kept = (sweep_dir / "0" / "metrics.json").read_bytes(), (sweep_dir / "0" / "adapter").stat().st_mtime_ns
    for entry in sorted((sweep_dir / "1").rglob("*"), reverse=True):  # job 1 as if the sweep had stopped before it
        entry.rmdir() if entry.is_dir() else entry.unlink()
    (sweep_dir / "1").rmdir()
    again = cli(*args, "trainer.resume_from_checkpoint=auto", check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds this run, finished; kept as it is" in again.stdout + again.stderr
    assert ((sweep_dir / "0" / "metrics.json").read_bytes(), (sweep_dir / "0" / "adapter").stat().st_mtime_ns) == kept
    assert json.loads((sweep_dir / "1" / "metrics.json").read_text())["lora"]["r"] == 8
    rows = list(csv.DictReader((sweep_dir / "comparison.csv").open()))
    assert sorted(r["status"] for r in rows) == ["ok", "ok"]

    runs = {p.name: (p / "metrics.json").read_bytes() for p in sweep_dir.iterdir() if p.name.isdigit()}
    other = cli(*args, "trainer.resume_from_checkpoint=auto", "seed=7", check=False)
    assert other.returncode == 1, other.stderr[-3000:]
    assert other.stderr.strip().splitlines()[-1].startswith("finetune-train: 2 of 2 jobs of the sweep failed")
    said = other.stdout + other.stderr
    assert "holds a finished run trained with seed=42 (now 7) and no checkpoint to continue from" in said
    assert {p.name: (p / "metrics.json").read_bytes() for p in sweep_dir.iterdir() if p.name.isdigit()} == runs
