"""The prepared GPU speed script (docs/bench/gpu/speed.py) runs on a CPU with tiny sizes: every job's code path
(the three bench arms, a 7B-shapes config shrunk to one layer with nf4, the step profile) works before a GPU is
lent, so the one device call is not spent finding a typo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shared


@pytest.mark.slow
def test_the_gpu_speed_script_dry_run_runs_every_job(tmp_path):
    shared("chnsenticorp")
    proc = subprocess.run([sys.executable, str(ROOT / "docs/bench/gpu/speed.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    results = json.loads((tmp_path / "summary.json").read_text())
    assert [r["job"] for r in results] == ["135m_lora", "7b_nf4", "profile_135m"], proc.stdout
    assert [r["status"] for r in results] == ["ok"] * 3, (tmp_path / "summary.md").read_text()[-4000:]
    assert proc.returncode == 0
    arms = json.loads((tmp_path / "135m_lora" / "bench.json").read_text())["arms"]
    assert set(arms) >= {"finetune", "plain"}  # trl too where TRL is installed
    assert "| finetune / plain |" in (tmp_path / "summary.md").read_text()


def test_the_gpu_speed_script_names_its_jobs_and_refuses_an_unknown_one(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "docs/bench/gpu/speed.py"), "--out", str(tmp_path), "--only",
                           "nonsense"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "no such job; jobs: 135m_lora, 135m_nf4, 135m_lora_compiled, 135m_lora_norms, 135m_lora_packed, 7b_lora" in proc.stderr


@pytest.mark.slow
def test_the_gpu_scale_out_script_dry_run_runs_every_job(tmp_path):
    """docs/bench/gpu/scaleout.py on a CPU: the reference run and DDP under torchrun train and reload to the same test
    scores; FSDP, FSDP + nf4 and DeepSpeed are refused in one line (they need CUDA), as the dry run expects; the
    2-job parallel sweep runs."""
    shared("chnsenticorp")
    proc = subprocess.run([sys.executable, str(ROOT / "docs/bench/gpu/scaleout.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    results = {r["job"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert list(results) == ["single", "ddp", "fsdp", "fsdp_nf4", "zero2", "zero3", "lease"], proc.stdout
    assert proc.returncode == 0, (tmp_path / "summary.md").read_text()
    for job in ("single", "ddp"):
        assert results[job]["status"] == "ok" and results[job]["eval_status"] == "ok"
        assert results[job]["run"]["accuracy"] == results[job]["reloaded"]["accuracy"]
    assert results["ddp"]["distributed"]["strategy"] == "ddp"
    assert abs(results["ddp"]["reloaded"]["eval_loss"] - results["single"]["reloaded"]["eval_loss"]) < 1e-3
    for job in ("fsdp", "fsdp_nf4", "zero2", "zero3"):
        assert results[job]["status"] == "refused as expected", results[job]
    assert results["lease"]["status"] == "ok" and results["lease"]["lease"]["jobs"] == 2


def test_the_gpu_scale_out_script_names_its_jobs_and_refuses_an_unknown_one(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "docs/bench/gpu/scaleout.py"), "--out", str(tmp_path), "--only",
                           "nonsense"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "no such job; jobs: single, ddp, fsdp, fsdp_nf4" in proc.stderr
