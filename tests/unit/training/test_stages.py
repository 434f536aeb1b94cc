"""The named stages of a run, called one at a time as finetune.training.job does: each adds what it names and
nothing marks the run finished before record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.runs import RunWriter
from finetune.training import stages
from finetune.training.job import _RunLog


def test_each_stage_can_be_called_alone_and_adds_what_it_names(tiny_cfg):
    cfg = tiny_cfg("eval.zero_shot=true")
    run_dir = Path(cfg.output_dir)
    writer = RunWriter(run_dir, resume=False, overwrite=False)
    writer.check()
    job = stages.Job(cfg, run_dir, writer, [], "0")
    run_log = _RunLog()
    try:
        stages.prepare(job, run_log)  # rows, the run directory opened, the model loaded
        assert job.splits.test and job.model is not None and job.metrics["status"] == "running"
        assert (run_dir / "config.yaml").is_file() and not (run_dir / "metrics.json").exists()

        stages.baseline(job)  # a LoRA run scores its base model zero-shot after training (adapters off)
        assert "zero_shot_accuracy" not in job.metrics and "trainable_params" not in job.metrics

        stages.adapt(job)  # LoRA: a small share of the parameters trains
        assert 0 < job.metrics["trainable_params"] < job.metrics["total_params"] / 10

        stages.fit(job)  # the Trainer's steps and the training figures
        assert job.metrics["train_steps"] == cfg.trainer.max_steps and job.metrics["train_tokens"] > 0
        assert "accuracy" not in job.metrics

        assert stages.save(job) is True  # rank 0 goes on to score

        stages.baseline(job, after_training=True)  # zero-shot scores of the base model
        assert 0.0 <= job.metrics["zero_shot_accuracy"] <= 1.0

        stages.score(job)  # validation and test scores after training
        assert job.metrics["n_scored"] == len(job.splits.test) and 0.0 <= job.metrics["accuracy"] <= 1.0
        assert not (run_dir / "metrics.json").exists()  # still not finished

        metrics = stages.record(job)  # metrics.json last: the run is finished
    finally:
        run_log.close()
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["status"] == "ok" and (run_dir / "adapter" / "adapter_config.json").is_file()


def test_a_run_directory_has_one_owner_at_a_time(tmp_path):
    """The lock is taken before the directory is checked; a second writer is refused at once naming the holder,
    touching nothing; once the owner lets go (or dies: the kernel drops a flock) the directory is free again."""
    import os

    from finetune.runs import LOCK_FILE, RunDirBusy, RunWriter

    run_dir = tmp_path / "run"
    owner = RunWriter(run_dir, resume=False, overwrite=False)
    owner.check()
    assert f"pid {os.getpid()}" in (run_dir / LOCK_FILE).read_text()
    other = RunWriter(run_dir, resume=False, overwrite=False)
    with pytest.raises(RunDirBusy, match=rf"output_dir={run_dir} is in use by another run right now \(pid {os.getpid()}"):
        other.check()
    assert (run_dir / LOCK_FILE).exists()  # the refused writer removed nothing of the owner's
    owner.release()
    assert not run_dir.exists()  # made by the lock, never used: gone again
    again = RunWriter(run_dir, resume=False, overwrite=False)
    again.check()
    again.release()
