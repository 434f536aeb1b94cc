"""Scoring under simulated INT8 inference: what a QAT run keeps, and what post-training quantization loses.

A QAT run is scored with INT8 activations on its own targets and per-channel INT8 weights of their linear
layers (``accuracy_int8`` / ``f1_int8`` or ``perplexity_int8``). A run without QAT scored the same way is
post-training quantization (PTQ), the baseline QAT must beat; with ``qat.eval_int8=true`` it is scored for
each target set a QAT run can choose (attn, ffn, attn+ffn), so every QAT row has a PTQ row to compare with.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from finetune.data import DataSplits, tokenize_split
from finetune.evaluate import classify, loss_and_perplexity

log = logging.getLogger("finetune.int8_eval")

PTQ_TARGET_SETS = (("attn",), ("ffn",), ("attn", "ffn"))


def _score(model, tok, splits: DataSplits, dcfg: DictConfig, max_len: int, bs: int, bf16: bool) -> dict:
    if dcfg.task == "classification":
        out = classify(model, tok, splits.test, dcfg, max_len, bs, bf16)
        return {"accuracy_int8": out["accuracy"], "f1_int8": out["f1"]}
    rows = splits.test or splits.validation
    lp = loss_and_perplexity(model, tokenize_split(rows, dcfg, tok, max_len), tok.pad_token_id, bs, bf16)
    return {"loss_int8": lp["eval_loss"], "perplexity_int8": lp["perplexity"]}


def int8_metrics(model, tok, splits: DataSplits, dcfg: DictConfig, qcfg: DictConfig, targets: list[str], handle,
                 max_len: int, bs: int, bf16: bool) -> dict:
    """Simulated-INT8 scores of a trained model.

    Returns:
        For a QAT run: ``accuracy_int8`` / ``f1_int8`` (or ``perplexity_int8``) on its own targets.
        Without QAT (PTQ): the same keys for attn+ffn, plus ``accuracy_int8_attn`` / ``..._ffn`` etc. for the
        single-target sets, and ``int8_eval: "ptq"``.
    """
    from finetune.qat import simulate_int8

    bits = int(qcfg.get("eval_bits") or 8)
    if targets:
        with simulate_int8(model, targets, qcfg, handle=handle):
            scores = _score(model, tok, splits, dcfg, max_len, bs, bf16)
        _log("QAT", targets, scores, bits)
        return {**scores, "int8_eval": "qat", "int8_targets": list(targets), "int8_eval_bits": bits}
    result: dict = {"int8_eval": "ptq", "int8_targets": ["attn", "ffn"], "int8_eval_bits": bits}
    for target_set in PTQ_TARGET_SETS:
        with simulate_int8(model, list(target_set), qcfg):
            scores = _score(model, tok, splits, dcfg, max_len, bs, bf16)
        _log("PTQ", target_set, scores, bits)
        if len(target_set) == 2:
            result.update(scores)
        else:
            result.update({f"{k}_{target_set[0]}": v for k, v in scores.items()})
    return result


def _log(kind: str, targets, scores: dict, bits: int = 8) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    log.info("simulated deployment, %d-bit activations / INT8 weights (%s on %s): %s", bits, kind, "+".join(targets),
             shown)
