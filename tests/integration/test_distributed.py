"""One job over several processes (torchrun, gloo on this CPU) and sweeps through a parallel Hydra launcher.

DDP with 2 processes x batch 2 trains the same adapter as 1 process x batch 4 (same rows per step, same
seed); rank 0 alone writes the run directory, the W&B run and metrics.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY, shared

# 24 rows, 3 steps of 4 rows per step; random (not length-grouped) order, no dropout, fp32 (auto would pick bf16
# on a CPU with native bf16, whose rounding differs with the batch layout far beyond these tolerances): both layouts
# see the same rows in each step, so only the order of float additions differs.
COMMON = [*[o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.batch_size", "logger"))],
          "trainer.max_steps=3", "trainer.sampling=random", "lora.dropout=0.0", "trainer.lr=5e-3",
          "trainer.precision=fp32",
          # As on GPUs (trainer.share_prefix=auto is off there): the loss selects the supervised positions through
          # the collator's host-side label plan, under DDP's wrapper.
          "trainer.share_prefix=false",
          "dataset.max_train_samples=24", "eval.num_samples=0"]
# Static-scale QAT on the attention inputs: its observers must see every rank's batch to match one process. Its own
# full-precision model teaches it (distill=self): each rank's teacher pass, the sums over the ranks.
QAT = ["qat_targets=[attn]", "qat.scale=static", "qat.ema_decay=0.5", "distill=self"]
CHECKPOINTS = ["trainer.save_strategy=steps", "trainer.save_steps=1", "trainer.save_total_limit=5"]


def _env(**extra: str) -> dict:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train(args: list[str], cwd: Path, nproc: int = 1, multirun: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "finetune.cli.train", *(["-m"] if multirun else []), f"dataset.path={shared('chnsenticorp')}",
           *COMMON, *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    single = _train(["trainer.batch_size=4", "logger=none", *QAT, f"hydra.run.dir={base / 'single'}"], base)
    assert single.returncode == 0, single.stderr[-3000:]
    # Each rank's Hydra gets a directory of its own (run-0, run-1); rank 0's is the job's. A checkpoint at every
    # step: the uninterrupted run the resume test compares with.
    ddp = _train(["trainer.batch_size=2", "distributed=ddp", "logger=wandb", *QAT, *CHECKPOINTS,
                  f"hydra.run.dir={base}/run-${{oc.env:RANK,0}}"], base, nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return base, base / "single", base / "run-0"


def test_ddp_two_processes_train_what_one_process_trains_with_twice_the_batch(ddp_and_single):
    _, single, ddp = ddp_and_single
    one = json.loads((single / "metrics.json").read_text())
    two = json.loads((ddp / "metrics.json").read_text())
    assert two["status"] == "ok" and two["train_steps"] == one["train_steps"] == 3
    a = load_file(single / "adapter" / "adapter_model.safetensors")
    b = load_file(ddp / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    moved = max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k)
    assert moved > 1e-3  # training moved the adapters (lora_B starts at zero)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    assert abs(two["train_loss"] - one["train_loss"]) <= 1e-4 * abs(one["train_loss"])
    assert abs(two["eval_loss"] - one["eval_loss"]) <= 1e-4 * abs(one["eval_loss"])
    assert two["accuracy"] == one["accuracy"] and two["accuracy_int8"] == one["accuracy_int8"]
    assert two["distill"]["distilled_tokens"] == one["distill"]["distilled_tokens"] > 0
    # The KL of two nearly equal distributions is second order in their logits' difference, so the batch layout's
    # GEMM round-off (batch 2 vs 4) moves it relatively more than the loss: an absolute allowance beside 0.1%.
    assert two["distill"]["kl_per_token"] == pytest.approx(one["distill"]["kl_per_token"], rel=1e-3, abs=1e-6)
    # every rank's static QAT scales were calibrated on the max over all ranks' batches: one process's scales
    scales = [json.loads((d / "qat_state.json").read_text())["static_absmax"] for d in (single, ddp)]
    assert scales[0].keys() == scales[1].keys() and len(scales[0]) == 2
    for key, value in scales[0].items():
        assert scales[1][key] == pytest.approx(value, rel=1e-5), key


def test_ddp_rank_0_alone_writes_the_run(ddp_and_single):
    base, _, ddp = ddp_and_single
    assert not (base / "run-1").exists()  # rank 1's own directory, empty, removed
    assert sorted(p.name for p in base.iterdir()) == ["run-0", "single"]
    m = json.loads((ddp / "metrics.json").read_text())
    d = m["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and d["strategy"] == "ddp"
    assert [r["rank"] for r in d["per_rank"]] == [0, 1]
    assert m["train_tokens"] == sum(r["tokens"] for r in d["per_rank"]) and all(r["tokens"] > 0 for r in d["per_rank"])
    assert m["peak_memory_mb"] == max(r["peak_memory_mb"] for r in d["per_rank"])
    assert m["peak_in_use_mb"] == max(r["peak_in_use_mb"] for r in d["per_rank"]) > 0
    assert len(list((ddp / "wandb").glob("offline-run-*"))) == 1
    assert (ddp / "adapter" / "adapter_model.safetensors").is_file() and (ddp / "train.log").is_file()
    assert not list(ddp.glob(".staging-*"))


def test_a_sweep_inside_torchrun_is_refused(tmp_path):
    """What torchrun's environment says (one of two ranks) is enough: refused before any rank does anything."""
    cmd = [sys.executable, "-m", "finetune.cli.train", "-m", f"dataset.path={shared('chnsenticorp')}", *COMMON,
           "lora.r=4,8", f"hydra.sweep.dir={tmp_path / 'sweep'}", "logger=none"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert out.returncode == 2 and "cannot run inside torchrun" in out.stderr
    assert not (tmp_path / "sweep").exists() or not list((tmp_path / "sweep").rglob("metrics.json"))


def test_ddp_resume_equals_the_uninterrupted_run(ddp_and_single, tmp_path):
    """Two processes; a run stopped by a SIGTERM to one rank during step 2: every rank saves the same step and
    stops, and resumed from it under torchrun the run ends as the uninterrupted one (the fixture's DDP run: each rank
    restores its own loss summed since the last log, token count and peak memory, the static QAT scales calibrated
    so far and the self-distillation's sums)."""
    _, _, full = ddp_and_single
    one = json.loads((full / "metrics.json").read_text())
    saved = sorted(p.name for p in (full / "checkpoints").glob("checkpoint-*"))
    assert one["train_steps"] == 3 and saved == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    # SIGTERM to rank 1 alone during step 2, no checkpoints asked for: both ranks finish the step, checkpoint-2 is
    # written, both stop; the resume from it ends as the uninterrupted run.
    from tests.integration.test_nothing_lost import SIGNAL_AT_STEP

    same = ["trainer.batch_size=2", "distributed=ddp", "logger=none", *QAT]
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_AT_STEP.replace('int(os.environ["SIGNAL_AT_STEP"])',
                                             'int(os.environ["SIGNAL_AT_STEP"]) and os.environ["RANK"] == "1"')
                      + "from finetune.cli.train import main\nmain()\n")
    stopped = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
         f"dataset.path={shared('chnsenticorp')}", *COMMON, *same, "trainer.save_strategy=no",
         f"hydra.run.dir={tmp_path}/stopped-${{oc.env:RANK,0}}"],
        cwd=tmp_path, env=_env(SIGNAL_AT_STEP="2", SIGNAL_NAME="SIGTERM"), capture_output=True, text=True,
        timeout=900)
    assert stopped.returncode != 0
    # (each rank's line; the two processes' progress bars may share a line with one of them)
    lines = [line for line in stopped.stderr.splitlines() if "finetune-train: stopped by SIGTERM" in line]
    assert len(lines) == 2 and all("after step 2:" in line for line in lines), stopped.stderr[-3000:]
    assert [p.name for p in (tmp_path / "stopped-0" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    assert json.loads((tmp_path / "stopped-0" / "metrics.json").read_text())["error_type"] == "RunInterrupted"
    third = _train([*same, *CHECKPOINTS, "trainer.resume_from_checkpoint=auto",
                    f"hydra.run.dir={tmp_path}/stopped-${{oc.env:RANK,0}}"], tmp_path, nproc=2)
    assert third.returncode == 0, third.stderr[-3000:]
    three = json.loads((tmp_path / "stopped-0" / "metrics.json").read_text())
    assert three["resumed_from"]["step"] == 2 and three["train_steps"] == 3
    for key in ("train_loss", "train_tokens", "eval_loss", "accuracy", "f1", "accuracy_int8"):
        assert three[key] == one[key], key
    # the teacher's sums carried over the stop: every step's distilled tokens, and the KL per token to within the
    # last digit metrics.json keeps (6 decimals; the summation order differs across the resume)
    assert three["distill"]["distilled_tokens"] == one["distill"]["distilled_tokens"] > 0
    assert three["distill"]["kl_per_token"] == pytest.approx(one["distill"]["kl_per_token"], rel=1e-3, abs=1.5e-6)
    tokens = [[r["tokens"] for r in m["distributed"]["per_rank"]] for m in (one, three)]
    assert tokens[0] == tokens[1]
