"""metrics.json: the one schema of what a run records, shared by its writers and its readers.

Every key a finished (or failed) run writes is named here with its type and meaning; ``RunWriter.commit``
checks a run's metrics against it before writing, and the report reads its columns by these names, so a key
is spelt in one place; docs/runs.md summarises them for a reader.
"""

from __future__ import annotations

import re
from typing import Any

from finetune.config import QAT_TARGETS

NUMBER = (int, float)
TEXT = (str,)
FLAG = (bool,)
LIST = (list,)
MAPPING = (dict,)
OPTIONAL_TEXT = (str, type(None))

# name -> (allowed types, meaning)
FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    # what ran
    "status": (TEXT, "running | ok | failed | interrupted (stopped by a signal or Ctrl-C; resume it) (written "
                     "last: ok marks a finished run)"),
    "job": (TEXT, "job number within a sweep (0 for a single run)"),
    "method": (TEXT, "LoRA | DoRA | QLoRA-int8 | QLoRA-nf4 | full, with a QAT suffix where trained with QAT"),
    "model": (TEXT, "model.name_or_path as given"),
    "model_path": (TEXT, "the resolved checkpoint directory or hub id"),
    "dataset": (TEXT, "dataset.name"),
    "task": (TEXT, "classification | generation"),
    "data_source": (TEXT, "where the rows came from (file or folder, hub id, embedded corpus)"),
    "quantization": (TEXT, "quantization.mode of the base: none | int8 | nf4"),
    "qat_targets": (LIST, "the QAT sub-layer groups trained with fake quantization ([] = none)"),
    "precision": (TEXT, "the compute precision training and scoring used: fp32 | bf16 | fp16"),
    "share_prefix": ((bool, str), "whether training computed the prompt prefix a batch's rows share once per batch "
                                  "(trainer.share_prefix, auto resolved): true, false or packed (in one pass)"),
    "seed": (NUMBER, "the run's seed"),
    "overrides": (LIST, "the command-line overrides of this job"),
    "lora": (MAPPING, "r, alpha, dropout, target_modules and layers of the adapter"),
    "lora_init": (TEXT, "lora.init: the finished run whose adapter this run's started as"),
    "cpu_allocator": (TEXT, "glibc default, or the bounded allocator's settings (cpu_allocator=bounded)"),
    "gpu": (TEXT, "the GPU's name, where one was used"),
    "hardware": (TEXT, "the machine the figures were measured on: the CPU model, cores and vector ISA, or the GPU"),
    "distributed": (MAPPING, "how a multi-process job ran, and each rank's tokens, time and peak memory"),
    # rows
    "n_train": (NUMBER, "training rows"),
    "n_train_packed_rows": (NUMBER, "rows after packing (trainer.packing=true)"),
    "n_validation": (NUMBER, "validation rows"),
    "n_test": (NUMBER, "test rows"),
    "n_scored": (NUMBER, "test rows scored for accuracy / F1"),
    "n_val_scored": (NUMBER, "validation rows scored for val_accuracy / val_f1"),
    # parameters and memory
    "trainable_params": (NUMBER, "parameters that train"),
    "total_params": (NUMBER, "all parameters"),
    "trainable_pct": (NUMBER, "trainable share of all parameters, in percent"),
    "model_memory_mb": (NUMBER, "the loaded model's weights and buffers, MiB"),
    "base_model_fingerprint": (TEXT, "sha256 over the base model's weight, config and tokenizer files (a hub model "
                                     "in the hub cache: hub:<id>@<commit>); a run is not loaded onto another base"),
    "peak_memory_mb": (NUMBER, "peak memory of loading and training (RSS on CPU, allocated on GPU), MiB; a resumed "
                              "run: the higher of this process's and the one that wrote the checkpoint"),
    "peak_in_use_mb": (NUMBER, "peak memory in use over loading and training, MiB: on CPU the bytes the C allocator "
                              "had handed out (tensors and other native allocations) plus the model's weights "
                              "mapped from a checkpoint file, read at the end of every "
                              "training forward and by a thread (unlike "
                              "RSS, not the free memory it keeps, which varies between identical runs); on GPU "
                              "allocated as peak_memory_mb; a resumed run: the higher of the two processes'"),
    "memory_breakdown_mb": (MAPPING, "peak_memory_mb split into weights, trainable + optimizer state (the trainable "
                                     "parameters not already in the weights, their gradients and AdamW moments), rest"),
    "eval_peak_memory_mb": (NUMBER, "peak memory of the scoring after training, MiB"),
    "memory_device": (TEXT, "cpu | cuda: what the memory figures measure"),
    # training
    "run_wall_s": (NUMBER, "wall time of this process's run, from the checked config to metrics.json, s"),
    "train_runtime_s": (NUMBER, "training time over the whole run (a resumed run included), s"),
    "train_steps": (NUMBER, "optimizer steps"),
    "train_loss": (NUMBER, "mean training loss over the steps"),
    "train_tokens": (NUMBER, "real (non-padding) tokens trained on"),
    "train_tokens_per_s": (NUMBER, "train_tokens / train_runtime_s"),
    "resumed_from": (MAPPING, "a resumed run: the checkpoint (path) and its optimizer step; the training figures "
                              "above still cover the whole run"),
    "qat": (MAPPING, "the QAT settings and statistics of training (per-group SNR, scales)"),
    "distill": (MAPPING, "distill=self | run: the teacher, alpha, temperature, KL direction, start step and the mean "
                         "cross-entropy and T^2 x KL per distilled token"),
    # scores
    "majority_accuracy": (NUMBER, "test accuracy of always answering the test split's most frequent label"),
    "majority_f1": (NUMBER, "macro-F1 of always answering that label: the floor a classifier must clear"),
    "zero_shot_accuracy": (NUMBER, "the base model's test accuracy (before training, or after it with the adapters off)"),
    "zero_shot_f1": (NUMBER, "the base model's test macro-F1 (as zero_shot_accuracy)"),
    "zero_shot_cached": (FLAG, "whether the zero-shot scores came from the score cache"),
    "eval_loss": (NUMBER, "validation loss over the response tokens"),
    "perplexity": (NUMBER, "exp(eval_loss) for classification; exp(test_loss) for generation"),
    "eval_tokens": (NUMBER, "response tokens in eval_loss"),
    "test_loss": (NUMBER, "test loss over the response tokens (generation)"),
    "val_accuracy": (NUMBER, "validation accuracy: the selection score (the sweep objective)"),
    "val_f1": (NUMBER, "validation macro-F1"),
    "accuracy": (NUMBER, "test accuracy after training"),
    "f1": (NUMBER, "test macro-F1 after training"),
    "test_scored_from_layer": (NUMBER, "lora.layers runs: first layer the final test scoring recomputed (the ones "
                               "below: the zero-shot pass's states, same base weights; 0 = every layer)"),
    # simulated INT8 deployment (QAT runs, qat.eval_int8=true)
    "int8_eval": (TEXT, "qat | ptq: which model the simulated INT8 scores are of"),
    "int8_targets": (LIST, "the sub-layer groups quantized in the simulation"),
    "int8_eval_bits": (NUMBER, "activation bits of the simulation"),
    "int8_granularity": (TEXT, "sublayer | linear"),
    "int8_scheme": (TEXT, "the deployed scheme: w8a8 | w4a8"),
    "int8_scale": (TEXT, "tensor | token | static: the simulation's activation scales"),
    "int8_weight_group_size": (NUMBER, "INT4 weight group size (w4a8)"),
    "ptq_baselines": (MAPPING, "qat.baselines: per baseline, its scale and calibration and, per target set "
                               "(qat.baseline_targets), its simulated scores with their round-off spread"),
    "ptq_validation": (MAPPING, "qat.baselines: per target set, round-to-nearest's (rtn) and each baseline's "
                                "simulated scores on the validation split: what chooses the strongest (test not searched)"),
    "int8_batch_size": (NUMBER, "qat.eval_batch_size: rows per forward of the simulation, whatever eval.batch_size"),
    "int8_spread_rescorings": (NUMBER, "qat.eval_spread: perturbed re-scorings behind each *_int8_spread"),
    "int8_perturbation": (NUMBER, "relative size of the k-th re-scoring's input perturbation: 1 + k x this"),
    # failures
    "error": (TEXT, "the failure's first line"),
    "error_type": (TEXT, "the failure's exception type"),
}

# Families of keys: the simulated INT8 scores, on both groups and (PTQ) on each alone.
PATTERNS: list[tuple[re.Pattern, tuple[type, ...], str]] = [
    (re.compile(r"(accuracy|f1|loss|perplexity)_int8(_(" + "|".join(QAT_TARGETS) + "))?"), NUMBER,
     "simulated INT8 score of the deployment; _attn / _ffn: PTQ of that group alone"),
    (re.compile(r"(accuracy|f1|loss|perplexity)_int8_spread(_(" + "|".join(QAT_TARGETS) + "))?"), LIST,
     "[lowest, highest] of that simulated score over itself and its perturbed re-scorings: its round-off range"),
    (re.compile(r"int8_flipped(_(" + "|".join(QAT_TARGETS) + "))?"), NUMBER,
     "share of the scored rows whose simulated prediction a perturbed re-scoring changed"),
]


def field(key: str) -> tuple[tuple[type, ...], str] | None:
    """The types and meaning of a metrics.json key, or ``None`` for a key the schema does not know."""
    if key in FIELDS:
        return FIELDS[key]
    for pattern, types, meaning in PATTERNS:
        if pattern.fullmatch(key):
            return types, meaning
    return None


def problems(metrics: dict[str, Any]) -> list[str]:
    """What in ``metrics`` the schema does not allow: unknown keys and values of the wrong type."""
    out = []
    for key, value in metrics.items():
        spec = field(key)
        if spec is None:
            out.append(f"{key}: not in the metrics.json schema (finetune.metrics.FIELDS)")
        elif value is not None and not isinstance(value, spec[0]) or isinstance(value, bool) and spec[0] == NUMBER:
            out.append(f"{key}: {type(value).__name__} where the schema has {'/'.join(t.__name__ for t in spec[0])}")
    return out


def check(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` if the schema allows every key and value.

    Raises:
        ValueError: a key the schema does not name or a value of the wrong type (a writer's mistake).
    """
    found = problems(metrics)
    if found:
        raise ValueError("metrics.json does not follow its schema: " + "; ".join(found))
    return metrics
