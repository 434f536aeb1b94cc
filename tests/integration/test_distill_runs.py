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
# A KL is never negative, but its fp32 sum over the 49,152-word vocabulary, where student and teacher nearly agree
# (a few steps from the same model), rounds to a few 1e-7 either way: -1e-6 was recorded on the AVX2 code paths.
KL_ROUND_OFF = 1e-5


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
    assert d["distilled_tokens"] > 0 and d["ce_per_token"] > 0 and d["kl_per_token"] >= -KL_ROUND_OFF
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


def test_the_qkd_regime_sweep_runs_its_eight_arms_per_seed_in_order(tmp_path):
    """+sweep=qkd_regime on the tiny model, one seed: each seed's plain runs come first and teach its QKD-run arms by
    name; the plain runs carry their cell's PTQ baselines; the report keeps the distilled arms apart."""
    import subprocess
    import sys

    sweep = tmp_path / "qkd"
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.cli.train", "+sweep=qkd_regime", "hydra.sweeper.params.seed=1", *TINY, DATA,
         "dataset.max_test_samples=8", "qat.eval_spread=0", "isolate_jobs=false", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = ["plain_w8a8", "plain_w4a8", "w8a8_ffn_qat", "w8a8_ffn_self", "w8a8_ffn_run", "w4a8_qat", "w4a8_self",
            "w4a8_run"]
    m = {arm: json.loads((sweep / f"seed1-{arm}" / "metrics.json").read_text()) for arm in arms}
    assert [m[a]["job"] for a in arms] == [str(i) for i in range(8)]  # in this order: the teacher first
    assert all(r["status"] == "ok" and r["seed"] == 1 and problems(r) == [] for r in m.values())
    for arm in ("w8a8_ffn_run", "w4a8_run"):
        assert m[arm]["distill"]["teacher"] == str(sweep / "seed1-plain_w8a8")
    assert m["w8a8_ffn_self"]["distill"]["mode"] == "self" and "distill" not in m["w8a8_ffn_qat"]
    assert (m["w8a8_ffn_run"]["qat_targets"], m["w8a8_ffn_run"]["int8_scheme"]) == (["ffn"], "w8a8")
    assert (m["w4a8_self"]["qat_targets"], m["w4a8_self"]["int8_scheme"]) == (["attn", "ffn"], "w4a8")
    assert sorted(m["plain_w8a8"]["ptq_baselines"]["smoothquant-0.7"]) == ["calibration", "ffn", "scale"]
    assert "attn+ffn" in m["plain_w4a8"]["ptq_baselines"]["hadamard"] and m["plain_w4a8"]["int8_scheme"] == "w4a8"
    # each baseline's log line names the weights it was simulated with: INT4 groups in the W4A8 cell
    assert "8-bit activations / INT4 group-32 weights (PTQ hadamard on attn+ffn)" in (
        sweep / "seed1-plain_w4a8" / "train.log").read_text()
    assert "8-bit activations / INT8 weights (PTQ smoothquant-0.7 on ffn)" in (
        sweep / "seed1-plain_w8a8" / "train.log").read_text()
    report = (sweep / "comparison.md").read_text()
    for label in ("| ffn QKD-self ", "| ffn QKD-run ", "| attn+ffn QKD-self ", "| attn+ffn QKD-run "):
        assert label in report, label


@pytest.mark.parametrize("method", [("lora=dora",), ("quantization=nf4",), ("lora=none", "trainer.lr=1e-4")],
                         ids=["dora", "qlora-nf4", "full"])
def test_self_distillation_trains_every_method(tmp_path, method):
    """QKD-self on DoRA, QLoRA (an nf4 base: activation QAT only) and full fine-tuning: the teacher pass runs each
    step and the run scores its deployment."""
    m, _ = _run(tmp_path, *method, "qat_targets=[ffn]", "distill=self", "qat.eval_spread=0", name="run")
    assert m["status"] == "ok" and m["distill"]["distilled_tokens"] > 0 and m["distill"]["kl_per_token"] >= -KL_ROUND_OFF
    assert 0.0 <= m["accuracy_int8"] <= 1.0 and problems(m) == []


def test_self_distillation_of_a_generation_run_covers_its_response_tokens(tmp_path):
    """On an SFT dataset the KL runs at every supervised (response) token, not one label position."""
    m, _ = _run(tmp_path, "dataset=alpaca", f"dataset.path={shared('alpaca', 'alpaca_en_demo.json')}",
                "qat_targets=[ffn]", "distill=self", "qat.eval_spread=0", name="sft")
    assert m["status"] == "ok" and m["task"] == "generation" and problems(m) == []
    assert m["distill"]["distilled_tokens"] > 2 * 2 * 2  # 2 steps of 2 rows, many response tokens each
    assert m["perplexity_int8"] > 0
