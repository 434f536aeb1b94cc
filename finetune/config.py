"""Validation of a composed config, before any weights load.

Hydra already rejects unknown group options and keys (struct mode); this module checks values and
combinations, and says in one line which key is wrong, what it holds and what is allowed.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.errors import FinetuneError

QAT_TARGETS = ("attn", "ffn")
LORA_METHODS = ("lora", "dora", "none")
TARGET_PRESETS = ("qv", "attn", "ffn", "all-linear", "auto")
QUANT_MODES = ("none", "int8", "nf4")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STRATEGIES = ("no", "steps", "epoch")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise FinetuneError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _number(key: str, value: Any, *, low=None, high=None, low_open=False, high_open=False, integer=False) -> None:
    """Check ``low (<|<=) value (<|<=) high``; booleans are not numbers."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise FinetuneError(f"{key}={value!r} must be {'an integer' if integer else 'a number'}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise FinetuneError(f"{key}={value!r} is out of range; allowed: {lo}{key}{hi}")


def qat_targets(cfg: DictConfig) -> list[str]:
    """The QAT targets selected by the ``qat_targets`` group, in canonical order (``[]`` = off)."""
    node = cfg.get("qat_targets")
    if node is None:
        return []
    chosen = [k for k, v in OmegaConf.to_container(node).items() if v]
    for name in chosen:
        _choice("qat_targets", name, QAT_TARGETS)
    return [t for t in QAT_TARGETS if t in chosen]


def method_name(cfg: DictConfig) -> str:
    """The method label used in metrics and reports: full | lora | dora | qlora-int8 | qlora-nf4 | qdora-nf4 ..."""
    method = cfg.lora.method
    quant = cfg.quantization.mode
    if method == "none":
        return "full"
    if quant == "none":
        return method
    return f"q{method}-{quant}"


def validate(cfg: DictConfig) -> None:
    """Check every value and combination a run depends on.

    Raises:
        FinetuneError: naming the first bad key, its value and what is allowed.
    """
    _number("seed", cfg.seed, low=0, integer=True)
    if not isinstance(cfg.get("isolate_jobs", True), bool):
        raise FinetuneError(f"isolate_jobs={cfg.isolate_jobs!r} is not allowed; allowed: true, false")

    m = cfg.model
    if not isinstance(m.name_or_path, str) or not m.name_or_path.strip():
        raise FinetuneError("model.name_or_path must be a hub id, a local directory, or embedded:<name>")
    _choice("model.dtype", m.dtype, DTYPES)

    q = cfg.quantization
    _choice("quantization.mode", q.mode, QUANT_MODES)
    if q.mode == "nf4":
        _choice("quantization.quant_type", q.quant_type, ("nf4", "fp4"))
        _choice("quantization.compute_dtype", q.compute_dtype, ("auto", "bfloat16", "float16", "float32"))
    if q.mode == "int8":
        _number("quantization.llm_int8_threshold", q.llm_int8_threshold, low=0, low_open=True)

    lo = cfg.lora
    _choice("lora.method", lo.method, LORA_METHODS)
    if lo.method != "none":
        _number("lora.r", lo.r, low=0, low_open=True, integer=True)
        _number("lora.alpha", lo.alpha, low=0, low_open=True)
        _number("lora.dropout", lo.dropout, low=0, high=1, high_open=True)
        _choice("lora.bias", lo.bias, ("none", "all", "lora_only"))
        tm = lo.target_modules
        if isinstance(tm, str):
            _choice("lora.target_modules", tm, TARGET_PRESETS)
        elif not OmegaConf.is_list(tm) or not tm or not all(isinstance(t, str) and t for t in tm):
            raise FinetuneError(
                f"lora.target_modules={tm!r}: use a preset ({', '.join(TARGET_PRESETS)}) or a non-empty list of module names"
            )
    elif q.mode != "none":
        raise FinetuneError(
            f"quantization={q.mode} with lora=none is not possible: quantized base weights cannot be trained; "
            "use lora=default (QLoRA) or quantization=none (full fine-tuning)"
        )

    targets = qat_targets(cfg)
    if cfg.qat.get("eval_bits") is not None:
        _number("qat.eval_bits", cfg.qat.eval_bits, low=4, high=8, integer=True)
    if targets:
        a = cfg.qat
        _number("qat.bits", a.bits, low=4, high=8, integer=True)
        _choice("qat.scale", a.scale, ("tensor", "token", "static"))
        _choice("qat.granularity", a.granularity, ("sublayer", "linear"))
        if a.weight_bits is not None:
            _number("qat.weight_bits", a.weight_bits, low=4, high=8, integer=True)
            if q.mode != "none":
                raise FinetuneError(
                    f"qat.weight_bits with quantization={q.mode} is not supported: the base weights are already "
                    "bitsandbytes-quantized; drop qat.weight_bits (activation QAT still applies)"
                )
        _number("qat.start_step", a.start_step, low=0, integer=True)
        _number("qat.ema_decay", a.ema_decay, low=0, high=1, low_open=True, high_open=True)

    d = cfg.dataset
    _choice("dataset.name", d.name, ("chnsenticorp", "alpaca", "sharegpt"))
    _choice("dataset.task", d.task, ("classification", "generation"))
    for key in ("max_train_samples", "max_eval_samples", "max_test_samples"):
        if d.get(key) is not None:
            _number(f"dataset.{key}", d[key], low=1, integer=True)
    if d.task == "classification":
        words = d.label_words
        if not OmegaConf.is_list(words) or len(words) < 2 or not all(isinstance(w, str) and w.strip() for w in words):
            raise FinetuneError(f"dataset.label_words={words!r} must list at least two non-empty words")
        if len(set(words)) != len(words):
            raise FinetuneError(f"dataset.label_words={list(words)!r} must be distinct")

    t = cfg.trainer
    _number("trainer.epochs", t.epochs, low=0, low_open=True)
    _number("trainer.max_steps", t.max_steps, integer=True, low=-1)
    if t.max_steps == 0:
        raise FinetuneError("trainer.max_steps=0 is not allowed; use -1 (train for trainer.epochs) or a positive step count")
    _number("trainer.batch_size", t.batch_size, low=1, integer=True)
    _number("trainer.eval_batch_size", t.eval_batch_size, low=1, integer=True)
    _number("trainer.grad_accum", t.grad_accum, low=1, integer=True)
    _number("trainer.lr", t.lr, low=0, low_open=True)
    _number("trainer.warmup_ratio", t.warmup_ratio, low=0, high=1)
    _number("trainer.max_length", t.max_length, low=16, integer=True)
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.eval_strategy", t.eval_strategy, STRATEGIES)
    _choice("trainer.save_strategy", t.save_strategy, STRATEGIES)

    _choice("logger.backend", cfg.logger.backend, ("wandb", "none"))
    if cfg.logger.backend == "wandb":
        _choice("logger.mode", cfg.logger.mode, ("auto", "online", "offline", "disabled"))
