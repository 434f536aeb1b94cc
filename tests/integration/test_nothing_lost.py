"""Nothing lost, nothing silent: bad input never changes a run directory, a run never clobbers another, a
failure never replaces a finished run, resume after kill -9 is exact, damaged checkpoints are skipped by name.

All on the tiny random model; the bad-input table runs finetune-train's real entrypoint in-process (Hydra
included), a few cases again as subprocesses.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from finetune.errors import FinetuneError
from finetune.cli.train import run
from tests.conftest import ROOT, TINY, compose_cfg, shared

CKPT = ["trainer.save_strategy=steps", "trainer.save_steps=1"]


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` with its bytes: equal snapshots = byte-for-byte unchanged."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished tiny run with checkpoints: the directory every bad command is pointed at."""
    run_dir = tmp_path_factory.mktemp("good") / "run"
    cfg = compose_cfg([*TINY, f"dataset.path={shared('chnsenticorp')}", *CKPT], run_dir)
    assert run(cfg, run_dir)["status"] == "ok"
    return run_dir


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-data")
    (d / "latin1.jsonl").write_bytes('{"text": "caf\xe9", "label": 1}\n'.encode("latin-1"))
    (d / "empty.jsonl").write_bytes(b"")
    (d / "blank.json").write_text("  \n\n")
    (d / "broken.json").write_text('[{"text": "ok", "label": 1},')
    (d / "rows.txt").write_text("text,label\n")
    (d / "nolabel.jsonl").write_text('{"text": "fine"}\n')
    (d / "header_only.csv").write_text("text,label\n")
    return d


def _train_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """finetune-train's console entrypoint in this process: (exit status, stderr lines)."""
    from finetune.cli import train
    import logging

    GlobalHydra.instance().clear()
    old, root = sys.argv, logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sys.argv = ["finetune-train", *argv]
    code = 0
    try:
        train.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
        GlobalHydra.instance().clear()
        # Hydra configured logging for this process (a console handler on pytest's captured stdout): undo it,
        # or later tests would log into a closed stream.
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
    return code, capsys.readouterr().err.strip().splitlines()


def _tiny(run_dir: Path) -> list[str]:
    return [*TINY, f"dataset.path={shared('chnsenticorp')}", f"hydra.run.dir={run_dir}"]


# (extra arguments, text the one error line must contain); {data} is the bad-files folder.
BAD_INPUTS = [
    (["trainer.learning_rate=1e-4"], "did you mean trainer.lr"),
    (["+trainer.learning_rate=1e-4"], "did you mean trainer.lr"),
    (["lora.alhpa=32"], "did you mean lora.alpha"),
    (["trainer.gradient_accumulation_steps=4"], "did you mean trainer.grad_accum"),
    (["qat_targets=[mlp]"], "qat_targets=mlp"),
    (["model=bogus"], "model=bogus"),
    (["quantization=fp8"], "quantization=fp8"),
    (["dataset=imdb"], "dataset=imdb"),
    (["lora=qlora"], "lora=qlora"),
    (["logger=tensorboard"], "logger=tensorboard"),
    (["+sweep=nosuch"], "sweep=nosuch"),
    (["trainer.lr=-1"], "trainer.lr=-1"),
    (["trainer.lr=abc"], "trainer.lr='abc'"),
    (["trainer.batch_size=0"], "trainer.batch_size=0"),
    (["trainer.batch_size=2.5"], "trainer.batch_size=2.5"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.epochs=0"], "trainer.epochs=0"),
    (["trainer.grad_accum=0"], "trainer.grad_accum=0"),
    (["trainer.warmup_ratio=1.5"], "trainer.warmup_ratio=1.5"),
    (["trainer.max_length=8"], "trainer.max_length=8"),
    (["trainer.precision=fp64"], "trainer.precision='fp64'"),
    (["trainer.scheduler=bogus"], "trainer.scheduler='bogus'"),
    (["trainer.sampling=bogus"], "trainer.sampling='bogus'"),
    (["trainer.optim=adam9"], "trainer.optim='adam9'"),
    (["trainer.eval_strategy=sometimes"], "trainer.eval_strategy='sometimes'"),
    (["trainer.save_steps=0"], "trainer.save_steps=0"),
    (["trainer.logging_steps=0"], "trainer.logging_steps=0"),
    (["trainer.dataloader_num_workers=-1"], "trainer.dataloader_num_workers=-1"),
    (["trainer.gradient_checkpointing=maybe"], "trainer.gradient_checkpointing='maybe'"),
    (["trainer.weight_decay=-0.1"], "trainer.weight_decay=-0.1"),
    (["trainer.max_grad_norm=-1"], "trainer.max_grad_norm=-1"),
    (["trainer.save_total_limit=0"], "trainer.save_total_limit=0"),
    (["lora.r=0"], "lora.r=0"),
    (["lora.dropout=1.0"], "lora.dropout=1.0"),
    (["lora.bias=some"], "lora.bias='some'"),
    (["lora.target_modules=everything"], "lora.target_modules='everything'"),
    (["lora.use_rslora=yes"], "lora.use_rslora='yes'"),
    (["quantization=nf4", "lora=none"], "quantization=nf4 with lora=none"),
    (["quantization=nf4", "quantization.quant_type=nf8"], "quantization.quant_type='nf8'"),
    (["qat.bits=3"], "qat.bits=3"),
    (["qat.scale=bogus"], "qat.scale='bogus'"),
    (["qat.granularity=block"], "qat.granularity='block'"),
    (["qat.weight_bits=2"], "qat.weight_bits=2"),
    (["qat.ema_decay=1.0"], "qat.ema_decay=1.0"),
    (["qat.eval_bits=16"], "qat.eval_bits=16"),
    (["qat.eval_int8=maybe"], "qat.eval_int8='maybe'"),
    (["qat_targets=[attn]", "qat.weight_bits=8", "quantization=int8"], "qat.weight_bits with quantization=int8"),
    (["eval.batch_size=0"], "eval.batch_size=0"),
    (["eval.num_samples=-1"], "eval.num_samples=-1"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens=0"),
    (["eval.zero_shot=perhaps"], "eval.zero_shot='perhaps'"),
    (["dataset.label_words=[good]"], "dataset.label_words"),
    (["dataset.label_words=[a,a]"], "must be distinct"),
    (["dataset.max_train_samples=0"], "dataset.max_train_samples=0"),
    (["dataset.eval_fraction=0.9"], "dataset.eval_fraction=0.9"),
    (["seed=-1"], "seed=-1"),
    (["model.dtype=float8"], "model.dtype='float8'"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode='sometimes'"),
    (["overwrite_run=please"], "overwrite_run='please'"),
    (["cpu_allocator=fast"], "cpu_allocator='fast'"),
    (["lora.r=8,16"], "add -m"),
    (["-m", "lora.r=8,0"], "lora.r=0"),
    (["-m", "qat_targets=[attn],[mlp]"], "qat_targets=mlp"),
    (["+sweep=qat_seeds", "qat.scale=bogus"], "qat.scale='bogus'"),
    (["trainer.lr=[1"], "'trainer.lr=[1'"),
    ([], "already holds a run"),
    (["trainer.resume_from_checkpoint={good}/nope"], "trainer.resume_from_checkpoint="),
    (["trainer.resume_from_checkpoint=auto", "dataset.path={data}/missing.jsonl"], "missing.jsonl"),
    (["trainer.resume_from_checkpoint=auto", "lora.r=16"], "was trained with lora.r=8 (now 16)"),
    (["trainer.resume_from_checkpoint=auto", "dataset.path={data}/latin1.jsonl"], "latin1.jsonl is not UTF-8"),
    (["trainer.resume_from_checkpoint=auto", "dataset.path={data}/empty.jsonl"], "empty.jsonl is empty"),
    (["trainer.resume_from_checkpoint=auto", "dataset.path={data}/blank.json"], "blank.json is empty"),
    (["trainer.resume_from_checkpoint=auto", "dataset.path={data}/broken.json"], "broken.json: malformed JSON"),
    (["trainer.resume_from_checkpoint=auto", "dataset.path={data}/rows.txt"], "rows.txt: unsupported extension"),
    (["trainer.resume_from_checkpoint=auto", "dataset.path={data}/nolabel.jsonl"], "nolabel.jsonl"),
    (["trainer.resume_from_checkpoint=auto", "dataset.path={data}/header_only.csv"], "header_only.csv holds no rows"),
]


@pytest.mark.parametrize("extra,needle", BAD_INPUTS, ids=[" ".join(e) or "same-dir" for e, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(extra, needle, good_run, bad_files, capsys):
    before = snapshot(good_run)
    args = [a.format(data=bad_files, good=good_run) for a in extra]
    code, err = _train_cli([*_tiny(good_run), *args], capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert needle in err[0], err[0]
    assert snapshot(good_run) == before


def test_bad_input_table_is_large_enough():
    assert len(BAD_INPUTS) >= 40


@pytest.mark.parametrize("extra,needle", [
    (["trainer.learning_rate=1e-4"], "did you mean trainer.lr"),
    (["qat_targets=[mlp]"], "qat_targets=mlp"),
    (["trainer.resume_from_checkpoint=auto", "dataset.path={data}/latin1.jsonl"], "latin1.jsonl is not UTF-8"),
])
def test_bad_input_from_the_real_command(extra, needle, good_run, bad_files):
    before = snapshot(good_run)
    args = [a.format(data=bad_files) for a in extra]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", "from finetune.cli.train import main; main()", *_tiny(good_run), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and needle in err[0], proc.stderr
    assert snapshot(good_run) == before


# ------------------------------------------------------------------------------------------ run directories


def _cfg(run_dir: Path, *overrides: str):
    return compose_cfg([*TINY, f"dataset.path={shared('chnsenticorp')}", *CKPT, *overrides], run_dir)


def test_a_stop_signal_during_an_overwrite_puts_the_old_run_back_and_says_where_the_attempt_went(
        good_run, tmp_path, monkeypatch):
    """overwrite_run=true stopped by SIGTERM: the replaced run comes back whole, and the line (and the attempt's
    metrics.json) names the folder that now holds the attempt's checkpoint, from which it continues exactly."""
    import shutil

    from transformers.trainer_callback import DefaultFlowCallback

    from finetune.errors import RunInterrupted

    run_dir = tmp_path / "run"
    shutil.copytree(good_run, run_dir)
    before = snapshot(run_dir)
    step_end = DefaultFlowCallback.on_step_end

    def signal_at_step_2(self, args, state, control, **kw):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_end(self, args, state, control, **kw)

    monkeypatch.setattr(DefaultFlowCallback, "on_step_end", signal_at_step_2)
    with pytest.raises(RunInterrupted) as stopped:
        run(_cfg(run_dir, "overwrite_run=true", "seed=7"), run_dir)
    monkeypatch.undo()
    assert {k: v for k, v in snapshot(run_dir).items() if not k.startswith("failed-")} == before
    (failed,) = run_dir.glob("failed-*")
    assert (failed / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert str(stopped.value) == (
        f"stopped by SIGTERM after step 2: this attempt and its checkpoints were moved to {failed} and the run it was "
        f"to replace is back in {run_dir}; continue the attempt with hydra.run.dir={failed} "
        "trainer.resume_from_checkpoint=auto")
    assert json.loads((failed / "metrics.json").read_text())["error"] == str(stopped.value)
    resumed = run(_cfg(failed, "overwrite_run=true", "seed=7", "trainer.resume_from_checkpoint=auto"), failed)
    assert resumed["status"] == "ok" and resumed["resumed_from"]["step"] == 2


def test_a_finished_run_resumed_with_auto_is_kept_as_it_is(good_run, tmp_path):
    """auto in a folder whose run finished with this config (logging keys aside): nothing left to do, its metrics
    come back and not a byte of the folder changes (a continued sweep, a SLURM job requeued after it finished)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(good_run, run_dir)
    before = snapshot(run_dir)
    again = run(_cfg(run_dir, "trainer.resume_from_checkpoint=auto", "trainer.logging_steps=1"), run_dir)
    assert again == json.loads((good_run / "metrics.json").read_text()) and "resumed_from" not in again
    assert snapshot(run_dir) == before


def test_failure_never_replaces_a_finished_run(good_run, tmp_path):
    """A resume of a finished run that fails after training keeps the finished artifacts and config; the
    failed attempt is kept beside them."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(good_run, run_dir)
    before = snapshot(run_dir)
    kept = {k: v for k, v in before.items() if not k.startswith(("checkpoints", "train.log"))}
    # max_steps grows so training runs on; eval.batch_size is corrupted after validation to fail after training.
    cfg = _cfg(run_dir, "trainer.resume_from_checkpoint=auto", "trainer.max_steps=3", "eval.num_samples=1")
    import finetune.evaluation.scoring as ev

    original = ev.sample_generations

    def broken(*a, **k):
        raise RuntimeError("disk full while sampling")

    ev.sample_generations = broken
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            run(cfg, run_dir)
    finally:
        ev.sample_generations = original
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k in kept} == kept
    failed = [p for p in run_dir.iterdir() if p.name.startswith("failed-")]
    assert len(failed) == 1 and json.loads((failed[0] / "metrics.json").read_text())["status"] == "failed"
    assert (failed[0] / "adapter").is_dir(), "the failed attempt's artifacts are kept for inspection"


def test_overwrite_run_replaces_and_restores_on_failure(good_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(good_run, run_dir)
    before = snapshot(run_dir)
    with pytest.raises(FinetuneError, match="already holds a run"):
        run(_cfg(run_dir), run_dir)
    assert snapshot(run_dir) == before
    # overwrite_run with a data error after the run started: the old run comes back whole
    import finetune.evaluation.scoring as ev

    original = ev.classify

    def broken(*a, **k):
        raise RuntimeError("scoring crashed")

    ev.classify = broken
    try:
        with pytest.raises(RuntimeError):
            run(_cfg(run_dir, "overwrite_run=true"), run_dir)
    finally:
        ev.classify = original
    after = {k: v for k, v in snapshot(run_dir).items() if not k.startswith("failed-")}
    assert after == before
    # a successful overwrite replaces it and leaves no copy behind
    m = run(_cfg(run_dir, "overwrite_run=true", "seed=7"), run_dir)
    assert m["status"] == "ok" and json.loads((run_dir / "metrics.json").read_text())["seed"] == 7
    assert not [p for p in run_dir.iterdir() if p.name.startswith((".replaced-", ".staging-"))]


def test_config_records_absolute_paths(good_run, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(good_run / "config.yaml")
    assert Path(cfg.dataset.path).is_absolute() and Path(cfg.dataset.path).is_dir()
    # finetune-eval from another directory finds the run's data
    from finetune.cli import evaluate as eval_cli
    monkeypatch.chdir(tmp_path)
    assert eval_cli.main([f"run={good_run}", f"out={tmp_path / 'scores.json'}"]) == 0


def test_a_run_is_never_loaded_onto_another_base_model(good_run, tmp_path, capsys):
    """metrics.json records the base model's content fingerprint; finetune-eval (and merge / chat / export, which
    load runs the same way) refuse an adapter on a base whose files are no longer those."""
    import shutil

    from finetune.cli import evaluate as eval_cli
    from finetune.model.fingerprint import model_fingerprint
    from finetune.model.checkpoints import resolve_model_path
    from omegaconf import OmegaConf

    recorded = json.loads((good_run / "metrics.json").read_text())["base_model_fingerprint"]
    cfg = OmegaConf.load(good_run / "config.yaml")
    assert recorded == model_fingerprint(resolve_model_path(cfg.model)[0], cfg.model)
    assert eval_cli.main([f"run={good_run}", f"out={tmp_path / 'same.json'}"]) == 0
    moved = tmp_path / "run"  # the same run, as if its base had been re-converted since
    shutil.copytree(good_run, moved)
    metrics = json.loads((moved / "metrics.json").read_text())
    (moved / "metrics.json").write_text(json.dumps({**metrics, "base_model_fingerprint": "0" * 64}))
    capsys.readouterr()
    assert eval_cli.main([f"run={moved}", f"out={tmp_path / 'other.json'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on model.name_or_path=random:llama with fingerprint 0000000000000000" in err[0]
    assert not (tmp_path / "other.json").exists()


# ------------------------------------------------------------------------------------------------- resume

RESUME = [*TINY, "trainer.max_steps=-1", "trainer.epochs=2", "dataset.max_train_samples=16", "trainer.batch_size=2",
          "trainer.logging_steps=3", "trainer.save_strategy=steps", "trainer.save_steps=3",
          "trainer.save_total_limit=2", "trainer.eval_strategy=steps", "trainer.eval_steps=4",
          "trainer.lr=5e-3"]
COMPARED = ("train_steps", "train_loss", "train_tokens", "eval_loss", "accuracy", "f1", "perplexity")


# Sends this process a signal at the end of one optimizer step (as a scheduler would, at an arbitrary moment):
# the Trainer's own step-end callback is where the signal arrives, before any other callback sees the step.
SIGNAL_AT_STEP = """
import os, signal, sys
from transformers.trainer_callback import DefaultFlowCallback
_step_end = DefaultFlowCallback.on_step_end
def on_step_end(self, args, state, control, **kw):
    if state.global_step == int(os.environ["SIGNAL_AT_STEP"]):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL_NAME"]))
    return _step_end(self, args, state, control, **kw)
DefaultFlowCallback.on_step_end = on_step_end
"""


def _train_process(run_dir: Path, *extra: str, prelude: str = "", env: dict | None = None) -> subprocess.Popen:
    args = [*RESUME, f"dataset.path={shared('chnsenticorp')}", f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", prelude + "from finetune.cli.train import main; main()", *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The RESUME run's metrics, trained without a stop."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "full"
    full = _train_process(run_dir)
    assert full.wait(timeout=600) == 0, full.stderr.read()
    reference = json.loads((run_dir / "metrics.json").read_text())
    assert reference["train_steps"] == 16
    return reference


# What submitit does in a SLURM job: a Python handler for SIGUSR2 that requeues the job, then exits.
SUBMITIT_LIKE = """
def _requeue(signum, frame):
    open(os.environ["REQUEUED_MARKER"], "w").write("requeued")
    sys.exit(-1)
signal.signal(signal.SIGUSR2, _requeue)
"""


# SIGTERM end to end: tests/integration/test_distributed.py (to one rank of two); SIGUSR1's handling:
# tests/unit/training/test_signals.py. Here submitit's SIGUSR2, which takes the same path and then its handler.
@pytest.mark.parametrize("name, status, requeued", [("SIGUSR2", 255, True), ("SIGINT", 130, False)])
def test_a_stop_signal_saves_the_step_under_way_and_the_resume_equals_the_uninterrupted_run(
        tmp_path, uninterrupted, name, status, requeued):
    """SIGTERM (a scheduler's time limit or preemption) or, under submitit, SIGUSR2 during step 5, two steps after
    the last checkpoint (3): the step finishes, checkpoint-5 is written, the run stops (one line, metrics.json says
    so; exit 128 + the signal, or submitit's own handler runs last: requeue, exit) and the resume from it (asked
    for, or a requeued SLURM job's own) gives the uninterrupted run's figures."""
    run_dir, marker = tmp_path / "stopped", tmp_path / "requeued"
    prelude = SIGNAL_AT_STEP + (SUBMITIT_LIKE if name == "SIGUSR2" else "")
    proc = _train_process(run_dir, prelude=prelude,
                          env={"SIGNAL_AT_STEP": "5", "SIGNAL_NAME": name, "REQUEUED_MARKER": str(marker)})
    assert proc.wait(timeout=600) == status, proc.stderr.read()
    assert marker.exists() == (name == "SIGUSR2")
    checkpoint = run_dir / "checkpoints" / "checkpoint-5"
    lines = [line for line in proc.stderr.read().splitlines() if line.startswith("finetune-train:")]
    assert lines == [f"finetune-train: stopped by {name} after step 5: {checkpoint} saved; continue with "
                     "trainer.resume_from_checkpoint=auto (same run directory)"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 5
    stopped = json.loads((run_dir / "metrics.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["error_type"] == "RunInterrupted"
    assert not (run_dir / "adapter").exists()
    if requeued:  # the same command again, as SLURM restarts a requeued job
        again = _train_process(run_dir, env={"SLURM_RESTART_COUNT": "1"})
    else:
        again = _train_process(run_dir, "trainer.resume_from_checkpoint=auto")
    assert again.wait(timeout=600) == 0, again.stderr.read()
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["resumed_from"] == {"checkpoint": str(checkpoint), "step": 5}
    for key in COMPARED:
        assert resumed.get(key) == uninterrupted.get(key), key


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_signal_to_a_sweep_stops_its_job_with_a_checkpoint_and_starts_no_other(tmp_path, name, status):
    """SIGTERM to the sweep's own process alone (jobs isolated in processes of their own) while job 0 trains: it is
    passed on to the job, which saves a checkpoint of its step and stops; job 1 never starts; exit status 143.
    Ctrl-C, which a terminal sends to its whole foreground process group (the sweep and its job), does the same once
    (exit status 130): the job saves its step and stops, no other job starts. Either way the sweep's report is
    written, listing the job that ran as interrupted."""
    sweep = tmp_path / "sweep"
    args = ["-m", *RESUME, f"dataset.path={shared('chnsenticorp')}", f"hydra.sweep.dir={sweep}", "lora.r=4,8"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from finetune.cli.train import main; main()", *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    deadline = time.time() + 600
    while not (sweep / "0" / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the job ended before the sweep could be stopped"
        time.sleep(0.05)
    if name == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == status, proc.stderr.read()
    last = proc.stderr.read().strip().splitlines()[-1]
    stopped = json.loads((sweep / "0" / "metrics.json").read_text())
    assert stopped["error_type"] == "RunInterrupted" and stopped["status"] == "interrupted", stopped
    step = int(stopped["error"].split("after step ")[1].split(":")[0])
    assert 3 <= step < 16 and (sweep / "0" / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert last == (f"finetune-train: job 0: {stopped['error']}; the sweep stopped on {name} before its next job; "
                    f"continue the sweep with the same command and hydra.sweep.dir={sweep} "
                    "trainer.resume_from_checkpoint=auto")
    assert not (sweep / "1").exists()
    # the report lists what ran: the stopped job, as interrupted
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "interrupted")], rows


def test_kill_9_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    """16 rows / batch 2 = 8 steps per epoch, 2 epochs, default (length-grouped) sampler; killed with SIGKILL
    once the step-9 checkpoint exists (mid-epoch 2), resumed with auto: every loss and score is identical."""
    reference = uninterrupted
    killed = tmp_path / "killed"
    proc = _train_process(killed)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "checkpoint-9" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    again = _train_process(killed, "trainer.resume_from_checkpoint=auto")
    assert again.wait(timeout=600) == 0, again.stderr.read()
    resumed = json.loads((killed / "metrics.json").read_text())
    for key in COMPARED:
        assert resumed.get(key) == reference.get(key), key


def test_resumed_at_its_last_step_a_run_trains_nothing_more_and_reports_the_whole_runs_peak_memory(tmp_path):
    """A run that stopped after its last checkpoint (here max_steps=3, mid-epoch: 4 steps per epoch) and is resumed
    trains no step more than max_steps and scores what the finished run scored. The steps before the checkpoint
    ran in another process: its peak memory is carried in the checkpoint and reported, not only the little the
    resumed process did; and metrics.json says the run was resumed."""
    from finetune.metrics import problems
    from finetune.training.checkpoints import read_checkpoint_state, write_checkpoint_state

    run_dir = tmp_path / "run"
    first = run(_cfg(run_dir, "trainer.max_steps=3", "trainer.save_total_limit=3"), run_dir)
    assert first["train_steps"] == 3 and "resumed_from" not in first
    last = run_dir / "checkpoints" / "checkpoint-3"
    state = read_checkpoint_state(last)
    assert 0 < state["peak_memory_mb_per_rank"][0] <= first["peak_memory_mb"]
    assert 0 < state["peak_in_use_mb_per_rank"][0] <= first["peak_in_use_mb"]
    # the process that trained steps 1-3 peaked far above anything this one reaches
    write_checkpoint_state(last, {**state, "peak_memory_mb_per_rank": [123456.0], "peak_in_use_mb_per_rank": [65432.0]})
    (run_dir / "metrics.json").unlink()  # stopped before its scores were written (a finished run would be kept as is)
    again = run(_cfg(run_dir, "trainer.max_steps=3", "trainer.resume_from_checkpoint=auto"), run_dir)
    for key in COMPARED:
        assert again.get(key) == first.get(key), key
    assert again["peak_memory_mb"] == 123456.0 and again["memory_breakdown_mb"]["rest"] > 100000
    assert again["peak_in_use_mb"] == 65432.0
    assert again["resumed_from"] == {"checkpoint": str(last), "step": 3}
    assert problems(again) == []


def test_a_resume_that_changes_what_the_checkpoint_was_trained_with_is_refused_naming_the_keys(tmp_path):
    """Another adapter rank would fail half-way through loading (a traceback), another lr, seed or precision would
    silently not continue the run: all are refused before anything is written, naming each key; keys that do not
    touch the steps already trained (max_steps, evaluation, logging) may change."""
    run_dir = tmp_path / "run"
    assert run(_cfg(run_dir, "trainer.max_steps=2", "trainer.save_total_limit=3"), run_dir)["status"] == "ok"
    before = snapshot(run_dir)
    resume = "trainer.resume_from_checkpoint=auto"
    with pytest.raises(FinetuneError, match=r"checkpoint-2 was trained with lora.r=8 \(now 16\), "
                                            r"trainer.lr=0.002 \(now 0.01\).*a new directory"):
        run(_cfg(run_dir, "trainer.max_steps=3", resume, "lora.r=16", "trainer.lr=1e-2"), run_dir)
    with pytest.raises(FinetuneError, match=r"seed=42 \(now 7\)"):
        run(_cfg(run_dir, "trainer.max_steps=3", resume, "seed=7"), run_dir)
    assert snapshot(run_dir) == before
    # trainer.precision=auto resolves by machine: the checkpoint records what it was trained in
    from finetune.training.checkpoints import read_checkpoint_state, write_checkpoint_state

    last = run_dir / "checkpoints" / "checkpoint-2"
    state = read_checkpoint_state(last)
    assert state["precision"] in ("fp32", "bf16")
    write_checkpoint_state(last, {**state, "precision": "fp16"})  # as if trained on a GPU without bf16
    with pytest.raises(FinetuneError, match=r"checkpoint-2 was trained in fp16, this run would train in (fp32|bf16) "
                                            r"\(trainer.precision=auto\); set trainer.precision=fp16"):
        run(_cfg(run_dir, "trainer.max_steps=3", resume), run_dir)
    write_checkpoint_state(last, state)
    # trainer.share_prefix=auto resolves by device and precision too (on a CPU: true in fp32, false in bf16): the
    # checkpoint records what it trained with
    shares = state["precision"] == "fp32"
    assert state["share_prefix"] is shares
    write_checkpoint_state(last, {**state, "share_prefix": not shares})  # as if trained on another machine
    said = {True: "with the shared prompt prefix computed once per batch", False: "without sharing the prompt prefix"}
    with pytest.raises(FinetuneError, match=rf"checkpoint-2 was trained {said[not shares]}, this run would train "
                                            rf"{said[shares]} \(trainer.share_prefix=auto\); set "
                                            rf"trainer.share_prefix={str(not shares).lower()} to continue it"):
        run(_cfg(run_dir, "trainer.max_steps=3", resume), run_dir)
    # A checkpoint of the release before auto: no record in its state, its own value in its config.yaml (true, the
    # old default; here the value auto gives on this machine), which auto continues.
    write_checkpoint_state(last, {k: v for k, v in state.items() if k != "share_prefix"})
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("share_prefix: auto", f"share_prefix: {str(shares).lower()}"))
    assert snapshot(run_dir) != before and f"share_prefix: {str(shares).lower()}" in config.read_text()
    again = run(_cfg(run_dir, "trainer.max_steps=3", resume, "eval.batch_size=3", "trainer.logging_steps=1"), run_dir)
    assert again["train_steps"] == 3 and again["resumed_from"]["step"] == 2


def test_damaged_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
    from finetune.training.checkpoints import resolve_resume

    run_dir = tmp_path / "run"
    m = run(_cfg(run_dir, "trainer.max_steps=3", "trainer.save_total_limit=3"), run_dir)
    assert m["status"] == "ok"
    latest = run_dir / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, as by a full disk
    with caplog.at_level("WARNING"):
        chosen = resolve_resume("auto", run_dir)
    assert chosen == str(run_dir / "checkpoints" / "checkpoint-2")
    assert "checkpoint-3" in caplog.text and "adapter_model.safetensors" in caplog.text
    with pytest.raises(FinetuneError, match="checkpoint-3 cannot be resumed from: adapter_model.safetensors"):
        resolve_resume(str(run_dir / "checkpoints" / "checkpoint-3"), run_dir)
    # a checkpoint interrupted before its manifest was written is skipped too, also when it was killed between
    # the Trainer's files and ours (no running loss sums: resuming from it would change train_loss)
    (run_dir / "checkpoints" / "checkpoint-2" / "finetune_manifest.json").unlink()
    (run_dir / "checkpoints" / "checkpoint-2" / "finetune_state.json").unlink()
    assert resolve_resume("auto", run_dir) == str(run_dir / "checkpoints" / "checkpoint-1")
    # and the resumed run from checkpoint-1 trains to the end (stopped before its scores: a finished run is kept)
    (run_dir / "metrics.json").unlink()
    again = run(_cfg(run_dir, "trainer.max_steps=3", "trainer.resume_from_checkpoint=auto"), run_dir)
    assert again["status"] == "ok" and again["train_steps"] == 3


# ------------------------------------------------------------------------------------- determinism, W&B


def test_same_result_whether_or_not_this_process_built_the_tiny_model(tmp_path, monkeypatch):
    """The tiny model's builder must not reseed the global RNG: a run that builds it (empty cache) and one that
    finds it cached give identical metrics."""
    import finetune.model.checkpoints as fm

    # the embedded tokenizer is reused from the real cache (looked up before the cache moves); only the random
    # model is rebuilt
    real_embedded = fm.embedded_checkpoint("SmolLM2-135M-Instruct")
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fm, "embedded_checkpoint", lambda name: real_embedded)
    first = run(_cfg(tmp_path / "a", "lora.dropout=0.1"), tmp_path / "a")
    assert any((tmp_path / "cache" / "models").iterdir()), "the first run built the model"
    second = run(_cfg(tmp_path / "b", "lora.dropout=0.1"), tmp_path / "b")
    for key in COMPARED:
        assert first.get(key) == second.get(key), key


def test_unreachable_wandb_server_costs_at_most_10_s(tmp_path, monkeypatch, caplog):
    """A server that accepts connections and never answers: the run goes offline within the bound, saying so
    in one line with the sync command."""
    from omegaconf import OmegaConf

    from finetune.report import tracking
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    cfg = OmegaConf.create({"logger": {"backend": "wandb", "mode": "auto", "project": "t", "entity": None,
                                       "group": None, "tags": []}})
    try:
        t0 = time.perf_counter()
        assert not tracking.server_reachable(tracking.server_url())
        waited = time.perf_counter() - t0
        with caplog.at_level("WARNING"):
            wrun = tracking.init_run(cfg, tmp_path, "probe", [])
    finally:
        stop.set()
        server.close()
    try:
        assert waited <= 10, waited  # the deliverable's bound on the time lost to an unreachable server
        lines = [r.getMessage() for r in caplog.records if "did not answer" in r.getMessage()]
        assert len(lines) == 1 and "wandb sync" in lines[0] and "offline" in lines[0]
        assert wrun is None or wrun.settings.mode == "offline"
    finally:
        if wrun is not None:
            wrun.finish()
        import wandb

        wandb.teardown()  # the W&B process singleton keeps this test's server address otherwise


def test_output_dir_on_the_command_line_leaves_no_empty_hydra_folder(good_run, tmp_path):
    """``output_dir=<dir>`` is where the run writes: Hydra's own time-stamped folder follows it instead of being
    made (empty) under ./outputs; here with a command that is refused, as the directory already holds a run."""
    from finetune.cli.train import run_dir_follows_output_dir

    before = snapshot(good_run)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    args = [*TINY, f"dataset.path={shared('chnsenticorp')}", f"output_dir={good_run}"]
    proc = subprocess.run([sys.executable, "-c", "from finetune.cli.train import main; main()", *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == [] and snapshot(good_run) == before
    # an explicit hydra.run.dir, a sweep or an interpolated value are left as given
    for argv in (["output_dir=/a", "hydra.run.dir=/b"], ["-m", "output_dir=/a"], ["output_dir=${oc.env:HOME}/x"]):
        assert run_dir_follows_output_dir(argv) == argv
    assert run_dir_follows_output_dir(["lora.r=4", "output_dir=/a"]) == ["lora.r=4", "output_dir=/a", "hydra.run.dir=/a"]
    # beside it, so a flag after the overrides still parses (argparse takes the overrides as one run)
    assert run_dir_follows_output_dir(["output_dir=/a", "--cfg", "job"]) == ["output_dir=/a", "hydra.run.dir=/a",
                                                                               "--cfg", "job"]
    shown = subprocess.run([sys.executable, "-c", "from finetune.cli.train import main; main()",
                            f"output_dir={tmp_path / 'x'}", "--cfg", "job"], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=300)
    assert shown.returncode == 0 and f"output_dir: {tmp_path / 'x'}" in shown.stdout, shown.stderr


def test_two_runs_started_together_into_one_directory_one_owns_it_the_other_is_refused(tmp_path, uninterrupted):
    """Two real processes into one hydra.run.dir, started together with different seeds: the first to its checks
    owns the directory for its lifetime (a lock the kernel drops if it dies); the other stops at once with one line
    naming the holder or the finished run, and writes nothing there. The owner's run is the uninterrupted one."""
    run_dir = tmp_path / "shared"
    first = _train_process(run_dir)
    second = _train_process(run_dir, "seed=7")
    codes = {first.wait(timeout=600), second.wait(timeout=600)}
    errors = {p: p.stderr.read() for p in (first, second)}
    assert codes == {0, 2}, errors
    owner, refused = (first, second) if first.returncode == 0 else (second, first)
    lines = [line for line in errors[refused].splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and ("is in use by another run right now (pid " in lines[0]
                                or "already holds a run" in lines[0]), errors[refused]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["seed"] == (42 if owner is first else 7)
    if owner is first:  # the run is the seed-42 run, whole
        for key in COMPARED:
            assert metrics.get(key) == uninterrupted.get(key), key
    assert not (run_dir / ".finetune.lock").exists() and not list(run_dir.glob("failed-*"))
