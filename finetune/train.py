"""finetune-train: one Hydra entrypoint that fine-tunes, evaluates and records a run.

    finetune-train                                  # embedded SmolLM2-135M, ChnSentiCorp, LoRA
    finetune-train quantization=nf4 lora.r=16       # QLoRA
    finetune-train lora=none                        # full fine-tuning
    finetune-train -m lora.r=8,16                   # a sweep (Hydra multirun)

Flow: validate -> data rows -> model (+ bitsandbytes) -> zero-shot score -> LoRA -> QAT -> Trainer
-> save adapter / model -> evaluate (fp, and simulated INT8 where asked) -> metrics.json + W&B.
Returns the objective a sweeper optimises (accuracy, or minus eval loss for generation).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import sys
import time
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from finetune.config import CONF_DIR as CONFIG_TREE, method_name, qat_targets, validate
from finetune.errors import LOG_FORMAT, FinetuneError, print_error

log = logging.getLogger("finetune.train")


def _hydra_context() -> tuple[bool, list[str], str, str | None]:
    """(multirun?, this job's overrides, job id, sweep group) — defaults when called outside Hydra.

    The sweep group is ``<sweep name>/<time>`` (the sweep folder below multirun_sweeps/), shared by every
    job of one sweep so W&B groups them together.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:
        return False, [], "0", None
    multirun = hc.mode == RunMode.MULTIRUN
    group = "/".join(Path(hc.sweep.dir).parts[-2:]) if multirun else None
    return multirun, list(hc.overrides.task), str(hc.job.get("num", "0")), group


def write_json(path: Path, data: dict) -> None:
    from finetune.runs import atomic_write_json

    atomic_write_json(path, data)


PATH_KEYS = ("dataset.path", "trainer.resume_from_checkpoint")


def resolved_config(cfg: DictConfig) -> DictConfig:
    """The config with every local path made absolute (against the directory the command ran from), so a run
    directory works from any current directory (``finetune-eval run=R`` from elsewhere finds its data)."""
    import os

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in PATH_KEYS:
        value = OmegaConf.select(out, key)
        if isinstance(value, str) and value not in ("auto",):
            OmegaConf.update(out, key, os.path.abspath(os.path.expanduser(value)))
    name = out.model.name_or_path
    if isinstance(name, str) and (name.startswith((".", "/", "~")) or Path(name).expanduser().is_dir()):
        out.model.name_or_path = os.path.abspath(os.path.expanduser(name))
    return out


def _early_files(cfg: DictConfig, overrides: list[str]) -> dict[str, str]:
    """config.yaml (resolved, absolute paths) and Hydra's .hydra/ trio, written by the run itself."""
    files = {"config.yaml": OmegaConf.to_yaml(resolved_config(cfg)),
             ".hydra/config.yaml": OmegaConf.to_yaml(cfg),
             ".hydra/overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(overrides)))}
    try:
        from hydra.core.hydra_config import HydraConfig

        files[".hydra/hydra.yaml"] = OmegaConf.to_yaml(OmegaConf.create({"hydra": HydraConfig.get()}))
    except ValueError:  # not under Hydra (tests, isolated jobs)
        pass
    return files


class _RunLog:
    """train.log of a run: records are held in memory until the run may write into its directory, so a rejected
    command leaves an existing run's log untouched."""

    def __init__(self) -> None:
        import logging.handlers

        self.root = logging.getLogger()
        self.buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 10)
        self.buffer.setLevel(logging.INFO)
        self.file: logging.Handler | None = None
        self.root.addHandler(self.buffer)
        self.level = self.root.level
        if self.root.level > logging.INFO or self.root.level == logging.NOTSET:
            self.root.setLevel(logging.INFO)

    def open(self, path: Path) -> None:
        self.file = logging.FileHandler(path, mode="a", encoding="utf-8")
        self.file.setFormatter(logging.Formatter(LOG_FORMAT))
        self.buffer.setTarget(self.file)
        self.buffer.flush()
        self.root.removeHandler(self.buffer)
        self.root.addHandler(self.file)

    def close(self) -> None:
        self.root.removeHandler(self.buffer)
        self.buffer.close()
        if self.file is not None:
            self.root.removeHandler(self.file)
            self.file.close()
        self.root.setLevel(self.level)


def objective(metrics: dict) -> float:
    """What a sweeper maximises, measured on the validation split, never on test (a configuration chosen by its
    test score would report an optimistic, selected number): validation accuracy for classification, minus
    the validation loss for generation. Test scores are recorded beside it, not used for selection."""
    if "val_accuracy" in metrics:
        return float(metrics["val_accuracy"])
    return -float(metrics.get("eval_loss", math.inf))


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None, job: str = "0") -> dict:
    """Train and evaluate one configuration; writes every artifact into ``run_dir``; returns the metrics.

    Nothing is written before the config and the data have been checked; a directory that already holds a run
    is refused unless resumed or ``overwrite_run=true``; a failure is recorded without replacing a finished run
    (:class:`finetune.runs.RunWriter`).

    Raises:
        FinetuneError: a user error (bad value, file, combination); anything else a run can raise.
    """
    from finetune import distributed
    from finetune.runs import RunWriter, holds_run

    from finetune.trainer import resolve_resume

    writer = RunWriter(run_dir, resume=cfg.trainer.get("resume_from_checkpoint") is not None,
                       overwrite=cfg.get("overwrite_run", False) is True)
    run_log = _RunLog()
    try:
        validate(cfg)
        # Rank 0 checks the directory and picks the checkpoint; under torchrun every rank follows its decision.
        distributed.agree(writer.check)
        # Resolved before anything is written: a bad path or a damaged checkpoint leaves the directory as it was.
        resume = distributed.agree(lambda: resolve_resume(cfg.trainer.get("resume_from_checkpoint"), Path(run_dir)))
        return _run(cfg, run_dir, writer, run_log, overrides or [], job, resume)
    except BaseException as exc:
        if not distributed.is_main():  # rank 0 records the failure; the others only stop
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, FinetuneError):
            log.error("run failed: %s", message)
        else:
            log.error("job failed:\n%s", traceback.format_exc())
        failure = {"status": "failed", "job": job, "error": message, "error_type": type(exc).__name__,
                   "overrides": overrides or []}
        if not writer.started and not holds_run(run_dir):  # a fresh directory: nothing there to lose
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            run_log.open(Path(run_dir) / "train.log")
            write_json(Path(run_dir) / "metrics.json", failure)
        failed = writer.fail(failure)
        if failed is not None:
            log.error("this attempt failed; the finished run in %s is kept as it was, the attempt is in %s",
                      run_dir, failed)
        raise
    finally:
        run_log.close()


def _run(cfg: DictConfig, run_dir: Path, writer, run_log: _RunLog, overrides: list[str], job: str,
         resume: str | None) -> dict:
    import torch
    from transformers import set_seed

    from finetune.data import DataCollator, load_splits, tokenize_split
    from finetune.evaluate import zero_shot
    from finetune.lora import apply_lora, count_params
    from finetune.measure import (ThroughputCallback, bound_cpu_allocator, memory_breakdown_mb, memory_device,
                                  peak_memory_mb, reset_peak_memory)
    from finetune.model import load_model, resolve_precision
    from finetune.trainer import make_trainer, training_arguments
    from finetune import distributed, tracking

    targets = qat_targets(cfg)
    method = method_name(cfg)
    dcfg, tcfg = cfg.dataset, cfg.trainer
    set_seed(cfg.seed)
    precision = resolve_precision(tcfg.precision, cfg.model.dtype, full_finetune=cfg.lora.method == "none")
    classification = dcfg.task == "classification"

    # Rows first: a missing file or a bad row is reported before any weights load.
    splits = load_splits(dcfg, cfg.seed)
    log.info("data: %s (train %d, validation %d, test %d)", splits.source, len(splits.train),
             len(splits.validation), len(splits.test))
    main = distributed.is_main()
    strategy = str(cfg.get("distributed", {}).get("strategy", "none"))
    # FSDP / DeepSpeed shard the weights: every rank takes part in each forward pass, evaluation included.
    sharded = strategy in ("fsdp", "deepspeed")
    # Config and data are good: from here on the run writes into its directory (rank 0 alone).
    if main:
        writer.begin(_early_files(cfg, overrides))
        run_log.open(run_dir / "train.log")
    metrics: dict = {
        "status": "running", "job": job, "method": method, "model": cfg.model.name_or_path,
        "dataset": dcfg.name, "task": dcfg.task, "data_source": splits.source,
        "quantization": cfg.quantization.mode, "qat_targets": targets, "precision": precision.name,
        "seed": cfg.seed, "overrides": overrides or [],
        "n_train": len(splits.train), "n_validation": len(splits.validation), "n_test": len(splits.test),
    }
    if cfg.lora.method != "none":
        metrics["lora"] = {k: OmegaConf.to_container(cfg.lora, resolve=True).get(k) for k in ("r", "alpha", "dropout", "target_modules")}

    if memory_device() == "cpu":
        bounded = bound_cpu_allocator() if cfg.get("cpu_allocator") == "bounded" else None
        metrics["cpu_allocator"] = bounded or "glibc default"
    reset_peak_memory()
    model, tok, resolved = load_model(cfg.model, cfg.quantization, precision,
                                      gradient_checkpointing=bool(tcfg.gradient_checkpointing), sharded=sharded)
    metrics["model_path"] = resolved
    metrics["model_memory_mb"] = round(model.get_memory_footprint() / 2**20, 2)
    eval_bs, max_len = int(cfg.eval.batch_size), int(tcfg.max_length)
    bf16 = precision.bf16

    if classification and cfg.eval.zero_shot and (main or sharded):
        t0 = time.perf_counter()
        zs = zero_shot(model, tok, splits.test, cfg, resolved, max_len, eval_bs, precision)
        metrics.update(zero_shot_accuracy=zs["accuracy"], zero_shot_f1=zs["f1"], zero_shot_cached=zs["from_cache"])
        log.info("zero-shot on %d test rows: accuracy %.4f, F1 %.4f (%.0f s%s)", zs["n"], zs["accuracy"], zs["f1"],
                 time.perf_counter() - t0, ", cached scores" if zs["from_cache"] else "")

    # peak_memory_mb covers the weights already loaded plus everything training adds, not zero-shot scoring.
    reset_peak_memory()
    model = apply_lora(model, cfg.lora)
    trainable, total = count_params(model)
    metrics.update(trainable_params=trainable, total_params=total, trainable_pct=round(100 * trainable / total, 4))
    log.info("%s: %s trainable of %s parameters (%.3f%%)", method, f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    qat_handle, callbacks = None, []
    if targets:
        from finetune.qat import QATCallback, apply_qat

        qat_handle = apply_qat(model, targets, cfg.qat)
        callbacks.append(QATCallback(qat_handle, int(cfg.qat.start_step)))

    train_ds = tokenize_split(splits.train, dcfg, tok, max_len)
    if tcfg.get("packing"):
        from finetune.data.packing import pack_rows

        n_examples = len(train_ds)
        train_ds = pack_rows(train_ds, max_len)
        metrics["n_train_packed_rows"] = len(train_ds)
        log.info("packing: %d examples in %d rows of up to %d tokens", n_examples, len(train_ds), max_len)
    val_ds = tokenize_split(splits.validation, dcfg, tok, max_len) if splits.validation else None
    meter = ThroughputCallback()
    collator = DataCollator(pad_token_id=tok.pad_token_id)
    callbacks.append(meter)

    name = cfg.run_name or f"{method}-{dcfg.name}-{run_dir.name}"
    wandb_run = tracking.init_run(cfg, run_dir, name, tags=[method, dcfg.name] + (overrides or [])) if main else None
    args = training_arguments(tcfg, precision, run_dir, cfg.seed, ["wandb"] if wandb_run else [], name,
                              has_eval=val_ds is not None, dist_cfg=cfg.get("distributed"))
    trainer = make_trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                           data_collator=collator, callbacks=callbacks, meter=meter,
                           share_prefix=bool(tcfg.get("share_prefix", True)))
    result = trainer.train(resume_from_checkpoint=resume)
    if qat_handle is not None:
        # Quantization statistics of training; then fake-quant off so the fp scores below are full precision.
        metrics["qat"] = qat_handle.summary()
        if wandb_run is not None:
            wandb_run.log(qat_handle.metrics())
        qat_handle.enabled = False
    # Peak memory of loading + training (the comparison column); evaluation's own peak is recorded apart.
    # Under a multi-process launch: the job's figures (sum of tokens, max of peaks and times) and each rank's.
    ranks = distributed.gather({"rank": distributed.rank(), "tokens": meter.tokens, "train_runtime_s": meter.elapsed,
                                "peak_memory_mb": round(peak_memory_mb(), 1), "loss_sum": trainer._total_loss_scalar})
    # The Trainer's running loss: the logged part is already averaged over ranks, the part since the last log is
    # each rank's own; the mean over ranks is the job's loss (exact when the ranks' batches weigh alike).
    loss_sum = sum(r.pop("loss_sum") for r in ranks) / len(ranks)
    metrics["peak_memory_mb"] = max(r["peak_memory_mb"] for r in ranks)
    metrics["memory_breakdown_mb"] = memory_breakdown_mb(metrics["peak_memory_mb"], metrics["model_memory_mb"], model)
    reset_peak_memory()
    elapsed = max(r["train_runtime_s"] for r in ranks)
    tokens = sum(r["tokens"] for r in ranks)
    metrics.update(
        # Over the whole run, also after a resume (the checkpoint carries the running sums and the time).
        train_runtime_s=round(elapsed, 2),
        train_steps=result.global_step,
        train_loss=round(loss_sum / max(result.global_step, 1), 6),
        train_tokens=tokens,
        train_tokens_per_s=round(tokens / elapsed, 2) if elapsed > 0 else 0.0,
    )
    if distributed.launched():
        metrics["distributed"] = {**distributed.describe(strategy), "per_rank": [
            {**r, "train_runtime_s": round(r["train_runtime_s"], 2),
             "tokens_per_s": round(r["tokens"] / r["train_runtime_s"], 2) if r["train_runtime_s"] > 0 else 0.0}
            for r in ranks]}

    # Artifacts: the adapter in PEFT format (or the full model), and the tokenizer.
    weights_dir = "model" if cfg.lora.method == "none" else "adapter"
    if sharded:  # the sharded weights are gathered by the engine (a collective: every rank calls it; rank 0 writes)
        trainer.save_model(distributed.broadcast(str(writer.path(weights_dir)) if main else None))
    if not main and not sharded:
        return {"status": "ok", "rank": distributed.rank()}  # rank 0 evaluates and records
    if not main:  # sharded: every forward pass needs every rank; rank 0 records
        _evaluate(cfg, model, tok, splits, val_ds, {}, qat_handle, targets, bf16)
        return {"status": "ok", "rank": distributed.rank()}
    if sharded:
        tok.save_pretrained(writer.path(weights_dir))
    elif cfg.lora.method == "none":
        # A standalone checkpoint: AutoModelForCausalLM / AutoTokenizer.from_pretrained(run_dir / "model").
        model.save_pretrained(writer.path("model"))
        tok.save_pretrained(writer.path("model"))
    else:
        model.save_pretrained(writer.path("adapter"))
    tok.save_pretrained(writer.path("tokenizer"))
    if qat_handle is not None:
        # Calibrated static scales (qat.scale=static) are what an INT8 export needs; the rest documents the run.
        write_json(writer.path("qat_state.json"), {"targets": targets, "config": OmegaConf.to_container(cfg.qat),
                                                "static_scales": qat_handle.static_scales(),
                                                "static_absmax": qat_handle.static_absmax()})

    _evaluate(cfg, model, tok, splits, val_ds, metrics, qat_handle, targets, bf16)
    metrics.update(eval_peak_memory_mb=round(peak_memory_mb(), 1), memory_device=memory_device(), status="ok")
    if torch.cuda.is_available():
        metrics["gpu"] = torch.cuda.get_device_name()
    writer.commit(metrics)
    tracking.finish_run(wandb_run, metrics)
    log.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}))
    return metrics


def _evaluate(cfg: DictConfig, model, tok, splits, val_ds, metrics: dict, qat_handle, targets: list[str],
              bf16: bool) -> None:
    """Scores after training into ``metrics``: validation loss and selection score, test scores, simulated INT8
    where asked, sample generations in the log."""
    from finetune.data import tokenize_split
    from finetune.evaluate import classify, loss_and_perplexity, sample_generations

    dcfg = cfg.dataset
    classification = dcfg.task == "classification"
    eval_bs, max_len = int(cfg.eval.batch_size), int(cfg.trainer.max_length)
    if val_ds is not None and len(val_ds):
        metrics.update(loss_and_perplexity(model, val_ds, tok.pad_token_id, eval_bs, bf16))
    if classification and splits.validation:
        # The selection score (objective, report ranking): the validation split, scored like test.
        val = classify(model, tok, splits.validation, dcfg, max_len, eval_bs, bf16)
        metrics.update(val_accuracy=val["accuracy"], val_f1=val["f1"], n_val_scored=val["n"])
        log.info("validation: accuracy %.4f, F1 %.4f on %d rows", val["accuracy"], val["f1"], val["n"])
    if classification:
        scored = classify(model, tok, splits.test, dcfg, max_len, eval_bs, bf16)
        metrics.update(accuracy=scored["accuracy"], f1=scored["f1"], n_scored=scored["n"])
        log.info("test: accuracy %.4f, F1 %.4f on %d rows", scored["accuracy"], scored["f1"], scored["n"])
    elif splits.test:
        test_ds = tokenize_split(splits.test, dcfg, tok, max_len)
        test = loss_and_perplexity(model, test_ds, tok.pad_token_id, eval_bs, bf16)
        metrics.update(test_loss=test["eval_loss"], perplexity=test["perplexity"])

    if qat_handle is not None or cfg.qat.get("eval_int8") is True:
        from finetune.int8_eval import int8_metrics

        metrics.update(int8_metrics(model, tok, splits, dcfg, cfg.qat, targets, qat_handle, max_len, eval_bs, bf16))

    for sample in sample_generations(model, tok, splits.test or splits.validation, dcfg, int(cfg.eval.num_samples),
                                     int(cfg.eval.max_new_tokens), bf16, max_len):
        log.info("sample | prompt: %s | completion: %s | reference: %s", sample["prompt"].replace("\n", " "),
                 sample["completion"].replace("\n", " "), sample["reference"])


def _record_failure(run_dir: Path, job: str, overrides: list[str], message: str, error_type: str) -> None:
    """A failure the job itself could not record (a hard-killed job process); never over a finished run."""
    from finetune.runs import read_status

    if read_status(run_dir) == "ok":
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "metrics.json", {
        "status": "failed", "job": job, "error": message, "error_type": error_type, "overrides": overrides,
    })


def _job_process(cfg_yaml: str, run_dir: str, overrides: list[str], job: str) -> None:
    """Body of an isolated sweep job (a spawned process): log to stderr like Hydra does, run (which keeps
    train.log), record."""
    fmt = logging.Formatter(LOG_FORMAT)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    import os

    start = time.perf_counter()
    log.info("job %s: process %d started", job, os.getpid())
    try:
        run(OmegaConf.create(cfg_yaml), Path(run_dir), overrides, job)
        log.info("job %s: process %d finished after %.1f s", job, os.getpid(), time.perf_counter() - start)
    except FinetuneError as exc:  # recorded in metrics.json; the job's log says why too
        log.error("job %s failed: %s", job, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        sys.exit(1)
    except BaseException:  # recorded in metrics.json, traceback logged
        sys.exit(1)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the out-of-memory killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"job process killed by {name}{hint}"
    return f"job process exited with status {code} before writing its metrics"


def run_isolated(cfg: DictConfig, run_dir: Path, overrides: list[str], job: str, target=None) -> dict:
    """Run one sweep job in a fresh process and return its metrics.json.

    Each job then starts from an empty heap, so its peak memory is its own (in one process, memory an
    earlier job freed but the allocator kept counts against the next one: +4.6 GB measured for the last
    job of a 4-job CPU sweep), and a crash or an out-of-memory kill fails only that job.
    ``target`` replaces the job body (same arguments as :func:`_job_process`; tests).
    """
    import multiprocessing
    import os

    from finetune import distributed

    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    path = run_dir / "metrics.json"
    before = path.read_bytes() if path.is_file() else None
    # By module path: under ``python -m finetune.train`` this module is __main__, which a launcher's worker process
    # (joblib) cannot import back by that name.
    body = target or importlib.import_module("finetune.train")._job_process
    proc = multiprocessing.get_context("spawn").Process(
        target=body, args=(cfg_yaml, str(run_dir), overrides, job), name=f"finetune-job-{job}")
    # With CUDA, the job gets gpus_per_job GPUs no other running job of the sweep holds (jobs side by side under
    # hydra/launcher=parallel); the sweep folder keeps the lease files.
    with distributed.gpu_lease(run_dir.parent / ".gpu-lease", int(cfg.get("gpus_per_job") or 0)) as gpus:
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpus is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = distributed.visible_devices(gpus)
            log.info("job %s on GPU(s) %s", job, os.environ["CUDA_VISIBLE_DEVICES"])
        try:
            with _stdlib_start_method():
                proc.start()  # the child takes this environment
        except Exception as exc:  # noqa: BLE001 - the job could not start: recorded like any job failure
            message = f"job process could not start: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            _record_failure(run_dir, job, overrides, message, "JobProcessError")
            return {"status": "failed", "job": job, "error": message, "error_type": "JobProcessError",
                    "overrides": overrides}
        finally:
            if gpus is not None:
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
        proc.join()
    after = path.read_bytes() if path.is_file() else None
    status = json.loads(after).get("status") if after is not None else None
    if after is None or (after == before and proc.exitcode != 0) or status == "running":
        reason = _exit_reason(proc.exitcode)
        _record_failure(run_dir, job, overrides, reason, "JobProcessError")
        recorded = json.loads(path.read_text()) if path.is_file() else {}
        if recorded.get("status") != "failed":  # a finished run kept its metrics.json; this job still failed
            recorded = {"status": "failed", "job": job, "error": reason, "error_type": "JobProcessError",
                        "overrides": overrides}
        return recorded
    return json.loads(after)


@contextlib.contextmanager
def _stdlib_start_method():
    """A spawned child replays its parent's global start method; inside a joblib (loky) worker that is 'loky', which
    the child cannot resolve. Switch to 'spawn' while starting the job process, then put the worker's back."""
    import multiprocessing

    current = multiprocessing.get_start_method(allow_none=True)
    if current in (None, "spawn", "fork", "forkserver"):
        yield
        return
    saved = multiprocessing.context._default_context._actual_context  # the worker's own (loky) context
    multiprocessing.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocessing.context._default_context._actual_context = saved


def _check_before_spawn(cfg: DictConfig, run_dir: Path, overrides: list[str], job: str) -> None:
    """The checks ``run`` starts with, in the sweep process: a bad value fails the job without a process."""
    from finetune.runs import check_run_dir

    # A directory that already holds a run is left exactly as it is: nothing is recorded in it.
    check_run_dir(run_dir, resume=cfg.trainer.get("resume_from_checkpoint") is not None,
                  overwrite=bool(cfg.get("overwrite_run", False)))
    try:
        validate(cfg)
    except FinetuneError as exc:
        _record_failure(run_dir, job, overrides, str(exc).splitlines()[0], type(exc).__name__)
        raise


def run_and_record(cfg: DictConfig) -> float:
    """Run one job. A user error in a single run exits 2 with one line; in a sweep every failure is
    recorded in the job's metrics.json and the sweep goes on (``isolate_jobs``: each job in its own process)."""
    from finetune import distributed

    multirun, overrides, job, group = _hydra_context()
    run_dir = Path(cfg.output_dir)
    if group and cfg.logger.get("backend") == "wandb" and not cfg.logger.get("group"):
        cfg.logger.group = group
    distributed.adopt_slurm_tasks()
    if distributed.launched():
        if multirun and not _launcher_isolates():
            print_error("a sweep (-m) cannot run inside torchrun / accelerate launch: launch single runs with them, "
                        "or give each sweep job several processes with hydra/launcher=slurm (tasks_per_node)")
            sys.exit(2)
        try:
            return objective(_run_launched(cfg, run_dir, overrides, job))
        except FinetuneError as exc:
            if multirun:  # recorded in the job's metrics.json by rank 0
                return float("nan")
            print_error(exc)
            sys.exit(2)
        finally:
            distributed.finish()
    if multirun:
        try:
            if cfg.get("isolate_jobs", True) and not _launcher_isolates():
                _check_before_spawn(cfg, run_dir, overrides, job)
                metrics = run_isolated(cfg, run_dir, overrides, job)
            else:
                metrics = run(cfg, run_dir, overrides, job)
        except (FinetuneError, Exception) as exc:  # noqa: BLE001 - recorded in metrics.json by run()
            metrics = {"status": "failed", "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
        if metrics.get("status") != "ok":
            log.error("job %s failed: %s (see %s)", job, metrics.get("error"), run_dir)
            return float("nan")
        return objective(metrics)
    try:
        return objective(run(cfg, run_dir, overrides, job))
    except FinetuneError as exc:
        print_error(exc)
        sys.exit(2)


def _launcher_isolates() -> bool:
    """True when the Hydra launcher already runs every job in a fresh process of its own (submitit: local and
    SLURM); the basic launcher runs jobs in the sweep process and joblib reuses its workers, so there
    ``isolate_jobs`` spawns one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return "submitit" in str(HydraConfig.get().launcher.get("_target_", ""))
    except ValueError:
        return False


def _run_launched(cfg: DictConfig, run_dir: Path, overrides: list[str], job: str) -> dict:
    """One job over the processes of torchrun / accelerate launch: rank 0's run directory is everyone's (each
    rank's Hydra picked a time-stamped one of its own; an empty one it made is removed)."""
    import os

    from finetune import distributed

    distributed.init()
    shared = Path(distributed.broadcast(os.path.abspath(run_dir)))
    if shared != Path(os.path.abspath(run_dir)):
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only if empty: never anything this rank did not create
        cfg.output_dir = str(shared)
    return run(cfg, shared, overrides, job)


CONF_DIR = str(CONFIG_TREE)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    return run_and_record(cfg)


def main() -> None:
    """finetune-train: the command line is composed and checked first (one ``error:`` line and exit status 2
    for a bad option, key or value, before anything is written), then Hydra runs."""
    from finetune.overrides import precheck

    try:
        precheck(sys.argv[1:], CONF_DIR, "train")
    except FinetuneError as exc:
        print_error(exc)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
