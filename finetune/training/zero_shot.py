"""The zero-shot stage of a run: its base model's test scores, before training or, where the adapters can be
switched off again, after it (:func:`zero_shot_after_training`)."""

from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger("finetune.cli.train")


def zero_shot_after_training(job) -> bool:  # job: finetune.training.stages.Job
    """Whether the zero-shot scoring waits until training is done: wherever the adapters can be switched off again
    (LoRA / DoRA / QLoRA without QAT, weights not sharded), so the training figures (``peak_in_use_mb``) never
    include what scoring leaves behind. LLM.int8()'s outlier columns make a matmul of a new shape at every scored
    batch, and the kernels' per-shape state stays allocated: +74 MB in use on SmolLM2 when the scores were computed
    in process, +0 when they came from the score cache (docs/measurements/memory.md). Full fine-tuning changes the
    base weights and QAT's hooks stay on the model, so those runs score the base model before training."""
    cfg = job.cfg
    return cfg.lora.method != "none" and not job.metrics["qat_targets"] and not job.sharded


def baseline(job, after_training: bool = False) -> None:
    """Zero-shot accuracy of the base model on the test rows (classification; scores cached by content): before
    training, or with the adapters switched off after it (``after_training``, see :func:`zero_shot_after_training`);
    the same weights, the same scores."""
    from finetune.evaluation.scoring import zero_shot

    if not (job.classification and job.cfg.eval.zero_shot and (job.main or job.sharded)):
        return
    if zero_shot_after_training(job) != after_training:
        return
    t0 = time.perf_counter()
    job.trunk = _frozen_trunk(job)
    with job.model.disable_adapter() if after_training else contextlib.nullcontext():
        zs = zero_shot(job.model, job.tok, job.splits.test, job.cfg, job.metrics["model_path"], job.max_length,
                       job.eval_batch_size, job.precision, job.trunk)
    if job.trunk is not None:
        job.trunk.spill()
    job.metrics.update(zero_shot_accuracy=zs["accuracy"], zero_shot_f1=zs["f1"], zero_shot_cached=zs["from_cache"])
    log.info("zero-shot on %d test rows: accuracy %.4f, F1 %.4f (%.0f s%s)", zs["n"], zs["accuracy"], zs["f1"],
             time.perf_counter() - t0, ", cached scores" if zs["from_cache"] else "")


def _frozen_trunk(job):
    """A :class:`FrozenTrunk` where LoRA leaves the lower layers as they are (``lora.layers``) and
    ``eval.reuse_frozen_layers`` is on: the zero-shot pass records the test rows' states entering the first adapted
    layer and the final test scoring starts from them."""
    from finetune.evaluation.trunk import FrozenTrunk
    from finetune.model.lora import resolve_layers

    cfg = job.cfg
    if (not cfg.eval.get("reuse_frozen_layers", True) or cfg.lora.method == "none" or cfg.lora.get("layers") is None
            or job.metrics["qat_targets"] or job.sharded):
        return None
    layers, _ = resolve_layers(cfg.lora, job.model)
    return FrozenTrunk(layers[0]) if layers[0] > 0 else None
