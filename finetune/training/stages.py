"""The stages of one training run, in order: prepare, baseline, adapt, fit, save, (baseline,) score, record.

Each stage reads and extends one :class:`Job` (the config, the run's writer, the model and data as far as the
run has got, and the metrics dict), so ``finetune.cli.train`` reads as the list of stages and a test can call one
stage alone. Under torchrun every rank runs every stage up to ``save``; rank 0 alone scores and records (every
rank scores when FSDP / DeepSpeed shard the weights).
"""

from __future__ import annotations

import logging
import time
import weakref

from omegaconf import DictConfig, OmegaConf

from finetune.config import method_name, qat_targets
from finetune.training.state import Job
from finetune.training.zero_shot import baseline  # noqa: F401 (a stage: run from finetune.training.job)

log = logging.getLogger("finetune.cli.train")


def _early_files(cfg: DictConfig, overrides: list[str]) -> dict[str, str]:
    """config.yaml (resolved, absolute paths) and Hydra's .hydra/ trio, written by the run itself."""
    from finetune.runs import resolved_config

    files = {"config.yaml": OmegaConf.to_yaml(resolved_config(cfg)),
             ".hydra/config.yaml": OmegaConf.to_yaml(cfg),
             ".hydra/overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(overrides)))}
    try:
        from hydra.core.hydra_config import HydraConfig

        files[".hydra/hydra.yaml"] = OmegaConf.to_yaml(OmegaConf.create({"hydra": HydraConfig.get()}))
    except ValueError:  # not under Hydra (tests, isolated jobs)
        pass
    return files


def prepare(job: Job, run_log) -> None:
    """Rows first (a missing file or a bad row is reported before any weights load), then a resume's config is
    checked against the run it continues, then the run directory is opened (rank 0), the metrics start, and the
    model loads."""
    from finetune.data import load_splits

    cfg, dcfg, tcfg = job.cfg, job.cfg.dataset, job.cfg.trainer
    job.splits = splits = load_splits(dcfg, cfg.seed)  # before the heavy imports below: a bad file fails fast
    if "distill" in cfg:
        from finetune.training.distill import check_teacher

        check_teacher(cfg.distill)  # a teacher run that is not there fails before any weights load
    from finetune.model.lora import check_init

    # likewise the run an adapter starts from (a resume takes its adapter from the checkpoint: that run may be gone)
    job.lora_init = check_init(cfg) if job.resume is None else None

    from transformers import set_seed

    from finetune.model.load import resolve_precision
    from finetune.model.loss import resolve_share_prefix
    from finetune.training import distributed
    from finetune.training.memory import memory_device

    set_seed(cfg.seed)
    job.precision = resolve_precision(tcfg.precision, cfg.model.dtype, full_finetune=cfg.lora.method == "none")
    job.share_prefix = resolve_share_prefix(tcfg.get("share_prefix", "auto"), memory_device(), job.precision.name)
    if job.resume is not None:  # the data is good; is this the run the checkpoint belongs to? (rank 0 decides)
        from finetune.training.checkpoints import check_resume_config

        distributed.agree(lambda: check_resume_config(cfg, job.resume, job.precision.name, job.share_prefix))
    log.info("data: %s (train %d, validation %d, test %d)", splits.source, len(splits.train),
             len(splits.validation), len(splits.test))
    job.main = distributed.is_main()
    # FSDP / DeepSpeed shard the weights: every rank takes part in each forward pass, evaluation included.
    job.sharded = str(cfg.get("distributed", {}).get("strategy", "none")) in ("fsdp", "deepspeed")
    if job.main:  # config and data are good: from here on the run writes into its directory (rank 0 alone)
        job.writer.begin(_early_files(cfg, job.overrides))
        run_log.open(job.run_dir / "train.log")
    job.metrics = _first_metrics(job, splits)
    _load(job)


def _first_metrics(job: Job, splits) -> dict:
    """metrics.json as a run starts: what runs, on what data, with which settings."""
    from finetune.training.memory import memory_device

    cfg, dcfg = job.cfg, job.cfg.dataset
    metrics = {
        "status": "running", "job": job.job, "method": method_name(cfg), "model": cfg.model.name_or_path,
        "dataset": dcfg.name, "task": dcfg.task, "data_source": splits.source,
        "quantization": cfg.quantization.mode, "qat_targets": qat_targets(cfg), "precision": job.precision.name,
        "seed": cfg.seed, "overrides": job.overrides,
        "n_train": len(splits.train), "n_validation": len(splits.validation), "n_test": len(splits.test),
    }
    if cfg.lora.method != "none":
        lora = OmegaConf.to_container(cfg.lora, resolve=True)
        metrics["lora"] = {k: lora.get(k) for k in ("r", "alpha", "dropout", "target_modules", "layers")}
    if memory_device() == "cpu":
        from finetune.training.memory import bound_cpu_allocator

        bounded = bound_cpu_allocator() if cfg.get("cpu_allocator") == "bounded" else None
        metrics["cpu_allocator"] = bounded or "glibc default"
    return metrics


def _load(job: Job) -> None:
    """The model and tokenizer, with what they weigh and (rank 0) the base's fingerprint."""
    from finetune.model.load import load_model
    from finetune.training.memory import reset_peak_memory

    cfg, tcfg = job.cfg, job.cfg.trainer
    reset_peak_memory()
    job.model, job.tok, resolved = load_model(cfg.model, cfg.quantization, job.precision,
                                              gradient_checkpointing=bool(tcfg.gradient_checkpointing),
                                              sharded=job.sharded)
    job.metrics["model_path"] = resolved
    job.metrics["model_memory_mb"] = round(job.model.get_memory_footprint() / 2**20, 2)
    # What model_memory_mb counts (memory_breakdown_mb); weak references, so an id reused later is not mistaken.
    job.loaded_params = {id(p): weakref.ref(p) for p in job.model.parameters()}
    if job.main:
        from finetune.model.fingerprint import model_fingerprint

        # What the adapter was trained on, by content: finetune-eval / -merge / -chat / -export refuse another base.
        fingerprint = model_fingerprint(resolved, cfg.model)
        if fingerprint is not None:
            job.metrics["base_model_fingerprint"] = fingerprint


def adapt(job: Job) -> None:
    """LoRA (or full fine-tuning) and fake quantization on the chosen sub-layers."""
    from finetune.model.lora import apply_lora, count_params
    from finetune.training.memory import reset_peak_memory

    # peak_memory_mb covers the weights already loaded plus everything training adds, not zero-shot scoring.
    reset_peak_memory()
    job.model = apply_lora(job.model, job.cfg.lora)
    if job.lora_init is not None:
        from finetune.model.lora import load_init

        load_init(job.model, job.lora_init)
    if job.cfg.lora.get("init"):
        job.metrics["lora_init"] = str(job.lora_init or job.cfg.lora.init)
    trainable, total = count_params(job.model)
    job.metrics.update(trainable_params=trainable, total_params=total, trainable_pct=round(100 * trainable / total, 4))
    log.info("%s: %s trainable of %s parameters (%.3f%%)", job.metrics["method"], f"{trainable:,}", f"{total:,}",
             100 * trainable / total)
    targets = job.metrics["qat_targets"]
    if targets:
        from finetune.qat.attach import QATCallback, apply_qat

        job.qat_handle = apply_qat(job.model, targets, job.cfg.qat)
        job.callbacks.append(QATCallback(job.qat_handle, int(job.cfg.qat.start_step)))
    from finetune.training.distill import build_distiller

    job.distiller = build_distiller(job.cfg, job.tok, job.qat_handle)


def _datasets(job: Job):
    """The tokenized training rows (packed where asked) and validation rows."""
    from finetune.data import tokenize_split

    cfg, dcfg = job.cfg, job.cfg.dataset
    train_ds = tokenize_split(job.splits.train, dcfg, job.tok, job.max_length)
    if cfg.trainer.get("packing"):
        from finetune.data.packing import pack_rows

        n_examples = len(train_ds)
        train_ds = pack_rows(train_ds, job.max_length)
        job.metrics["n_train_packed_rows"] = len(train_ds)
        log.info("packing: %d examples in %d rows of up to %d tokens", n_examples, len(train_ds), job.max_length)
    job.val_ds = tokenize_split(job.splits.validation, dcfg, job.tok, job.max_length) if job.splits.validation else None
    return train_ds


def fit(job: Job) -> None:
    """Train with the Hugging Face Trainer; record the training figures of the whole job (all ranks)."""
    from finetune.report import tracking
    from finetune.data import DataCollator
    from finetune.training.measure import ThroughputCallback
    from finetune.training.signals import StopOnSignal
    from finetune.training.trainer import make_trainer, training_arguments

    cfg, tcfg = job.cfg, job.cfg.trainer
    train_ds = _datasets(job)
    meter = ThroughputCallback()
    name = cfg.run_name or f"{job.metrics['method']}-{cfg.dataset.name}-{job.run_dir.name}"
    if job.main:
        job.wandb_run = tracking.init_run(cfg, job.run_dir, name,
                                          tags=[job.metrics["method"], cfg.dataset.name] + job.overrides)
    args = training_arguments(tcfg, job.precision, job.run_dir, cfg.seed, ["wandb"] if job.wandb_run else [], name,
                              has_eval=job.val_ds is not None, dist_cfg=cfg.get("distributed"))
    trainer = make_trainer(model=job.model, args=args, train_dataset=train_ds, eval_dataset=job.val_ds,
                           data_collator=DataCollator(pad_token_id=job.tok.pad_token_id, label_plan=True,
                                                      pad_to_multiple_of=tcfg.get("pad_to_multiple_of")),
                           callbacks=job.callbacks + [meter], meter=meter,
                           share_prefix=job.share_prefix, precision=job.precision.name,
                           head_chunk=int(tcfg.get("head_chunk") or 0), distiller=job.distiller,
                           compile_norms=bool(tcfg.get("compile_norms", False)))
    job.metrics["share_prefix"] = trainer.share_prefix
    trainer.add_callback(stopper := StopOnSignal())  # after the Trainer's own: its step-end decisions come first
    with stopper.installed():
        result = trainer.train(resume_from_checkpoint=job.resume)
    if (interrupted := stopper.interruption(args.output_dir)) is not None:
        raise interrupted
    job.trainer = trainer
    if job.distiller is not None:  # every rank's distilled tokens (a collective)
        from finetune.training import distributed

        job.metrics["distill"] = job.distiller.summary(distributed.gather(job.distiller.totals()))
    if job.qat_handle is not None:
        # Quantization statistics of training; then fake-quant off so the fp scores below are full precision.
        job.metrics["qat"] = job.qat_handle.summary()
        if job.wandb_run is not None:
            job.wandb_run.log(job.qat_handle.metrics())
        job.qat_handle.enabled = False
    _training_figures(job, meter, trainer, result.global_step)


def _training_figures(job: Job, meter, trainer, steps: int) -> None:
    """Peak memory of loading + training (the comparison column; evaluation's own peak is recorded apart),
    tokens/s and the loss; under a multi-process launch the job's figures (sum of tokens, max of peaks and
    times) and each rank's."""
    from finetune.training import distributed
    from finetune.training.memory import memory_breakdown_mb, reset_peak_memory, rounded_mb

    m = job.metrics
    ranks = distributed.gather({"rank": distributed.rank(), "tokens": meter.tokens, "train_runtime_s": meter.elapsed,
                                "peak_memory_mb": round(meter.peak_memory_mb(), 1),
                                "peak_in_use_mb": rounded_mb(meter.peak_in_use_mb()),
                                "loss_sum": trainer._total_loss_scalar})
    # The Trainer's running loss: the logged part is already averaged over ranks, the part since the last log is
    # each rank's own; the mean over ranks is the job's loss (exact when the ranks' batches weigh alike).
    loss_sum = sum(r.pop("loss_sum") for r in ranks) / len(ranks)
    m["peak_memory_mb"] = max(r["peak_memory_mb"] for r in ranks)
    in_use = [r["peak_in_use_mb"] for r in ranks if r["peak_in_use_mb"] is not None]
    if in_use:
        m["peak_in_use_mb"] = max(in_use)
    m["memory_breakdown_mb"] = memory_breakdown_mb(m["peak_memory_mb"], m["model_memory_mb"], job.model,
                                                   job.loaded_params)
    reset_peak_memory()
    elapsed = max(r["train_runtime_s"] for r in ranks)
    tokens = sum(r["tokens"] for r in ranks)
    m.update(
        # Over the whole run, also after a resume (the checkpoint carries the running sums and the time).
        train_runtime_s=round(elapsed, 2),
        train_steps=steps,
        train_loss=round(loss_sum / max(steps, 1), 6),
        train_tokens=tokens,
        train_tokens_per_s=round(tokens / elapsed, 2) if elapsed > 0 else 0.0,
    )
    if job.resume:
        # Which steps this process trained: the figures above cover the whole run, these say it was resumed.
        st = trainer._resumed_state or {}
        m["resumed_from"] = {"checkpoint": str(job.resume), "step": st.get("global_step")}
    strategy = str(job.cfg.get("distributed", {}).get("strategy", "none"))
    if distributed.launched() or strategy != "none":  # also one process under torchrun with a strategy set
        m["distributed"] = {**distributed.describe(strategy), "per_rank": [
            {**r, "train_runtime_s": round(r["train_runtime_s"], 2),
             "tokens_per_s": round(r["tokens"] / r["train_runtime_s"], 2) if r["train_runtime_s"] > 0 else 0.0}
            for r in ranks]}


def save(job: Job) -> bool:
    """The adapter in PEFT format (or the full model), the tokenizer and the QAT state. Returns whether this
    process goes on to score: rank 0 always, every rank where the weights are sharded."""
    from finetune.training import distributed
    from finetune.runs import atomic_write_json

    cfg, writer = job.cfg, job.writer
    weights_dir = "model" if cfg.lora.method == "none" else "adapter"
    if job.sharded:  # the sharded weights are gathered by the engine (a collective: every rank calls it; rank 0 writes)
        job.trainer.save_model(distributed.broadcast(str(writer.path(weights_dir)) if job.main else None))
    if not job.main:
        return job.sharded
    if job.sharded:
        job.tok.save_pretrained(writer.path(weights_dir))
    elif cfg.lora.method == "none":
        # A standalone checkpoint: AutoModelForCausalLM / AutoTokenizer.from_pretrained(run_dir / "model").
        job.model.save_pretrained(writer.path("model"))
        job.tok.save_pretrained(writer.path("model"))
    else:
        job.model.save_pretrained(writer.path("adapter"))
    job.tok.save_pretrained(writer.path("tokenizer"))
    if job.qat_handle is not None:
        # Calibrated static scales (qat.scale=static) are what an INT8 export needs; the rest documents the run.
        atomic_write_json(writer.path("qat_state.json"), {
            "targets": job.metrics["qat_targets"], "config": OmegaConf.to_container(cfg.qat),
            "static_scales": job.qat_handle.static_scales(), "static_absmax": job.qat_handle.static_absmax()})
    return True


def score(job: Job) -> None:
    """Scores after training into the metrics (a sharded rank's forward passes only serve rank 0's): the
    validation loss and selection score, test scores, simulated INT8 where asked, sample generations in the log."""
    from finetune.evaluation.scoring import (classify, loss_and_perplexity, majority_class, scores_and_loss,
                                             scores_to_metrics)

    metrics = job.metrics if job.main else {}
    model, tok, splits, dcfg = job.model, job.tok, job.splits, job.cfg.dataset
    eval_bs, max_len, bf16 = job.eval_batch_size, job.max_length, job.precision.bf16
    # The validation loss and, for classification, the selection score (objective, report ranking): the
    # validation split scored like test; one pass gives both where it can (scores_and_loss).
    both = None
    if job.classification and splits.validation and job.val_ds is not None:
        both = scores_and_loss(model, tok, splits.validation, dcfg, max_len, eval_bs, bf16)
    if both is not None:
        metrics.update(both[1])
    elif job.val_ds is not None and len(job.val_ds):
        metrics.update(loss_and_perplexity(model, job.val_ds, tok.pad_token_id, eval_bs, bf16))
    if job.classification and splits.validation:
        val = (scores_to_metrics(both[0], splits.validation, dcfg) if both is not None
               else classify(model, tok, splits.validation, dcfg, max_len, eval_bs, bf16))
        metrics.update(val_accuracy=val["accuracy"], val_f1=val["f1"], n_val_scored=val["n"])
        log.info("validation: accuracy %.4f, F1 %.4f on %d rows", val["accuracy"], val["f1"], val["n"])
    if job.classification:
        scored = classify(model, tok, splits.test, dcfg, max_len, eval_bs, bf16, job.trunk)
        metrics.update(accuracy=scored["accuracy"], f1=scored["f1"], n_scored=scored["n"],
                       **majority_class(splits.test, dcfg))
        if job.trunk is not None:
            # 0: every layer was run; k: layers below k came from the zero-shot pass (same base weights, same rows)
            metrics["test_scored_from_layer"] = job.trunk.start if job.trunk.replayed else 0
            job.trunk.release()
        log.info("test: accuracy %.4f, F1 %.4f on %d rows", scored["accuracy"], scored["f1"], scored["n"])
    elif splits.test:
        from finetune.data import tokenize_split

        test = loss_and_perplexity(model, tokenize_split(splits.test, dcfg, tok, max_len), tok.pad_token_id, eval_bs,
                                   bf16)
        metrics.update(test_loss=test["eval_loss"], perplexity=test["perplexity"])
    _int8_and_samples(job, metrics)


def _int8_and_samples(job: Job, metrics: dict) -> None:
    from finetune.evaluation.scoring import sample_generations

    cfg, bf16 = job.cfg, job.precision.bf16
    if job.qat_handle is not None or cfg.qat.get("eval_int8") is True:
        from finetune.evaluation.int8 import int8_metrics
        from finetune.evaluation.int8_cache import ScoreCache

        # Each finished simulated scoring kept in the run's checkpoint folder: a run stopped while it scores and
        # resumed re-scores only what was left (the weights must match bit for bit).
        cache = ScoreCache.for_run(job.model, job.qat_handle, job.splits, cfg,
                                   job.run_dir / "checkpoints" / "int8-scores", job.max_length, bf16)
        metrics.update(int8_metrics(job.model, job.tok, job.splits, cfg.dataset, cfg.qat, job.metrics["qat_targets"],
                                    job.qat_handle, job.max_length, bf16, cache))
    for sample in sample_generations(job.model, job.tok, job.splits.test or job.splits.validation, cfg.dataset,
                                     int(cfg.eval.num_samples), int(cfg.eval.max_new_tokens), bf16, job.max_length):
        log.info("sample | prompt: %s | completion: %s | reference: %s", sample["prompt"].replace("\n", " "),
                 sample["completion"].replace("\n", " "), sample["reference"])


def record(job: Job) -> dict:
    """metrics.json (the run's last file: it marks the run finished) and the W&B summary."""
    import torch

    from finetune.report import tracking
    from finetune.training.measure import hardware
    from finetune.training.memory import memory_device, peak_memory_mb

    metrics = job.metrics
    metrics.update(eval_peak_memory_mb=round(peak_memory_mb(), 1), memory_device=memory_device(),
                   hardware=hardware(memory_device()), run_wall_s=round(time.monotonic() - job.started, 1),
                   status="ok")
    if torch.cuda.is_available():
        metrics["gpu"] = torch.cuda.get_device_name()
    job.writer.commit(metrics)
    tracking.finish_run(job.wandb_run, metrics)
    from finetune.report.summary import run_summary

    log.info("metrics.json written: %s\n%s", job.run_dir / "metrics.json", run_summary(job.run_dir, metrics))
    return metrics
