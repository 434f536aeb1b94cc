"""Validation of a composed config, before any weights load.

Hydra already rejects unknown group options and keys (struct mode); this module checks values and
combinations, and says in one line which key is wrong, what it holds and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune import formats
from finetune.checks import boolean as _bool
from finetune.checks import choice as _choice
from finetune.checks import number as _number
from finetune.checks import text as _text
from finetune.checks import text_list as _text_list
from finetune.errors import FinetuneError
# The QAT and distillation vocabularies, re-exported: finetune.config is where every layer reads them.
from finetune.config.distill import DISTILL_MODES, KL_DIRECTIONS, validate_distill  # noqa: F401
from finetune.config.qat import (BASELINE_KINDS, GGML_SCHEMES, QAT_TARGETS, parse_baseline, GRANULARITIES, SCALE_MODES, SCHEME_SCALE,  # noqa: F401
                                 SCHEME_WEIGHT_BITS, SCHEMES, check_ggml_scheme, scheme_widths, validate_qat)

# The Hydra config tree, package data (a normal, non-editable install carries it with the code); absolute, so
# console scripts, `python -m` and every other command find it from any directory.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# The LoRA presets; finetune.model.arch maps each to every family's modules.
LORA_METHODS = ("lora", "dora", "none")
TARGET_PRESETS = ("qv", "attn", "ffn", "all-linear", "auto")
QUANT_MODES = ("none", "int8", "nf4")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STRATEGIES = ("no", "steps", "epoch")


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


def _sub(node: DictConfig, key: str) -> Any:
    """``node[key]``, or a clear error naming the key when a preset dropped it."""
    if key not in node:
        raise FinetuneError(f"{key} is missing from the composed config; restore it (conf/ declares every key)")
    return node[key]


SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay")
SAMPLING = ("random", "sequential", "group_by_length")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


# Optimizers every supported transformers version accepts (checked against the installed one in the tests).
COMMON_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad")


def _optimizers() -> tuple[str, ...]:
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


def validate(cfg: DictConfig) -> None:
    """Check every value and combination a run depends on: every key declared in conf/, group by group.

    Raises:
        FinetuneError: naming the first bad key, its value and what is allowed.
    """
    _validate_top(cfg)
    if "distributed" in cfg:
        _validate_distributed(cfg.distributed, cfg.quantization.mode)
    _validate_model(cfg.model)
    _validate_quantization(cfg.quantization)
    _validate_lora(cfg.lora, cfg.quantization.mode)
    targets = qat_targets(cfg)
    validate_qat(cfg.qat, targets, cfg.quantization.mode)
    _validate_eval(cfg.eval)
    _validate_dataset(cfg.dataset)
    _validate_trainer(cfg.trainer)
    if "distill" in cfg:
        validate_distill(cfg.distill, targets, _sub(cfg.trainer, "head_chunk"))
    if targets and cfg.qat.get("scheme") in GGML_SCHEMES and _sub(cfg.trainer, "head_chunk"):
        raise FinetuneError(f"trainer.head_chunk computes the output head from its weight directly, which would skip "
                            f"the head's Q8_0 grid of qat.scheme={cfg.qat.scheme}; set trainer.head_chunk=null")
    if cfg.trainer.packing and cfg.dataset.task != "generation":
        raise FinetuneError(f"trainer.packing=true applies to generation datasets (alpaca, sharegpt); "
                            f"dataset={cfg.dataset.name} is {cfg.dataset.task}: leave trainer.packing=false")
    if cfg.trainer.packing and targets:
        raise FinetuneError("trainer.packing=true cannot be combined with qat_targets: QAT's per-sequence scales "
                            "need one example per row; leave trainer.packing=false for QAT runs")
    _validate_logger(cfg.logger)


def _validate_top(cfg: DictConfig) -> None:
    _number("seed", cfg.seed, low=0, integer=True)
    if "cpu_allocator" in cfg:
        _choice("cpu_allocator", cfg.cpu_allocator, ("default", "bounded"))
    for key in ("isolate_jobs", "overwrite_run"):
        if key in cfg:
            _bool(key, cfg[key])
    if "gpus_per_job" in cfg:
        _number("gpus_per_job", cfg.gpus_per_job, low=0, integer=True)
    _text("run_name", cfg.get("run_name"), optional=True)
    _text("sweep_name", cfg.get("sweep_name"), optional=True)
    if cfg.get("sweep_name") and ("/" in cfg.sweep_name or cfg.sweep_name.startswith(".")):
        raise FinetuneError(f"sweep_name={cfg.sweep_name!r} names a folder; use letters, digits, - and _ only")


def _validate_model(m: DictConfig) -> None:
    if not isinstance(m.name_or_path, str) or not m.name_or_path.strip():
        raise FinetuneError("model.name_or_path must be a hub id, a local directory, or embedded:<name>")
    _choice("model.dtype", m.dtype, DTYPES)
    _text("model.revision", m.get("revision"), optional=True)
    _bool("model.trust_remote_code", m.get("trust_remote_code", False))
    if m.get("attn_implementation") is not None:
        _choice("model.attn_implementation", m.attn_implementation, ATTN_IMPLEMENTATIONS)


def _validate_quantization(q: DictConfig) -> None:
    _choice("quantization.mode", q.mode, QUANT_MODES)
    if q.mode == "nf4":
        _choice("quantization.quant_type", q.quant_type, ("nf4", "fp4"))
        _choice("quantization.compute_dtype", q.compute_dtype, ("auto", "bfloat16", "float16", "float32"))
        _bool("quantization.double_quant", q.double_quant)
    if q.mode == "int8":
        _number("quantization.llm_int8_threshold", q.llm_int8_threshold, low=0, low_open=True)
    if q.mode != "none":
        _text_list("quantization.skip_modules", q.get("skip_modules"), optional=True)


def _validate_lora(lo: DictConfig, quant_mode: str) -> None:
    _choice("lora.method", lo.method, LORA_METHODS)
    if lo.method == "none":
        if quant_mode != "none":
            raise FinetuneError(
                f"quantization={quant_mode} with lora=none is not possible: quantized base weights cannot be "
                "trained; use lora=default (QLoRA) or quantization=none (full fine-tuning)"
            )
        return
    _number("lora.r", lo.r, low=0, low_open=True, integer=True)
    _number("lora.alpha", lo.alpha, low=0, low_open=True)
    _number("lora.dropout", lo.dropout, low=0, high=1, high_open=True)
    _choice("lora.bias", lo.bias, ("none", "all", "lora_only"))
    _bool("lora.use_rslora", lo.get("use_rslora", False))
    _validate_lora_layers(lo.get("layers"))
    tm = lo.target_modules
    if isinstance(tm, str):
        _choice("lora.target_modules", tm, TARGET_PRESETS)
    elif not OmegaConf.is_list(tm) or not tm or not all(isinstance(t, str) and t for t in tm):
        raise FinetuneError(
            f"lora.target_modules={tm!r}: use a preset ({', '.join(TARGET_PRESETS)}) or a non-empty list of module names"
        )


def _validate_lora_layers(layers) -> None:
    """``lora.layers``: null (every decoder layer), N >= 1 (the N layers nearest the output), a fraction in (0, 1)
    (that share of the layers nearest the output) or a list of layer indices."""
    if layers is None:
        return
    whole = isinstance(layers, int) and not isinstance(layers, bool)
    if whole and layers >= 1:
        return
    if isinstance(layers, float) and 0 < layers < 1:
        return
    if (OmegaConf.is_list(layers) and layers
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        return
    shown = list(layers) if OmegaConf.is_list(layers) else layers
    raise FinetuneError(f"lora.layers={shown!r} is not allowed; allowed: null (every layer), an integer N >= 1 "
                        "(the top N layers), a fraction in (0, 1) (that share of the layers, from the top) or a "
                        "non-empty list of layer indices >= 0")


def _validate_logger(lg: DictConfig) -> None:
    _choice("logger.backend", lg.backend, ("wandb", "none"))
    if lg.backend == "wandb":
        _choice("logger.mode", lg.mode, ("auto", "online", "offline", "disabled"))
        _text("logger.project", lg.get("project"))
        for key in ("entity", "group"):
            _text(f"logger.{key}", lg.get(key), optional=True)
        _text_list("logger.tags", lg.get("tags"), optional=True)


def _validate_distributed(d: DictConfig, quant_mode: str) -> None:
    """``distributed.*``; what a strategy needs that this machine lacks is named before anything runs. PyTorch is
    imported only for the strategies that ask about CUDA: a bad value elsewhere is reported without its second of
    start-up."""
    import importlib.util

    _choice("distributed.strategy", d.get("strategy"), ("none", "ddp", "fsdp", "deepspeed"))
    if d.strategy == "ddp":
        _bool("distributed.find_unused_parameters", d.get("find_unused_parameters", False))
    if d.strategy == "fsdp":
        for key in ("reshard_after_forward", "cpu_offload", "activation_checkpointing"):
            _bool(f"distributed.{key}", d.get(key, False))
        import torch

        if not torch.cuda.is_available():
            raise FinetuneError("distributed=fsdp needs CUDA GPUs: on CPU the Trainer does not shard and would run "
                                "plain DDP instead; use distributed=ddp here")
        if quant_mode == "int8":
            raise FinetuneError("distributed=fsdp with quantization=int8 is not supported (bitsandbytes 8-bit weights "
                                "cannot be sharded); use quantization=nf4 (QLoRA + FSDP) or distributed=ddp")
    if d.strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise FinetuneError("distributed=deepspeed_* needs the deepspeed package (pip install deepspeed) and CUDA "
                                "GPUs; distributed=ddp or fsdp need neither")
        import torch

        if not torch.cuda.is_available():
            raise FinetuneError("distributed=deepspeed_* needs CUDA GPUs; on CPU use distributed=ddp")
        if not isinstance(d.get("config"), DictConfig):
            raise FinetuneError("distributed.config must be a DeepSpeed config mapping (see conf/distributed/)")


def _check_compiler(key: str) -> None:
    """What ``torch.compile`` needs to build kernels here (a C++ compiler, or Triton on a GPU), named before any run."""
    import torch

    from finetune.platform.compiler import compiler_missing

    missing = compiler_missing(torch.cuda.is_available())
    if missing:
        raise FinetuneError(f"{key}=true needs {missing}: torch.compile builds its kernels with it; install it or set "
                            f"{key}=false")


def _validate_eval(e: DictConfig) -> None:
    _bool("eval.zero_shot", _sub(e, "zero_shot"))
    _bool("eval.zero_shot_cache", _sub(e, "zero_shot_cache"))
    _bool("eval.reuse_frozen_layers", _sub(e, "reuse_frozen_layers"))
    _number("eval.batch_size", _sub(e, "batch_size"), low=1, integer=True)
    _number("eval.num_samples", _sub(e, "num_samples"), low=0, integer=True)
    _number("eval.max_new_tokens", _sub(e, "max_new_tokens"), low=1, integer=True)


def _validate_dataset(d: DictConfig) -> None:
    _text("dataset.name", d.name)
    fmt = formats.of_config(d)  # raises naming dataset.format and the known formats
    _choice("dataset.task", d.task, formats.TASKS)
    if d.task != fmt.task:
        raise FinetuneError(f"dataset.task={d.task} does not fit dataset.format={fmt.name}, a {fmt.task} format")
    for key in ("path", "hub_id", "embedded"):
        _text(f"dataset.{key}", d.get(key), optional=True)
    for key in ("max_train_samples", "max_eval_samples", "max_test_samples"):
        if d.get(key) is not None:
            _number(f"dataset.{key}", d[key], low=1, integer=True)
    if "max_length" in d:  # what trainer.max_length defaults to for this dataset (conf/trainer/default.yaml)
        _number("dataset.max_length", d.max_length, low=16, integer=True)
    if d.get("eval_fraction") is not None:
        _number("dataset.eval_fraction", d.eval_fraction, low=0, high=0.5, low_open=True, high_open=True)
    for key in ("use_chat_template", "train_on_prompt"):
        if key in d:
            _bool(f"dataset.{key}", d[key])
    if d.get("system") is not None and not isinstance(d.system, str):
        raise FinetuneError(f"dataset.system={d.system!r} must be a string (\"\" for an empty system prompt) or null")
    fmt.check_config(d)


def _validate_trainer(t: DictConfig) -> None:
    _number("trainer.epochs", t.epochs, low=0, low_open=True)
    _number("trainer.max_steps", t.max_steps, integer=True, low=-1)
    if t.max_steps == 0:
        raise FinetuneError("trainer.max_steps=0 is not allowed; use -1 (train for trainer.epochs) or a positive step count")
    _number("trainer.batch_size", t.batch_size, low=1, integer=True)
    _number("trainer.eval_batch_size", t.eval_batch_size, low=1, integer=True)
    _number("trainer.grad_accum", t.grad_accum, low=1, integer=True)
    _number("trainer.lr", t.lr, low=0, low_open=True)
    _number("trainer.weight_decay", t.weight_decay, low=0)
    _choice("trainer.scheduler", t.scheduler, SCHEDULERS)
    _number("trainer.warmup_ratio", t.warmup_ratio, low=0, high=1)
    _number("trainer.max_length", t.max_length, low=16, integer=True)
    _choice("trainer.precision", t.precision, PRECISIONS)
    _bool("trainer.gradient_checkpointing", t.gradient_checkpointing)
    _bool("trainer.packing", _sub(t, "packing"))
    _bool("trainer.torch_compile", _sub(t, "torch_compile"))
    _bool("trainer.compile_norms", _sub(t, "compile_norms"))
    if t.compile_norms:
        _check_compiler("trainer.compile_norms")
    if _sub(t, "pad_to_multiple_of") is not None:
        _number("trainer.pad_to_multiple_of", _sub(t, "pad_to_multiple_of"), low=1, integer=True)
    if _sub(t, "head_chunk") is not None:
        _number("trainer.head_chunk", _sub(t, "head_chunk"), low=0, integer=True)
    share = _sub(t, "share_prefix")
    if share not in ("auto", "packed") and not isinstance(share, bool):
        raise FinetuneError(f"trainer.share_prefix={share!r} is not allowed; allowed: auto, true, false, packed")
    _number("trainer.logging_steps", t.logging_steps, low=1, integer=True)
    _choice("trainer.eval_strategy", t.eval_strategy, STRATEGIES)
    _number("trainer.eval_steps", t.eval_steps, low=1, integer=True)
    _choice("trainer.save_strategy", t.save_strategy, STRATEGIES)
    _number("trainer.save_steps", t.save_steps, low=1, integer=True)
    if t.get("save_total_limit") is not None:
        _number("trainer.save_total_limit", t.save_total_limit, low=1, integer=True)
    resume = t.get("resume_from_checkpoint")
    if resume is not None and (not isinstance(resume, str) or not resume.strip()):
        raise FinetuneError(f"trainer.resume_from_checkpoint={resume!r} is not allowed; allowed: null, auto, or a "
                            "checkpoint directory")
    _choice("trainer.sampling", t.sampling, SAMPLING)
    _number("trainer.dataloader_num_workers", t.dataloader_num_workers, low=0, integer=True)
    if t.optim not in COMMON_OPTIMIZERS:  # the full list needs transformers' training_args: seconds to import
        _choice("trainer.optim", t.optim, _optimizers())
    _number("trainer.max_grad_norm", t.max_grad_norm, low=0)
