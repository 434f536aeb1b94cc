"""Fold a run's LoRA/DoRA adapter into its base and write a standalone checkpoint (the finetune-merge command,
:mod:`finetune.cli.merge`).

    finetune-merge run=outputs/<date>/<time> out=merged/                 # fp32 safetensors + tokenizer
    finetune-merge run=... out=merged-bf16/ dtype=bfloat16 overwrite=true
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('merged/')"   # no peft

More: docs/modules.md, section ``finetune.export.merge``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from finetune.data.formatting import prompt_ids
from finetune.checks import as_choice
from finetune.export.common import CHECK_PROMPTS, dir_size_bytes, open_run, prepare_out_dir
from finetune.runs import commit_dir, staging_dir

log = logging.getLogger("finetune.export.merge")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative tolerances on the max abs logit difference (see the module docstring): the float32 merge, and the
# written checkpoint by its dtype.
MERGE_RTOL = 1e-4
RTOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
# The merged float32 model vs the QLoRA model as trained, by the run's compute precision: bitsandbytes
# de-quantizes into that precision and its non-quantized layers stay in it.
QUANT_RTOL = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 1e-2}
# LLM.int8() quantizes the activations too (per token, outliers above its threshold kept in 16 bits): no float
# checkpoint computes what the int8 model computes. Its own distance from its de-quantized weights, measured on the
# same prompts without the adapter, bounds how close any merge can come; the merge may be this many times as far.
INT8_KERNEL_FACTOR = 1.5
ARGS = {"run": None, "out": None, "dtype": "float32", "check": "true", "overwrite": "false", "base": "trained",
        "trust_remote_code": "false"}
BASES = ("trained", "original")
NO_QUANT = {"mode": "none"}


class MergeCheckError(Exception):
    """The merged checkpoint's logits differ from the adapter model's by more than the tolerance."""


@torch.no_grad()
def prompt_logits(model, tok, prompts: tuple[str, ...] = CHECK_PROMPTS) -> list[torch.Tensor]:
    """Float32 logits of each prompt (one sequence at a time, no padding), on the CPU.

    Args:
        model: a causal LM (PEFT or plain).
        tok: its tokenizer; prompts are rendered as training rendered them (its chat template when it has one).
        prompts: the texts.

    Returns:
        One ``[seq_len, vocab]`` float32 tensor per prompt.
    """
    device = next(model.parameters()).device
    out = []
    for text in prompts:
        ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": text}])])
        out.append(model(input_ids=ids.to(device)).logits[0].float().cpu())
    return out


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(max |a - b|, max(1, max |a|)) over all prompts, positions and vocabulary entries."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(1.0, max(float(x.abs().max()) for x in a))
    return diff, scale


def dequantized_base_weights(model) -> dict[str, torch.Tensor]:
    """The float32 weights a bitsandbytes base computes with: ``dequant(quant(W))`` of every 4-bit / 8-bit
    linear, by module name (the names are the same in the run reloaded without quantization).

    Call before any forward: on the CPU an inference forward may repack 4-bit weights into another layout.
    """
    from peft.utils.integrations import dequantize_bnb_weight

    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer"):
            # A PEFT wrapper: its ``weight`` is its base layer's, visited under its own name with the int8 layer's
            # quantization ``state`` (which the wrapper lacks).
            continue
        weight = getattr(module, "weight", None)
        kind = type(weight).__name__
        if kind in ("Params4bit", "Int8Params"):
            out[name] = dequantize_bnb_weight(weight, getattr(module, "state", None)).detach().float().cpu().clone()
    return out


def merged_model(run_dir: str | Path, *, reference: bool = False, base: str = "trained",
                 dequantized: dict[str, torch.Tensor] | None = None):
    """Load a run and return its merged float32 model (adapter folded in; a full fine-tune as is).

    Args:
        run_dir: a finetune-train run directory.
        reference: also compute the unmerged float32 model's logits on :data:`CHECK_PROMPTS`, and for an
            adapter run the base's (adapter disabled) and the merged model's, before anything is cast.
        base: QLoRA runs: ``trained`` (default) merges into the de-quantized 4-bit / 8-bit weights the adapter
            was trained on (``dequant(quant(W)) + BA``: the model that was trained and scored); ``original``
            into the original full-precision weights (``W + BA``, a model that was never trained).
        dequantized: the de-quantized weights (:func:`dequantized_base_weights`), when the caller has them.

    Returns:
        ``(model, tokenizer, cfg, run_dir, info)``; ``info`` has ``kind`` (adapter | model), ``base_quantization``,
        ``base_weights`` (original | dequantized), ``note`` (a sentence for the user, or None) and, with
        ``reference``, ``reference_logits``, ``merged_logits`` and (adapter runs) ``base_logits``: lists of
        ``[seq, vocab]`` float32 tensors.

    Raises:
        FinetuneError: missing run directory / config, or a run with neither adapter/ nor model/.
    """
    from finetune.runs import run_config, run_kind

    path, cfg = run_config(run_dir)
    kind = run_kind(path)
    mode = str(cfg.quantization.mode)
    as_choice("base", base, BASES)
    use_dequantized = kind == "adapter" and mode != "none" and base == "trained"
    info: dict = {"kind": kind, "base_quantization": mode, "note": None,
                  "base_weights": "dequantized" if use_dequantized else "original"}
    if kind == "model":
        info["note"] = (f"run={path} is a full fine-tune: there is no adapter to merge; its model/ weights are "
                        "used as they are")
    elif use_dequantized:
        info["note"] = (f"run={path} trained QLoRA on an {mode}-quantized base: the adapter is merged into the "
                        f"de-quantized {mode} weights it was trained on (float32; the model that was trained and "
                        "scored), and the result is not re-quantized")
    elif mode != "none":
        info["note"] = (f"run={path} trained QLoRA on an {mode}-quantized base: base=original merges the adapter "
                        "into the original full-precision weights, a model that was never trained or scored")
    if use_dequantized and dequantized is None:
        quantized, _, _, _ = open_run(path)
        dequantized = dequantized_base_weights(quantized)
        del quantized
    quant = OmegaConf.create(NO_QUANT) if mode != "none" else None
    model, tok, cfg, path = open_run(path, quantization=quant, dtype="float32")
    if use_dequantized:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, weight in dequantized.items():
                modules[name].weight.copy_(weight.view_as(modules[name].weight))
        info["dequantized_modules"] = len(dequantized)
    if reference:
        info["reference_logits"] = prompt_logits(model, tok)
        if kind == "adapter":
            with model.disable_adapter():
                info["base_logits"] = prompt_logits(model, tok)
    if kind == "adapter":
        model = model.merge_and_unload()
    model.eval()
    if reference:
        info["merged_logits"] = prompt_logits(model, tok)
    return model, tok, cfg, path, info


def quantized_adapter(run_dir: Path) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], list[torch.Tensor]]:
    """The QLoRA model as trained (the adapter on the run's own quantized base): its logits on the check
    prompts, its de-quantized base weights (taken before the first forward), and the quantized base's logits
    with the adapter disabled (the kernel's own distance from its de-quantized weights)."""
    model, tok, _, _ = open_run(run_dir)
    weights = dequantized_base_weights(model)
    logits = prompt_logits(model, tok)
    with model.disable_adapter():
        base_logits = prompt_logits(model, tok)
    del model
    return logits, weights, base_logits


def original_w_logits(run_dir: Path) -> list[torch.Tensor]:
    """Logits of the ``W + BA`` merge (adapter into the original full-precision base), for the comparison."""
    model, tok, _, _, _ = merged_model(run_dir, base="original")
    logits = prompt_logits(model, tok)
    del model
    return logits


def merge_run(run: str, out: str, dtype: str = "float32", check: bool = True, overwrite: bool = False,
              base: str = "trained") -> dict:
    """Merge a run into a standalone checkpoint at ``out``; the CLI's work, returned as a dict.

    Args:
        run: the run directory.
        out: the output directory (absent, empty, or ``overwrite``).
        dtype: float32 | bfloat16 | float16, the saved weights' dtype.
        check: reload ``out`` and compare logits with the unmerged model.
        overwrite: replace a non-empty ``out``.
        base: QLoRA runs: ``trained`` (de-quantized base, default) or ``original`` (see :func:`merged_model`).

    Returns:
        What ``out/merge.json`` holds: run, kind, method, dtype, ``base_weights``, ``size_bytes`` and, with
        ``check``, ``merge_max_abs_diff`` / ``merge_tolerance`` (stage 1), ``max_abs_diff`` / ``tolerance``
        (stage 2), ``adapter_effect``, ``passed``; for QLoRA also ``max_abs_diff_vs_quantized_adapter`` (checked
        against ``quantized_adapter_tolerance`` with ``base=trained``) and ``original_w_merge_max_abs_diff``
        (how far the ``W + BA`` merge is from the model as trained).

    Raises:
        FinetuneError: bad arguments, run or out directory.
        MergeCheckError: the check failed (the checkpoint is still written, for inspection).
    """
    from finetune.runs import run_config, run_kind

    as_choice("dtype", dtype, tuple(DTYPES))
    path, cfg = run_config(run)
    kind = run_kind(path)
    target = prepare_out_dir(out, overwrite, path, "finetune-merge")
    as_choice("base", base, BASES)
    quant_ref, dequantized, original, quant_base = None, None, None, None
    if kind == "adapter" and cfg.quantization.mode != "none":
        # The QLoRA model as trained, before the fp32 model: one model in memory at a time.
        quant_ref, dequantized, quant_base = quantized_adapter(path)
        if check:
            original = original_w_logits(path) if base == "trained" else None
    model, tok, cfg, path, info = merged_model(path, reference=check, base=base, dequantized=dequantized)
    info["original_w_logits"] = original
    info["quantized_base_logits"] = quant_base
    # 4-bit layers keep their standard layout and compute in the run's precision (load.keep_4bit_layout)
    info["reference_precision"] = _run_precision(cfg)
    if info["note"]:
        print(info["note"] + (f", saved at {dtype}." if kind == "model" else "."))
    # Built beside ``out`` and renamed into place when complete: an earlier output is replaced only then.
    stage = staging_dir(target)
    try:
        model.to(DTYPES[dtype])
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        del model
        result = {"run": str(path), "kind": kind, "method": _method(cfg),
                  "base_quantization": info["base_quantization"], "base_weights": info["base_weights"],
                  "dtype": dtype, "out": str(target),
                  "size_bytes": dir_size_bytes(stage)}
        print(f"wrote {target} ({dtype}, {result['size_bytes'] / 2**20:.1f} MiB of weights)")
        if check:
            result.update(_check(stage, tok, dtype, info, quant_ref, kind))
        (stage / "merge.json").write_text(json.dumps(result, indent=2) + "\n")
        commit_dir(stage, target, "finetune-merge", {"run": str(path)})
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    if check and not result["passed"]:
        raise MergeCheckError(f"merge check failed: {result['failed']}; the checkpoint in {target} is not trustworthy")
    return result


def _check(target: Path, tok, dtype: str, info: dict, quant_ref: list | None, kind: str) -> dict:
    """The two-stage logit check (module docstring); prints one line per stage and returns the figures."""
    from transformers import AutoModelForCausalLM

    ref = info["reference_logits"]
    against = "the adapter model" if kind == "adapter" else "the run's model"
    if quant_ref is not None:
        against = ("the adapter on the de-quantized base" if info["base_weights"] == "dequantized"
                   else "the adapter on the original full-precision base")
    n = len(CHECK_PROMPTS)
    merge_diff, scale = max_abs_diff(ref, info["merged_logits"])
    merge_tol = MERGE_RTOL * scale
    print(f"check 1 (merge, float32): max |logit difference| = {merge_diff:.3g} vs {against} on {n} fixed prompts "
          f"(tolerance {merge_tol:.3g} = {MERGE_RTOL:g} x logit scale {scale:.3g})")
    out = {"compared_with": against + " in float32", "prompts": n, "logit_scale": scale,
           "merge_max_abs_diff": merge_diff, "merge_tolerance": merge_tol}
    if "base_logits" in info:
        effect, _ = max_abs_diff(ref, info["base_logits"])
        out["adapter_effect"] = effect
        print(f"         the adapter itself moves the logits by up to {effect:.3g} (what a missing merge would show)")
        if effect <= 10 * merge_tol:
            log.warning("the adapter barely changes the logits (%.3g): the merge check cannot tell a merged model "
                        "from the base", effect)
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=DTYPES[dtype]).eval()
    got = prompt_logits(reloaded, tok)
    del reloaded
    diff, _ = max_abs_diff(ref, got)
    tol = RTOL[dtype] * scale
    print(f"check 2 (written checkpoint, plain transformers, {dtype}): max |logit difference| = {diff:.3g} "
          f"(tolerance {tol:.3g} = {RTOL[dtype]:g} x logit scale)")
    out.update(max_abs_diff=diff, tolerance=tol, rtol=RTOL[dtype], merge_rtol=MERGE_RTOL)
    failed = _check_quantized(info, quant_ref, scale, out) if quant_ref is not None else []
    if merge_diff > merge_tol:
        failed.append(f"merged vs adapter (float32) {merge_diff:.3g} > {merge_tol:.3g}")
    if diff > tol:
        failed.append(f"written checkpoint ({dtype}) {diff:.3g} > {tol:.3g}")
    out["passed"] = not failed
    if failed:
        out["failed"] = "; ".join(failed)
    return out


def _check_quantized(info: dict, quant_ref: list, scale: float, out: dict) -> list[str]:
    """Check 3 of a QLoRA run (module docstring): the merged model against the model as trained, on the
    quantized base; records its figures in ``out`` and returns the failures."""
    failed: list[str] = []
    # The merged model vs the QLoRA model as trained (bitsandbytes kernels, in the precision they compute in).
    qdiff, _ = max_abs_diff(quant_ref, info["merged_logits"])
    out["max_abs_diff_vs_quantized_adapter"] = qdiff
    mode = info["base_quantization"]
    if info["base_weights"] == "dequantized":
        qrtol = QUANT_RTOL[info["reference_precision"]]
        qtol = qrtol * scale
        kernel_note = ""
        if mode == "int8" and info.get("quantized_base_logits") is not None and "base_logits" in info:
            kernel, _ = max_abs_diff(info["quantized_base_logits"], info["base_logits"])
            qtol += INT8_KERNEL_FACTOR * kernel
            out["int8_kernel_distance"] = kernel
            kernel_note = (f" + {INT8_KERNEL_FACTOR:g} x {kernel:.3g}, the int8 base's own distance from its "
                           "de-quantized weights without the adapter: LLM.int8() quantizes activations too, "
                           "which no float checkpoint reproduces")
        out.update(quantized_adapter_tolerance=qtol, quantized_adapter_rtol=qrtol,
                   quantized_adapter_precision=info["reference_precision"])
        print(f"check 3 (the model as trained): max |logit difference| = {qdiff:.3g} vs the adapter on the "
              f"{mode}-quantized base (tolerance {qtol:.3g} = {qrtol:g} x logit scale{kernel_note}, "
              f"{info['reference_precision']} compute)")
        if qdiff > qtol:
            failed.append(f"merged vs the adapter on the {mode} base {qdiff:.3g} > {qtol:.3g}")
    else:
        print(f"note: base=original: vs the adapter on the {mode}-quantized base as trained the max |logit "
              f"difference| is {qdiff:.3g} (the base's quantization error)")
    if info.get("original_w_logits") is not None:
        odiff, _ = max_abs_diff(quant_ref, info["original_w_logits"])
        out["original_w_merge_max_abs_diff"] = odiff
        print(f"note: merging into the original full-precision weights instead (base=original) would be "
              f"{odiff:.3g} away from the model as trained")
    return failed


def _run_precision(cfg) -> str:
    from finetune.model.load import resolve_precision

    return resolve_precision(cfg.trainer.precision, cfg.model.dtype, full_finetune=cfg.lora.method == "none").name


def _method(cfg) -> str:
    from finetune.config import method_name

    return method_name(cfg)
