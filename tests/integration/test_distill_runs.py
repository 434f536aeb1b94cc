"""Whole tiny runs with distillation: a finished run as teacher, the self-teacher of a QAT run resumed exactly, and
a teacher that is not a finished run refused before the run begins."""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import OmegaConf

from finetune.cli.train import run
from finetune.errors import FinetuneError
from finetune.metrics import problems
from tests.conftest import TINY, compose_cfg, shared

DATA = f"dataset.path={shared('chnsenticorp')}"


def _run(tmp_path, *overrides, name="run"):
    cfg = compose_cfg([*TINY, DATA, "trainer.precision=fp32", *overrides], tmp_path / name)
    return run(cfg, tmp_path / name), tmp_path / name


def test_a_finished_run_teaches_from_the_start_step(tmp_path, capsys):
    _, teacher = _run(tmp_path, name="teacher")
    capsys.readouterr()
    m, run_dir = _run(tmp_path, "distill=run", f"distill.teacher={teacher}", "distill.start_step=1",
                      "distill.kl=reverse", "trainer.max_steps=3", "trainer.logging_steps=1", "qat_targets=[ffn]",
                      name="student")
    d = m["distill"]
    assert d["mode"] == "run" and d["teacher"] == str(teacher) and d["kl"] == "reverse" and d["start_step"] == 1
    assert d["distilled_tokens"] > 0 and d["ce_per_token"] > 0 and d["kl_per_token"] >= 0
    assert problems(m) == []
    logged = capsys.readouterr().out  # the Trainer's logs, one line per step (trainer.logging_steps=1)
    assert logged.count("'loss'") == 3 and logged.count("distill/kl") == 2  # the teacher joins at step 1 (of 0..2)


def test_a_self_distilled_qat_run_resumes_exactly(tmp_path):
    common = ["qat_targets=[attn,ffn]", "qat.scheme=w4a8", "qat.granularity=linear", "distill=self",
              "distill.alpha=0.7", "trainer.max_steps=4", "trainer.save_strategy=steps", "trainer.save_steps=2"]
    full, full_dir = _run(tmp_path, *common, name="full")
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_dir / "checkpoints" / "checkpoint-2", resumed_dir / "checkpoints" / "checkpoint-2")
    again, _ = _run(tmp_path, *common, "trainer.resume_from_checkpoint=auto", name="resumed")
    assert again["resumed_from"]["step"] == 2
    assert again["distill"] == full["distill"] and full["distill"]["teacher"] == "self (fake-quant off)"
    for key in ("train_loss", "accuracy", "accuracy_int8"):
        assert again[key] == full[key], key


@pytest.mark.parametrize("teacher", ["missing", "unfinished"])
def test_a_teacher_that_is_not_a_finished_run_is_refused_before_anything_is_written(tmp_path, teacher):
    path = tmp_path / teacher
    if teacher == "unfinished":  # a run that stopped before its metrics.json said ok
        (path / "adapter").mkdir(parents=True)
        OmegaConf.save(compose_cfg(TINY, path), path / "config.yaml")
        (path / "metrics.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(FinetuneError, match=f"distill.teacher={path}") as err:
        _run(tmp_path, "distill=run", f"distill.teacher={path}", name="student")
    assert "\n" not in str(err.value)
    # A fresh directory gets the failure's record only (as any failed run): no config, no weights
    failed = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == str(err.value)
    assert not (tmp_path / "student" / "config.yaml").exists() and not (tmp_path / "student" / "adapter").exists()
