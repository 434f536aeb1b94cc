"""Load the base model (precision, bitsandbytes quantization) and its tokenizer, and a finished run for inference."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from finetune.platform.cpu import cpu_has_fast_bf16
from finetune.errors import FinetuneError
from finetune.model.checkpoints import resolve_model_path

log = logging.getLogger("finetune.model.load")


@dataclass
class Precision:
    """How a run computes: the weight dtype to load and the Trainer's mixed-precision flags."""

    load_dtype: torch.dtype
    bf16: bool
    fp16: bool
    name: str  # bf16 | fp16 | fp32


def resolve_precision(trainer_precision: str, model_dtype: str, full_finetune: bool = False) -> Precision:
    """Pick compute precision (``trainer.precision``) and the weight dtype (``model.dtype``).

    ``auto`` precision: bf16 on GPUs that support it, fp16 on older GPUs, bf16 on CPUs with native bf16
    (AVX-512 BF16 / AMX, unless ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below them), fp32 otherwise.
    ``auto`` weight dtype: the compute dtype when the base is frozen (LoRA / QLoRA: half the weight memory,
    and on CPU forwards ~1.5x faster than autocast over fp32 weights; PEFT keeps the adapters themselves in
    fp32), but fp32 for full fine-tuning, whose optimizer needs fp32 master weights (fp16 weights cannot be
    trained by the Trainer's grad scaler either).
    """
    cuda = torch.cuda.is_available()
    name = trainer_precision
    if name == "auto":
        if cuda:
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "bf16" if cpu_has_fast_bf16() else "fp32"
    if name == "fp16" and not cuda:
        raise FinetuneError("trainer.precision=fp16 needs a CUDA GPU; on CPU use bf16, fp32 or auto")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if model_dtype == "auto":
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        load = torch.float32 if full_finetune else compute
    else:
        load = dtypes[model_dtype]
    return Precision(load_dtype=load, bf16=name == "bf16", fp16=name == "fp16", name=name)


class _OncePerMessage(logging.Filter):
    """Let each distinct message through once: bitsandbytes' int8 matmul repeats the same cast warning on
    every forward call (hundreds of lines per training step)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def quiet_repeated_bnb_warnings() -> None:
    """Install :class:`_OncePerMessage` on bitsandbytes' autograd logger (idempotent)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OncePerMessage) for f in logger.filters):
        logger.addFilter(_OncePerMessage())


def bnb_compute_dtype(qcfg: DictConfig, precision: Precision) -> torch.dtype:
    """The dtype nf4 weights are de-quantized to for their matmul.

    ``auto`` follows the run's compute precision (bf16 / fp16 / fp32). A fixed bf16 on hardware without
    fast bf16 (CPUs without AVX-512 BF16 / AMX, pre-Ampere GPUs) falls back to slow generic kernels:
    on a 2-core AVX2 CPU an nf4 LoRA step took 220 s with bf16, where a plain fp32 LoRA step takes ~10 s.
    """
    if qcfg.get("compute_dtype", "auto") == "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.name, torch.float32)
    return getattr(torch, qcfg.compute_dtype)


def bnb_config(qcfg: DictConfig, precision: Precision, sharded: bool = False):
    """The one place a BitsAndBytesConfig is built from the ``quantization`` node (None for mode=none).

    ``sharded`` (FSDP / DeepSpeed ZeRO-3): 4-bit weights are stored in blocks typed as the run's weight dtype
    (``bnb_4bit_quant_storage``), the same dtype as the rest of the model, which the sharding engines need.
    """
    if qcfg.mode == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FinetuneError(f"quantization={qcfg.mode} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    quiet_repeated_bnb_warnings()
    skip = list(qcfg.get("skip_modules") or []) or None
    if qcfg.mode == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=float(qcfg.llm_int8_threshold), llm_int8_skip_modules=skip
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=qcfg.quant_type,
        bnb_4bit_use_double_quant=bool(qcfg.double_quant),
        bnb_4bit_compute_dtype=bnb_compute_dtype(qcfg, precision),
        llm_int8_skip_modules=skip,
        **({"bnb_4bit_quant_storage": precision.load_dtype} if sharded and precision.load_dtype else {}),
    )


def load_tokenizer(path: str, mcfg: DictConfig, local_only: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        path, revision=mcfg.get("revision"), trust_remote_code=bool(mcfg.trust_remote_code), local_files_only=local_only
    )
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def release_checkpoint_mapping(model) -> None:
    """Copy a CPU-quantized model's non-quantized tensors out of the memory-mapped checkpoint file.

    After quantize-on-load the embeddings, norms and head are still views of the mmapped safetensors file, which
    keeps the whole mapping alive, and the pages read while quantizing stay resident: 405 MB of SmolLM2's fp32
    file after an nf4 load, counted in the run's peak RSS although no method needs it. Copying the ~110 MB of
    views releases the mapping (measured: -297 MB resident after loading).
    """
    with torch.no_grad():
        for module in model.modules():
            for _, param in module.named_parameters(recurse=False):
                if type(param).__name__ not in ("Params4bit", "Int8Params"):
                    param.data = param.data.clone()
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None:
                    module._buffers[name] = buf.clone()


def restore_trainable_4bit_layout(model) -> int:
    """Put every bitsandbytes 4-bit weight back in its trainable layout; returns how many were converted.

    ``model`` is a module, or a list of the modules to check (the Trainer passes its 4-bit layers, found once).

    On a CPU with AVX-512 BF16, the first eval-mode forward of a ``Linear4bit`` without gradients (zero-shot
    scoring, evaluation during training) repacks its weight into an inference-only layout, after which
    ``matmul_4bit`` runs ``gemv_4bit``, which has no backward: training would go on without gradients through
    the base layers. Called before every training step, so no step ever runs on that layout, whatever CPU.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    converted = 0
    for module in model if isinstance(model, list) else model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            converted += 1
    return converted


def keep_4bit_layout(model) -> int:
    """Keep every bitsandbytes 4-bit weight in its standard layout: switch off the repacking for the fused CPU
    kernel (the first eval-mode forward of a ``Linear4bit`` on a CPU with AVX-512 BF16). That kernel computes in
    bf16 whatever the run's precision (an fp32 run's nf4 scores were bf16 ones); repacking and back is not exact
    (de-quantized weights moved by up to 2.4e-4 on the tiny model), so a run trained after a zero-shot pass
    trained on other weights than one whose zero-shot scores came from the cache; and DoRA, which de-quantizes
    the base weight in every forward for its weight norm, read the repacked bytes as if in the standard layout
    (weights off by 0.128 at a scale of 0.084). Measured on SmolLM2 nf4, 64 reviews, this CPU: bf16 scoring 10.3-10.7
    s without the kernel against 12.2-12.6 s with it; fp32 20.5 s against 14.2 s, now really fp32. Returns how many
    4-bit layers were found. Called at load, before any forward."""
    found = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            found += 1
    return found


def load_model(mcfg: DictConfig, qcfg: DictConfig, precision: Precision, *, gradient_checkpointing: bool = False,
               for_training: bool = True, sharded: bool = False):
    """Load tokenizer and model; quantize with bitsandbytes and prepare for k-bit training where asked.

    ``sharded`` (``distributed=fsdp`` / DeepSpeed): the engine places and shards the weights, so no device map;
    a 4-bit base stores its blocks in the weight dtype (:func:`bnb_config`).

    Returns:
        (model, tokenizer, resolved path or hub id)
    """
    from transformers import AutoModelForCausalLM

    path, local_only = resolve_model_path(mcfg)
    tok = load_tokenizer(path, mcfg, local_only)
    kwargs = dict(
        dtype=precision.load_dtype,
        revision=mcfg.get("revision"),
        trust_remote_code=bool(mcfg.trust_remote_code),
        local_files_only=local_only,
    )
    if mcfg.get("attn_implementation"):
        kwargs["attn_implementation"] = mcfg.attn_implementation
    quant = bnb_config(qcfg, precision, sharded=sharded)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if sharded and quant is None:
        pass  # FSDP / DeepSpeed move and shard the weights themselves
    elif torch.cuda.is_available():
        # One process per GPU (torchrun / accelerate) puts the whole model on its own device.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    elif quant is not None:
        kwargs["device_map"] = {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise FinetuneError(f"model.name_or_path={mcfg.name_or_path}: cannot load ({str(exc).splitlines()[0]})") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if quant is not None and not torch.cuda.is_available():
        release_checkpoint_mapping(model)
        keep_4bit_layout(model)
    if for_training:
        prepare_for_training(model, quantized=quant is not None, gradient_checkpointing=gradient_checkpointing)
    return model, tok, path


def prepare_for_training(model, *, quantized: bool, gradient_checkpointing: bool) -> None:
    """The same preparation for a LoRA base and a QLoRA (k-bit) base, so the two compare on their weights alone.

    A k-bit base is frozen (its adapters train); nothing is upcast: embeddings, norms and head keep the run's
    weight dtype as they do under LoRA (PEFT's ``prepare_model_for_kbit_training`` would cast them to float32
    for QLoRA only, and enable reentrant checkpointing where LoRA uses the non-reentrant kind). Gradient
    checkpointing, when on, is non-reentrant for both, with input gradients enabled so a frozen embedding
    still lets gradients reach the adapters inside checkpointed layers.
    """
    if quantized:
        for param in model.parameters():
            param.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False


def check_base_model(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse to load a run's adapter onto a base model other than the one it was trained on (its metrics.json
    ``base_model_fingerprint``): a re-converted or re-downloaded model, a hub model whose revision moved.

    Raises:
        FinetuneError: the base model's files are not those the run recorded.
    """
    from finetune.model.fingerprint import model_fingerprint
    from finetune.runs import run_metrics

    try:
        recorded = run_metrics(Path(run_dir)).get("base_model_fingerprint")
    except (OSError, ValueError):
        recorded = None
    if not recorded:  # a run of an earlier version, or a base with no local files to fingerprint
        return
    resolved, _ = resolve_model_path(cfg.model)
    now = model_fingerprint(resolved, cfg.model)
    if now is not None and now != recorded:
        raise FinetuneError(
            f"run={run_dir}: its adapter was trained on model.name_or_path={cfg.model.name_or_path} with fingerprint "
            f"{recorded[:16]}, but {resolved} now holds {now[:16]}: an adapter on another base is not the trained "
            "model; restore that base (for a hub model, pin model.revision when training)")


# Whether the person at the command line allows a finished run's model to run code from its files
# (``trust_remote_code=true`` on finetune-eval / -chat / -merge / -export). A run directory can come from anyone:
# its config.yaml alone never switches remote code on, as Hugging Face's own tools take the flag only from the person.
_REMOTE_CODE_ALLOWED = [False]


def allow_remote_code(allowed: bool) -> None:
    """Set what the person said (``trust_remote_code=``) for the runs this process loads."""
    _REMOTE_CODE_ALLOWED[0] = bool(allowed)


def _remote_code_from_the_person(path: Path, cfg: DictConfig) -> None:
    """The run's ``model.trust_remote_code`` only where the person allowed it.

    Raises:
        FinetuneError: the run was trained with remote code on and the person did not allow it.
    """
    if cfg.model.get("trust_remote_code") and not _REMOTE_CODE_ALLOWED[0]:
        raise FinetuneError(f"run={path} was trained with model.trust_remote_code=true ({cfg.model.name_or_path} runs "
                            "code from its own files); pass trust_remote_code=true if you trust that code")
    cfg.model.trust_remote_code = bool(cfg.model.get("trust_remote_code")) and _REMOTE_CODE_ALLOWED[0]


def load_run(run_dir: str | Path, *, quantization: DictConfig | None = None, for_training: bool = False,
             merge: bool = False):
    """Load a finished run for inference.

    Args:
        run_dir: a finetune-train run directory.
        quantization: a ``quantization`` node for the base (default: what the run trained with).
        merge: fold the adapter into the base weights (``merge_and_unload``).

    Returns:
        (model, tokenizer, cfg, run_dir)
    """
    from finetune.runs import run_config, run_kind

    path, cfg = run_config(run_dir)
    kind = run_kind(path)
    _remote_code_from_the_person(path, cfg)
    precision = resolve_precision(cfg.trainer.precision, cfg.model.dtype, full_finetune=cfg.lora.method == "none")
    qcfg = quantization if quantization is not None else cfg.quantization
    if kind == "model":
        mcfg = OmegaConf.merge(cfg.model, {"name_or_path": str(path / "model")})
        model, _, _ = load_model(mcfg, qcfg, precision, for_training=for_training)
    else:
        from peft import PeftModel

        from finetune.model.lora import peft_wrapping

        check_base_model(path, cfg)
        base, _, _ = load_model(cfg.model, qcfg, precision, for_training=for_training)
        with peft_wrapping():
            model = PeftModel.from_pretrained(base, path / "adapter", is_trainable=for_training)
        if merge:
            model = model.merge_and_unload()
    tok = load_tokenizer(str(path / "tokenizer"), cfg.model, local_only=True)
    model.eval()
    return model, tok, cfg, path
