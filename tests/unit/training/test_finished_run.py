"""trainer.resume_from_checkpoint=auto over a finished run (how a stopped sweep continues): which config differences
keep the run as it is, which refuse it, and which leave the ordinary resume to decide."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from finetune.runs import RunDirHeld, resolved_config
from finetune.training.checkpoints import finished_run
from tests.conftest import TINY, compose_cfg


def _finished(run_dir, *overrides):
    """A folder holding a finished run of ``TINY + overrides``: its config.yaml and an ``ok`` metrics.json."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved_config(compose_cfg([*TINY, *overrides], run_dir))))
    (run_dir / "metrics.json").write_text(json.dumps({"status": "ok", "accuracy": 0.75}))
    return run_dir


def _auto(run_dir, *overrides):
    return compose_cfg([*TINY, "trainer.resume_from_checkpoint=auto", *overrides], run_dir)


def test_a_finished_run_of_this_config_is_kept_whatever_it_logged_or_where(tmp_path):
    run_dir = _finished(tmp_path / "run")
    assert finished_run(_auto(run_dir, "trainer.logging_steps=1", "logger=wandb"), run_dir)["accuracy"] == 0.75
    assert finished_run(compose_cfg(TINY, run_dir), run_dir) is None  # not asked to resume: the usual refusal
    assert finished_run(_auto(run_dir, "overwrite_run=true"), run_dir) is None  # asked to replace it


def test_a_key_a_later_release_added_is_not_compared_but_a_changed_value_is(tmp_path):
    run_dir = _finished(tmp_path / "run")
    recorded = OmegaConf.load(run_dir / "config.yaml")
    del recorded.qat["eval_spread"]  # as written by a release without the key
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(recorded))
    assert finished_run(_auto(run_dir), run_dir) is not None
    with pytest.raises(RunDirHeld, match=r"trained with seed=42 \(now 7\) and no checkpoint to continue from"):
        finished_run(_auto(run_dir, "seed=7"), run_dir)
    (run_dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # a checkpoint: the ordinary resume decides
    assert finished_run(_auto(run_dir, "seed=7"), run_dir) is None
